#!/usr/bin/env python3
"""Build the small demo corpus and byte-level BPE tokenizer shipped in ``jaxlm/assets``.

Data source
-----------
The text is Jane Austen's six completed novels as packaged by the R package
``janeaustenr`` (https://github.com/juliasilge/janeaustenr), taken from the
Debian package ``r-cran-janeaustenr``. The novels themselves are in the public
domain (Austen died in 1817; the transcriptions derive from Project Gutenberg
texts). The ``janeaustenr`` packaging is MIT-licensed (Copyright 2016-2017
Julia Silge; Debian packaging Copyright 2021 Andreas Tille).

The .deb is fetched with ``apt-get download`` and unpacked with
``dpkg-deb -x``; R itself is never installed. The novels live in the package's
lazy-load data database (``data/Rdata.rdx`` + ``data/Rdata.rdb``), which is
decoded here with the PyPI package ``rdata``. ``rdata`` is needed only to run
this script; it is not a runtime dependency of jaxlm.

Outputs (in ``--out-dir``, default ``jaxlm/assets``)
-----------------------------------------------------
``austen.jsonl.gz``
    gzip'ed JSON lines, one record per novel, in janeaustenr's order:
    ``{"title": "Pride & Prejudice", "text": "..."}``. ``text`` is the novel's
    lines joined with ``"\\n"``; blank lines are kept so paragraphs survive.
``tokenizer.json``
    A ``tokenizers`` byte-level BPE tokenizer trained on that text
    (ByteLevel pre-tokenizer without prefix space, ByteLevel decoder and
    post-processor, special token ``<|endoftext|>`` with id 0).

Both files are written deterministically (the gzip header carries no
timestamp or file name), so re-running the script reproduces them byte for byte.

Usage::

    pip install rdata            # build-time only
    python tools/build_demo_assets.py                   # downloads the .deb
    python tools/build_demo_assets.py --deb-root /tmp/ja  # already extracted
"""

from __future__ import annotations

import argparse
import bz2
import glob
import gzip
import json
import lzma
import struct
import subprocess
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

DEB_PACKAGE = "r-cran-janeaustenr"
DATA_SUBDIR = "usr/lib/R/site-library/janeaustenr/data"

# R object name -> title, in the order janeaustenr::austen_books() uses.
NOVELS = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}

EOT = "<|endoftext|>"
REPO_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------
# Step 1: get the package and read the R data
# ---------------------------------------------------------------------------


def download_and_extract(workdir: Path) -> Path:
    """``apt-get download`` the .deb into ``workdir`` and unpack it; return the root."""
    subprocess.run(["apt-get", "download", DEB_PACKAGE], cwd=workdir, check=True)
    debs = sorted(glob.glob(str(workdir / f"{DEB_PACKAGE}_*.deb")))
    if not debs:
        raise FileNotFoundError(f"apt-get download produced no {DEB_PACKAGE}_*.deb")
    return extract_deb(Path(debs[-1]), workdir / "root")


def extract_deb(deb: Path, dest: Path) -> Path:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
    return dest


def _parse_r_object(raw: bytes):
    import rdata

    with warnings.catch_warnings():
        # rdata warns "Unknown file type: assumed RDS" for headerless payloads.
        warnings.simplefilter("ignore", UserWarning)
        parsed = rdata.parser.parse_data(raw)
    return rdata.conversion.convert(parsed)


def _decompress_rdb_record(record: bytes, compressed) -> bytes:
    """Decode one record of an R lazy-load database (R's lazyLoadDBfetch).

    Each record is a big-endian uint32 uncompressed length followed by the
    payload. With ``compressed`` TRUE (zlib, what janeaustenr uses) the payload
    is a bare zlib stream; with 2 or 3 (bzip2/xz) it starts with a one-byte
    method tag: b"Z" xz, b"2" bzip2, b"1" zlib, b"0" stored.
    """
    (length,) = struct.unpack(">I", record[:4])
    body = record[4:]
    if compressed in (True, 1):
        raw = zlib.decompress(body)
    elif compressed in (2, 3):
        methods = {b"Z": lzma.decompress, b"2": bz2.decompress,
                   b"1": zlib.decompress, b"0": bytes}
        raw = methods[body[:1]](body[1:])
    else:
        raise ValueError(f"unsupported lazy-load compression {compressed!r}")
    if len(raw) != length:
        raise ValueError(f"record length mismatch: header {length}, got {len(raw)}")
    return raw


