from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.layers.linear import Einsum
from jaxlm.layers.remat import recomputed
from jaxlm.layers.sharding import constrain


def _common(cfg, rngs: nnx.Rngs) -> dict:
  return dict(rngs=rngs, param_dtype=jnp.dtype(cfg.param_dtype),
              compute_dtype=jnp.dtype(cfg.compute_dtype), init_std=cfg.init_std,
              float32_weight_grads=cfg.float32_weight_grads)


def _into_mlp(cfg, rngs: nnx.Rngs) -> Einsum:
  m = cfg.mlp_dim
  return Einsum("btd,dm->btm", (cfg.hidden_size, m), ("embed", "mlp"),
                bias_shape=(m,) if cfg.mlp_bias else None, bias_names=("mlp",),
                **_common(cfg, rngs))


def _out_of_mlp(cfg, rngs: nnx.Rngs) -> Einsum:
  d = cfg.hidden_size
  return Einsum("btm,md->btd", (cfg.mlp_dim, d), ("mlp", "embed"),
                bias_shape=(d,) if cfg.mlp_bias else None, bias_names=("embed",),
                **_common(cfg, rngs))


def _swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  return jax.nn.silu(gate) * up


def _gelu(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=True)


def _activation(fn, cfg):
  """fn, recomputed in the backward from its inputs (the projections' outputs) when no remat
  policy decides what a layer keeps (remat_policy "none"): the layer then keeps those and
  the down projection's input, not every intermediate (sigmoid, silu, ...). For the
  reference 1.1B compiled for an H100 that is 10.6 GiB less (README, "Plan for a GPU you do
  not have")."""
  return recomputed(fn) if cfg.remat_policy == "none" else fn


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x)), as in Llama."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.gate_proj = _into_mlp(cfg, rngs)
    self.up_proj = _into_mlp(cfg, rngs)
    self.down_proj = _out_of_mlp(cfg, rngs)
    self.activation = _activation(_swiglu, cfg)

  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = self.activation(self.gate_proj(x), self.up_proj(x))
    hidden = constrain(hidden, ("act_batch", "act_length", "act_mlp"))
    return self.down_proj(hidden)


class GeluMLP(nnx.Module):
  """down(gelu(up(x))) with gelu's tanh approximation, as GPT-2 ("gelu_new": c_fc, c_proj)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.up_proj = _into_mlp(cfg, rngs)
    self.down_proj = _out_of_mlp(cfg, rngs)
    self.activation = _activation(_gelu, cfg)

  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = self.activation(self.up_proj(x))
    hidden = constrain(hidden, ("act_batch", "act_length", "act_mlp"))
    return self.down_proj(hidden)


def make_mlp(cfg, *, rngs: nnx.Rngs) -> SwiGLU | GeluMLP:
  return (SwiGLU if cfg.mlp_type == "swiglu" else GeluMLP)(cfg, rngs=rngs)
