"""jaxlm/profiling.py: device time per step by kernel category, from real trace files (a
GPU-shaped XSpace written through jax's own profiler bindings, and CPU traces of real
training steps), in `jaxlm profile` and in `jaxlm train` with train.profile_at."""
import json
import subprocess
import sys

import pytest
from jax.profiler import ProfileData

from jaxlm import profiling
from jaxlm.config import ConfigError
from jaxlm.train.loop import train

# Two steps on one GPU, two streams. Times in picoseconds from each line's start (1000 ns).
# The "XLA Ops" line repeats the kernels as HLO ops and must not count a second time.
GPU_TRACE = """
planes {
  id: 1 name: "/device:GPU:0"
  lines {
    id: 1 name: "Stream #7(compute)" timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 4000000
             stats { metadata_id: 9 str_value: "custom-call.3" } }
    events { metadata_id: 2 offset_ps: 4000000 duration_ps: 3000000 }
    events { metadata_id: 3 offset_ps: 7000000 duration_ps: 1000000
             stats { metadata_id: 9 str_value: "loop_add_fusion.2" } }
    events { metadata_id: 1 offset_ps: 10000000 duration_ps: 4000000
             stats { metadata_id: 9 str_value: "custom-call.3" } }
    events { metadata_id: 2 offset_ps: 14000000 duration_ps: 3000000 }
    events { metadata_id: 4 offset_ps: 17000000 duration_ps: 500000 }
  }
  lines {
    id: 2 name: "Stream #13(nccl)" timestamp_ns: 1000
    events { metadata_id: 5 offset_ps: 7000000 duration_ps: 2000000 }
  }
  lines {
    id: 3 name: "XLA Ops" timestamp_ns: 1000
    events { metadata_id: 3 offset_ps: 0 duration_ps: 20000000 }
  }
  event_metadata { key: 1 value { id: 1 name: "nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NTN" } }
  event_metadata { key: 2 value { id: 2
    name: "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3" } }
  event_metadata { key: 3 value { id: 3 name: "loop_add_fusion_2" } }
  event_metadata { key: 4 value { id: 4 name: "wrapped_transpose" } }
  event_metadata { key: 5 value { id: 5 name: "ncclDevKernel_AllGather_RING_LL" } }
  stat_metadata { key: 9 value { id: 9 name: "hlo_op" } }
}
planes { id: 2 name: "/host:CPU" }
"""

# A CPU trace: the XLA ops run on host threads, a while loop around its body's ops.
CPU_TRACE = """
planes {
  id: 1 name: "/host:CPU"
  lines {
    id: 1 name: "tf_XLAEigen" timestamp_ns: 0
    events { metadata_id: 1 offset_ps: 0 duration_ps: 10000000
             stats { metadata_id: 9 str_value: "while.1" } }
    events { metadata_id: 2 offset_ps: 1000000 duration_ps: 3000000
             stats { metadata_id: 9 str_value: "dot.4" } }
    events { metadata_id: 3 offset_ps: 5000000 duration_ps: 2000000
             stats { metadata_id: 9 str_value: "reduce.2" } }
    events { metadata_id: 4 offset_ps: 0 duration_ps: 50000000 }
  }
  event_metadata { key: 1 value { id: 1 name: "while.1" } }
  event_metadata { key: 2 value { id: 2 name: "dot.4" } }
  event_metadata { key: 3 value { id: 3 name: "reduce.2" } }
  event_metadata { key: 4 value { id: 4 name: "python step()" } }
  stat_metadata { key: 9 value { id: 9 name: "hlo_op" } }
}
"""


def write_trace(tmp_path, text, name="host.xplane.pb"):
  path = tmp_path / "plugins" / "profile" / "run" / name
  path.parent.mkdir(parents=True)
  path.write_bytes(ProfileData.text_proto_to_serialized_xspace(text))
  return path


