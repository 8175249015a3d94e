from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.layers.remat import recomputed
from jaxlm.layers.sharding import param


def _rms_norm(x, scale, eps: float, dtype):
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (normed * scale.astype(jnp.float32)).astype(dtype)


def _layer_norm(x, scale, bias, eps: float, dtype):
  x32 = x.astype(jnp.float32)
  centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
  normed = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
  return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype)


class RMSNorm(nnx.Module):
  """Root-mean-square norm, statistics in float32 whatever the compute dtype."""

  def __init__(self, dim: int, *, eps: float, param_dtype, compute_dtype,
               recompute_in_backward: bool = False):
    self.eps = eps
    self.compute_dtype = compute_dtype
    self.scale = param(jnp.ones((dim,), param_dtype), ("norm",))
    self.norm = recomputed(_rms_norm, (2, 3)) if recompute_in_backward else _rms_norm

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.norm(x, self.scale[...], self.eps, self.compute_dtype)


class LayerNorm(nnx.Module):
  """Mean-and-variance norm with a bias (GPT-2), statistics in float32."""

  def __init__(self, dim: int, *, eps: float, param_dtype, compute_dtype,
               recompute_in_backward: bool = False):
    self.eps = eps
    self.compute_dtype = compute_dtype
    self.scale = param(jnp.ones((dim,), param_dtype), ("norm",))
    self.bias = param(jnp.zeros((dim,), param_dtype), ("norm",))
    self.norm = recomputed(_layer_norm, (3, 4)) if recompute_in_backward else _layer_norm

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.norm(x, self.scale[...], self.bias[...], self.eps, self.compute_dtype)


def make_norm(cfg) -> RMSNorm | LayerNorm:
  """The norm cfg.norm_type names, over the hidden size. Without a remat policy ("none")
  and with layers scanned it is recomputed in the backward from its input instead of
  keeping float32 copies of it: two [batch, seq, hidden] float32 arrays a norm, for every
  layer, that the scan would stack (6.0 GiB and 21.6 GB moved a step for the reference
  1.1B compiled for an H100). Unrolled, XLA keeps what it needs for 0.07 GiB, and
  recomputing moves 2.1 GB more (README, "What the kernels move")."""
  norm = RMSNorm if cfg.norm_type == "rms" else LayerNorm
  return norm(cfg.hidden_size, eps=cfg.norm_eps, param_dtype=jnp.dtype(cfg.param_dtype),
              compute_dtype=jnp.dtype(cfg.compute_dtype),
              recompute_in_backward=cfg.remat_policy == "none" and cfg.scan_layers)
