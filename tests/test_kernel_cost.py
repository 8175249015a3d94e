"""Reading a compiled program's kernels (jaxlm.kernel_cost): bytes moved and matmul FLOPs
of small programs whose answer is known, loops counted per iteration, slices and in-place
updates counted by what they touch, and a real train step scanned and unrolled."""
import json

import jax
import jax.numpy as jnp
import pytest

from jaxlm import kernel_cost, plan_cli
from jaxlm.plan import experiment_config, kernel_traffic, plan
from jaxlm.train.loop import Run
from jaxlm.train.trainer import BATCH_KEYS

F32 = 4


def _summary(fn, *args, **jit_options):
  compiled = jax.jit(fn, **jit_options).lower(*args).compile()
  found = kernel_cost.kernels(compiled.as_text())
  return kernel_cost.summary(found), found


def test_a_matmul_counts_its_flops_and_its_operands():
  a, b = jnp.ones((64, 256)), jnp.ones((256, 128))
  summary, _ = _summary(jnp.matmul, a, b)
  assert summary["matmul"]["flops"] == 2 * 64 * 128 * 256
  assert summary["matmul"]["kernels"] == 1
  # Reads both operands and writes the result; nothing else in the program moves more.
  assert summary["matmul"]["bytes"] == (64 * 256 + 256 * 128 + 64 * 128) * F32
  assert summary["total"]["flops"] == summary["matmul"]["flops"]


def test_an_elementwise_kernel_reads_and_writes_its_arrays_once():
  x = jnp.ones((512, 512))
  summary, found = _summary(lambda x: jnp.tanh(x * 2.0 + 1.0), x)
  assert len(found) == 1 and found[0].category == "other"
  assert summary["total"]["bytes"] == 2 * 512 * 512 * F32
  assert summary["total"]["flops"] == 0


def test_a_loop_counts_its_kernels_once_per_iteration():
  def layers(x, weights):
    return jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x, weights)[0]

  x, weights = jnp.ones((32, 64)), jnp.ones((6, 64, 64))
  summary, found = _summary(layers, x, weights)
  assert summary["matmul"]["flops"] == 6 * 2 * 32 * 64 * 64
  assert {k.count for k in found if k.category == "matmul"} == {6}


def test_slices_and_in_place_updates_count_what_they_touch():
  buffer, row = jnp.zeros((4096, 256)), jnp.ones((1, 256))

  def update(buffer, row, i):  # donated: written in place
    return jax.lax.dynamic_update_slice(buffer, row * 3.0, (i, 0))

  summary, _ = _summary(update, buffer, row, 7, donate_argnums=0)
  assert summary["total"]["bytes"] <= 2 * 256 * F32 + 64  # the row in and out (+ the index)

  def read(buffer, i):
    return jax.lax.dynamic_slice(buffer, (i, 0), (1, 256)) * 2.0

  summary, _ = _summary(read, buffer, 7)
  assert summary["total"]["bytes"] <= 2 * 256 * F32 + 64


def _train_step_kernels(scan_layers: bool) -> dict:
  config, _ = experiment_config("tiny", {"data": 1}, seq_len=64, batch_size=4,
                                remat="none", overrides=[
                                    f"--config.model.scan_layers={scan_layers}",
                                    "--config.model.attention_impl=xla"])
  run = Run.build(config, planning=True, devices=jax.devices()[:1])
  compiled = run.trainer.lower_train_step({k: (4, 64) for k in BATCH_KEYS}).compile()
  return run, kernel_traffic(compiled.as_text(), "cpu", top=3)


