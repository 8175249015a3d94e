"""One entry point from a flat data config to training and validation batches:

  data = build_train_data(config.data, tokenizer, seq_len, global_batch, seed,
                          process_index, process_count)

data.train and data.validation serve this process's rows of each global batch as int32 arrays
[global_batch / process_count, seq_len]: input_ids, targets, loss_mask, positions, segment_ids;
they have .batch(k), next(), .state() / .restore(state) and .batches_per_epoch, like
data.validation is None when validation_fraction is 0; data.meta holds the cache's row counts,
statistics and malformed rows.

Config keys (a flat dict, e.g. under config.data; missing keys take these defaults, other keys
are ignored):
  sources = ("embedded",)  source specs (see jaxlm.data.sources): paths, globs, directories,
                           "hf:NAME", "tfds:NAME"; "?weight=0.3" sets a mixture weight (give
                           all sources one or none: none mixes in proportion to their rows),
                           "?text=content" reads a field from another column
  format = "text"          text | sft | chat | classification | pairs (see jaxlm.data.formats)
  shaping = "pack"         pack: several documents per row, attention kept within each by
                           segment_ids; window: one document window per padded row;
                           stream: whole documents in order as one stream cut into rows,
                           attention across documents (GPT-style pretraining; overflow
                           and stride do not apply)
  overflow = "auto"        examples longer than seq_len: window | truncate_left |
                           truncate_right | drop; auto = window for text, truncate_left
                           (the prompt loses its start) for the other formats, and
                           truncate_right (keep the start, as HF tokenizers truncate) for
                           a classification head
  stride = 0               window step in tokens; 0 = seq_len (no overlap)
  text_unit = "document"   what one document of a .txt file is: line | paragraph | document
  labels = ()              allowed labels (classification, pairs) or tags (tagging); an int
                           label indexes it. Empty for a regression head, whose label is a
                           number (the score)
  prompt_template = ""     classification / pairs prompt; "" = "{text}\\nLabel:" or
                           "{text_a}\\n{text_b}\\nLabel:"; the target is " " + label
  word_separator = " "     tagging: what goes between words ("" for Chinese characters)
  chat_template = ""       Jinja chat template replacing the tokenizer's own
  add_special_tokens = False  wrap each example (text, classification, pairs, tagging) in
                           the tokenizer's special tokens, e.g. [CLS] ... [SEP] (BERT) or
                           <s> ... </s> (RoBERTa), as an encoder reads it
  strip_html = False       keep only the visible text of HTML
  min_chars = 1            drop examples with fewer characters of text
  dedupe = True            drop exact duplicates (across all sources, before the split)
  validation_fraction = 0.02  share held out, chosen by a hash of (seed, content): of the
                           distinct examples, or of the windows of documents longer than a
                           row (cut without overlap), so a few long books still give some
  error_budget = 0         malformed rows tolerated: an int counts rows, a float is a fraction
  cache_dir = "~/.cache/jaxlm"  where tokenized rows are kept, by fingerprint
  prefetch = 2             batches prepared ahead by a background thread; 0 disables it
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

from jaxlm.data.budget import check_budget_value
from jaxlm.data.build import prepare_rows
from jaxlm.data.cache import open_split
from jaxlm.data.formats import DEFAULT_PROMPTS, FIELDS
from jaxlm.data.loader import RowBatches
from jaxlm.data.shaping import check_shaping
from jaxlm.data.sources import OPTIONS, TEXT_UNITS, DataError, parse_source
from jaxlm.data.tokens import TextTokenizer

DEFAULTS = {
    "sources": ("embedded",),
    "format": "text",
    "shaping": "pack",
    "overflow": "auto",
    "stride": 0,
    "text_unit": "document",
    "labels": (),
    "prompt_template": "",
    "word_separator": " ",
    "chat_template": "",
    "add_special_tokens": False,
    "strip_html": False,
    "min_chars": 1,
    "dedupe": True,
    "validation_fraction": 0.02,
    "error_budget": 0,
    "cache_dir": "~/.cache/jaxlm",
    "prefetch": 2,
}


def resolve_settings(data_config: Mapping, seq_len: int, label_head: bool = False,
                     regression: bool = False) -> dict:
  """DEFAULTS overridden by the config's values, checked, with "auto" resolved. label_head:
  rows for a classification head (the label's index is the target, see shaping.py), not
  for a language model; regression: for a regression head (the label is a number, the
  target; implies label_head)."""
  config = data_config.to_dict() if hasattr(data_config, "to_dict") else dict(data_config)
  settings = {key: config.get(key, default) for key, default in DEFAULTS.items()}
  if isinstance(settings["sources"], str):
    settings["sources"] = (settings["sources"],)
  settings["sources"] = tuple(settings["sources"])
  settings["labels"] = tuple(settings["labels"])
  if not settings["sources"]:
    raise DataError("data.sources is empty; name at least one source, e.g. ('embedded',).")
  label_head = label_head or regression
  settings["label_head"] = label_head
  settings["regression"] = regression
  if settings["overflow"] == "auto":
    settings["overflow"] = ("truncate_right" if label_head else
                            "window" if settings["format"] == "text" else "truncate_left")
  if not 0 <= settings["validation_fraction"] < 1:
    raise DataError(f"data.validation_fraction must be in [0, 1), not "
                    f"{settings['validation_fraction']}.")
  if settings["text_unit"] not in TEXT_UNITS:
    raise DataError(f"data.text_unit must be one of {', '.join(TEXT_UNITS)}, not "
                    f"{settings['text_unit']!r}.")
  if settings["add_special_tokens"] and settings["format"] in ("sft", "chat"):
    raise DataError(f"data.add_special_tokens wraps whole examples for an encoder; "
                    f"data.format = {settings['format']!r} trains a decoder, whose templates "
                    f"carry their own tokens: unset it.")
  if settings["shaping"] == "stream" and (label_head or settings["format"] == "tagging"):
    raise DataError("data.shaping 'stream' runs documents together for a language model; a "
                    "classification, regression or tagging head needs each example in its "
                    "own segment: use data.shaping 'pack'.")
  check_budget_value(settings["error_budget"])
  check_shaping(settings["shaping"], settings["overflow"], settings["stride"] or seq_len, seq_len)
  return settings


def _check_renames(sources, fmt: str) -> None:
  fields = set(FIELDS.get(fmt, ())) | ({"label"} if fmt in DEFAULT_PROMPTS else set())
  for source in sources:
    unknown = set(source.renames) - fields
    if unknown:
      raise DataError(f"Source {source.spec!r}: unknown option(s) {sorted(unknown)}. Options are "
                      f"{', '.join(OPTIONS)}, or FIELD=COLUMN for the {fmt} fields "
                      f"{', '.join(sorted(fields))}.")


def _weights(sources) -> list[float] | None:
  given = [s.weight is not None for s in sources]
  if any(given) and not all(given):
    raise DataError("Give every data source a ?weight= or none (then sources mix in proportion "
                    "to their rows).")
  return [s.weight for s in sources] if all(given) else None


def prepare_data(data_config: Mapping, tokenizer, seq_len: int, seed: int,
                 label_head: bool = False, regression: bool = False):
  """Builds the tokenized cache if it is absent (e.g. ahead of a job); returns its directory,
  its metadata (row counts, statistics, malformed rows) and whether this call built it."""
  settings = resolve_settings(data_config, seq_len, label_head, regression)
  sources = [parse_source(spec) for spec in settings["sources"]]
  _check_renames(sources, settings["format"])
  tok = TextTokenizer(tokenizer, settings["chat_template"], settings["add_special_tokens"])
  return prepare_rows(sources, tok, settings, seq_len, seed)


@dataclasses.dataclass(frozen=True)
class TrainData:
  train: RowBatches
  validation: RowBatches | None
  meta: dict  # the cache's metadata: "stats", "problems", row counts
  directory: Path  # the tokenized cache
  built: bool  # whether this call built the cache (False: reused)

  def summary(self) -> str:
    stats, malformed = self.meta["stats"], self.meta["problems"]["malformed"]
    line = (f"data: {stats.get('train_rows', 0):,} train rows / "
            f"{stats.get('train_tokens', 0):,} tokens, {stats.get('validation_rows', 0):,} "
            f"validation rows | {stats.get('duplicates', 0):,} duplicates dropped | cache "
            f"{'built' if self.built else 'reused'}: {self.directory}")
    return line + (f" | {malformed:,} malformed rows skipped" if malformed else "")

  def close(self) -> None:
    for loader in (self.train, self.validation):
      if loader is not None:
        loader.close()


def build_train_data(data_config: Mapping, tokenizer, seq_len: int, global_batch: int, seed: int,
                     process_index: int = 0, process_count: int = 1,
                     label_head: bool = False, regression: bool = False) -> TrainData:
  """tokenizer: a spec ("embedded", a tokenizer.json, a Hugging Face model directory), a
  tokenizers.Tokenizer or a transformers tokenizer. Every process may call this at once: the
  first builds the cache, the others wait and read it. label_head, regression: see
  resolve_settings."""
  settings = resolve_settings(data_config, seq_len, label_head, regression)
  weights = _weights([parse_source(spec) for spec in settings["sources"]])
  directory, meta, built = prepare_data(data_config, tokenizer, seq_len, seed, label_head,
                                        regression)
  data_id = hashlib.sha256(json.dumps([meta["fingerprint"], weights]).encode()).hexdigest()[:16]
  common = dict(seed=seed, process_index=process_index, process_count=process_count,
                prefetch=settings["prefetch"], data_id=data_id)
  train = RowBatches(open_split(directory, meta, "train"), global_batch, weights=weights,
                     shuffle=True, **common)
  if settings["validation_fraction"] == 0:
    return TrainData(train, None, meta, directory, built)
  val_parts = open_split(directory, meta, "validation")
  if not sum(len(p["input_ids"]) for p in val_parts):
    raise DataError(f"data.validation_fraction = {settings['validation_fraction']} held out "
                    f"none of {meta['stats'].get('train_pieces', 0)} examples or windows; raise "
                    f"it, or set it to 0 to train without evaluation.")
  return TrainData(train, RowBatches(val_parts, global_batch, shuffle=False, **common), meta,
                   directory, built)
