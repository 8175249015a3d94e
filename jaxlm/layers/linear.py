"""Projections and embeddings with logical axis names and separate param/compute dtypes."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.layers.sharding import LogicalAxes, param


class Einsum(nnx.Module):
  """y = einsum(equation, x, W) (+ b). Weights stored in param_dtype, used in compute_dtype."""

  def __init__(self, equation: str, shape: tuple[int, ...], names: LogicalAxes, *,
               rngs: nnx.Rngs, param_dtype, compute_dtype, init_std: float,
               bias_shape: tuple[int, ...] | None = None, bias_names: LogicalAxes = ()):
    self.equation = equation
    self.compute_dtype = compute_dtype
    self.kernel = param(init_std * jax.random.normal(rngs.params(), shape, param_dtype), names)
    self.bias = (param(jnp.zeros(bias_shape, param_dtype), bias_names)
                 if bias_shape is not None else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.einsum(self.equation, x.astype(self.compute_dtype),
                   self.kernel[...].astype(self.compute_dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.compute_dtype)
    return y


class Embedding(nnx.Module):

  def __init__(self, vocab_size: int, dim: int, *, rngs: nnx.Rngs, param_dtype,
               compute_dtype, init_std: float):
    self.compute_dtype = compute_dtype
    self.table = param(init_std * jax.random.normal(rngs.params(), (vocab_size, dim),
                                                    param_dtype), ("vocab", "embed"))

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.table[...].astype(self.compute_dtype), ids, axis=0)

  def attend(self, x: jax.Array) -> jax.Array:
    """Output projection with the embedding matrix (tied embeddings); logits in float32."""
    return jnp.einsum("btd,vd->btv", x, self.table[...].astype(self.compute_dtype),
                      preferred_element_type=jnp.float32)
