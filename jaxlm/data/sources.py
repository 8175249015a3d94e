"""Where rows come from: local files, the Hugging Face Hub or TFDS, read as (where, row) records.

A source spec is one string: a local path, glob or directory, `hf:NAME`, `tfds:NAME` (or
`tfds:/path/to/name/1.0.0`), or `embedded` (the shipped Jane Austen corpus), optionally
followed by `?key=value&...` (so globs use * and [...], not ?):
  weight=   mixture weight (data.sources without weights mix in proportion to their rows)
  split=    hub / TFDS split (default train); config=, revision= (hub); data_dir= (TFDS)
  FIELD=COLUMN  read a format field from another column, e.g. `?text=content`.

Line files (.jsonl/.ndjson, .txt/.md, each optionally .gz) are read here byte by byte rather
than through datasets' json/text builders: those abort the whole file at the first undecodable
byte or bad JSON line (and ignore `encoding` for compressed files), so they can neither count
nor locate malformed rows. Columnar files (.parquet, .csv, .tsv, .json) and hub datasets come
through `datasets.load_dataset`; TFDS datasets through `tfds.data_source` over array_record
(no TensorFlow needed).
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import itertools
import json
import math
from pathlib import Path
from typing import Iterator, NamedTuple
from urllib.parse import parse_qsl

from jaxlm.data.text import EMBEDDED_CORPUS

LINE_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".txt": "text", ".md": "text"}
DATASETS_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".json": "json"}
OPTIONS = ("weight", "split", "config", "revision", "data_dir")
TEXT_UNITS = ("line", "paragraph", "document")


class DataError(ValueError):
  """Bad data or data settings; the message names the fix."""


class Record(NamedTuple):
  where: str  # "file:line" or the row's address in a dataset, for problem reports
  row: dict | None
  problem: str | None  # why the row could not be read; row is None then


@dataclasses.dataclass(frozen=True)
class Source:
  spec: str
  kind: str  # files | hf | tfds
  target: str
  weight: float | None
  options: dict
  renames: dict  # format field -> column it is read from

  def files(self) -> list[Path]:
    """The local files, in a fixed order."""
    target = Path(self.target).expanduser()
    if target.is_dir():
      found = [p for p in sorted(target.rglob("*")) if p.is_file() and _kind(p)]
    elif any(c in self.target for c in "*["):  # "?" starts the options instead
      found = [Path(p) for p in sorted(glob.glob(str(target), recursive=True))]
    else:
      found = [target] if target.is_file() else []
    if not found:
      raise DataError(f"Source {self.spec!r} matches no files. Give a file, a directory or a "
                      f"glob of {', '.join(sorted({**LINE_SUFFIXES, **DATASETS_BUILDERS}))} "
                      f"files (line files may be .gz).")
    for path in found:
      if not _kind(path):
        raise DataError(f"{path}: unsupported file type; use one of "
                        f"{', '.join(sorted({**LINE_SUFFIXES, **DATASETS_BUILDERS}))}.")
    return found


def parse_source(spec: str) -> Source:
  body, _, query = spec.partition("?")
  try:
    params = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
  except ValueError:
    raise DataError(f"Source {spec!r}: options after '?' must be key=value pairs joined by "
                    f"'&'.") from None
  options = {k: params.pop(k) for k in OPTIONS if k in params}
  weight = None
  if "weight" in options:
    try:
      weight = float(options.pop("weight"))
    except ValueError:
      weight = -1.0
    if not (math.isfinite(weight) and weight >= 0):
      raise DataError(f"Source {spec!r}: weight must be a number >= 0.")
  if body == "embedded":
    kind, target = "files", str(EMBEDDED_CORPUS)
  elif body.startswith(("hf:", "tfds:")):
    kind, _, target = body.partition(":")
  else:
    kind, target = "files", body
  return Source(spec, kind, target, weight, options, params)


def read_records(source: Source, text_unit: str = "document") -> Iterator[Record]:
  """Every row of the source, in a fixed order, with renamed fields applied."""
  if source.kind == "files":
    records = (r for path in source.files() for r in _read_file(path, text_unit))
  elif source.kind == "hf":
    records = _read_hub(source)
  else:
    records = _read_tfds(source)
  for record in records:
    if record.row is not None and source.renames:
      row = dict(record.row)
      for field, column in source.renames.items():
        if column in row:
          row[field] = row.pop(column)
      record = record._replace(row=row)
    yield record


def fingerprint(source: Source) -> list[str]:
  """What identifies the source's content: file paths and bytes, the hub commit, or the TFDS
  dataset info (name, version, shard sizes)."""
  if source.kind == "files":
    parts = []
    for path in source.files():
      digest = hashlib.sha256()
      with open(path, "rb") as f:
        while block := f.read(1 << 22):
          digest.update(block)
      parts.append(f"{path.resolve()}:{digest.hexdigest()}")
    return parts
  if source.kind == "hf":
    return [source.target, source.options.get("config", ""), source.options.get("split", "train"),
            _hub_revision(source)]
  info = _tfds_source(source).dataset_info
  return [source.options.get("split", "train"), json.dumps(json.loads(info.as_json),
                                                           sort_keys=True)]


def _kind(path: Path) -> str | None:
  """jsonl, text, or the datasets builder for the file; None if unsupported."""
  compressed = path.suffix == ".gz"  # line files only: read here, decompressed on the fly
  suffix = Path(path.stem).suffix if compressed else path.suffix
  if suffix in LINE_SUFFIXES:
    return LINE_SUFFIXES[suffix]
  return None if compressed else DATASETS_BUILDERS.get(suffix)


def _read_file(path: Path, text_unit: str) -> Iterator[Record]:
  kind = _kind(path)
  if kind == "jsonl":
    yield from _read_jsonl(path)
  elif kind == "text":
    yield from _read_text(path, text_unit)
  else:
    yield from _read_with_datasets(path, kind)


def _open_bytes(path: Path):
  return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _decode(raw: bytes) -> tuple[str | None, str | None]:
  try:
    return raw.decode("utf-8"), None
  except UnicodeDecodeError as e:
    return None, f"not UTF-8 (byte {raw[e.start:e.start + 1]!r} at offset {e.start})"


def _read_jsonl(path: Path) -> Iterator[Record]:
  with _open_bytes(path) as f:
    for line_no, raw in enumerate(f, 1):
      where = f"{path}:{line_no}"
      if not raw.strip():
        continue
      text, problem = _decode(raw)
      if problem:
        yield Record(where, None, problem)
        continue
      try:
        row = json.loads(text)
      except json.JSONDecodeError as e:
        yield Record(where, None, f"invalid JSON ({e.msg} at column {e.colno})")
        continue
      if not isinstance(row, dict):
        yield Record(where, None, f"expected a JSON object, got {type(row).__name__}")
        continue
      yield Record(where, row, None)


def _read_text(path: Path, unit: str) -> Iterator[Record]:
  """unit: "line" (each non-blank line), "paragraph" (blank-line separated) or "document"
  (the whole file); a unit holding bytes that are not UTF-8 is reported at their line."""
  with _open_bytes(path) as f:
    lines = ((line_no, *_decode(raw)) for line_no, raw in enumerate(f, 1))
    if unit == "line":
      units = ([line] for line in lines)
    elif unit == "paragraph":
      units = (list(group) for blank, group in itertools.groupby(lines, key=_is_blank)
               if not blank)
    else:
      units = [list(lines)]
    for lines_of_unit in units:
      bad = next(((n, problem) for n, _, problem in lines_of_unit if problem), None)
      if bad:
        yield Record(f"{path}:{bad[0]}", None, bad[1])
        continue
      text = "".join(text for _, text, _ in lines_of_unit).rstrip("\r\n")
      if text.strip():
        yield Record(f"{path}:{lines_of_unit[0][0]}", {"text": text}, None)


def _is_blank(line: tuple) -> bool:
  _, text, problem = line
  return problem is None and not text.strip()


def _read_with_datasets(path: Path, builder: str) -> Iterator[Record]:
  import datasets
  kwargs = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
  try:
    rows = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True,
                                 **kwargs)
    for index, row in enumerate(rows, 1):
      yield Record(f"{path}:row {index}", row, None)
  except (datasets.exceptions.DatasetGenerationError, ValueError, OSError) as e:
    raise DataError(f"{path}: datasets' {builder} reader cannot read this file "
                    f"({type(e).__name__}: {e}). Fix the file, or convert it to JSON lines so "
                    f"bad rows can be located and skipped.") from e


def _hub_error(source: Source, error: Exception) -> DataError:
  return DataError(
      f"Cannot load Hugging Face dataset {source.target!r} ({type(error).__name__}: {error}). "
      f"Without access to the Hub, download it elsewhere and pass local files instead, e.g. "
      f"data.sources=('/data/train-*.parquet',).")


def _hub_revision(source: Source) -> str:
  """The commit the dataset is read at, so the cache follows the dataset's content."""
  import huggingface_hub
  try:
    return huggingface_hub.HfApi().dataset_info(
        source.target, revision=source.options.get("revision")).sha
  except Exception as e:  # offline mode, no network, unknown name: all mean "pass local files"
    raise _hub_error(source, e) from e


