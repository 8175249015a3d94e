"""Evaluation metrics against hand-computed values and the reference libraries called directly."""
import json

import numpy as np
import pytest
import sacrebleu
from tokenizers.processors import TemplateProcessing

from jaxlm.data.text import END_OF_TEXT, load_tokenizer
from jaxlm.evaluate.metrics import (classification_metrics, format_confusion_matrix,
                                    generation_metrics, perplexity)
from jaxlm.evaluate.ner import (IGNORE, align_labels_to_tokens, entity_metrics,
                                tags_from_token_predictions)

NER_LABELS = {"O": 0, "B-PER": 1, "I-PER": 2, "B-LOC": 3, "I-LOC": 4}


def test_classification_three_classes_by_hand():
  # Per class (tp, fp, fn): a (1, 1, 1) -> F1 1/2; b (2, 1, 0) -> P 2/3, R 1, F1 4/5;
  # c (1, 0, 1) -> P 1, R 1/2, F1 2/3. Macro F1 = (1/2 + 4/5 + 2/3) / 3 = 59/90.
  m = classification_metrics([0, 0, 1, 1, 2, 2], np.array([0, 1, 1, 1, 2, 0]), ["a", "b", "c"])
  assert m["accuracy"] == pytest.approx(4 / 6)
  assert m["f1_macro"] == pytest.approx(59 / 90)
  assert m["precision_macro"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
  assert m["recall_macro"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
  assert (m["f1/a"], m["f1/b"], m["f1/c"]) == pytest.approx((1 / 2, 4 / 5, 2 / 3))
  json.dumps(m)  # logged as is to metrics.jsonl


def test_confusion_matrix_rows_are_true_classes():
  m = classification_metrics([0, 0, 0, 1], [0, 1, 1, 1], ["cat", "dog", "bird"])
  # Two true cats predicted as dog land in row "cat", column "dog"; "bird" never occurs but
  # keeps its (empty) row and column.
  assert m["confusion_matrix"] == [[1, 2, 0], [0, 1, 0], [0, 0, 0]]
  table = format_confusion_matrix(m["confusion_matrix"], ["cat", "dog", "bird"])
  assert table.splitlines() == ["true \\ pred  cat  dog  bird",
                                "cat            1    2     0",
                                "dog            0    1     0",
                                "bird           0    0     0"]


def test_weighted_average_and_absent_class():
  # a: P 1, R 2/3, F1 4/5 (support 3); b: P 1/2, R 1, F1 2/3 (support 1); c absent.
  m = classification_metrics([0, 0, 0, 1], [0, 0, 1, 1], ["a", "b", "c"])
  assert m["f1_weighted"] == pytest.approx((3 * 4 / 5 + 1 * 2 / 3) / 4)
  # The absent class is left out of the macro average but still reported, as 0.
  assert m["f1_macro"] == pytest.approx((4 / 5 + 2 / 3) / 2)
  assert m["f1/c"] == 0.0


def test_top_k_accuracy_from_scores():
  scores = np.array([[0.5, 0.3, 0.2],     # true 1: second best
                     [0.1, 0.2, 0.7],     # true 2: best
                     [0.35, 0.4, 0.25]])  # true 0: second best
  m = classification_metrics([1, 2, 0], scores.argmax(1), ["a", "b", "c"], scores=scores,
                             top_k=(1, 2, 5))
  assert m["top1_accuracy"] == pytest.approx(1 / 3)
  assert m["top2_accuracy"] == 1.0
  assert "top5_accuracy" not in m  # k >= classes is always 1.0, so not reported


def test_top1_accuracy_with_two_classes():
  logits = np.array([[2.0, -1.0], [0.5, 1.5], [3.0, 4.0], [1.0, 0.0]])
  m = classification_metrics([0, 1, 0, 0], logits.argmax(1), ["neg", "pos"], scores=logits)
  assert m["top1_accuracy"] == m["accuracy"] == 0.75


@pytest.mark.parametrize("labels, predictions, bad", [([0, 3], [0, 1], "3"),
                                                      ([0, 1], [-1, 1], "-1")])
def test_out_of_range_class_id_is_named(labels, predictions, bad):
  with pytest.raises(ValueError, match=rf"class id {bad}, outside range\(3\)"):
    classification_metrics(labels, predictions, ["a", "b", "c"])


def test_perplexity_and_its_cap():
  assert perplexity(2 * 100 * np.log(4.0), 200) == pytest.approx(
      {"loss": np.log(4.0), "perplexity": 4.0})
  assert perplexity(1e6, 1)["perplexity"] == pytest.approx(np.exp(50.0))
  with pytest.raises(ValueError, match="at least one token"):
    perplexity(1.0, 0)


def test_bleu_and_chrf_equal_sacrebleu():
  predictions = ["the cat sat on the mat today", "a dog barked at the postman"]
  references = ["the cat sat on a mat today", "the dog barked at the postman loudly"]
  scores, signature = generation_metrics(predictions, references)
  assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score)
  assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(predictions, [references]).score)
  assert "nrefs:1" in signature and "tok:13a" in signature
  assert all(isinstance(value, float) for value in scores.values())


def test_perfect_prediction_scores_100_with_variable_references():
  predictions = ["the quick brown fox jumps", "over the lazy sleeping dog"]
  references = [["a quick brown fox leaps", "the quick brown fox jumps"],
                ["over the lazy sleeping dog"]]
  scores, signature = generation_metrics(predictions, references)
  assert scores["bleu"] == pytest.approx(100.0)
  assert scores["chrf"] == pytest.approx(100.0)
  # ROUGE keeps the best-matching reference per example.
  assert scores["rouge1"] == scores["rouge2"] == scores["rougeL"] == pytest.approx(1.0)
  assert "nrefs:var" in signature


