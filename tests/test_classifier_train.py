"""A classification head in `jaxlm train`: the rows it trains on, the run, its evaluation,
a classifier fine-tuned with LoRA from a language model, and its export to transformers."""
import json

import jax
import numpy as np
import pytest

from jaxlm.config import ConfigError
from jaxlm.data.pipeline import build_train_data
from jaxlm.data.sources import DataError
from jaxlm.train.loop import train

LABELS = ("dog", "cat", "bird")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
  """120 rows whose label is named by a keyword in the text, plus a duplicate and a row with
  a label outside the set."""
  path = tmp_path_factory.mktemp("labelled") / "rows.jsonl"
  rng = np.random.default_rng(0)
  filler = ["the", "a", "garden", "quiet", "morning", "walks", "sees", "near", "old", "house"]
  rows = []
  for i in range(120):
    label = LABELS[i % 3]
    words = list(rng.choice(filler, size=int(rng.integers(3, 12))))
    words.insert(int(rng.integers(0, len(words))), label)
    rows.append({"text": " ".join(words) + f" {i}", "label": label})
  rows += [rows[0], {"text": "a fish swims", "label": "fish"}]
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  return path


def classifier_overrides(labelled, **more):
  return {"model__num_labels": 3, "data__sources": (str(labelled),),
          "data__format": "classification", "data__labels": LABELS,
          "data__prompt_template": "{text}", "data__error_budget": 1,
          "data__validation_fraction": 0.25, "data__seq_len": 16, **more}


def test_each_example_has_one_target_its_class_at_its_last_token(labelled, token_cache):
  data = build_train_data(
      {"sources": (str(labelled),), "format": "classification", "labels": LABELS,
       "prompt_template": "{text}", "error_budget": 1, "cache_dir": token_cache,
       "validation_fraction": 0.25}, "embedded", 16, 4, 0, label_head=True)
  stats = data.meta["stats"]
  assert stats["duplicates"] == 1 and data.meta["problems"]["malformed"] == 1
  assert stats["train_loss_tokens"] + stats["validation_loss_tokens"] == 120
  parts = data.train.parts[0]
  for row in range(len(parts["input_ids"])):
    segments = parts["segment_ids"][row]
    for s in np.unique(segments[segments > 0]):
      where = np.flatnonzero(segments == s)
      mask = parts["loss_mask"][row][where]
      # Exactly the segment's last token carries the class index, nothing else a target.
      assert mask.tolist() == [0] * (len(where) - 1) + [1]
      assert parts["targets"][row][where[-1]] < len(LABELS)
      assert (parts["targets"][row][where[:-1]] == 0).all()
  data.close()


def test_head_rows_refuse_windows_and_unlabelled_formats(labelled, token_cache):
  settings = {"sources": (str(labelled),), "format": "classification", "labels": LABELS,
              "error_budget": 1, "cache_dir": token_cache, "overflow": "window"}
  with pytest.raises(DataError, match="one piece per example"):
    build_train_data(settings, "embedded", 16, 4, 0, label_head=True)
  with pytest.raises(DataError, match="needs data.format 'classification' or 'pairs'"):
    build_train_data({**settings, "format": "text", "overflow": "auto"}, "embedded", 16, 4, 0,
                     label_head=True)


def test_label_count_mismatch_and_wrong_format_are_config_errors(labelled, tiny_config,
                                                                 tmp_path):
  with pytest.raises(ConfigError, match="model.num_labels = 2 classes but data.labels names 3"):
    train(tiny_config(**classifier_overrides(labelled, model__num_labels=2)), tmp_path / "a")
  with pytest.raises(ConfigError, match="needs data.format 'classification' or 'pairs'"):
    train(tiny_config(**classifier_overrides(labelled, data__format="text")), tmp_path / "b")


def test_classifier_learns_and_jaxlm_eval_agrees(labelled, tiny_config, tmp_path):
  from jaxlm.evaluate.run import evaluate_model, eval_config
  config = tiny_config(**classifier_overrides(
      labelled, train__steps=40, train__eval_every=20, train__eval_batches=8,
      optim__learning_rate=3e-3, checkpoint__every=20))
  metrics = train(config, tmp_path / "run")
  logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  evaluated = [m for m in logged if "eval_accuracy" in m]
  assert evaluated[0]["step"] == 0 and evaluated[0]["eval_accuracy"] < 0.7
  # The keyword decides the label: a 2-layer model learns it from scratch.
  assert metrics["eval_accuracy"] >= 0.9 and metrics["eval_f1_macro"] >= 0.9
  result = evaluate_model(eval_config(None, str(tmp_path / "run")), str(tmp_path / "run"))
  assert np.sum(result["confusion_matrix"]) == result["examples"]
  assert result["accuracy"] == pytest.approx(metrics["eval_accuracy"])
  assert result["loss"] == pytest.approx(metrics["eval_loss"], rel=1e-4)


def test_lora_classifier_from_a_language_model_exports_to_transformers(labelled, tiny_config,
                                                                        tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from jaxlm.evaluate.run import eval_rows, head_scores, load_eval_model
  from jaxlm.loading import load_params
  from jaxlm.train.loop import Run

  base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
  base.save_pretrained(tmp_path / "base")
  config = tiny_config(**classifier_overrides(
      labelled, model__init_from=str(tmp_path / "base"), model__preset="tiny",
      finetune__lora_targets="attention", finetune__lora_rank=4, train__steps=4,
      optim__learning_rate=1e-2))
  run = Run.build(config)
  # The new head trains beside the adapters; the base (no lm_head any more) stays frozen.
  trained = jax.tree_util.tree_flatten_with_path(run.trainer.split(
      run.trainer.trainable_mask)[0])[0]
  names = {"/".join(str(k.key) for k in path) for path, _ in trained}
  assert "score/kernel" in names and all("lora" in n or n == "score/kernel" for n in names)
  train(config, tmp_path / "run")
  merged = load_params(tmp_path / "run").params
  source = load_params(tmp_path / "base").params
  assert "lm_head" not in merged
  np.testing.assert_array_equal(merged["layers"]["mlp"]["up_proj"]["kernel"],
                                source["layers"]["mlp"]["up_proj"]["kernel"])

  from jaxlm.cli import main
  assert main(["convert", "--to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
  exported = transformers.AutoModelForSequenceClassification.from_pretrained(
      tmp_path / "hf").eval()
  assert exported.config.id2label == dict(enumerate(LABELS))
  model = load_eval_model(tmp_path / "run")
  batch = eval_rows(config, "embedded", "validation", label_head=True).batch(0)
  ours, _ = head_scores(model, batch)
  theirs = []
  for row, segments in enumerate(batch["segment_ids"]):
    for s in np.unique(segments[segments > 0]):
      ids = batch["input_ids"][row][segments == s]
      with torch.no_grad():
        logits = exported(torch.as_tensor(ids[None].astype(np.int64))).logits
      theirs.append(torch.log_softmax(logits, -1)[0].numpy())
  np.testing.assert_allclose(ours, np.stack(theirs), atol=1e-4)
