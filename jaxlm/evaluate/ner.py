"""Named-entity recognition: word-level BIO tags aligned onto sub-word tokens for training, and
token predictions mapped back to word tags for entity-level scoring with seqeval.

Sub-word alignment follows the usual token-classification recipe: the first sub-word of each
word carries the word's label and the rest carry IGNORE (-100, the index the loss skips), so
each word is predicted, and scored, exactly once.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from seqeval.metrics import classification_report
from tokenizers import Tokenizer

IGNORE = -100
ENTITY_PREFIXES = ("B-", "I-", "E-", "S-", "L-", "U-")  # IOB1/2, IOE, IOBES and BILOU tags


def _label_id(label: str, label_to_id: Mapping[str, int]) -> int:
  if label not in label_to_id:
    raise ValueError(f"Unknown NER label {label!r}; allowed labels: {sorted(label_to_id)}.")
  return label_to_id[label]


def _continuation_label(label: str) -> str:
  return "I-" + label[2:] if label.startswith("B-") else label


def align_labels_to_tokens(words: Sequence[str], word_labels: Sequence[str],
                           tokenizer: Tokenizer, label_to_id: Mapping[str, int], *,
                           label_all_subwords: bool = False,
                           prefix_space: bool = True) -> tuple[list[int], list[int]]:
  """Tokenizes pre-split `words` and returns (input_ids, label_ids), one label id per token.

  The first sub-word of each word gets the word's label; later sub-words get IGNORE, or with
  `label_all_subwords` the word's label with B- turned into I- (the continuation of the same
  entity). Special tokens added by the tokenizer's post-processor always get IGNORE.

  `prefix_space`: byte-level BPE (GPT-2, Llama 3, the shipped tokenizer) marks a word start
  with the space in front of it ("ĠBennet"), and `encode(words, is_pretokenized=True)` encodes
  every word as if it began the text, so "Bennet" would come out as "B", "ennet", tokens the
  model rarely saw mid-sentence. Prepending a space to every word but the first makes the ids
  equal to `encode(" ".join(words))`, i.e. running text. Whitespace, WordPiece and Metaspace
  pre-tokenizers drop or absorb that space, so it is harmless there; turn it off only for
  tokenizers whose normalizer itself prepends "▁" (Llama-2-style SentencePiece conversions).
  """
  if len(words) != len(word_labels):
    raise ValueError(f"Need one label per word, got {len(words)} words and "
                     f"{len(word_labels)} labels.")
  first_ids = [_label_id(label, label_to_id) for label in word_labels]
  rest_ids = ([_label_id(_continuation_label(label), label_to_id) for label in word_labels]
              if label_all_subwords else [IGNORE] * len(words))

  pieces = [(" " + word if prefix_space and i else word) for i, word in enumerate(words)]
  encoding = tokenizer.encode(pieces, is_pretokenized=True)
  label_ids, previous = [], None
  for word_id in encoding.word_ids:
    if word_id is None:
      label_ids.append(IGNORE)
    else:
      label_ids.append(first_ids[word_id] if word_id != previous else rest_ids[word_id])
    previous = word_id
  return list(encoding.ids), label_ids


def tags_from_token_predictions(
    pred_ids, label_ids, id_to_label) -> tuple[list[list[str]], list[list[str]]]:
  """Word-level (true_tags, pred_tags) from token-level ids [batch, tokens].

  Positions whose label is IGNORE (later sub-words, special tokens, padding) are dropped, so
  with first-sub-word alignment each word keeps its first sub-word's prediction. Align
  evaluation data with `label_all_subwords=False`: otherwise continuation sub-words survive
  the mask and count as extra words. `id_to_label` is a list or mapping from id to tag.
  """
  pred_ids, label_ids = np.asarray(pred_ids), np.asarray(label_ids)
  if pred_ids.shape != label_ids.shape or pred_ids.ndim != 2:
    raise ValueError(f"pred_ids and label_ids must both be [batch, tokens], got "
                     f"{pred_ids.shape} and {label_ids.shape}.")
  true_tags, pred_tags = [], []
  for preds, labels in zip(pred_ids, label_ids):
    keep = labels != IGNORE
    true_tags.append([id_to_label[int(i)] for i in labels[keep]])
    pred_tags.append([id_to_label[int(i)] for i in preds[keep]])
  return true_tags, pred_tags


def entity_metrics(true_tags: list[list[str]], pred_tags: list[list[str]]) -> dict:
  """Entity-level micro precision, recall and F1, and per-type F1 ("f1/TYPE"), by seqeval.

  An entity counts only when its type and both boundaries match (conlleval's rule), so a
  predicted span with a wrong boundary is a false positive and the true span a false
  negative. Types are those found in either the true or the predicted tags.
  """
  report = classification_report(true_tags, pred_tags, output_dict=True, zero_division=0)
  micro = report["micro avg"]
  out = {"precision": float(micro["precision"]), "recall": float(micro["recall"]),
         "f1": float(micro["f1-score"])}
  averages = ("micro avg", "macro avg", "weighted avg")
  out.update({f"f1/{name}": float(scores["f1-score"])
              for name, scores in report.items() if name not in averages})
  return out


def is_entity_tagset(labels: Sequence[str]) -> bool:
  """Whether the tags spell entities (O and prefixed tags such as B-PER), so that entity-level
  scores mean something; other tag sets (part of speech, say) get token-level scores only."""
  return any(tag != "O" for tag in labels) and all(
      tag == "O" or tag.startswith(ENTITY_PREFIXES) for tag in labels)


def segment_tags(batch: Mapping[str, np.ndarray], predictions: np.ndarray,
                 id_to_label) -> tuple[list[list[str]], list[list[str]]]:
  """Word-level (true_tags, pred_tags) of every example of a batch of data-pipeline rows
  (jaxlm/data/shaping.py): each example is a segment of a row and its words are the tokens
  with a loss, whose target is the word's tag; predictions: the class at every token."""
  true_tags, pred_tags = [], []
  for r, row_segments in enumerate(np.asarray(batch["segment_ids"])):
    labelled = np.asarray(batch["loss_mask"][r]).astype(bool)
    for s in np.unique(row_segments[row_segments > 0]):
      keep = (row_segments == s) & labelled
      if keep.any():
        true_tags.append([id_to_label[int(i)] for i in batch["targets"][r][keep]])
        pred_tags.append([id_to_label[int(i)] for i in predictions[r][keep]])
  return true_tags, pred_tags