def test_rouge_english_by_hand():
  # 5 of 6 unigrams shared; bigrams the-cat, on-the, the-mat: 3 of 5; LCS "the cat on the mat".
  scores, _ = generation_metrics(["the cat sat on the mat"], ["the cat lay on the mat"])
  assert scores["rouge1"] == pytest.approx(5 / 6)
  assert scores["rouge2"] == pytest.approx(3 / 5)
  assert scores["rougeL"] == pytest.approx(5 / 6)


def test_rouge_stemming_option():
  stemmed, _ = generation_metrics(["cats running"], ["cat runs"])
  exact, _ = generation_metrics(["cats running"], ["cat runs"], use_stemmer=False)
  assert stemmed["rouge1"] == 1.0 and exact["rouge1"] == 0.0


def test_chinese_is_scored_per_character():
  same, signature = generation_metrics(["今天天气很好。"], ["今天天气很好。"], tokenize="zh")
  assert same["rouge1"] == same["rouge2"] == same["rougeL"] == 1.0
  assert same["bleu"] == pytest.approx(100.0)
  assert "tok:zh" in signature
  disjoint, _ = generation_metrics(["我喜欢猫"], ["他们去北京"], tokenize="zh")
  assert disjoint["rouge1"] == disjoint["rouge2"] == disjoint["rougeL"] == 0.0
  # Why the char tokenizer exists: rouge-score's default one drops non-ASCII entirely.
  default, _ = generation_metrics(["今天天气很好"], ["今天天气很好"])
  assert default["rouge1"] == 0.0


def test_generation_rejects_mismatched_lengths_and_unknown_tokenizer():
  with pytest.raises(ValueError, match="one reference"):
    generation_metrics(["a", "b"], ["a"])
  with pytest.raises(ValueError, match="tokenize must be one of"):
    generation_metrics(["a"], ["a"], tokenize="intl")


@pytest.fixture(scope="module")
def tokenizer():
  return load_tokenizer("embedded")


WORDS = ["Elizabeth", "Bennet", "visited", "Pemberton"]
WORD_LABELS = ["B-PER", "I-PER", "O", "B-LOC"]


def test_alignment_matches_running_text(tokenizer):
  input_ids, label_ids = align_labels_to_tokens(WORDS, WORD_LABELS, tokenizer, NER_LABELS)
  # Byte-level BPE with is_pretokenized encodes each word as if it began the text ("B",
  # "ennet"); the space prefix gives the ids the model sees in ordinary text.
  assert input_ids == tokenizer.encode(" ".join(WORDS)).ids
  without_prefix, _ = align_labels_to_tokens(WORDS, WORD_LABELS, tokenizer, NER_LABELS,
                                             prefix_space=False)
  assert without_prefix != input_ids
  word_ids = tokenizer.encode(" ".join(WORDS)).word_ids
  assert len(label_ids) == len(input_ids) > len(WORDS)  # some words split into sub-words
  assert [label for label in label_ids if label != IGNORE] == [1, 2, 0, 3]
  firsts = [i == 0 or word_ids[i] != word_ids[i - 1] for i in range(len(word_ids))]
  assert all((label != IGNORE) == first for label, first in zip(label_ids, firsts))


def test_alignment_label_all_subwords_continues_entities(tokenizer):
  _, label_ids = align_labels_to_tokens(["Pemberton"], ["B-LOC"], tokenizer, NER_LABELS,
                                        label_all_subwords=True)
  assert len(label_ids) > 1
  assert label_ids == [NER_LABELS["B-LOC"]] + [NER_LABELS["I-LOC"]] * (len(label_ids) - 1)


def test_alignment_ignores_special_tokens(tokenizer):
  with_eos = load_tokenizer("embedded")
  eos_id = tokenizer.token_to_id(END_OF_TEXT)
  with_eos.post_processor = TemplateProcessing(single=f"$A {END_OF_TEXT}",
                                               special_tokens=[(END_OF_TEXT, eos_id)])
  input_ids, label_ids = align_labels_to_tokens(WORDS, WORD_LABELS, with_eos, NER_LABELS)
  assert input_ids[-1] == eos_id and label_ids[-1] == IGNORE


def test_alignment_unknown_label_names_the_allowed_set(tokenizer):
  with pytest.raises(ValueError, match=r"'B-ORG'.*'B-LOC', 'B-PER'"):
    align_labels_to_tokens(["Netherfield", "Park"], ["B-ORG", "I-ORG"], tokenizer, NER_LABELS)


def test_entity_f1_with_a_wrong_boundary():
  true = [["B-PER", "I-PER", "O", "B-LOC"]]
  pred = [["B-PER", "O", "O", "B-LOC"]]
  # The truncated PER span is a false positive and the full one a false negative; LOC is a
  # true positive: P = R = F1 = 1/2.
  m = entity_metrics(true, pred)
  assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((0.5, 0.5, 0.5))
  assert m["f1/PER"] == 0.0 and m["f1/LOC"] == 1.0


def test_token_predictions_back_to_word_tags(tokenizer):
  id_to_label = {i: label for label, i in NER_LABELS.items()}
  _, label_ids = align_labels_to_tokens(WORDS, WORD_LABELS, tokenizer, NER_LABELS)
  # Predictions on later sub-words disagree with the first ones (B-PER inside "Pemberton")
  # and are discarded: the first sub-word decides the word's tag.
  preds = [NER_LABELS["B-PER"] if label == IGNORE else label for label in label_ids]
  padded = 3
  true_tags, pred_tags = tags_from_token_predictions(
      [preds + [0] * padded], [label_ids + [IGNORE] * padded], id_to_label)
  assert true_tags == pred_tags == [WORD_LABELS]
  assert entity_metrics(true_tags, pred_tags)["f1"] == 1.0
