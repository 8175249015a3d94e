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
