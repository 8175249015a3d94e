"""Compiling for a GPU that is not here (`jaxlm plan --target`). The compiles need jax's
CUDA plugin (`pip install "jax[cuda12]"`, several GB, not a test dependency): where it is
missing they are skipped and the error that names the install is checked instead."""
import re

import jax
import pytest

from jaxlm import plan_cli
from jaxlm.config import ConfigError
from jaxlm.models.config import from_preset
from jaxlm.parallel.collectives import collectives, compile_with_partitioned_hlo
from jaxlm.parallel.gpu_target import cuda_plugin_installed, target_devices
from jaxlm.plan import BATCH_KEYS, experiment_config, plan
from jaxlm.train.loop import Run

HAVE_PLUGIN = cuda_plugin_installed()
needs_plugin = pytest.mark.skipif(not HAVE_PLUGIN, reason="jax's CUDA plugin not installed")


def test_targets_and_gpu_counts_are_checked_first():
  with pytest.raises(ConfigError, match=r"Unknown GPU target 'a100x': use one of h100"):
    target_devices("a100x", 8)
  with pytest.raises(ConfigError, match=r"12 GPUs do not fill hosts of 8"):
    target_devices("h100", 12)


@pytest.mark.skipif(HAVE_PLUGIN, reason="the plugin is installed")
def test_without_the_plugin_the_error_names_the_install(capsys):
  with pytest.raises(ConfigError, match=r'pip install "jax\[cuda12\]==.*no GPU is needed'):
    target_devices("h100", 8)
  assert plan_cli.main(["--preset", "tiny", "--mesh", "fsdp=8", "--target", "h100"]) == 2
  assert 'pip install "jax[cuda12]' in capsys.readouterr().err


@needs_plugin
def test_a_plan_for_h100s_is_the_gpu_compilers():
  """The step compiles for 8 H100s with cuDNN's attention; memory is the GPU compiler's."""
  devices = target_devices("h100", 8)
  assert len(devices) == 8 and devices[0].device_kind == "NVIDIA H100 80GB HBM3"
  (row,) = plan("demo", [{"fsdp": 8}], seq_len=256, batch_size=8, hbm_gib=80,
                devices=devices)
  assert row["attention_impl"] == "cudnn" and row["fits"] and row["temp_bytes"] > 0
  assert set(row["sent_by_axes"]) == {"fsdp"}


@needs_plugin
def test_plan_command_with_a_target(capsys):
  assert plan_cli.main(["--preset", "demo", "--mesh", "fsdp=8", "--seq-len", "128",
                        "--target", "h100"]) == 0
  out = capsys.readouterr().out
  assert "attention planned as: cudnn" in out
  assert "compiled for 8 x NVIDIA H100 80GB HBM3 by XLA's GPU compiler" in out


@needs_plugin
def test_the_gpu_compiler_reduces_as_the_collectives_reader_counts():
  """The reader counts collectives in the partitioned program and applies what GPU compilers
  do to them (an all-reduce sliced by every user is a reduce-scatter; sums of reduce-scatters
  of the same share fold into one). The program the GPU compiler finishes holds as many
  reduce-scatters of activations per layer: under sequence parallelism with full remat, 5."""
  config, _ = experiment_config("demo", {"fsdp": 4, "tensor": 2}, seq_len=256, batch_size=8,
                                remat="full", overrides={"mesh.sequence_parallel": True,
                                                         "model.attention_impl": "cudnn"})
  run = Run.build(config, planning=True, devices=target_devices("h100", 8))
  compiled, partitioned = compile_with_partitioned_hlo(
      run.trainer.lower_train_step({key: (8, 256) for key in BATCH_KEYS}))
  cfg = from_preset("demo")
  activation = 8 // 4 * 256 * cfg.hidden_size * 2
  found = collectives(partitioned, {"data": 1, "fsdp": 4, "tensor": 2})
  counted = [c for c in found if c.kind == "reduce-scatter" and c.axes == ("tensor",)
             and c.count == cfg.num_layers and c.bytes == activation]
  text = compiled.as_text()
  assert "__cudnn$fmha" in text
  gpu = re.findall(rf"bf16\[2,128,{cfg.hidden_size}\]\S*\) reduce-scatter-start\(", text)
  assert len(counted) == len(gpu) == 5


@needs_plugin
def test_minimal_with_attention_keeps_cudnns_attention_forward():
  """Under minimal the backward runs cuDNN's attention forward again (a second forward
  call); minimal_with_attention keeps its outputs instead, for a little more memory."""
  devices = target_devices("h100", 1)
  calls, temp = {}, {}
  for policy in ("minimal", "minimal_with_attention"):
    config, _ = experiment_config("demo", {"data": 1}, seq_len=256, batch_size=8,
                                  remat=policy, overrides={"model.attention_impl": "cudnn"})
    compiled = Run.build(config, planning=True, devices=devices).trainer.lower_train_step(
        {key: (8, 256) for key in BATCH_KEYS}).compile()
    calls[policy] = re.findall(r'custom_call_target="__cudnn\$(fmha\w*)"', compiled.as_text())
    temp[policy] = compiled.memory_analysis().temp_size_in_bytes
  assert sorted(calls["minimal"]) == ["fmhaScaleBiasSoftmax", "fmhaScaleBiasSoftmax",
                                      "fmhaScaleBiasSoftmaxBackward"]
  assert sorted(calls["minimal_with_attention"]) == ["fmhaScaleBiasSoftmax",
                                                     "fmhaScaleBiasSoftmaxBackward"]
  assert temp["minimal"] < temp["minimal_with_attention"] < 1.5 * temp["minimal"]


