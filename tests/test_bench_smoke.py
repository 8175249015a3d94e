"""bench/train_throughput.py runs the real train step end to end and prints one JSON line."""
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import one_device_env

BENCH = Path(__file__).resolve().parent.parent / "bench" / "train_throughput.py"


def test_benchmark_prints_one_json_line(tmp_path):
  out = subprocess.run(
      [sys.executable, str(BENCH), "--preset", "tiny", "--seq-len", "64", "--batch-size", "8",
       "--steps", "3", "--mesh", "fsdp=4,tensor=2", "--config.optim.learning_rate=1e-3",
       "--profile", str(tmp_path / "trace"), "--profile-steps", "2"],
      capture_output=True, text=True, timeout=300)  # 8 devices from conftest
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 1
  result = json.loads(lines[0])
  assert result["recompiles"] == 0
  assert result["tokens_per_s"] > 0 and result["step_time_s"] > 0
  assert result["tokens_per_s_synced"] == pytest.approx(512 / result["step_time_s"])
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
  # Two more steps, traced after the timed ones; on CPU the XLA ops stand in for kernels.
  profile = result["profile"]
  assert profile["source"] == "host XLA ops" and profile["steps"] == 2
  assert Path(profile["trace"]).is_relative_to(tmp_path / "trace")
  shares = [c["share"] for c in profile["categories"].values()]
  assert sum(shares) == pytest.approx(1) and profile["devices"] == 8
  assert "collective" in profile["categories"]  # fsdp and tensor axes gather and reduce
  assert 0 < profile["busy_ms_per_step"] <= profile["wall_ms_per_step"]
  assert profile["top"] and profile["top"][0]["ms_per_step"] > 0
  assert "profile (host XLA ops, 2 steps)" in out.stderr


def test_packed_synthetic_rows_look_like_packed_data():
  sys.path.insert(0, str(BENCH.parent))
  from train_throughput import synthetic_rows
  rows = synthetic_rows(np.random.default_rng(0), batch_size=4, seq_len=32, vocab_size=100,
                        docs_per_row=5)
  segments, positions = rows["segment_ids"], rows["positions"]
  for seg, pos in zip(segments, positions):
    assert seg[0] == 1 and set(np.diff(seg)) <= {0, 1} and seg[-1] == 5  # 5 documents
    starts = np.flatnonzero(np.diff(seg, prepend=0))
    assert (pos[starts] == 0).all()  # positions restart at every document
    assert (np.diff(pos)[np.diff(seg) == 0] == 1).all()  # and count up inside it
  assert "segment_ids" not in synthetic_rows(np.random.default_rng(0), 4, 32, 100)


def test_attention_check_passes_xla_and_reports_what_fails():
  """bench/attention_check.py on CPU: XLA's bf16 attention, with and without a document
  mask, is within bf16 error of float32 in the output and all three gradients; cuDNN, which
  CPU lacks, is reported as a failed case (exit 1), not a crash."""
  script = str(BENCH.parent / "attention_check.py")
  small = ["--batch", "2", "--seq-len", "64", "--heads", "4", "--kv-heads", "2",
           "--head-dim", "16", "--docs", "0,3", "--repeats", "2"]
  env = one_device_env()  # one device
  out = subprocess.run([sys.executable, script, *small], env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout)
  assert result["ok"] and [c["docs_per_row"] for c in result["cases"]] == [0, 3]
  for case in result["cases"]:
    assert set(case["errors"]) == {"out", "dq", "dk", "dv"} and case["finite"]
    assert 1e-4 < max(case["errors"].values()) < 1e-2  # bf16 rounding, not float32 (0)
    assert case["ms_forward_backward"] > 0 and case["kv"] == [2, 64, 2, 16]
  # Each case also went to stderr as it ended, for a run that a timeout cuts short.
  progress = [json.loads(line.removeprefix("attention_check: "))
              for line in out.stderr.splitlines() if line.startswith("attention_check: ")]
  assert progress == result["cases"]
  out = subprocess.run([sys.executable, script, *small, "--impls", "cudnn", "--docs", "0"],
                       env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  (case,) = json.loads(out.stdout)["cases"]
  assert not case["ok"] and case["error"].startswith("RuntimeError")


def test_benchmark_help():
  out = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True,
                       text=True, check=True).stdout
  assert "ref-1.1b" in out and "--config.SECTION.KEY=VALUE" in out and "--mesh" in out