def test_gpu_trace_by_category_per_step(tmp_path):
  write_trace(tmp_path, GPU_TRACE)
  summary = profiling.summarize(tmp_path, steps=2, wall_s=0.000024)
  assert summary["source"] == "gpu streams" and summary["devices"] == 1
  ms = {name: c["ms_per_step"] for name, c in summary["categories"].items()}
  assert ms == pytest.approx({"matmul": 0.004, "attention": 0.003, "collective": 0.001,
                              "other": 0.0005, "copy": 0.00025})
  assert list(ms) == ["matmul", "attention", "collective", "other", "copy"]  # largest first
  assert summary["kernel_ms_per_step"] == pytest.approx(0.00875)
  # The all-gather on its own stream overlaps compute for half its time: that half counts once.
  assert summary["busy_ms_per_step"] == pytest.approx(0.00825)
  assert summary["wall_ms_per_step"] == pytest.approx(0.012)
  assert summary["busy_share"] == pytest.approx(0.00825 / 0.012)
  top = summary["top"][0]
  assert top["name"].startswith("nvjet") and top["hlo_op"] == "custom-call.3"
  assert top["calls_per_step"] == 1 and top["category"] == "matmul"
  table = profiling.format_table(summary)
  assert "busy 0.01 of 0.01 wall (69%)" in table and "matmul 0.00 ms (46%)" in table


def test_cpu_trace_counts_self_time_of_nested_ops(tmp_path):
  path = write_trace(tmp_path, CPU_TRACE)
  summary = profiling.summarize(path, steps=1)
  assert summary["source"] == "host XLA ops"
  kernels = {k["name"]: k["ms_per_step"] for k in summary["top"]}
  # The python event has no hlo_op; the loop keeps what its body did not take.
  assert kernels == pytest.approx({"while.1": 0.005, "dot.4": 0.003, "reduce.2": 0.002})
  assert summary["busy_ms_per_step"] == pytest.approx(0.010)
  assert summary["busy_share"] is None  # no wall time given


def test_cli_names_a_missing_trace(tmp_path):
  jaxlm = [sys.executable, "-m", "jaxlm.cli", "profile"]
  out = subprocess.run(jaxlm + [str(tmp_path), "--steps", "1"], capture_output=True, text=True,
                       timeout=60)
  assert out.returncode == 2 and f"No *.xplane.pb under {tmp_path}" in out.stderr
  write_trace(tmp_path, GPU_TRACE)
  out = subprocess.run(jaxlm + [str(tmp_path), "--steps", "2", "--top", "2"],
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()  # the head, the categories, two kernels
  assert len(lines) == 4 and "nvjet" in lines[2] and "[custom-call.3]" in lines[2]
  assert "cudnn_generated" in lines[3]


def test_training_traces_the_window_it_is_given(tiny_config, tmp_path, capsys):
  train(tiny_config(train__profile_at=3, train__profile_steps=2), tmp_path)
  summary = json.loads((tmp_path / "profile" / "summary.json").read_text())
  assert summary["steps"] == 2 and summary["source"] == "host XLA ops"
  assert summary["trace"].startswith(str(tmp_path / "profile" / "plugins" / "profile"))
  assert 0 < summary["busy_ms_per_step"] <= summary["wall_ms_per_step"]
  assert sum(c["share"] for c in summary["categories"].values()) == pytest.approx(1)
  # Two steps of the same program: every op of the step ran a whole number of times per step.
  assert all(k["calls_per_step"] * 2 == round(k["calls_per_step"] * 2) for k in summary["top"])
  assert "profile (host XLA ops, 2 steps)" in capsys.readouterr().out
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]  # the run went on


def test_a_profiler_that_cannot_start_leaves_the_run_going(tiny_config, tmp_path, capsys,
                                                          monkeypatch):
  def no_profiler(*args, **kwargs):
    raise RuntimeError("CUPTI is not available")

  monkeypatch.setattr(profiling.jax.profiler, "start_trace", no_profiler)
  train(tiny_config(train__profile_at=3, train__profile_steps=2), tmp_path)
  assert ("profile failed, training goes on: could not start the trace: RuntimeError: CUPTI "
          "is not available") in capsys.readouterr().out
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
  assert not (tmp_path / "profile" / "summary.json").exists()


@pytest.mark.parametrize("at, steps", [(1, 3), (-2, 3), (3, 0)])
def test_a_profile_window_that_cannot_work_is_refused(tiny_config, tmp_path, at, steps):
  with pytest.raises(ConfigError, match="profile_at is 0 .* or a step after the first, which "
                                        "compiles"):
    train(tiny_config(train__profile_at=at, train__profile_steps=steps), tmp_path)
