"""A regression head in `jaxlm train` (model.classifier = "regression", STS-B style): rows
that carry a float32 score at each example's last token, training to an MSE well under the
predict-the-mean baseline, `jaxlm eval`'s report, bad input named, and Hugging Face
*ForSequenceClassification with problem_type "regression", both ways."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import cli
from jaxlm.config import ConfigError, model_config
from jaxlm.data.build import cache_key
from jaxlm.data.pipeline import build_train_data, resolve_settings
from jaxlm.data.shaping import decode_scores, encode_scores
from jaxlm.data.sources import DataError, parse_source
from jaxlm.data.tokens import TextTokenizer
from jaxlm.train.loop import Run, train
from jaxlm.train.step import target_scores

from tests.helpers import assert_trees_close
from tests.conftest import make_tiny_config

KEYWORD = "red"
FILLER = ["the", "a", "garden", "quiet", "morning", "house", "walk", "old"]
REGRESSION = {"model.num_labels": 1, "model.classifier": "regression", "data.format": "pairs",
              "data.prompt_template": "{text_a}\n{text_b}", "data.validation_fraction": 0.25}


@pytest.fixture(scope="module")
def scored_pairs(tmp_path_factory):
  """160 pairs of five words; the score is half the number of times KEYWORD occurs in them,
  a function of the text that a 2-layer model learns from scratch."""
  rng = np.random.default_rng(0)
  words = FILLER + [KEYWORD]
  odds = [0.1] * len(FILLER) + [0.2]
  rows = []
  for i in range(160):
    a, b = (list(rng.choice(words, size=5, p=odds)) for _ in range(2))
    rows.append({"text_a": " ".join(a) + f" {i}", "text_b": " ".join(b),
                 "label": (a.count(KEYWORD) + b.count(KEYWORD)) / 2})
  path = tmp_path_factory.mktemp("scored") / "pairs.jsonl"
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  return path


def regression_config(token_cache, sources, **overrides):
  """conftest's tiny fp32 setup as a regression run, for a module-scoped run."""
  return make_tiny_config(token_cache, **{
      "optim__learning_rate": 3e-3, "train__log_every": 10, "checkpoint__every": 1000,
      "data__sources": (str(sources),), **{k.replace(".", "__"): v for k, v in REGRESSION.items()},
      **overrides})


@pytest.fixture(scope="module")
def trained(scored_pairs, token_cache, tmp_path_factory):
  """60 steps, evaluated every 20 on the whole validation split, stopping early on
  eval_pearson (patient enough to run to the end)."""
  config = regression_config(
      token_cache, scored_pairs, train__steps=60, train__eval_every=20,
      train__eval_batches=16, train__early_stopping__metric="eval_pearson",
      train__early_stopping__mode="max", train__early_stopping__patience=5)
  workdir = tmp_path_factory.mktemp("regression") / "run"
  return config, workdir, train(config, workdir)


def validation_scores(config):
  data = build_train_data(config.data, "embedded", config.data.seq_len, config.data.batch_size,
                          config.data.seed, regression=True)
  parts = data.validation.parts[0]
  scores = decode_scores(parts["targets"])[parts["loss_mask"].astype(bool)]
  data.close()
  return scores


def test_scores_round_trip_exactly_through_the_int32_targets():
  tiny = np.finfo(np.float32).smallest_subnormal
  values = np.array([0.0, -0.0, 1.0, -2.5, 0.1, np.pi, 5.0, -1e-30, tiny, 3.4028235e38,
                     -3.4028235e38, 12345.678], np.float32)
  encoded = encode_scores(values)
  assert encoded.dtype == np.int32
  # Bit for bit, the sign of -0.0 and the subnormal included; on the host and in the step.
  np.testing.assert_array_equal(decode_scores(encoded).view(np.uint32), values.view(np.uint32))
  on_device = np.asarray(jax.jit(target_scores)(jnp.asarray(encoded)))
  np.testing.assert_array_equal(on_device.view(np.uint32), values.view(np.uint32))
  assert decode_scores(np.zeros(3, np.int32)).tolist() == [0.0, 0.0, 0.0]  # unlabelled tokens


