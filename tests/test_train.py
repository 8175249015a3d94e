"""The train loop end to end: resume, restore onto another mesh, refusing foreign
checkpoints, accumulation, and that the loss really falls."""
import collections
import json
import os
import threading
import traceback

import jax
import numpy as np
import pytest

from jaxlm.checkpoint import Checkpointer, CheckpointMismatchError
from jaxlm.config import ConfigError
from jaxlm.train.loop import Run, train

from tests.helpers import assert_trees_close


def _losses(workdir):
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  return {row["step"]: row["loss"] for row in rows if "loss" in row}


def _final_params(config, workdir, mesh=None):
  if mesh:
    with config.unlocked():
      config.mesh.update(mesh)
  run = Run.build(config)
  checkpointer = Checkpointer(workdir / "checkpoints", every=1, keep=10)
  state, data_state = checkpointer.restore(checkpointer.latest_step(),
                                           run.trainer.abstract_state())
  checkpointer.close()
  return state, data_state


def test_nothing_recompiles_after_the_first_step(tiny_config, tmp_path):
  """Logging, evaluation and checkpoints between steps leave every jitted function of the
  loop with one compile (a recompile would stall the steps it happens on). Orbax's own
  slicing while it saves is left out: its code, compiled once per array shape."""
  lowered = []

  def on_event(event, duration, fun_name="", **kwargs):
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration" and not any(
        "/orbax/" in frame.filename for frame in traceback.extract_stack()):
      lowered.append(fun_name)

  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    train(tiny_config(train__log_every=2, train__eval_every=2, checkpoint__every=2), tmp_path)
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)
  counts = collections.Counter(lowered)
  assert counts["jit(train_step)"] == counts["jit(eval_step)"] == 1
  assert max(counts.values()) == 1, counts


def test_resume_matches_uninterrupted_run(tiny_config, tmp_path):
  fixed = {"optim__decay_steps": 6}
  straight = tmp_path / "straight"
  train(tiny_config(**fixed), straight)
  resumed = tmp_path / "resumed"
  train(tiny_config(train__steps=3, **fixed), resumed)
  train(tiny_config(**fixed), resumed)  # same workdir: picks up at step 3

  a, b = _losses(straight), _losses(resumed)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
  for step in a:
    assert a[step] == b[step], (step, a[step], b[step])
  state_a, data_a = _final_params(tiny_config(**fixed), straight)
  state_b, data_b = _final_params(tiny_config(**fixed), resumed)
  assert data_a == data_b and (data_a["position"], data_a["seed"]) == (6, 0)
  assert int(state_a["step"]) == int(state_b["step"]) == 6
  assert_trees_close(state_a["params"], state_b["params"], rtol=0, atol=0)
  assert_trees_close(state_a["opt_state"], state_b["opt_state"], rtol=0, atol=0)


