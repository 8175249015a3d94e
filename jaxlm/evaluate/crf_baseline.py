"""`jaxlm baseline` for a tagging recipe (data.format = "tagging", NER): a linear-chain CRF
(CRFsuite, via python-crfsuite) over hand-made window features of each word, trained and
scored on exactly the sentences `jaxlm train` trains a token classifier on and holds out.

The sentences are made and split as for the TF-IDF baseline (jaxlm/evaluate/baseline.py):
read, formatted, short ones and exact duplicates dropped, each held out whole by the seeded
hash of its words (the digest the data build splits a tagging example by; tags do not enter
it). It is scored as `jaxlm eval` scores a token classifier: accuracy / P/R/F1 / confusion
matrix over words, and, when the tags spell entities, seqeval's entity-level scores under the
same "entity_" keys. Nothing is tokenized: the trainer keeps the words of a sentence's first
data.seq_len tokens (data.overflow truncate_right), this tagger reads every word.
"""
from __future__ import annotations

import tempfile
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pycrfsuite

from jaxlm.data.formats import Example
from jaxlm.data.pipeline import resolve_settings
from jaxlm.data.sources import DataError
from jaxlm.evaluate.baseline import split_examples
from jaxlm.evaluate.metrics import classification_metrics, format_confusion_matrix
from jaxlm.evaluate.ner import entity_metrics, is_entity_tagset

WINDOW = 2  # words each side whose identity is a feature
# L1 / L2 penalties and the L-BFGS cap: CRFsuite's usual NER settings, checked on People's
# Daily (ner_zh) within its training split (every 10th training sentence scored, 20,000 of
# the others trained on; the held-out split untouched): entity F1 0.924 at c1 / c2 = 0.1 /
# 0.01, 0.918 at 0.1 / 0.1, 0.923 at 0.05 / 0.01, 0.921 at 0.2 / 0.01, and 0.922 with 200
# iterations instead of 100, which take twice as long.
TRAINER_PARAMS = {"c1": 0.1, "c2": 0.01, "max_iterations": 100,
                  # a weight for every tag pair, so that pairs never seen (O -> I-PER) can
                  # learn negative ones instead of staying at zero
                  "feature.possible_transitions": True}
PAD = ("<s>", "</s>")  # the words before the first and after the last


def _kind(word: str) -> str:
  """A coarse class of the word's characters, which generalises past the words seen."""
  if word.isdigit():  # also full-width digits (１９９８)
    return "digit"
  if word.isnumeric():  # Chinese numerals (一九九八) and the like
    return "numeral"
  if all(unicodedata.category(c)[0] in "PS" for c in word):
    return "punct"
  if word.isascii():
    return "ascii"
  return "other"


def word_features(words: Sequence[str]) -> list[list[str]]:
  """CRFsuite attributes of each word: the words (lowercased) at -2..+2 and the bigrams they
  make, the character kind of the word and its neighbours, and for cased or multi-character
  words case and affixes. For Chinese, a word is a character, so these are the character
  unigrams and bigrams of a 5-character window that character-based NER uses."""
  lowered = [PAD[0]] * WINDOW + [w.lower() for w in words] + [PAD[1]] * WINDOW
  kinds = ["pad"] + [_kind(w) for w in words] + ["pad"]
  out = []
  for i, word in enumerate(words):
    at = {k: lowered[i + WINDOW + k] for k in range(-WINDOW, WINDOW + 1)}
    features = ["bias"] + [f"w[{k}]={w}" for k, w in at.items()]
    features += [f"w[{k}]w[{k + 1}]={at[k]}|{at[k + 1]}" for k in range(-WINDOW, WINDOW)]
    features.append(f"w[-1]w[1]={at[-1]}|{at[1]}")
    features += [f"kind[{k}]={kinds[i + 1 + k]}" for k in (-1, 0, 1)]
    if word.istitle():
      features.append("title")
    if word.isupper():
      features.append("upper")
    if len(word) > 2:
      features += [f"prefix={at[0][:3]}", f"suffix={at[0][-3:]}"]
    out.append(features)
  return out


