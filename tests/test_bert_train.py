"""Masked-LM training of BERT / RoBERTa encoders in `jaxlm train`, proven against transformers
on tiny random models: the loss falls, the first step's loss is transformers' own on the same
corrupted batch, resume is exact, the workdir exports to a directory transformers loads with
the same logits, eval masks with a fixed key, shardings follow the rules, and the refusals."""
import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxlm import cli  # noqa: E402
from jaxlm.config import ConfigError, apply_overrides, base_config  # noqa: E402
from jaxlm.convert.bert_hf import load_bert, save_random_encoder  # noqa: E402
from jaxlm.data.pipeline import build_train_data, resolve_settings  # noqa: E402
from jaxlm.data.sources import DataError  # noqa: E402
from jaxlm.evaluate.run import evaluate_model, eval_config  # noqa: E402
from jaxlm.loading import load_params  # noqa: E402
from jaxlm.models.bert import bert_from_params  # noqa: E402
from jaxlm.train.loop import Run, train  # noqa: E402
from jaxlm.train.options import training_tokenizer  # noqa: E402
from jaxlm.train.mlm import corrupt_batch  # noqa: E402
from jaxlm.train.step import mlm_step_key  # noqa: E402

from tests.helpers import assert_trees_close  # noqa: E402

FAMILIES = ("bert", "roberta")
STEPS = 16
WORDS = "cat dog bird fish red blue green big small old new".split()


def _texts():
  """Learnable: each text states two words twice, so a masked one is told by the other."""
  rng = random.Random(0)
  return [f"the {a} and the {b} saw the {a} and the {b} {i}"
          for i, (a, b) in enumerate(rng.sample(WORDS, 2) for _ in range(300))]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  path = tmp_path_factory.mktemp("mlm_corpus") / "corpus.jsonl"
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts()))
  return path


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("mlm_hf")
  return {family: save_random_encoder(root / family, family, texts=_texts(), vocab_size=300,
                                      hidden_size=32, mlp_dim=64, num_heads=4,
                                      max_positions=64)
          for family in FAMILIES}


@pytest.fixture(scope="module")
def make_config(corpus, hf_dirs, tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("mlm_cache"))

  def make(family="bert", **overrides):
    config = base_config()
    apply_overrides(config, {
        "model.init_from": str(hf_dirs[family]), "model.compute_dtype": "float32",
        "model.dropout_rate": 0.0, "data.sources": (str(corpus),), "data.seq_len": 32,
        "data.batch_size": 8, "data.cache_dir": cache, "data.add_special_tokens": True,
        "data.shaping": "window", "data.validation_fraction": 0.05,
        "optim.learning_rate": 1e-2, "optim.warmup_steps": 2, "optim.decay_steps": STEPS,
        "train.steps": STEPS, "train.log_every": 1, "train.eval_every": STEPS,
        "train.eval_batches": 100, "checkpoint.every": STEPS // 2,
        "checkpoint.async_save": False,
        **{k.replace("__", "."): v for k, v in overrides.items()}})
    return config

  return make


@pytest.fixture(scope="module")
def runs(make_config, tmp_path_factory):
  """An uninterrupted run of each family: (workdir, last metrics)."""
  root = tmp_path_factory.mktemp("mlm_runs")
  return {family: (root / family, train(make_config(family), root / family))
          for family in FAMILIES}


def _metrics(workdir):
  return {row["step"]: row for row in map(json.loads, open(workdir / "metrics.jsonl"))}


def _hf_model(path):
  return transformers.AutoModelForMaskedLM.from_pretrained(path).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_first_step_loss_is_transformers_mlm_loss_and_loss_falls(family, runs, make_config,
                                                                 hf_dirs):
  workdir, last = runs[family]
  losses = {step: row["loss"] for step, row in _metrics(workdir).items() if "loss" in row}
  assert sorted(losses) == list(range(1, STEPS + 1))
  assert losses[STEPS] < losses[1] - 1.0, losses
  # The first batch as the run read it, corrupted with the first step's key.
  config = make_config(family)
  run = Run.build(config)
  data = build_train_data(config.data, training_tokenizer(config), 32, 8, config.data.seed)
  batch = next(data.train)
  data.close()
  corrupted = jax.device_get(corrupt_batch(mlm_step_key(jax.random.PRNGKey(0), 0),
                                           {k: jnp.asarray(v) for k, v in batch.items()},
                                           run.trainer.mlm))
  chosen = corrupted["loss_mask"].astype(bool)
  assert chosen.any() and not (chosen & (batch["segment_ids"] == 0)).any()
  assert not np.isin(batch["input_ids"][chosen], run.trainer.mlm.special_ids).any()
  offset = run.model_cfg.position_offset
  with torch.no_grad():
    hf_loss = _hf_model(hf_dirs[family])(
        input_ids=torch.tensor(corrupted["input_ids"], dtype=torch.long),
        attention_mask=torch.as_tensor(batch["segment_ids"] > 0, dtype=torch.long),
        position_ids=torch.as_tensor(batch["positions"] + offset, dtype=torch.long),
        labels=torch.as_tensor(np.where(chosen, batch["input_ids"], -100),
                               dtype=torch.long)).loss.item()
  assert abs(losses[1] - hf_loss) < 1e-4, (losses[1], hf_loss)