def test_each_example_carries_its_score_at_its_last_token(scored_pairs, token_cache):
  settings = {"sources": (str(scored_pairs),), "format": "pairs", "cache_dir": token_cache,
              "validation_fraction": 0.25}
  data = build_train_data(settings, "embedded", 32, 8, 0, regression=True)
  assert data.meta["dtypes"]["targets"] == "int32"  # never uint16: all 32 bits of a float
  truth = sorted(np.float32(json.loads(line)["label"]) for line in open(scored_pairs))
  found = []
  for parts in (data.train.parts[0], data.validation.parts[0]):
    for row in range(len(parts["input_ids"])):
      segments = parts["segment_ids"][row]
      for s in np.unique(segments[segments > 0]):
        where = np.flatnonzero(segments == s)
        assert parts["loss_mask"][row][where].tolist() == [0] * (len(where) - 1) + [1]
        found.append(decode_scores(parts["targets"][row][where[-1:]])[0])
  assert sorted(found) == truth
  # Through the loader, as the step receives it.
  batch = data.train.batch(0)
  assert batch["targets"].dtype == np.int32 and set(
      decode_scores(batch["targets"])[batch["loss_mask"] > 0]) <= set(truth)
  data.close()
  # Score rows are cached apart from any other rows of the same settings.
  tok, sources = TextTokenizer("embedded"), [parse_source(str(scored_pairs))]
  keys = [cache_key(sources, tok, resolve_settings(settings, 32, **head), 32, 0)
          for head in ({"regression": True}, {"label_head": True})]
  assert data.directory.name == f"rows-{keys[0][:32]}" and keys[0] != keys[1]


def test_gradient_accumulation_is_exact_for_squared_error(scored_pairs, token_cache):
  # Each micro-batch of 4 rows over data x fsdp = 4 devices.
  config = regression_config(token_cache, scored_pairs, mesh__fsdp=4, mesh__tensor=2)
  batch = build_train_data(config.data, "embedded", 32, 8, 0, regression=True).train.batch(0)
  results = []
  for accum in (1, 2):
    with config.unlocked():
      config.train.grad_accum_steps = accum
    run = Run.build(config)
    state, metrics = run.trainer.train_step(run.trainer.init_state(0), run.global_batch(batch))
    results.append((jax.device_get(state["params"]), jax.device_get(metrics)))
  (full, full_metrics), (accum, accum_metrics) = results
  assert set(full_metrics) >= {"loss", "tokens"} and "nll" not in full_metrics
  mask = batch["loss_mask"] > 0
  assert float(full_metrics["tokens"]) == mask.sum()
  np.testing.assert_allclose(full_metrics["loss"], accum_metrics["loss"], rtol=1e-6)
  assert_trees_close(full, accum, rtol=1e-4, atol=1e-6)


def test_regression_learns_well_below_the_mean_baseline(trained):
  config, workdir, metrics = trained
  scores = validation_scores(config)
  baseline = float(np.var(scores))  # the MSE of predicting the mean score
  logged = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  evaluated = [m for m in logged if "eval_mse" in m]
  assert [m["step"] for m in evaluated] == [0, 20, 40, 60]
  assert {"eval_loss", "eval_mse", "eval_rmse", "eval_mae", "eval_pearson",
          "eval_spearman"} <= set(evaluated[0])
  assert not any("accuracy" in k or "perplexity" in k for m in logged for k in m)
  assert evaluated[0]["eval_mse"] > baseline  # a random head is worse than the mean
  assert metrics["eval_mse"] == metrics["eval_loss"] < 0.25 * baseline
  assert metrics["eval_rmse"] == pytest.approx(np.sqrt(metrics["eval_mse"]))
  assert metrics["eval_pearson"] > 0.9 and metrics["eval_spearman"] > 0.85
  assert metrics["loss"] < 0.1  # the training MSE
  best = json.loads((workdir / "best.json").read_text())
  assert best["metric"] == "eval_pearson"
  assert best["value"] == max(m["eval_pearson"] for m in evaluated)


def test_jaxlm_eval_reports_the_regression_metrics(trained, capsys):
  _, workdir, metrics = trained
  best = json.loads((workdir / "best.json").read_text())
  at_best = next(json.loads(line) for line in open(workdir / "metrics.jsonl")
                 if json.loads(line)["step"] == best["step"] and "eval_mse" in line)
  capsys.readouterr()
  assert cli.main(["eval", "--model", str(workdir)]) == 0
  printed = capsys.readouterr().out.strip().splitlines()
  result = json.loads(printed[-1])
  for name in ("mse", "rmse", "mae", "pearson", "spearman"):
    assert any(line.split()[:1] == [name] for line in printed), name
    # The whole validation split, as training's evaluation saw it at the best step.
    assert result[name] == pytest.approx(at_best[f"eval_{name}"], rel=1e-4, abs=1e-6)
  assert result["loss"] == result["mse"] and "perplexity" not in result
  assert result["examples"] == len(validation_scores(trained[0]))


