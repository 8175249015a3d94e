"""Inverted dropout: kept values are scaled by 1 / (1 - rate), so evaluation needs no rescaling."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """x unchanged without an rng (evaluation, generation) or at rate 0."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