def sentence_words(example: Example, separator: str) -> list[str]:
  """The words of a tagging example, whose parts carry the separator before every word but
  the first (jaxlm/data/formats.py)."""
  return [text[len(separator):] if i else text for i, (text, _) in enumerate(example.parts)]


def _check_split(train: list[Example], val: list[Example], config) -> None:
  if not val:
    raise DataError(f"data.validation_fraction = {config.data.validation_fraction} held out "
                    f"none of the {len(train):,} sentences; raise it, e.g. "
                    f"--config.data.validation_fraction=0.1.")
  seen = {tag for e in train for tag in e.tags}
  if len(seen) < 2:
    raise DataError(f"The training sentences hold {len(seen)} of the {len(config.data.labels)} "
                    f"data.labels tags; a tagger needs two.")


def crf_baseline(config) -> dict:
  """Trains a CRF on the recipe's training sentences and tags its held-out ones: the word
  metrics of `classification_metrics`, "entity_precision" / "entity_recall" / "entity_f1" /
  "entity_f1/TYPE" when the tags spell entities, and "train_examples",
  "validation_examples", "train_words", "validation_words", "iterations" (L-BFGS iterations
  run) and "method"."""
  settings = resolve_settings(config.data, config.data.seq_len, label_head=True)
  if settings["format"] != "tagging":
    raise DataError(f"A CRF baseline tags words: data.format must be 'tagging', not "
                    f"{settings['format']!r}.")
  labels, separator = settings["labels"], settings["word_separator"]
  train, val = split_examples(settings, config.data.seed)
  _check_split(train, val, config)
  trainer = pycrfsuite.Trainer(verbose=False)
  trainer.set_params(TRAINER_PARAMS)
  for example in train:
    trainer.append(word_features(sentence_words(example, separator)),
                   [labels[t] for t in example.tags])
  true_tags = [[labels[t] for t in e.tags] for e in val]
  with tempfile.TemporaryDirectory() as directory:
    model = str(Path(directory) / "crf.model")
    trainer.train(model)
    tagger = pycrfsuite.Tagger()
    with tagger.open(model):  # closes the model file before the directory goes
      pred_tags = [tagger.tag(word_features(sentence_words(e, separator))) for e in val]
  index = {label: i for i, label in enumerate(labels)}
  result = classification_metrics(np.array([index[t] for tags in true_tags for t in tags]),
                                  np.array([index[t] for tags in pred_tags for t in tags]),
                                  labels)
  if is_entity_tagset(labels):
    result.update({f"entity_{k}": v for k, v in entity_metrics(true_tags, pred_tags).items()})
  return {**result, "train_examples": len(train), "validation_examples": len(val),
          "train_words": sum(len(e.tags) for e in train),
          "validation_words": sum(map(len, true_tags)),
          "iterations": len(trainer.logparser.iterations), "method": "crf"}


def format_crf_report(result: dict, labels) -> str:
  header = (f"baseline: linear-chain CRF (CRFsuite, L-BFGS, {result['iterations']} "
            f"iterations) over +-{WINDOW}-word window features: trained on "
            f"{result['train_examples']:,} sentences ({result['train_words']:,} words), scored "
            f"on {result['validation_examples']:,} held out ({result['validation_words']:,} "
            f"words)")
  floats = {key: value for key, value in result.items() if isinstance(value, float)}
  entity = [key for key in floats if key.startswith("entity_")]
  lines = [header] + [f"  {key:<20} {floats[key]:.4f}"
                      for key in entity + [key for key in floats if key not in entity]]
  lines += ["confusion matrix over words:",
            format_confusion_matrix(result["confusion_matrix"], labels)]
  return "\n".join(lines)