def test_restore_onto_a_different_mesh(tiny_config, tmp_path):
  train(tiny_config(mesh__fsdp=8), tmp_path)
  fsdp_state, _ = _final_params(tiny_config(mesh__fsdp=8), tmp_path)
  tp_state, _ = _final_params(tiny_config(), tmp_path, mesh=dict(data=4, fsdp=1, tensor=2))
  kernel = tp_state["params"]["layers"]["mlp"]["up_proj"]["kernel"]
  assert tuple(kernel.sharding.spec) == (None, None, "tensor")
  assert tuple(fsdp_state["params"]["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec) == (
      None, "fsdp", None)
  assert_trees_close(fsdp_state["params"], tp_state["params"], rtol=0, atol=0)


def test_checkpoint_of_another_model_is_refused_and_kept(tiny_config, tmp_path):
  train(tiny_config(), tmp_path)
  ckpt_dir = tmp_path / "checkpoints"
  before = {p: p.stat().st_mtime_ns for p in ckpt_dir.rglob("*") if p.is_file()}
  with pytest.raises(CheckpointMismatchError, match=r"hidden_size: checkpoint 64 vs config 128"):
    train(tiny_config(model__hidden_size=128), tmp_path)
  after = {p: p.stat().st_mtime_ns for p in ckpt_dir.rglob("*") if p.is_file()}
  assert before == after


def test_gradient_accumulation_equals_full_batch(tiny_config, tmp_path):
  train(tiny_config(train__steps=2), tmp_path / "full")
  train(tiny_config(train__steps=2, train__grad_accum_steps=2, mesh__fsdp=4,
                    mesh__data=1, mesh__tensor=2), tmp_path / "accum")
  full, accum = _losses(tmp_path / "full"), _losses(tmp_path / "accum")
  np.testing.assert_allclose([full[1], full[2]], [accum[1], accum[2]], rtol=1e-5)
  a, _ = _final_params(tiny_config(train__steps=2), tmp_path / "full")
  b, _ = _final_params(tiny_config(train__steps=2), tmp_path / "accum")
  assert_trees_close(a["params"], b["params"], rtol=1e-4, atol=1e-6)


def test_loss_falls_on_the_embedded_corpus(tiny_config, tmp_path):
  metrics = train(tiny_config(train__steps=40, optim__learning_rate=3e-3,
                              train__eval_every=40), tmp_path)
  losses = _losses(tmp_path)
  assert losses[1] > 8.0  # ln(4096) = 8.3 at initialisation
  assert losses[40] < losses[1] - 1.5
  assert np.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] < losses[1] - 1.0
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert rows[0]["step"] == 0 and rows[0]["eval_loss"] > 8.0  # evaluated before training
  assert {"loss", "perplexity", "learning_rate", "grad_norm", "tokens_per_s",
          "step_time_s"} <= set(rows[-1])
  assert any(name.startswith("events.out.tfevents")
             for name in os.listdir(tmp_path / "tensorboard"))


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tiny_config, tmp_path, capsys):
  fixed = {"optim__decay_steps": 6}
  train(tiny_config(**fixed), tmp_path / "straight")
  run = tmp_path / "run"
  train(tiny_config(**fixed), run)
  shards = sorted((run / "checkpoints" / "6" / "state").rglob("d/*"))
  victim = max(shards, key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated write
  train(tiny_config(**fixed), run)  # resumes from step 3, redoes 4..6
  out = capsys.readouterr().out
  assert "is incomplete or corrupt" in out and "Resuming from step 3" in out
  assert (run / "checkpoints" / "6.broken").is_dir()  # kept, not deleted
  a, _ = _final_params(tiny_config(**fixed), tmp_path / "straight")
  b, _ = _final_params(tiny_config(**fixed), run)
  assert_trees_close(a["params"], b["params"], rtol=0, atol=0)


def test_checkpoint_without_commit_marker_is_skipped(tiny_config, tmp_path, capsys):
  train(tiny_config(**{"optim__decay_steps": 6}), tmp_path)
  (tmp_path / "checkpoints" / "6" / "commit_success.txt").unlink()
  train(tiny_config(**{"optim__decay_steps": 6}), tmp_path)
  assert "no commit marker" in capsys.readouterr().out
  names = {p.name for p in (tmp_path / "checkpoints").iterdir()}
  assert {"3", "6", "6.broken"} <= names  # redone step 6 saved beside the kept broken one


def test_early_stopping_keeps_and_loads_the_best_checkpoint(tiny_config, tmp_path, capsys):
  """mode=max on a falling eval loss: the first evaluation stays the best, so the run stops
  after `patience` more; the best checkpoint survives keep=1 and is what loading gives."""
  from jaxlm.loading import load_params
  from jaxlm.train.early_stopping import read_best
  config = tiny_config(train__steps=20, train__eval_every=2, train__eval_batches=1,
                       optim__learning_rate=3e-3, checkpoint__every=100, checkpoint__keep=1,
                       train__early_stopping__metric="eval_loss",
                       train__early_stopping__mode="max", train__early_stopping__patience=2)
  metrics = train(config, tmp_path)
  assert metrics["stopped_early_at"] == 6
  assert "Early stop at step 6" in capsys.readouterr().out
  best = read_best(tmp_path)
  assert best["step"] == 2 and best["metric"] == "eval_loss"
  checkpointer = Checkpointer(tmp_path / "checkpoints", every=1, keep=1)
  assert checkpointer.all_steps() == [2, 6]
  state, _ = checkpointer.restore(2, Run.build(config).trainer.abstract_state())
  checkpointer.close()
  assert_trees_close(load_params(tmp_path).params, state["params"], rtol=0, atol=0)
  # Running it again does not train on: the patience is spent.
  assert train(config, tmp_path) == {}
  assert read_best(tmp_path)["step"] == 2


def _tensorboard_threads() -> set:
  return {t for t in threading.enumerate() if type(t).__module__.startswith("tensorboardX")}


def test_early_stopping_needs_an_evaluation_metric(tiny_config, tmp_path):
  with pytest.raises(ConfigError, match="needs evaluation"):
    train(tiny_config(train__early_stopping__metric="eval_loss"), tmp_path / "a")
  running = _tensorboard_threads()
  with pytest.raises(ConfigError, match="choose one of eval_loss, eval_perplexity"):
    train(tiny_config(train__early_stopping__metric="accuracy", train__eval_every=2,
                      train__eval_batches=1), tmp_path / "b")
  # Raised after the metrics writer opened: it is closed all the same (left open, its thread
  # outlives the run and Python 3.12 prints a traceback at exit).
  assert _tensorboard_threads() <= running
