"""`jaxlm baseline`: TF-IDF features and logistic regression on a recipe's classification
data (ridge regression for a regression head's scores), trained and scored on exactly the
examples `jaxlm train` trains a head on and holds out, so a fine-tuned model has a classical
reference on the same validation set.

The examples are made as the data build makes them for a head (model.num_labels > 0): rows
read and formatted (data.format classification or pairs, data.labels, data.prompt_template,
data.strip_html), short ones (data.min_chars) and exact duplicates (data.dedupe) dropped, and
each held out by the same seeded hash of its content (data.seed, data.validation_fraction).
The classifier reads the rendered prompt; the template's words are the same in every example,
so they do not change the result. Nothing is tokenized: data.overflow = "drop", which drops
examples longer than data.seq_len tokens from training, does not drop them here. A tagging
recipe (NER) gets a CRF on the same split instead: jaxlm/evaluate/crf_baseline.py.
"""
from __future__ import annotations

import collections
from typing import NamedTuple

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.pipeline import Pipeline

from jaxlm.data.budget import Problems, enforce
from jaxlm.data.build import held_out, iter_examples, make_formatter
from jaxlm.data.formats import DEFAULT_PROMPTS, Example
from jaxlm.data.pipeline import resolve_settings
from jaxlm.data.sources import DataError, parse_source
from jaxlm.evaluate.metrics import (classification_metrics, format_confusion_matrix,
                                    regression_metrics)

# word: unigrams and bigrams of scikit-learn's word tokens, for space-separated languages;
# char: 1-3 character n-grams, the natural unit for Chinese, which has no spaces.
ANALYZERS = {"word": {"analyzer": "word", "ngram_range": (1, 2)},
             "char": {"analyzer": "char", "ngram_range": (1, 3)}}
# Inverse L2 penalty. 3-fold cross-validation on the training split: BBC News 0.956 / 0.962
# / 0.964 accuracy at C = 1 / 10 / 100, the Chinese reviews 0.721 / 0.714 / 0.710.
C = 10.0
# The ridge penalties a regression baseline picks from, by leave-one-out error on the
# training split (scikit-learn's RidgeCV).
RIDGE_ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0)


class LabelledSplit(NamedTuple):
  train_texts: list[str]
  train_labels: list  # indices into data.labels; for a regression recipe the scores
  val_texts: list[str]
  val_labels: list


def split_examples(settings: dict, seed: int) -> tuple[list[Example], list[Example]]:
  """(training, held-out) examples of a head's data, as the data build makes and splits them
  (settings: `resolve_settings(..., label_head=True)`)."""
  formatter = make_formatter(settings, None)  # no tokenizer: a head's formats need none
  problems, stats, seen = Problems(), collections.Counter(), set()
  sides = {False: [], True: []}
  for source in map(parse_source, settings["sources"]):
    for example, digest in iter_examples(source, settings, formatter, problems, stats, seen):
      # Window 0: a head's examples are cut to one row, so each is held out whole.
      sides[held_out(digest, 0, seed, settings["validation_fraction"])].append(example)
  enforce(problems.report(), settings["error_budget"])
  return sides[False], sides[True]


def is_regression_recipe(config) -> bool:
  return config.model.classifier == "regression"


def labelled_split(config) -> LabelledSplit:
  """The rendered prompt and label index (a regression recipe's: score) of every example,
  on its side of the split."""
  settings = resolve_settings(config.data, config.data.seq_len, label_head=True,
                              regression=is_regression_recipe(config))
  if settings["format"] not in DEFAULT_PROMPTS:
    raise DataError(f"A baseline classifies examples: data.format must be one of "
                    f"{', '.join(DEFAULT_PROMPTS)}, not {settings['format']!r} (a tagging "
                    f"recipe gets a CRF: jaxlm.evaluate.crf_baseline).")
  train, val = split_examples(settings, config.data.seed)
  return LabelledSplit([e.parts[0][0] for e in train], [e.label for e in train],
                       [e.parts[0][0] for e in val], [e.label for e in val])


def _tfidf(analyzer: str) -> TfidfVectorizer:
  if analyzer not in ANALYZERS:
    raise ValueError(f"analyzer must be one of {', '.join(ANALYZERS)}, not {analyzer!r}.")
  return TfidfVectorizer(sublinear_tf=True, **ANALYZERS[analyzer])


def make_classifier(analyzer: str = "word", seed: int = 0) -> Pipeline:
  return Pipeline([("tfidf", _tfidf(analyzer)),
                   ("logreg", LogisticRegression(C=C, max_iter=1000, random_state=seed))])


def _check_split(split: LabelledSplit, config) -> None:
  if not split.val_texts:
    raise DataError(f"data.validation_fraction = {config.data.validation_fraction} held out "
                    f"none of the {len(split.train_texts):,} examples; raise it, e.g. "
                    f"--config.data.validation_fraction=0.1.")
  if is_regression_recipe(config):
    return
  if len(set(split.train_labels)) < 2:
    raise DataError(f"The training split holds examples of {len(set(split.train_labels))} of "
                    f"the {len(config.data.labels)} data.labels; a classifier needs two.")


def make_regressor(analyzer: str = "word") -> Pipeline:
  return Pipeline([("tfidf", _tfidf(analyzer)), ("ridge", RidgeCV(alphas=RIDGE_ALPHAS))])


def tfidf_baseline(config, analyzer: str = "word") -> dict:
  """Trains on the recipe's training examples and scores its validation examples: the
  metrics of `classification_metrics` (a regression recipe's: of `regression_metrics`, and
  "alpha", the ridge penalty chosen), plus "train_examples", "validation_examples",
  "analyzer" and "method" (logistic or ridge)."""
  split = labelled_split(config)
  _check_split(split, config)
  sizes = {"train_examples": len(split.train_texts),
           "validation_examples": len(split.val_texts), "analyzer": analyzer}
  if is_regression_recipe(config):
    regressor = make_regressor(analyzer)
    regressor.fit(split.train_texts, split.train_labels)
    metrics = regression_metrics(split.val_labels, regressor.predict(split.val_texts))
    return {**metrics, "alpha": float(regressor.named_steps["ridge"].alpha_), **sizes,
            "method": "ridge"}
  classifier = make_classifier(analyzer, config.data.seed)
  labels = tuple(config.data.labels)
  classifier.fit(split.train_texts, split.train_labels)
  # predict_proba has a column per class seen in training only; absent classes score 0.
  scores = np.zeros((len(split.val_texts), len(labels)))
  scores[:, classifier.classes_] = classifier.predict_proba(split.val_texts)
  metrics = classification_metrics(np.array(split.val_labels), scores.argmax(axis=1), labels,
                                   scores=scores)
  return {**metrics, **sizes, "method": "logistic"}


def format_report(result: dict, labels) -> str:
  low, high = ANALYZERS[result["analyzer"]]["ngram_range"]
  model = ("logistic regression" if result["method"] == "logistic" else
           f"ridge regression (alpha {result['alpha']:g})")
  header = (f"baseline: TF-IDF {result['analyzer']} {low}-{high}-grams + {model}: "
            f"trained on {result['train_examples']:,} examples, scored on "
            f"{result['validation_examples']:,} held out")
  lines = [header] + [f"  {key:<20} {value:.4f}" for key, value in result.items()
                      if isinstance(value, float) and key != "alpha"]
  if "confusion_matrix" in result:
    lines += ["confusion matrix:", format_confusion_matrix(result["confusion_matrix"], labels)]
  return "\n".join(lines)