def _read_hub(source: Source) -> Iterator[Record]:
  import datasets
  split = source.options.get("split", "train")
  try:
    rows = datasets.load_dataset(source.target, source.options.get("config"), split=split,
                                 revision=_hub_revision(source), streaming=True)
  except Exception as e:  # as above
    raise _hub_error(source, e) from e
  for index, row in enumerate(rows):
    yield Record(f"hf:{source.target}[{split}]#{index}", row, None)


def _tfds_source(source: Source):
  import tensorflow_datasets as tfds
  split = source.options.get("split", "train")
  try:
    if Path(source.target).expanduser().is_dir():
      return tfds.builder_from_directory(str(Path(source.target).expanduser())).as_data_source(
          split=split)
    return tfds.data_source(source.target, split=split, data_dir=source.options.get("data_dir"),
                            download=False)
  except Exception as e:  # tfds raises many types for "not prepared here"
    raise DataError(f"Cannot open TFDS dataset {source.target!r} split {split!r} as an "
                    f"array_record data source ({type(e).__name__}: {e}). Prepare it with "
                    f"file_format='array_record' and pass ?data_dir= or the dataset's version "
                    f"directory.") from e


def _read_tfds(source: Source) -> Iterator[Record]:
  import tensorflow_datasets as tfds
  data = _tfds_source(source)
  label_names = {name: feature.names for name, feature in data.dataset_info.features.items()
                 if isinstance(feature, tfds.features.ClassLabel)}
  split = source.options.get("split", "train")
  for index in range(len(data)):
    where = f"tfds:{source.target}[{split}]#{index}"
    row, problem = {}, None
    for name, value in data[index].items():
      if isinstance(value, bytes):
        value, problem = _decode(value)
      elif name in label_names:
        value = label_names[name][int(value)]
      elif hasattr(value, "tolist"):  # numpy scalars and arrays -> Python values
        value = value.tolist()
      row[name] = value
    yield Record(where, None, problem) if problem else Record(where, row, None)