def test_gpu_session_runs_parts_within_its_budget(tmp_path):
  """bench/gpu_session.sh plumbing (no GPU here): a jaxlm part runs (on the tiny preset) and
  brings its profile into the table and its log and trace into logs.tgz; parts for which
  BUDGET_S leaves less than their minimum are skipped and reported; an unknown part is
  refused."""
  root = BENCH.parent.parent
  # One device, as on the GPU host; conftest's unoptimised CPU backend kept.
  env = one_device_env()
  env.update(OUT=str(tmp_path), BUDGET_S="150",
             BENCH_ARGS="--preset tiny --seq-len 64 --batch-size 8 --steps 2",
             PLAN_ARGS="--preset tiny --seq-len 64 --batch-size 8",
             CEILINGS_ARGS="--matmul-n 256 --memory-mib 8 --repeats 3",
             PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
  script = str(root / "bench" / "gpu_session.sh")
  # The second variant has an XLA flag of its own (one that does nothing on CPU), packs
  # two documents into each row, computes the loss 32 positions at a time, unrolls the
  # layers and runs the Pallas attention (interpreted here).
  variants = ["jaxlm:minimal",
              "jaxlm:minimal+xla_gpu_autotune_level=0+docs2+chunk32+unroll+pallas_gpu"]
  # A plan of the first variant's step as compiled for an H100 (which needs jax's CUDA
  # plugin, absent here): the table sets the least its kernels take beside the measurement.
  bounds = {"matmul": 0.004, "attention": 0.0, "collective": 0.0, "copy": 0.0005,
            "reduction": 0.001, "other": 0.002, "total": 0.0075}
  (tmp_path / "plan_minimal_h100.json").write_text(json.dumps([{
      "layout": "1 device", "temp_bytes": 2**20, "peak_bytes": 2**21, "attention_impl": "cudnn",
      "compiled_for": "NVIDIA H100 80GB HBM3", "kernels": {"total": {"bytes": 1e9}},
      "kernel_bound_s": bounds, "bound": {"mfu_at_most": 0.74}}]))
  out = subprocess.run(["bash", script, "ceilings", "plan:minimal+unroll", *variants, "maxtext",
                        "torch"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout + out.stderr
  table = out.stdout[out.stdout.index("tokens/s"):].splitlines()
  names = ["jaxlm_minimal",
           "jaxlm_minimal_xla_gpu_autotune_level-0_docs2_chunk32_unroll_pallas_gpu"]
  base_flags = env["XLA_FLAGS"]
  for name, flags, docs, chunk, scan, impl in zip(
      names, ("", " --xla_gpu_autotune_level=0"), (0, 2), (None, 32), (None, False),
      (None, "pallas_gpu")):
    ran = json.loads((tmp_path / f"{name}.json").read_text())
    assert ran["tokens_per_s"] > 0 and ran["remat_policy"] == "minimal" and ran["profile"]
    assert ran["recompiles"] == 0  # Pallas (second variant) loaded before the first trace
    assert ran["xla_flags"] == base_flags + flags and ran["device_count"] == 1
    assert ran["docs_per_row"] == docs
    assert ran["overrides"].get("train.loss_chunk_len") == chunk
    assert ran["overrides"].get("model.scan_layers") == scan
    assert ran["scan_layers"] is (scan is None)
    assert ran["overrides"].get("model.attention_impl") == impl
    assert ran["attention_impl"] == (impl or "xla") and ran["loss_chunk_len"] == (chunk or 0)
  first = next(i for i, row in enumerate(table) if row.startswith(names[0]))
  assert table[first + 1].lstrip().startswith("busy ")
  (compared,) = [row for row in table if "measured / at least (plan_minimal_h100), ms: " in row]
  assert re.search(r"matmul \d+\.\d / 4\.0, .*total \d+\.\d / 7\.5$", compared), compared
  assert any(row.startswith("plan_minimal_h100 planned for NVIDIA H100 80GB HBM3: peak 0.0 GiB")
             and row.endswith("kernels move 1 GB: 8 ms a step at least, MFU at most 74%")
             for row in table)
  assert names[1] in table and table[table.index(names[1]) + 2].lstrip().startswith("busy ")
  for part in ("maxtext_anchor", "torch_anchor"):
    assert any(row.startswith(part) and re.search(r"needs \d+ s, BUDGET_S=150 leaves \d+$", row)
               for row in table)
    assert json.loads((tmp_path / f"{part}.json").read_text())["skipped"]
  # The ceilings part: this device's matmul rate and memory bandwidth, measured.
  ceilings = json.loads((tmp_path / "ceilings.json").read_text())
  assert ceilings["matmul_n"] == 256 and ceilings["matmul_tflops"] > 0
  assert any(row.startswith("ceilings") and "TFLOP/s bf16 matmul (256^3)" in row
             for row in table)
  # The plan part: the same step's memory and kernels as jaxlm plan gives them, compiled for
  # the CPU (no peak rates: no time bound; the measured ceilings bound only a GPU target's).
  (planned,) = json.loads((tmp_path / "plan_minimal_unroll.json").read_text())
  assert planned["layout"] == "1 device" and planned["temp_bytes"] > 0
  assert planned["kernels"]["matmul"]["flops"] > 0 and "kernel_bound_s" not in planned
  assert any(row.startswith("plan_minimal_unroll") and f"planned for cpu: peak "
             f"{planned['peak_bytes'] / 2**30:.1f} GiB" in row for row in table)
  with tarfile.open(tmp_path / "logs.tgz") as logs:
    assert sorted(logs.getnames()) == sorted(
        ["./ceilings.log", "./plan_minimal_unroll.log"] + [f"./{name}.log" for name in names]
        + [f"./profile_{name[len('jaxlm_'):]}.xplane.pb" for name in names])
  bad = subprocess.run(["bash", script, "jax:minimal"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=120)
  assert bad.returncode == 2 and "unknown part jax:minimal" in bad.stdout
