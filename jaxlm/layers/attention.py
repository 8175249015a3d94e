"""Grouped-query self-attention with rotary embeddings (or none, with learned positions),
causal, document and sliding-window masking, through `jax.nn.dot_product_attention` (cuDNN
flash on GPU, XLA elsewhere) or one of jax's Pallas flash-attention kernels (GPU, TPU), and
an optional key/value cache for generation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.layers.linear import Einsum
from jaxlm.layers.rotary import apply_rotary, inverse_frequencies
from jaxlm.layers.flash_kernels import KERNELS, flash_attention, load_kernel
from jaxlm.layers.sharding import constrain


# None: chosen per backend and dtype by resolve_attention_impl. The Pallas kernels
# (flash_kernels.py) apply the document mask inside the kernel.
ATTENTION_IMPLS = (None, "xla", "cudnn", *KERNELS)


def resolve_attention_impl(requested: str | None, dtype, backend: str | None = None) -> str:
  """cuDNN flash attention where it applies (GPU, 16-bit inputs), XLA elsewhere; backend:
  the one compiled for (default: JAX's)."""
  if requested is not None:
    return requested
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return "cudnn" if (backend or jax.default_backend()) == "gpu" and half else "xla"


class Attention(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    d, hd = cfg.hidden_size, cfg.resolved_head_dim
    n, k = cfg.num_heads, cfg.num_kv_heads
    common = dict(rngs=rngs, param_dtype=jnp.dtype(cfg.param_dtype),
                  compute_dtype=jnp.dtype(cfg.compute_dtype), init_std=cfg.init_std,
                  float32_weight_grads=cfg.float32_weight_grads)
    bias = cfg.qkv_bias
    self.q_proj = Einsum("btd,dnh->btnh", (d, n, hd), ("embed", "heads", "head_dim"),
                         bias_shape=(n, hd) if bias else None,
                         bias_names=("heads", "head_dim"), **common)
    self.k_proj = Einsum("btd,dkh->btkh", (d, k, hd), ("embed", "kv_heads", "head_dim"),
                         bias_shape=(k, hd) if bias else None,
                         bias_names=("kv_heads", "head_dim"), **common)
    self.v_proj = Einsum("btd,dkh->btkh", (d, k, hd), ("embed", "kv_heads", "head_dim"),
                         bias_shape=(k, hd) if bias else None,
                         bias_names=("kv_heads", "head_dim"), **common)
    self.o_proj = Einsum("btnh,nhd->btd", (n, hd, d), ("heads", "head_dim", "embed"),
                         bias_shape=(d,) if cfg.attention_out_bias else None,
                         bias_names=("embed",), **common)
    # A tuple of floats, not an array: static, so not mistaken for model state. None: the
    # positions were added to the embeddings instead (learned).
    self.inv_freq = (tuple(inverse_frequencies(hd, cfg.rope_theta, cfg.rope_scaling).tolist())
                     if cfg.position_embedding == "rope" else None)
    self.sliding_window = cfg.sliding_window
    self.document_mask = cfg.document_mask
    self.implementation = cfg.attention_impl
    load_kernel(cfg.attention_impl)

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
               cache: dict | None = None):
    """Without a cache: the attention output. With one ({"k", "v"}: [batch, slots, kv_heads,
    head_dim], "index": the first slot to write, "key_positions": [batch, slots] position of
    each slot's token, -1 for none, this call's tokens included): (output, {"k", "v"})."""
    q = constrain(self.q_proj(x), ("act_batch", "act_length", "act_heads", None))
    k = constrain(self.k_proj(x), ("act_batch", "act_length", "act_kv_heads", None))
    v = constrain(self.v_proj(x), ("act_batch", "act_length", "act_kv_heads", None))
    if self.inv_freq is not None:
      q = apply_rotary(q, positions, self.inv_freq)
      k = apply_rotary(k, positions, self.inv_freq)
    if cache is not None:
      return self._attend_cached(q, k, v, positions, cache)
    out = causal_attention(q, k, v, segment_ids if self.document_mask else None,
                           sliding_window=self.sliding_window,
                           implementation=self.implementation)
    out = constrain(out, ("act_batch", "act_length", "act_heads", None))
    return self.o_proj(out)

  def _attend_cached(self, q, k, v, positions, cache):
    kv = {name: _write(cache[name], new, cache["index"]) for name, new in (("k", k), ("v", v))}
    mask = cached_attention_mask(positions, cache["key_positions"], self.sliding_window)
    # The cached keys sit at arbitrary slots, so causality comes from positions in the mask;
    # only the XLA implementation takes an arbitrary boolean mask.
    out = jax.nn.dot_product_attention(q, kv["k"].astype(q.dtype), kv["v"].astype(q.dtype),
                                       mask=mask, implementation="xla")
    out = constrain(out, ("act_batch", "act_length", "act_heads", None))
    return self.o_proj(out), kv


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     segment_ids: jax.Array | None = None, *, sliding_window: int | None = None,
                     implementation: str | None = None) -> jax.Array:
  """Causal attention of q [batch, len, heads, head_dim] over k, v [batch, len, kv_heads,
  head_dim], each token seeing only its own document (segment_ids, when given) and the last
  sliding_window tokens; implementation as resolve_attention_impl."""
  implementation = resolve_attention_impl(implementation, q.dtype)
  if implementation in KERNELS:
    return flash_attention(q, k, v, segment_ids, sliding_window=sliding_window,
                           implementation=implementation)
  mask = None if segment_ids is None else segment_mask(segment_ids)
  window = None if sliding_window is None else (sliding_window - 1, 0)
  return jax.nn.dot_product_attention(
      q, k, v, mask=mask, is_causal=True, local_window_size=window,
      implementation=implementation)


def _write(cached: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
  """Writes new [batch, len, kv_heads, head_dim] into the cache's slots index..index+len-1."""
  cached = jax.lax.dynamic_update_slice(cached, new.astype(cached.dtype), (0, index, 0, 0))
  return constrain(cached, ("act_batch", None, "act_kv_heads", None))


def segment_mask(segment_ids: jax.Array) -> jax.Array:
  """bool [batch, 1, queries, keys]: tokens attend only within their own document (segment)
  of a packed row; padding (id 0) only to padding, so no query row is ever fully masked."""
  return segment_ids[:, None, :, None] == segment_ids[:, None, None, :]


def cached_attention_mask(query_positions: jax.Array, key_positions: jax.Array,
                          sliding_window: int | None) -> jax.Array:
  """bool [batch, 1, queries, slots]: a query sees the cached tokens at or before its own
  position (and within the window); slots without a token (position -1) are never seen."""
  q = query_positions[:, None, :, None]
  k = key_positions[:, None, None, :]
  mask = (k >= 0) & (k <= q)
  if sliding_window is not None:
    mask &= q - k < sliding_window
  return mask
