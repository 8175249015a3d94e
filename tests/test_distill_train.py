"""Knowledge distillation in `jaxlm train`: a model distilled from itself starts at zero, the
first step's loss is the distillation objective computed directly (with gradient
accumulation), the KL falls, a foreign vocabulary is refused, and the teacher stays out of
checkpoints while a resume reloads it and continues exactly."""
import ast
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import ConfigError
from jaxlm.convert.hf_config import family_for
from jaxlm.loading import LoadedParams, load_model, save_model_dir
from jaxlm.train.loop import Run, train

TEMPERATURE, ALPHA = 2.0, 0.5
# The teacher: shallower and narrower than the tiny student, with its vocabulary.
SMALL = dict(model__num_layers=1, model__hidden_size=32, model__mlp_dim=96)


def _rows(workdir):
  return [json.loads(line) for line in open(workdir / "metrics.jsonl")]


def _save_init(config, out, seed, head_scale=1.0):
  """A model directory holding the initialisation that `config` trains from with `seed`
  (head_scale > 1 sharpens its predictions, as a trained teacher's are)."""
  run = Run.build(config)
  params = jax.device_get(run.trainer.model_params(run.trainer.init_state(seed)))
  params["lm_head"] = jax.tree.map(lambda x: x * head_scale, params["lm_head"])
  cfg = run.model_cfg
  return str(save_model_dir(LoadedParams(cfg, params, family_for(cfg), None, None), out))


def _distilled(tiny_config, teacher, **overrides):
  return tiny_config(**{
      "distill__teacher": teacher, "distill__temperature": TEMPERATURE,
      "distill__alpha": ALPHA, "data__batch_size": 16, "train__grad_accum_steps": 2,
      "optim__learning_rate": 3e-3, "optim__decay_steps": 6, **overrides})


@pytest.fixture(scope="module")
def distilled_run(tmp_path_factory, token_cache):
  """One 6-step distillation (2 micro-batches a step) from a random smaller teacher."""
  from tests.conftest import tiny_config as factory
  make = factory.__wrapped__(token_cache)
  tmp = tmp_path_factory.mktemp("distill")
  teacher = _save_init(make(**SMALL), tmp / "teacher", seed=7, head_scale=30.0)
  config = _distilled(make, teacher)
  train(config, tmp / "run")
  return make, teacher, config, tmp / "run"


def test_distilling_a_model_into_itself_starts_at_zero(tiny_config, tmp_path):
  teacher = _save_init(tiny_config(), tmp_path / "self", seed=0)  # the student's own init
  config = tiny_config(distill__teacher=teacher, distill__alpha=1.0, distill__temperature=1.0,
                       train__steps=1)
  train(config, tmp_path / "run")
  first = _rows(tmp_path / "run")[0]
  assert first["loss"] == pytest.approx(0.0, abs=1e-6)
  assert first["distill_kl"] == pytest.approx(0.0, abs=1e-6)
  assert first["hard_loss"] > 1.0  # still reported, with weight 0


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_first_step_loss_is_the_distillation_objective(distilled_run):
  from jaxlm.data.pipeline import build_train_data

  make, teacher, config, workdir = distilled_run
  first = _rows(workdir)[0]
  data = build_train_data(config.data, config.data.tokenizer, config.data.seq_len,
                          config.data.batch_size, config.data.seed).train
  batch = data.batch(0)
  data.close()
  run = Run.build(make())
  student = nnx.merge(run.trainer.graphdef,
                      run.trainer.model_params(run.trainer.init_state(config.train.seed)))
  ids = jnp.asarray(batch["input_ids"])
  s = np.asarray(student(ids), np.float64)
  t = np.asarray(load_model(teacher)(ids), np.float64)
  assert s.shape == t.shape == (16, 32, 4096)

  mask = batch["loss_mask"].astype(np.float64)
  log_t, log_s = _log_softmax(t / TEMPERATURE), _log_softmax(s / TEMPERATURE)
  kl = (np.exp(log_t) * (log_t - log_s)).sum(-1) * TEMPERATURE**2
  nll = -np.take_along_axis(_log_softmax(s), batch["targets"][..., None], -1)[..., 0]
  kl, nll = (kl * mask).sum() / mask.sum(), (nll * mask).sum() / mask.sum()
  assert first["distill_kl"] == pytest.approx(kl, rel=1e-4)
  assert first["hard_loss"] == pytest.approx(nll, rel=1e-5)
  assert first["loss"] == pytest.approx(ALPHA * kl + (1 - ALPHA) * nll, rel=1e-5)


def test_distillation_lowers_the_kl(tiny_config, tmp_path):
  # A sharper version of the student's own initialisation: a teacher it can learn from in a
  # few steps.
  teacher = _save_init(tiny_config(), tmp_path / "sharp", seed=0, head_scale=8.0)
  config = tiny_config(distill__teacher=teacher, distill__alpha=1.0, distill__temperature=1.0,
                       optim__learning_rate=3e-3, optim__schedule="constant",
                       optim__warmup_steps=0, train__steps=12, checkpoint__every=100)
  train(config, tmp_path / "run")
  kls = [row["distill_kl"] for row in _rows(tmp_path / "run")]
  assert len(kls) == 12 and all(row["loss"] == row["distill_kl"]
                               for row in _rows(tmp_path / "run"))
  assert kls[-1] < 0.8 * kls[0], kls


def test_a_teacher_with_another_vocabulary_is_refused(tiny_config, tmp_path):
  teacher = _save_init(tiny_config(model__vocab_size=2048), tmp_path / "teacher", seed=7)
  with pytest.raises(ConfigError, match=r"vocabulary of 2048 tokens and the student 4096"):
    Run.build(tiny_config(distill__teacher=teacher))


def test_the_teacher_is_not_checkpointed_and_resume_matches(distilled_run, tmp_path):
  make, teacher, _, straight = distilled_run
  # The checkpoint holds the student's state alone.
  metadata = json.loads((straight / "checkpoints" / "6" / "state" / "_METADATA").read_text())
  saved = [ast.literal_eval(key) for key in metadata["tree_metadata"]]
  assert {path[0] for path in saved} == {"step", "params", "opt_state", "rng"}
  student = Run.build(make()).trainer.abstract_state(frozen=False)["params"]
  assert len([p for p in saved if p[0] == "params"]) == len(jax.tree.leaves(student))

  # Resume from step 3 (the teacher reloaded): steps 4-6 as in the uninterrupted run.
  resumed = tmp_path / "resumed"
  shutil.copytree(straight, resumed)
  shutil.rmtree(resumed / "checkpoints" / "6")
  train(_distilled(make, teacher), resumed)
  rows = _rows(resumed)
  assert [row["step"] for row in rows[-3:]] == [4, 5, 6]
  keys = ("loss", "distill_kl", "hard_loss")
  assert [[row[k] for k in keys] for row in rows[-3:]] == \
      [[row[k] for k in keys] for row in _rows(straight)[3:]]


def test_a_distilled_workdir_loads_without_its_teacher(distilled_run, tmp_path):
  _, teacher, _, straight = distilled_run
  moved = tmp_path / "teacher_gone"
  shutil.move(teacher, moved)
  try:
    logits = load_model(straight)(np.zeros((1, 4), np.int32))
  finally:
    shutil.move(moved, teacher)
  assert logits.shape == (1, 4, 4096) and np.isfinite(np.asarray(logits)).all()
