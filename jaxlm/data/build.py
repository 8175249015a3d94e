"""Sources -> cached rows: read, format, clean, drop exact duplicates, tokenize, cut, split, pack.

Duplicates are dropped across all sources before the split, and the split is decided by a
seeded hash of the content, so no validation text also appears in training. Examples are
tokenized and shaped in chunks, streaming into the cache, so memory stays bounded by the
chunk (plus a 16-byte digest per distinct example, for duplicate detection).
"""
from __future__ import annotations

import collections
import logging
from pathlib import Path

import numpy as np

from jaxlm.data import cache
from jaxlm.data.budget import Problems, enforce
from jaxlm.data.clean import content_digest, is_validation
from jaxlm.data.formats import Example, Formatter, RowError
from jaxlm.data.shaping import Pieces, cut_pieces, pack_rows
from jaxlm.data.sources import Source, fingerprint, read_records
from jaxlm.data.tokens import TextTokenizer

log = logging.getLogger(__name__)

CHUNK = 4096  # examples tokenized and shaped together
CONTENT_SETTINGS = ("format", "shaping", "overflow", "stride", "text_unit", "labels",
                    "prompt_template", "strip_html", "min_chars", "dedupe", "validation_fraction",
                    "label_head", "word_separator")


def _describe(source: Source) -> dict:
  """The source as the cache sees it: the mixture weight is applied when loading, not here."""
  return {"kind": source.kind, "target": source.target, "options": source.options,
          "renames": source.renames}


def cache_key(sources: list[Source], tok: TextTokenizer, settings: dict, seq_len: int,
              seed: int) -> str:
  return cache.fingerprint({
      "sources": [{**_describe(s), "content": fingerprint(s)} for s in sources],
      "tokenizer": tok.fingerprint(),
      "chat_template": tok.template() if settings["format"] == "chat" else "",
      # Only when on, so that the caches built before the setting existed stay valid.
      "settings": {**{k: settings[k] for k in CONTENT_SETTINGS},
                   **{k: True for k in ("add_special_tokens", "regression") if settings.get(k)}},
      "seq_len": seq_len, "seed": seed})


def prepare_rows(sources: list[Source], tok: TextTokenizer, settings: dict, seq_len: int,
                 seed: int) -> tuple[Path, dict, bool]:
  """The cache directory holding these sources' rows (built now if absent), its metadata,
  and whether this call built it."""
  key = cache_key(sources, tok, settings, seq_len, seed)
  directory, meta, built = cache.cached_build(
      settings["cache_dir"], key, lambda out: _build(out, sources, tok, settings, seq_len, seed))
  if not built:
    enforce(meta["problems"], settings["error_budget"])
  log.info("Data rows in %s (%s): %s", directory, "built" if built else "reused", meta["stats"])
  return directory, meta, built


def tokenize_examples(examples: list[Example], tok: TextTokenizer):
  """(ids, trained flag per token) of each example."""
  return [(ids, flags) for ids, flags, _ in _tokenize(examples, tok)]


def _tokenize(examples: list[Example], tok: TextTokenizer):
  """(ids, trained flag per token, tag per token or None) of each example. A tagging
  example's word carries its tag on its first sub-word token and -1 (no target) on the rest,
  so each word is predicted once."""
  encoded = iter(tok.encode([text for e in examples for text, _ in e.parts]))
  before, after = tok.wrap
  out = []
  for example in examples:
    ids = [next(encoded) for _ in example.parts]
    flags = [np.full(len(i), trained) for i, (_, trained) in zip(ids, example.parts)]
    tags = None
    if example.tags is not None:
      tags = [np.full(len(i), -1, np.int64) for i in ids]
      for word_tags, tag in zip(tags, example.tags):
        word_tags[:1] = tag
    if len(before) or len(after):  # an encoder's [CLS] ... [SEP], never a target
      ids = [before, *ids, after]
      flags = [np.zeros(len(before), bool), *flags, np.zeros(len(after), bool)]
      if tags is not None:
        tags = [np.full(len(before), -1), *tags, np.full(len(after), -1)]
    if example.eos:
      ids.append(np.array([tok.eos_id], np.int32))
      flags.append(np.array([example.parts[-1][1]]))
      if tags is not None:
        tags.append(np.array([-1]))
    out.append((np.concatenate(ids), np.concatenate(flags),
                None if tags is None else np.concatenate(tags)))
  return out


def held_out(digest: bytes, window: int, seed: int, fraction: float) -> bool:
  """Whether window `window` of the example with this content digest is held out."""
  return is_validation(digest + int(window).to_bytes(4, "little"), seed, fraction)


