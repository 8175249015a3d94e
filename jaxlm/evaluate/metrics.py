"""Classification, regression, perplexity and generation metrics over the standard
implementations (scikit-learn, scipy, sacrebleu, rouge-score), returned as flat dicts of
floats.

Keys are stable across calls so TensorBoard curves line up: per-class values are "f1/NAME"
(TensorBoard groups them under "f1"). The one non-float entry is classification's
"confusion_matrix" (a nested list of ints, still JSON-serialisable); pop it before handing the
dict to `jaxlm.train.metrics.MetricsWriter.write`, which logs scalars only.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU, CHRF
from scipy import stats
from sklearn.metrics import (accuracy_score, confusion_matrix, precision_recall_fscore_support,
                             top_k_accuracy_score)

# The same cap as the training loop's perplexity, so eval and train values compare directly
# and exp() never overflows (or turns into inf in TensorBoard's float32) on a diverged model.
MAX_LOG_PERPLEXITY = 50.0
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
# sacrebleu tokenizers offered: "13a" is the WMT standard for space-separated languages; "zh"
# and "char" split CJK text into characters, and ROUGE then does the same (see CharTokenizer).
BLEU_TOKENIZERS = ("13a", "zh", "char")


def _class_ids(values, name: str, num_classes: int) -> np.ndarray:
  ids = np.asarray(values)
  if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"{name} must be a 1-D sequence of int class ids, got dtype {ids.dtype} "
                     f"and shape {ids.shape}.")
  bad = ids[(ids < 0) | (ids >= num_classes)]
  if bad.size:
    raise ValueError(f"{name} holds class id {int(bad[0])}, outside range({num_classes}) of "
                     f"the {num_classes} label names.")
  return ids


def _top_k_accuracy(labels: np.ndarray, scores: np.ndarray, k: int) -> float:
  if scores.shape[1] == 2:
    # sklearn treats two classes as a binary problem wanting 1-D scores and a threshold;
    # with two classes the only meaningful k is 1, which is the argmax.
    return float(accuracy_score(labels, scores.argmax(axis=1)))
  return float(top_k_accuracy_score(labels, scores, k=k, labels=range(scores.shape[1])))


def classification_metrics(labels, predictions, label_names: Sequence[str], *, scores=None,
                           top_k: Sequence[int] = (1, 5)) -> dict:
  """Accuracy, macro/weighted precision, recall and F1, per-class F1 ("f1/NAME"), top-k
  accuracy from `scores` [n, classes] ("top{k}_accuracy", for k < classes) and
  "confusion_matrix" (rows = true class, columns = predicted, every label name a row).

  Macro and weighted averages run over the classes present in `labels` or `predictions`
  (sklearn's default), so a class absent from a small eval set does not count as F1 = 0 in
  the average; its own "f1/NAME" is still logged, as 0.0, to keep the key set stable.
  """
  num_classes = len(label_names)
  if len(set(label_names)) != num_classes:
    raise ValueError(f"label_names must be unique, got {list(label_names)}.")
  if len(labels) != len(predictions) or not len(labels):
    raise ValueError(f"Need as many predictions as labels, and at least one "
                     f"(got {len(predictions)} and {len(labels)}).")
  labels = _class_ids(labels, "labels", num_classes)
  predictions = _class_ids(predictions, "predictions", num_classes)

  out = {"accuracy": float(accuracy_score(labels, predictions))}
  for average in ("macro", "weighted"):
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predictions, average=average, zero_division=0)
    out.update({f"precision_{average}": float(precision), f"recall_{average}": float(recall),
                f"f1_{average}": float(f1)})
  _, _, per_class_f1, _ = precision_recall_fscore_support(
      labels, predictions, labels=range(num_classes), average=None, zero_division=0)
  out.update({f"f1/{name}": float(f1) for name, f1 in zip(label_names, per_class_f1)})

  if scores is not None:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (labels.size, num_classes):
      raise ValueError(f"scores must be [examples, classes] = {(labels.size, num_classes)}, "
                       f"got {scores.shape}.")
    for k in top_k:
      if k < num_classes:
        out[f"top{k}_accuracy"] = _top_k_accuracy(labels, scores, k)

  out["confusion_matrix"] = confusion_matrix(labels, predictions,
                                             labels=range(num_classes)).tolist()
  return out


def regression_metrics(targets, predictions) -> dict:
  """mse, rmse, mae, and the pearson and spearman correlations (scipy.stats) of predicted
  against true scores, as GLUE reports STS-B. A correlation is undefined when either side is
  constant (an untrained head can predict one value for all) or has one example: it is then
  0.0, no association, so that logs and early stopping always get a number."""
  targets = np.asarray(targets, np.float64)
  predictions = np.asarray(predictions, np.float64)
  if targets.shape != predictions.shape or targets.ndim != 1 or not targets.size:
    raise ValueError(f"Need as many predictions as targets, 1-D, and at least one (got shapes "
                     f"{predictions.shape} and {targets.shape}).")
  error = predictions - targets
  mse = float(np.mean(np.square(error)))
  out = {"mse": mse, "rmse": math.sqrt(mse), "mae": float(np.mean(np.abs(error)))}
  varies = targets.size > 1 and np.ptp(targets) > 0 and np.ptp(predictions) > 0
  for name, correlation in (("pearson", stats.pearsonr), ("spearman", stats.spearmanr)):
    out[name] = float(correlation(targets, predictions)[0]) if varies else 0.0
  return out


def format_confusion_matrix(matrix, label_names: Sequence[str]) -> str:
  """An aligned text table, one row per true class and one column per predicted class."""
  corner = "true \\ pred"
  rows = [[corner, *label_names]]
  rows += [[name, *map(str, counts)] for name, counts in zip(label_names, matrix)]
  widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
  lines = ["  ".join([row[0].ljust(widths[0])] +
                     [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])])
           for row in rows]
  return "\n".join(line.rstrip() for line in lines)


def perplexity(nll_sum: float, tokens: int) -> dict:
  """Mean loss per token and its exp, from a summed negative log-likelihood (nats)."""
  if tokens <= 0:
    raise ValueError(f"perplexity needs at least one token, got tokens={tokens}.")
  loss = float(nll_sum) / tokens
  return {"loss": loss, "perplexity": math.exp(min(loss, MAX_LOG_PERPLEXITY))}


class CharTokenizer:
  """rouge-score tokenizer for CJK text: one token per letter or digit, lowercased.

  rouge-score's default tokenizer keeps only [a-z0-9], so Chinese text becomes no tokens and
  every score 0. Punctuation and spaces are dropped, as the default tokenizer drops them.
  """

  def tokenize(self, text: str) -> list[str]:
    return [char for char in text.lower() if char.isalnum()]


def _reference_lists(predictions: Sequence[str], references) -> list[list[str]]:
  if len(predictions) != len(references) or not predictions:
    raise ValueError(f"Need one reference (or list of references) per prediction, and at "
                     f"least one prediction (got {len(predictions)} predictions, "
                     f"{len(references)} references).")
  return [[refs] if isinstance(refs, str) else list(refs) for refs in references]


def _sacrebleu_streams(reference_lists: list[list[str]]) -> list[list[str | None]]:
  # sacrebleu wants one stream per reference slot; None marks an example with fewer
  # references, which sacrebleu reports as "nrefs:var" in the signature.
  slots = max(len(refs) for refs in reference_lists)
  return [[refs[slot] if slot < len(refs) else None for refs in reference_lists]
          for slot in range(slots)]


def _mean_rouge(predictions: Sequence[str], reference_lists: list[list[str]], *,
                tokenize: str, use_stemmer: bool) -> dict:
  tokenizer = CharTokenizer() if tokenize in ("zh", "char") else None
  scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer,
                                    tokenizer=tokenizer)
  # score_multi keeps, per example, the reference with the best F-measure.
  per_example = [scorer.score_multi(refs, prediction)
                 for prediction, refs in zip(predictions, reference_lists)]
  return {name: float(np.mean([scores[name].fmeasure for scores in per_example]))
          for name in ROUGE_TYPES}


def generation_metrics(predictions: Sequence[str], references, *, tokenize: str = "13a",
                       use_stemmer: bool = True) -> tuple[dict, str]:
  """Corpus BLEU and chrF (sacrebleu, 0-100) and ROUGE-1/2/L F-measures (rouge-score, 0-1,
  averaged over examples), plus the sacrebleu BLEU signature string for reports.

  `references` holds one string per prediction or a list of references per prediction (the
  counts may differ). `tokenize="zh"` (or "char") makes both BLEU and ROUGE character-level,
  as Chinese needs. `use_stemmer` applies Porter stemming in English ROUGE, as the
  summarization literature (and transformers' run_summarization) reports it.
  """
  if tokenize not in BLEU_TOKENIZERS:
    raise ValueError(f"tokenize must be one of {BLEU_TOKENIZERS}, got {tokenize!r}.")
  reference_lists = _reference_lists(predictions, references)
  streams = _sacrebleu_streams(reference_lists)
  bleu = BLEU(tokenize=tokenize)
  scores = {"bleu": float(bleu.corpus_score(list(predictions), streams).score),
            "chrf": float(CHRF().corpus_score(list(predictions), streams).score)}
  scores.update(_mean_rouge(predictions, reference_lists, tokenize=tokenize,
                            use_stemmer=use_stemmer))
  return scores, str(bleu.get_signature())
