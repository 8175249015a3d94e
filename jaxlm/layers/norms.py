from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.layers.sharding import param


class RMSNorm(nnx.Module):
  """Root-mean-square norm, statistics in float32 whatever the compute dtype."""

  def __init__(self, dim: int, *, eps: float, param_dtype, compute_dtype):
    self.eps = eps
    self.compute_dtype = compute_dtype
    self.scale = param(jnp.ones((dim,), param_dtype), ("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * self.scale[...].astype(jnp.float32)).astype(self.compute_dtype)


class LayerNorm(nnx.Module):
  """Mean-and-variance norm with a bias (GPT-2), statistics in float32."""

  def __init__(self, dim: int, *, eps: float, param_dtype, compute_dtype):
    self.eps = eps
    self.compute_dtype = compute_dtype
    self.scale = param(jnp.ones((dim,), param_dtype), ("norm",))
    self.bias = param(jnp.zeros((dim,), param_dtype), ("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    normed = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True)
                                     + self.eps)
    out = normed * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return out.astype(self.compute_dtype)


def make_norm(cfg) -> RMSNorm | LayerNorm:
  """The norm cfg.norm_type names, over the hidden size."""
  norm = RMSNorm if cfg.norm_type == "rms" else LayerNorm
  return norm(cfg.hidden_size, eps=cfg.norm_eps, param_dtype=jnp.dtype(cfg.param_dtype),
              compute_dtype=jnp.dtype(cfg.compute_dtype))