def _split_of(pieces: Pieces, digests: list[bytes], seed: int, fraction: float,
              per_window: bool) -> np.ndarray:
  """Whether each piece is held out. Examples are split whole, except that the windows of a
  long example cut without overlap are split one by one (a corpus of a few long books still
  gets a validation set, and no text is on both sides)."""
  windows = pieces.window if per_window else np.zeros_like(pieces.window)
  return np.array([held_out(digests[e], w, seed, fraction)
                   for e, w in zip(pieces.example, windows)], bool)


def make_formatter(settings: dict, tok: TextTokenizer | None) -> Formatter:
  return Formatter(settings["format"], labels=settings["labels"],
                   prompt_template=settings["prompt_template"],
                   strip_html=settings["strip_html"], tokenizer=tok,
                   label_head=settings["label_head"],
                   regression=settings["regression"],
                   word_separator=settings["word_separator"])


def iter_examples(source: Source, settings: dict, formatter: Formatter, problems: Problems,
                  stats: collections.Counter, seen: set[bytes]):
  """(example, content digest) of each usable row of one source: malformed rows are counted
  in problems, short ones and (with data.dedupe) those whose digest is in `seen` in stats."""
  for record in read_records(source, settings["text_unit"]):
    problems.rows += 1
    if record.problem:
      problems.add(record.where, record.problem)
      continue
    try:
      example = formatter(record.row)
    except RowError as e:
      problems.add(record.where, str(e))
      continue
    if example.chars < settings["min_chars"]:
      stats["too_short"] += 1
      continue
    digest = content_digest(example.parts)
    if settings["dedupe"]:
      if digest in seen:
        stats["duplicates"] += 1
        continue
      seen.add(digest)
    stats["examples"] += 1
    yield example, digest


def _build(out: Path, sources: list[Source], tok: TextTokenizer, settings: dict, seq_len: int,
           seed: int) -> dict:
  formatter = make_formatter(settings, tok)
  problems = Problems()
  stats = collections.Counter()
  seen: set[bytes] = set()
  regression = settings["regression"]
  dtypes = cache.storage_dtypes(tok.vocab_size, seq_len, regression)
  per_window = settings["shaping"] == "stream" or (
      settings["overflow"] == "window" and settings["stride"] in (0, seq_len))
  described = []

  tagging = settings["format"] == "tagging"

  def flush(examples, digests, writers):
    labels = (np.array([e.label for e in examples], np.float32 if regression else np.int64)
              if settings["label_head"] and not tagging else None)
    encoded = _tokenize(examples, tok)
    # A stream runs an example's windows together again (shaping.stream_rows): cut without
    # overlap, they are only the unit of the train / validation split.
    overflow, stride = (("window", seq_len) if settings["shaping"] == "stream" else
                        (settings["overflow"], settings["stride"]))
    pieces, counts = cut_pieces([(ids, flags) for ids, flags, _ in encoded], seq_len,
                                overflow=overflow, stride=stride,
                                labels=labels,
                                tags=[tags for _, _, tags in encoded] if tagging else None)
    stats.update(counts)
    held_out = _split_of(pieces, digests, seed, settings["validation_fraction"], per_window)
    for split, mask in (("train", ~held_out), ("validation", held_out)):
      rows = pack_rows(pieces.select(mask), seq_len, settings["shaping"])
      writers[split].append(rows)
      stats[f"{split}_pieces"] += int(mask.sum())
      stats[f"{split}_rows"] += len(rows["input_ids"])
      stats[f"{split}_tokens"] += int(np.count_nonzero(rows["segment_ids"]))
      stats[f"{split}_loss_tokens"] += int(rows["loss_mask"].sum())

  for index, source in enumerate(sources):
    writers = {split: cache.RowWriter(out / split / str(index), dtypes) for split in cache.SPLITS}
    examples, digests = [], []
    for example, digest in iter_examples(source, settings, formatter, problems, stats, seen):
      examples.append(example)
      digests.append(digest)
      if len(examples) == CHUNK:
        flush(examples, digests, writers)
        examples, digests = [], []
    if examples:
      flush(examples, digests, writers)
    described.append({**_describe(source),
                      "rows": {split: writers[split].rows for split in cache.SPLITS}})
  enforce(problems.report(), settings["error_budget"])
  return {"seq_len": seq_len, "dtypes": dtypes, "sources": described, "stats": dict(stats),
          "problems": problems.report()}
