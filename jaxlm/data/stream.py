"""A token stream cut into fixed windows, served as deterministic, resumable global batches.

Batch k of a run is a pure function of (seed, k): windows are shuffled per epoch by
seed + epoch and the global batch is sliced per process, so a resumed run, or one with a
different number of processes, sees exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from jaxlm.data.text import corpus_path, end_of_text_id, load_tokenizer, read_documents

log = logging.getLogger(__name__)


def tokenize_corpus(corpus: str, tokenizer_spec: str, cache_dir: str) -> np.ndarray:
  """Documents joined by end-of-text tokens, tokenized once and cached by a fingerprint of
  the corpus bytes and the tokenizer."""
  tokenizer = load_tokenizer(tokenizer_spec)
  digest = hashlib.sha256()
  digest.update(corpus_path(corpus).read_bytes())
  digest.update(tokenizer.to_str().encode())
  cache = Path(cache_dir).expanduser() / f"tokens-{digest.hexdigest()[:20]}.npy"
  if cache.is_file():
    return np.load(cache, mmap_mode="r")
  eos = end_of_text_id(tokenizer)
  encoded = tokenizer.encode_batch(read_documents(corpus), add_special_tokens=False)
  dtype = np.uint16 if tokenizer.get_vocab_size() <= np.iinfo(np.uint16).max else np.int32
  pieces = []
  for enc in encoded:
    pieces.append(np.asarray(enc.ids, dtype))
    pieces.append(np.asarray([eos], dtype))
  tokens = np.concatenate(pieces)
  cache.parent.mkdir(parents=True, exist_ok=True)
  tmp = cache.with_suffix(f".{os.getpid()}.tmp.npy")
  np.save(tmp, tokens)
  os.replace(tmp, cache)  # atomic: a concurrent reader never sees half a file
  return tokens


class WindowBatches:
  """Serves {"input_ids", "targets", "loss_mask"} rows of this process's slice of each global
  batch; `state()` / `restore()` carry the position through checkpoints."""

  def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int, *, seed: int,
               process_index: int = 0, process_count: int = 1, shuffle: bool = True):
    if global_batch % process_count:
      raise ValueError(f"Global batch {global_batch} is not divisible by the {process_count} "
                       f"processes; choose a multiple of {process_count}.")
    self.tokens = tokens
    self.seq_len = seq_len
    self.global_batch = global_batch
    self.seed = seed
    self.shuffle = shuffle
    self.num_windows = (len(tokens) - 1) // seq_len
    self.batches_per_epoch = self.num_windows // global_batch
    if self.batches_per_epoch == 0:
      raise ValueError(
          f"The corpus ({len(tokens)} tokens, {self.num_windows} windows of {seq_len}) is "
          f"too small for one batch of {global_batch}; lower data.batch_size or data.seq_len.")
    local = global_batch // process_count
    self.rows = slice(process_index * local, (process_index + 1) * local)
    self.position = 0
    self._order = (None, None)

  def state(self) -> dict:
    return {"position": self.position, "seed": self.seed}

  def restore(self, state: dict) -> None:
    if state.get("seed", self.seed) != self.seed:
      raise ValueError(f"Checkpointed data seed {state['seed']} differs from data.seed "
                       f"{self.seed}; resume with the same seed or start a new workdir.")
    self.position = int(state["position"])

  def _epoch_order(self, epoch: int) -> np.ndarray:
    if self._order[0] != epoch:
      order = np.arange(self.num_windows)
      if self.shuffle:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
      self._order = (epoch, order)
    return self._order[1]

  def batch(self, k: int) -> dict[str, np.ndarray]:
    epoch, index = divmod(k, self.batches_per_epoch)
    order = self._epoch_order(epoch)
    windows = order[index * self.global_batch:(index + 1) * self.global_batch][self.rows]
    starts = windows * self.seq_len
    rows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int32)
    return {"input_ids": rows[:, :-1], "targets": rows[:, 1:],
            "loss_mask": np.ones_like(rows[:, 1:])}

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.batch(self.position)
    self.position += 1
    return batch


def split_stream(tokens: np.ndarray, validation_fraction: float):
  """The validation part is the tail of the stream, so no window is shared."""
  cut = int(len(tokens) * (1.0 - validation_fraction))
  return tokens[:cut], tokens[cut:]