def test_a_train_step_does_the_models_matmul_flops_scanned_or_unrolled():
  """The tiny Llama's step, remat none: its matmuls do 6 FLOPs per parameter per token in
  the projections plus XLA attention's score and value matmuls (forward, and twice that
  backward, over the whole [seq, seq] square: XLA computes the masked half too). Scanning
  over layers adds copies (each layer's inputs sliced out of the stacked weights, its
  saved activations into and out of stacked buffers) that unrolling does not."""
  run, scanned = _train_step_kernels(True)
  _, unrolled = _train_step_kernels(False)
  cfg, batch, seq = run.model_cfg, 4, 64
  head_dim = cfg.hidden_size // cfg.num_heads
  projections = cfg.num_layers * (
      cfg.hidden_size * head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
      + 3 * cfg.hidden_size * cfg.mlp_dim) + cfg.hidden_size * cfg.vocab_size
  attention = cfg.num_layers * 3 * 2 * (2 * batch * cfg.num_heads * seq * seq * head_dim)
  expected = 6 * batch * seq * projections + attention
  for found in (scanned, unrolled):
    assert found["kernels"]["matmul"]["flops"] == pytest.approx(expected, rel=1e-9)
    assert found["kernels"]["total"]["bytes"] > 0
  assert scanned["kernels"]["copy"]["bytes"] > 2 * unrolled["kernels"]["copy"]["bytes"]
  assert "kernel_bound_s" not in scanned  # no peak rates for a CPU
  top = scanned["top_kernels"]
  assert len(top) == 3 and top[0]["bytes"] >= top[1]["bytes"] >= top[2]["bytes"]


def test_time_bounds_take_each_kernels_slower_side():
  found = [kernel_cost.Kernel("mm", "matmul", 2, bytes=1e9, flops=1e12),
           kernel_cost.Kernel("add", "other", 3, bytes=2e9, flops=0.0)]
  bounds = kernel_cost.time_bounds(found, bytes_per_s=1e12, flops_per_s=1e15)
  assert bounds["matmul"] == pytest.approx(2 * 1e-3)  # 1 ms of either, twice
  assert bounds["other"] == pytest.approx(3 * 2e-3)
  assert bounds["total"] == pytest.approx(8e-3)


def test_plan_command_lists_the_kernels(capsys):
  assert plan_cli.main(["--preset", "tiny", "--mesh", "fsdp=8", "--seq-len", "64",
                        "--kernels", "2", "--config.model.num_layers=2"]) == 0
  out = capsys.readouterr().out
  block = out[out.index("fsdp=8: the step's kernels"):].splitlines()
  # A tiny model's units; no time bound without a CPU's peak rates.
  assert block[1].split() == ["category", "kernels", "MB", "moved", "GFLOP"]
  categories = [line.split()[0] for line in block[2:block.index("  moving the most:")]]
  assert categories[0] == "matmul" and categories[-1] == "total"
  assert "collective" in categories  # FSDP gathers weights and scatters gradients
  assert len(block) - block.index("  moving the most:") - 1 == 2
  assert plan_cli.main(["--preset", "tiny", "--mesh", "fsdp=8", "--seq-len", "64",
                        "--kernels", "--json", "--config.model.num_layers=2"]) == 0
  (row,) = json.loads(capsys.readouterr().out)
  assert row["kernels"]["matmul"]["flops"] > 0 and len(row["top_kernels"]) == 5
  assert plan_cli.main(["--preset", "tiny", "--mesh", "fsdp=8", "--kernels",
                        "--no-compile"]) == 2
  assert "--kernels reads the step compiled" in capsys.readouterr().err


# A GPU program where autotuning picked cuBLAS (as a GPU often does; a compile without one
# makes GEMMs Triton fusions): the matmul is a custom call whose result tuple ends with
# cuBLAS's scratch workspace, which is not data the kernel moves.
CUBLAS_MODULE = """\
HloModule jit_step, entry_computation_layout={(bf16[1024,256]{1,0}, bf16[256,1536]{1,0})->bf16[1024,1536]{1,0}}

ENTRY %main (x: bf16[1024,256], w: bf16[256,1536]) -> bf16[1024,1536] {
  %x = bf16[1024,256]{1,0} parameter(0)
  %w = bf16[256,1536]{1,0} parameter(1)
  %custom-call.6 = (bf16[1024,1536]{1,0}, s8[4194304]{0}) custom-call(%x, %w), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/btd,dm->btm/dot_general"}, backend_config={"operation_queue_id":"0","gemm_backend_config":{"selected_algorithm":"0","alpha_real":1,"beta":0,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]},"epilogue":"DEFAULT"}}
  ROOT %get-tuple-element = bf16[1024,1536]{1,0} get-tuple-element(%custom-call.6), index=0
}
"""