def read_novels(deb_root: Path) -> list[dict[str, str]]:
    """Return ``[{"title": ..., "text": ...}, ...]`` from an extracted .deb tree."""
    import rdata

    data_dir = deb_root / DATA_SUBDIR
    index = rdata.read_rds(data_dir / "Rdata.rdx")  # gzip'ed serialized list
    variables = {str(k): v for k, v in index["variables"].items()}
    compressed = index["compressed"]
    compressed = compressed.item() if hasattr(compressed, "item") else compressed[0]
    blob = (data_dir / "Rdata.rdb").read_bytes()

    records = []
    for name, title in NOVELS.items():
        offset, size = (int(x) for x in variables[name])
        raw = _decompress_rdb_record(blob[offset : offset + size], compressed)
        lines = _parse_r_object(raw).tolist()
        if not all(isinstance(line, str) for line in lines):
            raise ValueError(f"{name}: expected a character vector without NAs")
        records.append({"title": title, "text": "\n".join(lines)})
    return records


# ---------------------------------------------------------------------------
# Step 2: write the corpus
# ---------------------------------------------------------------------------


def write_corpus(records: list[dict[str, str]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with open(path, "wb") as f:
        # mtime=0 and an empty filename keep the gzip header reproducible.
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=9, mtime=0) as gz:
            gz.write(payload.encode("utf-8"))


# ---------------------------------------------------------------------------
# Step 3: train the tokenizer
# ---------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],  # first special token -> id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.token_to_id(EOT) != 0:
        raise AssertionError(f"{EOT} should have id 0, got {tok.token_to_id(EOT)}")
    return tok


def check_and_report(tok, records: list[dict[str, str]]) -> None:
    sample = records[1]["text"][:2000]  # opening of Pride & Prejudice
    if tok.decode(tok.encode(sample).ids) != sample:
        raise AssertionError("tokenizer round-trip failed on sample paragraph")
    n_chars = n_tokens = 0
    for r in records:
        ids = tok.encode(r["text"]).ids
        if tok.decode(ids) != r["text"]:
            raise AssertionError(f"tokenizer round-trip failed on {r['title']}")
        n_chars += len(r["text"])
        n_tokens += len(ids)
        print(f"  {r['title']:<20} {len(r['text']):>9,} chars {len(ids):>9,} tokens")
    print(f"  {'total':<20} {n_chars:>9,} chars {n_tokens:>9,} tokens "
          f"({n_chars / n_tokens:.3f} chars/token, vocab {tok.get_vocab_size()})")


# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build jaxlm's demo Jane Austen corpus and byte-level BPE tokenizer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--deb-root", type=Path,
                     help=f"directory where {DEB_PACKAGE}'s .deb was extracted (dpkg-deb -x)")
    src.add_argument("--deb", type=Path, help=f"path to a downloaded {DEB_PACKAGE}_*.deb")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "jaxlm" / "assets",
                        help="where to write austen.jsonl.gz and tokenizer.json")
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.deb_root is not None:
            deb_root = args.deb_root
        elif args.deb is not None:
            deb_root = extract_deb(args.deb, tmp / "root")
        else:
            deb_root = download_and_extract(tmp)
        records = read_novels(deb_root)

    corpus_path = args.out_dir / "austen.jsonl.gz"
    write_corpus(records, corpus_path)
    print(f"wrote {corpus_path} ({corpus_path.stat().st_size:,} bytes, {len(records)} novels)")

    tok = train_tokenizer([r["text"] for r in records], args.vocab_size)
    tok_path = args.out_dir / "tokenizer.json"
    tok.save(str(tok_path))
    print(f"wrote {tok_path} ({tok_path.stat().st_size:,} bytes)")
    check_and_report(tok, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
