"""jax's Pallas flash-attention kernels, as attention implementations:

- "pallas_gpu": jax.experimental.pallas.ops.gpu.attention (Triton), causal, with no grouped
  query form (key/value heads are repeated) and no sliding window;
- "splash": the TPU splash-attention kernel, per key/value head over its group of query
  heads, with a causal or sliding-window mask whose empty tiles it skips.

Both apply the document mask inside the kernel from the segment ids, where cuDNN is handed a
dense [batch, 1, seq, seq] bias. XLA cannot partition a Pallas call, so each runs on one
device's shard (batch over data x fsdp, heads over tensor). Off their hardware they run
interpreted, which is slow: for tests.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlm.layers.sharding import per_shard

KERNELS = ("pallas_gpu", "splash")
# pallas_gpu's tiles: forward, then the dk/dv and dq backward kernels (jax's defaults).
GPU_BLOCKS = {"block_q": 128, "block_k": 128, "block_q_dkv": 32, "block_kv_dkv": 32,
              "block_q_dq": 32, "block_kv_dq": 32}
# splash tiles both sequence axes by the largest of these that divides the length; TPU
# vector lanes make 128 the least.
SPLASH_BLOCKS = (512, 256, 128)

_IN_NAMES = (("act_batch", None, "act_heads", None), ("act_batch", None, "act_kv_heads", None),
             ("act_batch", None, "act_kv_heads", None), ("act_batch", None))


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
                    *, sliding_window: int | None, implementation: str) -> jax.Array:
  """Causal attention as jaxlm.layers.attention.causal_attention, by one of KERNELS."""
  if problem := (config_problem(implementation, q.shape[1], sliding_window)):
    raise ValueError(problem)
  if segment_ids is None:
    segment_ids = jnp.ones(q.shape[:2], jnp.int32)
  kernel = _gpu_attention if implementation == "pallas_gpu" else functools.partial(
      _splash_attention, sliding_window=sliding_window)
  return per_shard(kernel, _IN_NAMES, _IN_NAMES[0])(q, k, v, segment_ids)


@functools.cache
def load_kernel(implementation: str | None) -> None:
  """Traces and lowers the kernel, forward and backward, on a small input: for the model to
  call when it is built. Pallas imports modules as it first traces and lowers a kernel, and
  some register jax config values that belong to every jit's tracing context (jax 0.11:
  pallas_fuser_disable_nested_fuse), so a train step whose first trace did that would be
  traced and compiled again on its second call."""
  if implementation not in KERNELS:
    return
  qkv = jax.ShapeDtypeStruct((1, 128, 1, 128), jnp.bfloat16)
  segment_ids = jax.ShapeDtypeStruct((1, 128), jnp.int32)

  def total(q, k, v, segment_ids):
    out = flash_attention(q, k, v, segment_ids, sliding_window=None,
                          implementation=implementation)
    return jnp.sum(out.astype(jnp.float32))

  jax.jit(jax.grad(total, argnums=(0, 1, 2))).lower(qkv, qkv, qkv, segment_ids)


def _gpu_module():
  from jax.experimental.pallas.ops.gpu import attention
  return attention


def _splash_modules():
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel, splash_attention_mask)
  return splash_attention_kernel, splash_attention_mask


def config_problem(implementation: str, length: int, sliding_window: int | None) -> str | None:
  """Why the kernel cannot run a sequence of this length (or this window), or None."""
  if problem := window_problem(implementation, sliding_window):
    return problem
  if implementation == "pallas_gpu":
    blocks = sorted({min(size, length) for size in GPU_BLOCKS.values()})
    if any(length % size for size in blocks):
      return (f"attention_impl='pallas_gpu' tiles the sequence by {blocks}: use a sequence "
              f"length that is a multiple of them, not {length}.")
  if implementation == "splash" and _splash_block(length) is None:
    return (f"attention_impl='splash' tiles the sequence by {SPLASH_BLOCKS[-1]}: use a "
            f"sequence length that is a multiple of it, not {length}.")
  return None


def window_problem(implementation: str | None, sliding_window: int | None) -> str | None:
  """Why the implementation cannot apply this sliding window, or None."""
  if implementation == "pallas_gpu" and sliding_window is not None:
    return ("attention_impl='pallas_gpu' has no sliding window: use 'splash', 'cudnn' or "
            f"'xla' with sliding_window={sliding_window}.")
  return None


def _gpu_attention(q, k, v, segment_ids):
  gpu_attention = _gpu_module()
  length, groups = q.shape[1], q.shape[2] // k.shape[2]
  blocks = {name: min(size, length) for name, size in GPU_BLOCKS.items()}
  return gpu_attention.mha(
      q, jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2), segment_ids,
      sm_scale=q.shape[-1] ** -0.5, causal=True, block_sizes=gpu_attention.BlockSizes(**blocks),
      interpret=jax.default_backend() != "gpu")


def _splash_block(length: int) -> int | None:
  return next((size for size in SPLASH_BLOCKS if length % size == 0), None)


@functools.lru_cache(maxsize=None)
def _splash_kernel(length: int, groups: int, sliding_window: int | None, interpret: bool):
  """The kernel for one key/value head and its query heads; building it lays out the mask's
  tiles on the host, so it is built once per shape."""
  splash, masks = _splash_modules()
  shape = (length, length)
  mask = (masks.CausalMask(shape) if sliding_window is None
          else masks.LocalMask(shape, window_size=(sliding_window - 1, 0), offset=0))
  block = _splash_block(length)
  sizes = splash.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
      block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  # Its tile tables must be concrete arrays, not tracers of whichever jit first built it.
  with jax.ensure_compile_time_eval():
    return splash.make_splash_mqa_single_device(masks.MultiHeadMask([mask] * groups),
                                                block_sizes=sizes, interpret=interpret)


def _splash_attention(q, k, v, segment_ids, *, sliding_window):
  splash, _ = _splash_modules()
  batch, length, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  groups = heads // kv_heads
  kernel = _splash_kernel(length, groups, sliding_window, jax.default_backend() != "tpu")
  # Query head h reads key/value head h // groups: [batch, kv_heads, groups, len, head_dim].
  # The kernel does not scale the logits.
  q = (q * head_dim ** -0.5).reshape(batch, length, kv_heads, groups, head_dim)
  q = q.transpose(0, 2, 3, 1, 4)
  k, v = (x.transpose(0, 2, 1, 3) for x in (k, v))
  per_kv_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))
  out = jax.vmap(per_kv_head)(q, k, v, splash.SegmentIds(q=segment_ids, kv=segment_ids))
  return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, head_dim)