def test_resume_equals_uninterrupted_run(runs, make_config, tmp_path):
  straight, _ = runs["bert"]
  resumed = tmp_path / "resumed"
  train(make_config(train__steps=STEPS // 2), resumed)
  train(make_config(), resumed)  # picks up half way
  a, b = _metrics(straight), _metrics(resumed)
  for step in range(1, STEPS + 1):
    assert a[step]["loss"] == b[step]["loss"], step
  assert a[STEPS]["eval_loss"] == b[STEPS]["eval_loss"]
  assert_trees_close(load_params(straight).params, load_params(resumed).params, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_in_transformers_with_equal_logits(family, runs, tmp_path):
  workdir, _ = runs[family]
  out = tmp_path / "hf"
  assert cli.main(["convert", "--to-hf", str(workdir), "--out", str(out)]) == 0
  model = _hf_model(out)
  assert type(model).__name__ == ("Bert" if family == "bert" else "Roberta") + "ForMaskedLM"
  assert transformers.AutoTokenizer.from_pretrained(out).mask_token_id is not None
  loaded = load_params(workdir)
  ours = bert_from_params(loaded.cfg, loaded.params)
  pad = loaded.cfg.pad_token_id
  ids = np.random.default_rng(0).integers(5, loaded.cfg.vocab_size, (2, 12))
  mask = np.ones_like(ids)
  ids[1, 8:], mask[1, 8:] = pad, 0
  logits = np.asarray(ours.mlm_logits(ours(jnp.asarray(ids), jnp.asarray(mask))))
  with torch.no_grad():
    hf_logits = model(input_ids=torch.as_tensor(ids),
                      attention_mask=torch.as_tensor(mask)).logits.numpy()
  real = mask.astype(bool)
  np.testing.assert_allclose(logits[real], hf_logits[real], atol=1e-4)


def test_eval_uses_a_fixed_mask_and_matches_training_eval(runs):
  workdir, last = runs["roberta"]
  config = eval_config(None, str(workdir))
  first = evaluate_model(config, str(workdir))
  assert evaluate_model(config, str(workdir)) == first
  assert abs(first["loss"] - last["eval_loss"]) < 1e-5, (first, last)
  assert first["tokens"] > 0


def test_packed_rows_attend_within_their_segment(hf_dirs):
  from flax import nnx
  cfg, params = load_bert(hf_dirs["roberta"])  # positions count from pad_token_id + 1 = 2
  assert cfg.num_params() == sum(x.size for x in jax.tree.leaves(params))
  graphdef = nnx.graphdef(bert_from_params(cfg, params))
  run = jax.jit(lambda params, ids, **kw: nnx.merge(graphdef, params)(ids, **kw))
  rng = np.random.default_rng(0)
  a, b = rng.integers(3, 50, 7), rng.integers(3, 50, 5)
  # Packed: a, b, padding in one row. Apart: a row each, right-padded (RoBERTa's pad id).
  packed = jnp.asarray([np.concatenate([a, b, [0] * 4])])
  segments = jnp.asarray([[1] * 7 + [2] * 5 + [0] * 4])
  positions = jnp.asarray([list(range(7)) + list(range(5)) + [0] * 4])
  hidden = run(params, packed, positions=positions, segment_ids=segments)
  apart = jnp.asarray([np.pad(a, (0, 9), constant_values=1), np.pad(b, (0, 11),
                                                                    constant_values=1)])
  alone = run(params, apart, attention_mask=apart != 1)
  np.testing.assert_allclose(hidden[0, :7], alone[0, :7], atol=1e-5)
  np.testing.assert_allclose(hidden[0, 7:12], alone[1, :5], atol=1e-5)


def test_shardings_on_an_fsdp_by_tensor_mesh(make_config, hf_dirs):
  config = make_config(
      model__init_from="", model__preset="bert-tiny", model__vocab_size=320,
      model__hidden_size=64, model__num_heads=4, model__mlp_dim=128,
      data__tokenizer=str(hf_dirs["bert"]), mesh__fsdp=4, mesh__tensor=2)
  run = Run.build(config)
  state = run.fresh_state()
  params = state["params"]
  expected = {
      ("embeddings", "word", "table"): P("tensor", "fsdp"),
      ("embeddings", "position"): P(None, "fsdp"),
      ("layers", "attention", "q_proj", "kernel"): P(None, "fsdp", "tensor", None),
      ("layers", "attention", "o_proj", "kernel"): P(None, "tensor", None, "fsdp"),
      ("layers", "mlp", "up", "kernel"): P(None, "fsdp", "tensor"),
      ("layers", "mlp", "down", "kernel"): P(None, "tensor", "fsdp"),
      ("mlm_head", "bias"): P("tensor"),
  }
  for path, spec in expected.items():
    leaf = params
    for key in path:
      leaf = leaf[key]
    assert leaf.sharding.spec == spec, (path, leaf.sharding.spec)
    assert len(leaf.sharding.device_set) == 8
  # The optimizer moments follow their parameters.
  moments = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state["opt_state"])
             if "['q_proj']['kernel']" in jax.tree_util.keystr(path)]
  assert moments and all(m.sharding.spec == P(None, "fsdp", "tensor", None) for m in moments)


def test_refusals(make_config, hf_dirs, runs, capsys, tmp_path):
  with pytest.raises(ConfigError, match="no mask token.*data.tokenizer"):
    Run.build(make_config(model__init_from="", model__preset="bert-tiny",
                          model__vocab_size=4096))  # the embedded byte-level BPE
  with pytest.raises(ConfigError, match="data.format = 'text'"):
    Run.build(make_config(data__format="sft", data__add_special_tokens=False))
  with pytest.raises(ConfigError, match="model.num_kv_heads"):
    Run.build(make_config(model__num_kv_heads=2))
  with pytest.raises(DataError, match="add_special_tokens"):
    resolve_settings({"format": "sft", "add_special_tokens": True}, 32)
  workdir, _ = runs["bert"]
  assert cli.main(["generate", "--model", str(workdir), "--prompt", "the cat"]) == 2
  assert "encoder" in capsys.readouterr().err
  out = tmp_path / "jaxlm_dir"
  assert cli.main(["convert", "--from-hf", str(hf_dirs["bert"]), "--out", str(out)]) == 2
  assert "--to-hf" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_each_document_is_wrapped_once_in_the_tokenizers_special_tokens(make_config, family):
  from jaxlm.data.tokens import TextTokenizer
  config = make_config(family)
  spec = training_tokenizer(config)
  tok = TextTokenizer(spec, add_special_tokens=True)
  (first,), (last,) = tok.wrap  # [CLS] [SEP] / <s> </s>
  data = build_train_data(config.data, spec, config.data.seq_len, 8, 0)
  rows = data.train.parts[0]
  real = rows["input_ids"][0][rows["segment_ids"][0] > 0]
  # A short document is one window and the encoder reads it as [CLS] ... [SEP]: the
  # end-of-text token the pipeline appends is only ever a (next-token) target, which
  # masked-LM does not use.
  assert real[0] == first and real[-1] == last and last not in real[1:-1]
  data.close()


def test_recipe_config_trains_on_the_shipped_corpus(hf_dirs, tmp_path):
  """configs/mlm_bert.py at a tiny size: its masking, packing and special tokens on the
  shipped Jane Austen corpus with a stand-in BERT, evaluated before and after a step."""
  from jaxlm.config import load_config
  config = load_config("mlm_bert", [
      f"--config.model.init_from={hf_dirs['bert']}", f"--config.data.cache_dir={tmp_path}",
      "--config.data.seq_len=32", "--config.data.batch_size=8", "--config.train.steps=2",
      "--config.train.log_every=1", "--config.train.eval_every=2",
      "--config.train.eval_batches=1", "--config.checkpoint.async_save=False"])
  metrics = train(config, tmp_path / "run")
  logged = _metrics(tmp_path / "run")
  assert logged[0]["eval_loss"] > 0 and np.isfinite(metrics["eval_loss"])
  assert logged[2]["loss"] > 0 and logged[2]["tokens_seen"] == 2 * 8 * 32
