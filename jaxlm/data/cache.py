"""Tokenize-once cache: shaped rows as raw arrays in <cache_dir>/rows-<fingerprint>/, memory-mapped
by every run and process that asks for the same data.

The directory is named by a hash of everything the rows depend on (source paths and bytes,
tokenizer, chat template, settings, seq_len, seed, this format's version): changing any of them
names a new directory, so a stale cache is rebuilt, never read. A build writes into a private
temporary directory renamed into place when complete (atomic on one filesystem), so readers
see a whole cache or none and concurrent builders cannot corrupt each other; a lock file makes
processes on one machine wait for the first builder instead of repeating its work.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

from jaxlm.data.shaping import FIELDS

log = logging.getLogger(__name__)

VERSION = 1
SPLITS = ("train", "validation")


def fingerprint(inputs: dict) -> str:
  return hashlib.sha256(json.dumps({"version": VERSION, **inputs}, sort_keys=True).encode()
                        ).hexdigest()


def storage_dtypes(vocab_size: int, seq_len: int, regression: bool = False) -> dict[str, str]:
  """The narrowest dtypes that hold the values: half the disk and page cache of int32.
  Regression targets are float32 bit patterns (shaping.encode_scores): all 32 bits."""
  tokens = "uint16" if vocab_size <= 1 << 16 else "int32"
  places = "uint16" if seq_len < 1 << 16 else "int32"
  return {"input_ids": tokens, "targets": "int32" if regression else tokens,
          "loss_mask": "uint8", "positions": places, "segment_ids": places}


class RowWriter:
  """Appends rows of one (split, source) to raw per-field files."""

  def __init__(self, directory: Path, dtypes: dict[str, str]):
    directory.mkdir(parents=True, exist_ok=True)
    self.directory = directory
    self.dtypes = dtypes
    self.rows = 0

  def append(self, rows: dict[str, np.ndarray]) -> None:
    for field in FIELDS:
      with open(self.directory / f"{field}.bin", "ab") as f:
        f.write(np.ascontiguousarray(rows[field], self.dtypes[field]).tobytes())
    self.rows += len(rows[FIELDS[0]])


def _complete(directory: Path, key: str) -> dict | None:
  try:
    meta = json.loads((directory / "meta.json").read_text())
  except (OSError, json.JSONDecodeError):
    return None
  return meta if meta.get("fingerprint") == key else None


@contextlib.contextmanager
def _lock(path: Path):
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def cached_build(cache_dir: str | Path, key: str, build: Callable[[Path], dict]
                 ) -> tuple[Path, dict, bool]:
  """The cache directory for `key`, its metadata, and whether this call built it. build(tmp)
  writes the rows into tmp and returns their metadata."""
  cache_dir = Path(cache_dir).expanduser()
  cache_dir.mkdir(parents=True, exist_ok=True)
  final = cache_dir / f"rows-{key[:32]}"
  if (meta := _complete(final, key)) is not None:
    return final, meta, False
  with _lock(cache_dir / f"rows-{key[:32]}.lock"):
    if (meta := _complete(final, key)) is not None:
      return final, meta, False
    if final.exists():
      # Not written by a completed build (meta.json missing or for other inputs): keep it for
      # inspection, out of the way.
      aside = final.with_name(f"{final.name}.broken-{uuid.uuid4().hex[:8]}")
      log.warning("Cache %s is incomplete or inconsistent; moved to %s and rebuilt.", final, aside)
      os.rename(final, aside)
    tmp = cache_dir / f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
      meta = {**build(tmp), "fingerprint": key}
      (tmp / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False))
      os.rename(tmp, final)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
  return final, meta, True


def open_split(directory: Path, meta: dict, split: str) -> list[dict[str, np.ndarray]]:
  """Per source, read-only memory maps of the split's [rows, seq_len] arrays."""
  seq_len, parts = meta["seq_len"], []
  for index, source in enumerate(meta["sources"]):
    rows = source["rows"][split]
    fields = {}
    for field in FIELDS:
      dtype = meta["dtypes"][field]
      fields[field] = (np.memmap(directory / split / str(index) / f"{field}.bin", dtype, "r",
                                 shape=(rows, seq_len)) if rows else
                       np.zeros((0, seq_len), dtype))
    parts.append(fields)
  return parts
