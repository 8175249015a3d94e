"""kill -9 in the middle of `jaxlm train`, then the same command again: from the last
checkpoint that survived, the restarted run logs exactly (bit for bit, CPU fp32) the metrics of
a run that was never interrupted. No signal handler runs on SIGKILL, so this is the crash /
node-loss path, not the SIGTERM one (tests/test_failures.py)."""
import json
import re
import signal
import subprocess
import sys
import time

from tests.conftest import one_device_env

STEPS = 12
KILL_AT = 5  # kill once this step is logged; which step it really is varies run to run
EXACT = ("loss", "grad_norm", "param_norm", "learning_rate", "tokens_seen")


def _train(workdir, cache, log):
  """Starts `jaxlm train` in a fresh process: one CPU device (conftest.one_device_env)."""
  env = one_device_env()
  cmd = [sys.executable, "-m", "jaxlm.cli", "train", "--workdir", str(workdir),
         "--config.model.preset=tiny", "--config.model.vocab_size=4096",
         "--config.model.compute_dtype=float32", "--config.data.seq_len=32",
         "--config.data.batch_size=8", f"--config.train.steps={STEPS}",
         "--config.train.log_every=1", "--config.train.eval_every=0",
         "--config.checkpoint.every=2", f"--config.data.cache_dir={cache}"]
  out = open(log, "w")
  return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT), out


def _finish(proc, out, log):
  proc.wait(timeout=240)
  out.close()
  assert proc.returncode == 0, log.read_text()[-3000:]
  return log.read_text()


def _rows(workdir):
  return [json.loads(line) for line in open(workdir / "metrics.jsonl")]


def _last_logged_step(workdir):
  try:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
  except FileNotFoundError:
    return 0
  complete = [line for line in lines if line.endswith("}")]  # the writer may be mid-line
  return json.loads(complete[-1])["step"] if complete else 0


def test_kill_9_then_restart_matches_an_uninterrupted_run(token_cache, tmp_path):
  straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
  # The reference run and the run to kill at the same time: two cores.
  straight = _train(straight_dir, token_cache, tmp_path / "straight.log")
  victim, victim_out = _train(killed_dir, token_cache, tmp_path / "killed.log")

  deadline = time.time() + 180
  while _last_logged_step(killed_dir) < KILL_AT:
    assert victim.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
    assert time.time() < deadline, "the run never reached the kill step"
    time.sleep(0.02)
  victim.send_signal(signal.SIGKILL)
  victim.wait(timeout=30)
  victim_out.close()
  assert victim.returncode == -signal.SIGKILL
  killed_at = _last_logged_step(killed_dir)
  assert KILL_AT <= killed_at < STEPS, killed_at  # really in the middle of the run

  restarted = _train(killed_dir, token_cache, tmp_path / "restarted.log")
  restart_log = _finish(*restarted, tmp_path / "restarted.log")
  _finish(*straight, tmp_path / "straight.log")
  resumed_from = int(re.search(r"Resuming from step (\d+)", restart_log).group(1))
  # Checkpoints every 2 steps; the newest may have been cut short by the kill (it is then
  # set aside and the one before used), so the restart goes back at most two saves.
  assert resumed_from % 2 == 0 and killed_at - 4 <= resumed_from <= killed_at, (
      resumed_from, killed_at)

  reference = {row["step"]: row for row in _rows(straight_dir)}
  rows = _rows(killed_dir)
  assert sorted(reference) == list(range(1, STEPS + 1))
  # metrics.jsonl is append-only: the steps between the checkpoint and the kill are in it
  # twice, first from the killed run, then from the restart. The last occurrence counts.
  assert [row["step"] for row in rows] == (list(range(1, killed_at + 1)) +
                                           list(range(resumed_from + 1, STEPS + 1)))
  restart_rows = rows[killed_at:]
  last = {row["step"]: row for row in rows}
  assert restart_rows == [last[step] for step in range(resumed_from + 1, STEPS + 1)]
  for step in range(1, STEPS + 1):
    for key in EXACT:
      assert last[step][key] == reference[step][key], (step, key, last[step][key],
                                                       reference[step][key])
