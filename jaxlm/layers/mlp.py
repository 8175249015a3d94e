from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.layers.linear import Einsum
from jaxlm.layers.sharding import constrain


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x)), as in Llama."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    common = dict(rngs=rngs, param_dtype=jnp.dtype(cfg.param_dtype),
                  compute_dtype=jnp.dtype(cfg.compute_dtype), init_std=cfg.init_std)
    d, m = cfg.hidden_size, cfg.mlp_dim
    self.gate_proj = Einsum("btd,dm->btm", (d, m), ("embed", "mlp"), **common)
    self.up_proj = Einsum("btd,dm->btm", (d, m), ("embed", "mlp"), **common)
    self.down_proj = Einsum("btm,md->btd", (m, d), ("mlp", "embed"), **common)

  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
    hidden = constrain(hidden, ("act_batch", "act_length", "act_mlp"))
    return self.down_proj(hidden)