def test_a_cublas_call_is_a_matmul_without_its_workspace():
  (kernel,) = kernel_cost.kernels(CUBLAS_MODULE)
  assert kernel.category == "matmul" and kernel.flops == 2 * 1024 * 1536 * 256
  assert kernel.bytes == 2 * (1024 * 256 + 256 * 1536 + 1024 * 1536)
  assert kernel.op == "jit(step)/btd,dm->btm/dot_general"


CUDNN_ATTENTION_MODULE = """\
HloModule jit_step, entry_computation_layout={(bf16[4,256,8,32]{3,2,1,0}, bf16[4,256,4,32]{3,2,1,0}, bf16[4,256,4,32]{3,2,1,0})->bf16[4,8,256,32]{3,1,2,0}}

ENTRY %main (q: bf16[4,256,8,32], k: bf16[4,256,4,32], v: bf16[4,256,4,32]) -> bf16[4,8,256,32] {
  %q = bf16[4,256,8,32]{3,2,1,0} parameter(0)
  %k = bf16[4,256,4,32]{3,2,1,0} parameter(1)
  %v = bf16[4,256,4,32]{3,2,1,0} parameter(2)
  %fwd = (bf16[4,8,256,32]{3,1,2,0}, f32[4,8,256]{2,1,0}, u8[0]{0}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(step)/jvp()/dot_product_attention_fwd"}, backend_config={"operation_queue_id": "0", "cudnn_fmha_backend_config": {"fmha_scale": 0.17, "intermediate_tensor_shape": {"element_type": "BF16", "dimensions": ["4", "8", "256", "256"], "tuple_shapes": [], "layout": {"minor_to_major": ["3", "2", "1", "0"]}}, "is_flash_attention": true, "mask_type": "%MASK%", "sliding_window_length": %WINDOW%}}
  ROOT %out = bf16[4,8,256,32]{3,1,2,0} get-tuple-element(%fwd), index=0
}
"""


def test_cudnn_attention_does_the_matmuls_of_its_scores():
  """Forward: QK^T and PV, 2 x 2 x B x N x T x S x H FLOPs, half of them under a causal
  mask; a sliding window's are not counted (a bound must not count what is skipped)."""
  def attention(mask="CAUSAL", window=0, backward=False):
    text = CUDNN_ATTENTION_MODULE.replace("%MASK%", mask).replace("%WINDOW%", str(window))
    if backward:
      text = text.replace("fmhaSoftmax", "fmhaSoftmaxBackward")
    (kernel,) = kernel_cost.kernels(text)
    assert kernel.category == "attention"
    return kernel.flops

  full = 4 * 4 * 8 * 256 * 256 * 32
  assert attention(mask="NO_MASK") == full
  assert attention() == attention(mask="PADDING_CAUSAL") == full / 2
  assert attention(backward=True) == 2.5 * full / 2  # QK^T again, dP, dV, dQ, dK
  assert attention(window=64) == 0


def test_gradient_accumulation_does_the_same_matmul_flops():
  """Two microbatches in a loop, each scanning the layers: nested loops multiply."""
  flops = [plan("tiny", [{"fsdp": 8}], seq_len=64, batch_size=16, hbm_gib=80,
                grad_accum=accum, top_kernels=0)[0]["kernels"]["matmul"]["flops"]
           for accum in (1, 2)]
  assert flops[0] == flops[1] > 0


ASYNC_GATHER_MODULE = """\
HloModule jit_step, entry_computation_layout={(bf16[32,768]{1,0})->bf16[256,768]{1,0}}

ENTRY %main (w: bf16[32,768]) -> bf16[256,768] {
  %w = bf16[32,768]{1,0} parameter(0)
  %all-gather-start = ((bf16[32,768]{1,0}), bf16[256,768]{1,0}) all-gather-start(%w), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}, use_global_device_ids=true
  ROOT %all-gather-done = bf16[256,768]{1,0} all-gather-done(%all-gather-start)
}
"""


def test_an_asynchronous_collective_reads_its_shard_and_writes_the_whole():
  # Its result tuple repeats the operands before what it writes: they are read once.
  (kernel,) = kernel_cost.kernels(ASYNC_GATHER_MODULE)
  assert kernel.category == "collective" and kernel.count == 1
  assert kernel.bytes == 2 * (32 * 768 + 256 * 768)