@needs_plugin
def test_kernels_of_a_step_compiled_for_an_h100():
  """The GPU compiler's program, read kernel by kernel: its matmuls do exactly 6 FLOPs per
  matmul parameter per token (remat none; attention is cuDNN's, a forward and a backward
  kernel a layer, with the FLOPs of a causal attention), and unrolling the layers removes
  the scan's copies."""
  devices = target_devices("h100", 1)
  rows = {scan: plan("demo", [{"data": 1}], seq_len=256, batch_size=4, hbm_gib=80,
                     remat="none", top_kernels=3, devices=devices,
                     overrides=[f"--config.model.scan_layers={scan}"])[0]
          for scan in (True, False)}
  cfg = from_preset("demo")
  head_dim = cfg.hidden_size // cfg.num_heads
  per_token = cfg.num_layers * (
      cfg.hidden_size * head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
      + 3 * cfg.hidden_size * cfg.mlp_dim) + cfg.hidden_size * cfg.vocab_size
  for row in rows.values():
    kernels = row["kernels"]
    assert kernels["matmul"]["flops"] == 6 * 4 * 256 * per_token
    assert kernels["attention"]["kernels"] == 2 * cfg.num_layers
    # a causal forward (4 B N T^2 H / 2) and backward (10 B N T^2 H / 2) a layer
    assert kernels["attention"]["flops"] == (
        7 * 4 * cfg.num_heads * 256 * 256 * head_dim * cfg.num_layers)
    bounds = row["kernel_bound_s"]  # an H100's peak rates are known
    assert 0 < bounds["matmul"] < bounds["total"]
    # The step's time bound is its kernels' where longer than its model FLOPs at peak.
    assert row["bound"]["compute_s"] == max(bounds["total"], row["bound"]["model_flops_s"])
  assert rows[False]["kernels"]["copy"]["bytes"] * 4 < rows[True]["kernels"]["copy"]["bytes"]


@needs_plugin
def test_a_plan_for_two_hosts_of_h100s_times_its_step_at_their_rates():
  """16 H100s are two hosts of 8, each its own process: data=2 crosses between them, fsdp=8
  stays within one; the H100's own rates time the step, no --rates-of needed."""
  (row,) = plan("demo", [{"data": 2, "fsdp": 8}], seq_len=256, batch_size=16, hbm_gib=80,
                devices=target_devices("h100", 16))
  sent = row["sent_by_axes"]
  assert row["sent_by_link"]["host"] == sent["fsdp"] > 0
  assert row["sent_by_link"]["network"] == sum(sent.values()) - sent["fsdp"] > 0
  assert row["rates"].startswith("NVIDIA H100 80GB HBM3 rates: 989 TFLOP/s, 3.35 TB/s, 450 GB/s")
  assert row["bound"]["comm_by_link_s"]["network"] == row["sent_by_link"]["network"] / 50e9


@needs_plugin
def test_stream_rows_give_cudnn_attention_without_a_mask():
  """Packed rows hand cuDNN the document mask as a [batch, 1, seq, seq] bias, whose
  gradient its backward computes too; a stream's rows (data.shaping "stream") need none."""
  devices = target_devices("h100", 1)
  calls = {}
  for shaping in ("pack", "stream"):
    config, _ = experiment_config("demo", {"data": 1}, seq_len=256, batch_size=4,
                                  overrides={"data.shaping": shaping,
                                             "model.attention_impl": "cudnn"})
    compiled = Run.build(config, planning=True, devices=devices).trainer.lower_train_step(
        {key: (4, 256) for key in BATCH_KEYS}).compile()
    calls[shaping] = set(re.findall(r'custom_call_target="__cudnn\$(fmha\w*)"',
                                    compiled.as_text()))
  assert calls == {"pack": {"fmhaScaleBiasSoftmax", "fmhaScaleBiasSoftmaxBackward"},
                   "stream": {"fmhaSoftmax", "fmhaSoftmaxBackward"}}


@needs_plugin
def test_the_update_is_one_pass_over_each_weight_unless_it_may_be_dropped(monkeypatch):
  """The new parameters' norm is taken behind an optimization barrier (train/step.py):
  fused into the update instead, it has XLA split the update into two passes over each
  weight. Without the barrier the step moves at least one more float32 pass over the
  weights; with on_nonfinite=skip, whose update waits for the norm, it is left out."""
  devices = target_devices("h100", 1)
  params = 4_196_608  # the demo preset's

  def moved(on_nonfinite="stop"):
    (row,) = plan("demo", [{"data": 1}], seq_len=256, batch_size=4, hbm_gib=80,
                  remat="none", top_kernels=1, devices=devices,
                  overrides=["--config.model.scan_layers=False",
                             f"--config.train.on_nonfinite={on_nonfinite}"])
    return row["kernels"]["total"]["bytes"]

  with_barrier, skipping = moved(), moved("skip")
  monkeypatch.setattr(jax.lax, "optimization_barrier", lambda tree: tree)
  assert with_barrier <= moved() - 4 * params
  assert moved("skip") == skipping
