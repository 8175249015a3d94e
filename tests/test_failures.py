"""Preemption signals and non-finite losses."""
import json
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxlm.train.loop import NonFiniteLossError, train
from jaxlm.train.preemption import PREEMPTED_EXIT_CODE
from tests.conftest import one_device_env


def _cli(workdir, steps, cache):
  env = one_device_env()
  return [sys.executable, "-m", "jaxlm.cli", "train", "--workdir", str(workdir),
          "--config.model.preset=tiny", "--config.model.vocab_size=4096",
          "--config.data.seq_len=32", "--config.data.batch_size=8",
          f"--config.train.steps={steps}", "--config.train.log_every=1",
          "--config.train.eval_every=0", "--config.checkpoint.every=1000",
          f"--config.data.cache_dir={cache}"], env


def test_sigterm_saves_and_exits_with_the_preemption_code(token_cache, tmp_path):
  cmd, env = _cli(tmp_path, 100000, token_cache)
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 120
  while time.time() < deadline and not (metrics.exists() and len(metrics.read_text()
                                                                  .splitlines()) >= 3):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == PREEMPTED_EXIT_CODE, err[-2000:]
  assert "Run the same command to resume" in err
  saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
  last_logged = json.loads(metrics.read_text().splitlines()[-1])["step"]
  assert max(saved) >= last_logged >= 3  # saved at the step it stopped on, not at step 1000
  cmd, env = _cli(tmp_path, max(saved) + 1, token_cache)
  resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0 and f"Resuming from step {max(saved)}" in resumed.stdout


def test_nonfinite_loss_stops_with_step_and_last_checkpoint(tiny_config, tmp_path):
  with pytest.raises(NonFiniteLossError, match=r"Non-finite param_norm at step 1 .*last good checkpoint is none"):
    train(tiny_config(optim__learning_rate=float("nan"), optim__warmup_steps=0,
                      optim__schedule="constant", train__steps=2), tmp_path)
  assert not any(p.name.isdigit() for p in (tmp_path / "checkpoints").iterdir())


def test_skip_mode_drops_nonfinite_updates(tiny_config, tmp_path):
  # lr = inf makes every update non-finite: skipped, the params never change.
  config = tiny_config(optim__learning_rate=float("inf"), optim__warmup_steps=0,
                       optim__schedule="constant", optim__grad_clip_norm=0.0,
                       train__on_nonfinite="skip", train__steps=3)
  metrics = train(config, tmp_path)
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert metrics["skipped_steps"] == 3
  assert all(np.isfinite(r["loss"]) for r in rows)
  # The logged param_norm is that of the rejected update; the state itself never moved:
  from jaxlm.checkpoint import Checkpointer
  from jaxlm.train.loop import Run
  run = Run.build(config)
  fresh = run.trainer.init_state(config.train.seed)
  checkpointer = Checkpointer(tmp_path / "checkpoints", every=1, keep=3)
  state, _ = checkpointer.restore(3, run.trainer.abstract_state())
  checkpointer.close()
  for a, b in zip(jax.tree.leaves(fresh["params"]), jax.tree.leaves(state["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