def test_export_to_transformers_predicts_the_same_scores(trained, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from jaxlm.evaluate.run import eval_rows, load_eval_model, regression_predictions
  config, workdir, _ = trained
  assert cli.main(["convert", "--to-hf", str(workdir), "--out", str(tmp_path / "hf")]) == 0
  exported = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert exported["architectures"] == ["LlamaForSequenceClassification"]
  assert exported["num_labels"] == 1 and exported["problem_type"] == "regression"
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
  batch = eval_rows(config, "embedded", "validation", regression=True).batch(0)
  ours, scores = regression_predictions(load_eval_model(workdir), batch)
  theirs, losses = [], []
  for row, segments in enumerate(batch["segment_ids"]):
    for s in np.unique(segments[segments > 0]):
      ids = torch.as_tensor(batch["input_ids"][row][segments == s][None].astype(np.int64))
      with torch.no_grad():
        out = hf(ids, labels=torch.tensor([float(scores[len(theirs)])]))
      theirs.append(float(out.logits[0, 0]))
      losses.append(float(out.loss))
  np.testing.assert_allclose(ours, theirs, atol=1e-4)
  # transformers trains it as what it is: its loss is our squared error.
  np.testing.assert_allclose(losses, (np.array(theirs) - scores) ** 2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2"])
def test_transformers_regression_heads_import_and_export(family, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  import jaxlm
  from jaxlm.loading import load_params, save_hf_dir
  prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gpt2": "GPT2"}[family]
  shape = (dict(n_embd=32, n_layer=2, n_head=4, n_positions=64) if family == "gpt2" else
           dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
  # No problem_type for GPT-2: one label alone makes transformers regress.
  problem = {} if family == "gpt2" else {"problem_type": "regression"}
  hf_config = getattr(transformers, prefix + "Config")(vocab_size=96, num_labels=1,
                                                       pad_token_id=0, **shape, **problem)
  torch.manual_seed(0)
  model = getattr(transformers, prefix + "ForSequenceClassification")(hf_config).eval()
  with torch.no_grad():  # a head of std 1, so a transposed or dropped weight shows
    model.score.weight.normal_(0, 1.0)
  model.save_pretrained(tmp_path / "hf")
  ids = np.random.default_rng(0).integers(1, 96, (3, 9))

  def hf_scores(m):
    with torch.no_grad():
      return m(torch.as_tensor(ids)).logits[:, 0].numpy()

  ours = jaxlm.load_model(tmp_path / "hf")
  assert (ours.cfg.classifier, ours.cfg.num_labels) == ("regression", 1)
  np.testing.assert_allclose(np.asarray(ours(ids))[:, -1, 0], hf_scores(model), atol=1e-4)
  out = save_hf_dir(load_params(tmp_path / "hf"), tmp_path / "back")
  back = json.loads((out / "config.json").read_text())
  assert back["problem_type"] == "regression" and back["num_labels"] == 1
  reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
  np.testing.assert_allclose(hf_scores(reloaded), hf_scores(model), atol=1e-6)


def test_labels_that_are_not_finite_numbers_are_malformed_rows(scored_pairs, token_cache,
                                                              tmp_path):
  bad = tmp_path / "bad.jsonl"
  rows = [{"text_a": "a", "text_b": "b", "label": value}
          for value in ("high", True, None, [1.0], 1e39)]
  # NaN is not JSON, but Python's json (which reads the rows) writes and reads it.
  bad.write_text("".join(json.dumps(row) + "\n" for row in rows)
                 + '{"text_a": "c", "text_b": "d", "label": NaN}\n')
  settings = {"sources": (str(scored_pairs), str(bad)), "format": "pairs",
              "cache_dir": token_cache, "validation_fraction": 0.25}
  with pytest.raises(DataError, match="6 of 166 rows") as error:
    build_train_data(settings, "embedded", 32, 8, 0, regression=True)
  message = str(error.value)
  assert "field 'label' must be a number for a regression head, got str 'high'" in message
  assert "got bool True" in message and "missing field 'label'" in message
  assert "must be a finite number (float32), got 1e+39" in message and "got nan" in message
  data = build_train_data({**settings, "error_budget": 6}, "embedded", 32, 8, 0,
                          regression=True)
  assert data.meta["problems"]["malformed"] == 6
  data.close()


def test_settings_that_do_not_fit_a_regression_head_are_named(scored_pairs, token_cache,
                                                              tmp_path):
  def run(**overrides):
    return train(regression_config(token_cache, scored_pairs, **overrides), tmp_path / "run")

  with pytest.raises(ConfigError, match="unset data.labels, or train a classifier"):
    run(data__labels=("low", "high"))
  with pytest.raises(ValueError, match="regression head predicts one number: set num_labels=1"):
    run(model__num_labels=3)
  with pytest.raises(ConfigError, match="set model.num_labels = 1"):
    run(model__num_labels=0)
  # Left unset, the regression head's one output is implied.
  assert model_config(regression_config(token_cache, scored_pairs,
                                        model__num_labels=None)).num_labels == 1
  with pytest.raises(ConfigError, match="'classification' .* or 'pairs'"):
    run(data__format="text")
  with pytest.raises(ConfigError, match="train.label_smoothing and train.z_loss do not apply"):
    run(train__label_smoothing=0.1, train__z_loss=1e-4)
  with pytest.raises(DataError, match="unset data.labels"):
    build_train_data({"sources": (str(scored_pairs),), "format": "pairs", "labels": ("x",),
                      "cache_dir": token_cache}, "embedded", 32, 8, 0, regression=True)
