"""Llama-family decoder (Llama 2/3, Mistral, Qwen2 shapes) in Flax NNX.

Layer parameters are stacked on a leading "layers" axis so that the forward pass can scan
over them: compile time stays flat in depth and a checkpoint has the same layout whether the
layers are scanned or unrolled.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.layers.attention import Attention
from jaxlm.layers.linear import Einsum, Embedding
from jaxlm.layers.mlp import SwiGLU
from jaxlm.layers.norms import RMSNorm
from jaxlm.layers.remat import remat
from jaxlm.layers.sharding import constrain
from jaxlm.models.config import LlamaConfig

RESIDUAL = ("act_batch", "act_length", "act_embed")


def _dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    norm = dict(eps=cfg.norm_eps, param_dtype=jnp.dtype(cfg.param_dtype),
                compute_dtype=jnp.dtype(cfg.compute_dtype))
    self.input_norm = RMSNorm(cfg.hidden_size, **norm)
    self.attention = Attention(cfg, rngs=rngs)
    self.post_attention_norm = RMSNorm(cfg.hidden_size, **norm)
    self.mlp = SwiGLU(cfg, rngs=rngs)
    self.dropout_rate = cfg.dropout_rate

  def __call__(self, x, positions, segment_ids, dropout_rng=None):
    attn_rng = mlp_rng = None
    if dropout_rng is not None:
      attn_rng, mlp_rng = jax.random.split(dropout_rng)
    h = self.attention(self.input_norm(x), positions, segment_ids)
    x = constrain(x + _dropout(h, self.dropout_rate, attn_rng), RESIDUAL)
    h = self.mlp(self.post_attention_norm(x))
    return constrain(x + _dropout(h, self.dropout_rate, mlp_rng), RESIDUAL)


class Llama(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtypes = dict(param_dtype=jnp.dtype(cfg.param_dtype),
                  compute_dtype=jnp.dtype(cfg.compute_dtype))
    self.embed = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs,
                           init_std=cfg.init_std, **dtypes)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def stacked_layers(rngs):
      return DecoderLayer(cfg, rngs=rngs)

    self.layers = stacked_layers(rngs)
    self.final_norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, **dtypes)
    self.lm_head = None if cfg.tie_embeddings else Einsum(
        "btd,dv->btv", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), rngs=rngs,
        init_std=cfg.init_std, **dtypes)

  def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, *,
               dropout_rng: jax.Array | None = None) -> jax.Array:
    """input_ids, positions, segment_ids: int [batch, seq] -> float32 logits
    [batch, seq, vocab]. Positions default to 0..seq-1; segment ids (documents packed in
    one row, 0 = padding) restrict attention to the token's own document."""
    cfg = self.cfg
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    x = constrain(self.embed(input_ids), RESIDUAL)
    layer_def, layer_state = nnx.split(self.layers)
    layer_rngs = (None if dropout_rng is None or cfg.dropout_rate == 0.0
                  else jax.random.split(dropout_rng, cfg.num_layers))

    def one_layer(x, state_and_rng):
      state, rng = state_and_rng
      return nnx.merge(layer_def, state)(x, positions, segment_ids, rng), None

    one_layer = remat(one_layer, cfg.remat_policy, prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      x, _ = jax.lax.scan(one_layer, x, (layer_state, layer_rngs))
    else:
      for i in range(cfg.num_layers):
        layer_i = jax.tree.map(lambda a: a[i], (layer_state, layer_rngs))
        x, _ = one_layer(x, layer_i)

    x = self.final_norm(x)
    if self.lm_head is None:
      logits = self.embed.attend(x)
    else:
      logits = jnp.einsum("btd,dv->btv", x, self.lm_head.kernel[...].astype(x.dtype),
                          preferred_element_type=jnp.float32)
    return constrain(logits, ("act_batch", "act_length", "act_vocab"))
