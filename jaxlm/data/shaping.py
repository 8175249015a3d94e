"""Tokenized examples -> pieces of at most seq_len (input, target) pairs -> fixed-length rows of
input_ids, targets, loss_mask, positions and segment_ids.

An example of n tokens gives n - 1 pairs. One longer than a row is cut by data.overflow:
"window" (windows of seq_len pairs every `stride` pairs; pairs an earlier window already
trained on are context only, loss_mask 0, so every target is trained once), "truncate_left"
(keep the end: a long prompt loses its start, the completion stays), "truncate_right" (keep
the start) or "drop". Each piece is one segment: positions restart at 0 and segment_ids number
the pieces of a row 1, 2, ...; padding has segment 0 and loss_mask 0.

data.shaping "pack" fills rows best-fit with pieces taken longest first; "window" gives every
piece its own padded row; "stream" concatenates whole examples, in order, into one token
stream cut into rows of seq_len pairs, as GPT-style pretraining does: positions run on
through a row, every row is segment 1 (only the last row of a stream has padding), and a
document's first token is the target of the one before it, so the model attends across
documents (model.document_mask False).

With class labels (a classification head) every example is one piece, and its only target
is its label's index at its last pair: the last token the decoder reads, the one that has
seen the whole text (what transformers' *ForSequenceClassification pools). With tags (a token
classifier) every example is one piece too, and each token with a tag has it as the target
at its own position (what *ForTokenClassification predicts), not at the next token's.

A regression head's target sits where a class index would, but is a float32 score: the row
holds its bit pattern in the int32 `targets` (`encode_scores`; `decode_scores`, or
jax.lax.bitcast_convert_type in the train step, gives the score back, exactly). So rows stay
five int arrays: the cache, the loader, the batch shardings and gradient accumulation's split
serve regression rows unchanged, where a float field of its own would have to be threaded
through every one of them for the single target per example. The cache stores such targets
as int32 (cache.storage_dtypes), never narrower.
"""
from __future__ import annotations

import bisect
import collections
import dataclasses

import numpy as np

from jaxlm.data.sources import DataError

FIELDS = ("input_ids", "targets", "loss_mask", "positions", "segment_ids")
OVERFLOW = ("window", "truncate_left", "truncate_right", "drop")
SHAPING = ("pack", "window", "stream")


def encode_scores(scores) -> np.ndarray:
  """Regression scores -> the int32 targets that carry them: their float32 bit patterns."""
  return np.ascontiguousarray(scores, np.float32).view(np.int32)


def decode_scores(targets) -> np.ndarray:
  """The float32 scores that `encode_scores` put in targets (0 elsewhere decodes as 0.0)."""
  return np.ascontiguousarray(targets, np.int32).view(np.float32)


def check_shaping(shaping: str, overflow: str, stride: int, seq_len: int) -> None:
  if shaping not in SHAPING:
    raise DataError(f"data.shaping must be one of {', '.join(SHAPING)}, not {shaping!r}.")
  if overflow not in OVERFLOW:
    raise DataError(f"data.overflow must be one of {', '.join(OVERFLOW)}, not {overflow!r}.")
  if not 0 < stride <= seq_len:
    raise DataError(f"data.stride must be in 1..seq_len ({seq_len}), or 0 for seq_len; got "
                    f"{stride}.")


@dataclasses.dataclass
class Pieces:
  """Pieces of a list of examples, as parallel arrays over pieces."""
  ids: np.ndarray  # every example's tokens, concatenated
  trained: np.ndarray  # whether each token is a training target
  example: np.ndarray  # the example each piece comes from
  window: np.ndarray  # its number among its example's pieces
  start: np.ndarray  # index into ids of its first input token
  size: np.ndarray  # its number of pairs
  loss_from: np.ndarray  # its first pair with a loss
  # its example's class index (int), for a classification head; its score (float32), for a
  # regression head
  label: np.ndarray | None = None
  tags: np.ndarray | None = None  # a tag index per token of ids (-1: none), for a token classifier

  def select(self, mask: np.ndarray) -> "Pieces":
    fields = ("example", "window", "start", "size", "loss_from") + (
        () if self.label is None else ("label",))
    return dataclasses.replace(self, **{f: getattr(self, f)[mask] for f in fields})


