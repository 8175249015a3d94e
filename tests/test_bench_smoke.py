"""bench/train_throughput.py runs the real train step end to end and prints one JSON line."""
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "train_throughput.py"


def test_benchmark_prints_one_json_line():
  # Plumbing, not speed, is under test here: unoptimised XLA compiles it in half the time.
  env = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"] + " --xla_backend_optimization_level=0")
  out = subprocess.run(
      [sys.executable, str(BENCH), "--preset", "tiny", "--seq-len", "64", "--batch-size", "8",
       "--steps", "3", "--mesh", "fsdp=4,tensor=2", "--config.optim.learning_rate=1e-3"],
      env=env, capture_output=True, text=True, timeout=300)  # 8 devices from conftest
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 1
  result = json.loads(lines[0])
  assert result["recompiles"] == 0
  assert result["tokens_per_s"] > 0 and result["step_time_s"] > 0
  assert len(result["step_times_s"]) == 3 and result["compile_s"] > result["step_time_s"]
  assert result["tflops_per_device"] > 0
  assert result["mfu"] is None and result["peak_memory_bytes"] is None  # CPU: unknown
  assert result["device_kind"] == "cpu" and result["device_count"] == 8
  assert result["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
  assert result["tokens_per_step"] == 512 and result["flops_per_token"] > 0
  assert result["compute_dtype"] == "bfloat16" and result["param_dtype"] == "float32"
  assert result["overrides"]["optim.learning_rate"] == 1e-3
  assert result["overrides"]["model.preset"] == "tiny"
  assert {"jax", "jaxlib", "flax"} <= result.keys()
  assert result["loss_first"] > 0 and result["loss_last"] > 0


def test_benchmark_help():
  out = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True,
                       text=True, check=True).stdout
  assert "ref-1.1b" in out and "--config.SECTION.KEY=VALUE" in out and "--mesh" in out


def test_gpu_session_skips_what_would_overrun_its_budget(tmp_path):
  """bench/gpu_session.sh plumbing (no GPU here): the environment check passes, each part
  past BUDGET_S is skipped and reported in the table, and an unknown part is refused."""
  root = BENCH.parent.parent
  env = dict(os.environ, OUT=str(tmp_path), BUDGET_S="0",
             PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
  script = str(root / "bench" / "gpu_session.sh")
  out = subprocess.run(["bash", script, "jaxlm:minimal", "maxtext", "torch"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr
  table = out.stdout[out.stdout.index("tokens/s"):]
  for part in ("jaxlm_minimal", "maxtext_anchor", "torch_anchor"):
    assert f"{part}" in table and "would pass BUDGET_S=0" in table
    assert json.loads((tmp_path / f"{part}.json").read_text())["skipped"]
  bad = subprocess.run(["bash", script, "jax:minimal"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=120)
  assert bad.returncode == 2 and "unknown part jax:minimal" in bad.stdout
