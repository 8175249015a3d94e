"""Two real processes joined by jax.distributed on 127.0.0.1 (4 CPU devices each) train with
FSDP across processes, checkpoint, stop and resume: the losses equal one process with 8
devices running the same config straight through."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from jaxlm.train.loop import train
from tests.conftest import one_device_env

ROOT = Path(__file__).resolve().parent.parent
OVERRIDES = {"model.preset": "tiny", "model.vocab_size": 4096,
             "model.compute_dtype": "float32", "data.seq_len": 32, "data.batch_size": 8,
             "optim.learning_rate": 1e-3, "optim.warmup_steps": 2, "optim.decay_steps": 6,
             "train.log_every": 1, "train.eval_every": 0, "checkpoint.every": 3,
             "checkpoint.async_save": False, "mesh.fsdp": 8}


def _two_processes(workdir, steps, cache):
  env = one_device_env()
  env["WORKLOG_DIR"] = str(workdir.parent)
  args = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  cmd = [str(ROOT / "launch" / "local.sh"), "2", sys.executable, "-m", "jaxlm.cli", "train",
         "--workdir", str(workdir), "--cpu-devices", "4", f"--config.train.steps={steps}",
         f"--config.data.cache_dir={cache}", *args]
  result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  other = (workdir.parent / "process_1.log")
  assert result.returncode == 0, (result.stderr[-3000:],
                                  other.read_text()[-3000:] if other.exists() else "")
  return result


def _losses(workdir):
  return {r["step"]: r["loss"] for r in map(json.loads, open(workdir / "metrics.jsonl"))}


def test_two_processes_equal_one_and_resume_exactly(tiny_config, token_cache, tmp_path):
  multi = tmp_path / "multi" / "run"
  multi.parent.mkdir()
  _two_processes(multi, 3, token_cache)
  first = _two_processes(multi, 6, token_cache)  # resumes at step 3
  assert "Resuming from step 3" in first.stdout
  single = tmp_path / "single"
  train(tiny_config(**{k.replace(".", "__"): v for k, v in OVERRIDES.items()}), single)
  a, b = _losses(single), _losses(multi)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-5)


# Each process prints, per data row of the mesh, the processes its fsdp x tensor devices
# belong to.
_MESH_ROWS = """
from jaxlm.parallel import distributed
from jaxlm.parallel.mesh import build_mesh
distributed.configure_cpu_devices(4)
distributed.initialize()
mesh = build_mesh(dict(data=2, fsdp=2, tensor=2))
print([sorted({d.process_index for d in row.flat}) for row in mesh.devices])
"""


def test_fsdp_and_tensor_stay_inside_a_process_and_data_spans_them(tmp_path):
  """Hybrid sharding: with mesh.data = the number of hosts, each host holds one data replica,
  so FSDP's per-layer gathers and tensor parallelism never leave it (on GPUs: NVLink), and
  only the gradient reduction over data crosses hosts."""
  env = dict(one_device_env(), WORKLOG_DIR=str(tmp_path))
  out = subprocess.run([str(ROOT / "launch" / "local.sh"), "2", sys.executable, "-c", _MESH_ROWS],
                       env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1] == "[[0], [1]]"
  assert (tmp_path / "process_1.log").read_text().strip().splitlines()[-1] == "[[0], [1]]"