def _cut(length: int, seq_len: int, overflow: str, stride: int):
  """(first pair, end pair, first pair with loss) of the pieces one example is cut into."""
  pairs = length - 1
  if pairs <= seq_len:
    return [(0, pairs, 0)]
  if overflow == "drop":
    return []
  if overflow == "truncate_left":
    return [(pairs - seq_len, pairs, pairs - seq_len)]
  if overflow == "truncate_right":
    return [(0, seq_len, 0)]
  pieces, start, trained_to = [], 0, 0
  while trained_to < pairs:
    end = min(start + seq_len, pairs)
    pieces.append((start, end, trained_to))
    start, trained_to = start + stride, end
  return pieces


def cut_pieces(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, *, overflow: str,
               stride: int = 0, labels: np.ndarray | None = None,
               tags: list[np.ndarray] | None = None) -> tuple[Pieces, collections.Counter]:
  """examples: (token ids, trained flag per token); labels: a class index (int) per example,
  for a classification head, or a score (float32), for a regression head; tags: a tag index
  per token of each example (-1: none), for a token classifier. With either, overflow must
  not be "window" (one piece per example). Pieces without any loss are dropped."""
  if (labels is not None or tags is not None) and overflow == "window":
    raise DataError("A classification head needs one piece per example: set data.overflow to "
                    "truncate_right (keep the start), truncate_left (keep the end) or drop.")
  stride = stride or seq_len
  stats = collections.Counter()
  lengths = np.array([len(ids) for ids, _ in examples], np.int64)
  offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
  ids = np.concatenate([e[0] for e in examples] or [np.zeros(0, np.int32)])
  trained = np.concatenate([e[1] for e in examples] or [np.zeros(0, bool)]).astype(bool)
  if tags is not None:
    tags = np.concatenate(tags or [np.zeros(0, np.int64)]).astype(np.int64)
    # Pair j is scored at its input token j, not at its target token j + 1.
    trained = np.concatenate([[False], tags[:-1] >= 0]) if len(tags) else trained
  kept = []
  for index, (offset, length) in enumerate(zip(offsets, lengths)):
    cut = _cut(int(length), seq_len, overflow, stride) if length > 1 else []
    stats["dropped_too_long"] += bool(length > 1 and not cut)
    for window, (first, end, loss_from) in enumerate(cut):
      if trained[offset + max(first, loss_from) + 1:offset + end + 1].any():
        kept.append((index, window, offset + first, end - first, max(loss_from - first, 0)))
      else:
        stats["dropped_no_loss"] += 1
  columns = [np.array(c, np.int64) for c in zip(*kept)] or [np.zeros(0, np.int64)] * 5
  pieces = Pieces(ids, trained, *columns, tags=tags)
  if labels is not None:
    labels = np.asarray(labels)
    pieces.label = labels.astype(np.float32 if labels.dtype.kind == "f" else np.int64)[
        pieces.example]
  return pieces, stats


def _best_fit(lengths: np.ndarray, seq_len: int):
  """Row, offset and segment number of each piece: longest first, each into the open row it
  fills most tightly (rows by remaining space, kept in a sorted list of distinct spaces)."""
  row = np.empty(len(lengths), np.int64)
  offset = np.empty(len(lengths), np.int64)
  segment = np.empty(len(lengths), np.int64)
  spaces: list[int] = []
  rows_with_space = collections.defaultdict(list)
  used, segments = [], []
  for i in np.argsort(-lengths, kind="stable"):
    need = int(lengths[i])
    j = bisect.bisect_left(spaces, need)
    if j < len(spaces):
      space = spaces[j]
      r = rows_with_space[space].pop()
      if not rows_with_space[space]:
        del spaces[j], rows_with_space[space]
    else:
      space, r = seq_len, len(used)
      used.append(0)
      segments.append(0)
    row[i], offset[i] = r, used[r]
    used[r] += need
    segments[r] += 1
    segment[i] = segments[r]
    left = space - need
    if left:
      if left not in rows_with_space:
        bisect.insort(spaces, left)
      rows_with_space[left].append(r)
  return row, offset, segment, len(used)


def stream_rows(pieces: Pieces, seq_len: int) -> dict[str, np.ndarray]:
  """int32 [rows, seq_len] arrays of the pieces' tokens as one stream (data.shaping
  "stream"), each piece's tokens start..start+size (its size pairs need size + 1 tokens).
  A piece that continues the one before it (the next window of the same example, cut
  without overlap) shares its first token with that one's last, which the stream holds
  once."""
  continues = np.zeros(len(pieces.size), np.int64)
  continues[1:] = ((pieces.example[1:] == pieces.example[:-1])
                   & (pieces.window[1:] == pieces.window[:-1] + 1))
  tokens = pieces.size + 1 - continues
  index = (np.repeat(pieces.start + continues, tokens)
           + np.arange(int(tokens.sum())) - np.repeat(np.cumsum(tokens) - tokens, tokens))
  ids, trained = pieces.ids[index], pieces.trained[index]
  pairs = max(len(ids) - 1, 0)
  num_rows = -(-pairs // seq_len)
  rows = {f: np.zeros(num_rows * seq_len, np.int32) for f in FIELDS}
  rows["input_ids"][:pairs] = ids[:-1]
  rows["targets"][:pairs] = ids[1:]
  rows["loss_mask"][:pairs] = trained[1:]
  rows["positions"][:pairs] = np.arange(pairs) % seq_len
  rows["segment_ids"][:pairs] = 1
  return {f: a.reshape(num_rows, seq_len) for f, a in rows.items()}


def pack_rows(pieces: Pieces, seq_len: int, shaping: str) -> dict[str, np.ndarray]:
  """int32 [rows, seq_len] arrays holding the pieces."""
  if shaping == "stream":
    return stream_rows(pieces, seq_len)
  size = pieces.size
  if shaping == "pack":
    row, offset, segment, num_rows = _best_fit(size, seq_len)
  else:
    row, offset, segment = np.arange(len(size)), np.zeros_like(size), np.ones_like(size)
    num_rows = len(size)
  # Every token of every piece at once: w is the token's place in its piece.
  w = np.arange(int(size.sum())) - np.repeat(np.cumsum(size) - size, size)
  src = np.repeat(pieces.start, size) + w
  dst = np.repeat(row * seq_len + offset, size) + w
  rows = {f: np.zeros(num_rows * seq_len, np.int32) for f in FIELDS}
  rows["input_ids"][dst] = pieces.ids[src]
  if pieces.tags is not None:
    tag = pieces.tags[src]
    rows["targets"][dst] = np.maximum(tag, 0)
    rows["loss_mask"][dst] = tag >= 0
  elif pieces.label is None:
    rows["targets"][dst] = pieces.ids[src + 1]
    rows["loss_mask"][dst] = pieces.trained[src + 1] & (w >= np.repeat(pieces.loss_from, size))
  else:
    # Targets elsewhere stay 0: a token id would index past the classes.
    last = w == np.repeat(size, size) - 1
    rows["loss_mask"][dst[last]] = 1
    rows["targets"][dst[last]] = (encode_scores(pieces.label) if pieces.label.dtype.kind == "f"
                                  else pieces.label)
  rows["positions"][dst] = w
  rows["segment_ids"][dst] = np.repeat(segment, size)
  return {f: a.reshape(num_rows, seq_len) for f, a in rows.items()}
