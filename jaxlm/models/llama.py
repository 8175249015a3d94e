"""Llama-family decoder (Llama 2/3, Mistral, Qwen2 shapes) in Flax NNX.

Layer parameters are stacked on a leading "layers" axis so that the forward pass can scan
over them: compile time stays flat in depth and a checkpoint has the same layout whether the
layers are scanned or unrolled. The key/value cache for generation (`init_cache`) is stacked
the same way and scanned along with the layers.
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
CACHED_KV = (None, "act_batch", None, "act_kv_heads", None)  # [layers, batch, slots, kv, hd]


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=None) -> dict:
  """An empty key/value cache of max_len slots per row for `Llama.__call__(..., cache=)`:
  keys and values per layer (in dtype, default the compute dtype), the position of the token
  in each slot (-1: none) and the next slot to write, shared by all rows. max_len must hold
  every token fed, padding included: writes past the end would land on the last slots."""
  dtype = jnp.dtype(dtype or cfg.compute_dtype)
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.resolved_head_dim)
  return {"k": constrain(jnp.zeros(shape, dtype), CACHED_KV),
          "v": constrain(jnp.zeros(shape, dtype), CACHED_KV),
          "positions": constrain(jnp.full((batch, max_len), -1, jnp.int32), ("act_batch", None)),
          "index": jnp.zeros((), jnp.int32)}


def take_cache_rows(cache: dict, rows: jax.Array) -> dict:
  """The cache of batch rows `rows` (int [new_batch]), e.g. to follow beams to their parents."""
  return {"k": constrain(jnp.take(cache["k"], rows, axis=1), CACHED_KV),
          "v": constrain(jnp.take(cache["v"], rows, axis=1), CACHED_KV),
          "positions": constrain(jnp.take(cache["positions"], rows, axis=0), ("act_batch", None)),
          "index": cache["index"]}


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

  def __call__(self, x, positions, segment_ids, dropout_rng=None, cache=None):
    """-> (x, this layer's updated {"k", "v"} cache, or None without a cache)."""
    attn_rng = mlp_rng = None
    if dropout_rng is not None:
      attn_rng, mlp_rng = jax.random.split(dropout_rng)
    attended = self.attention(self.input_norm(x), positions, segment_ids, cache)
    h, kv = attended if cache is not None else (attended, None)
    x = constrain(x + _dropout(h, self.dropout_rate, attn_rng), RESIDUAL)
    h = self.mlp(self.post_attention_norm(x))
    return constrain(x + _dropout(h, self.dropout_rate, mlp_rng), RESIDUAL), kv


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
               dropout_rng: jax.Array | None = None, cache: dict | None = None):
    """input_ids, positions, segment_ids: int [batch, seq] -> float32 logits
    [batch, seq, vocab]. Positions default to 0..seq-1; segment ids (documents packed in
    one row, 0 = padding) restrict attention to the token's own document.

    With a cache (`init_cache`) the tokens fill its next seq slots and attend to everything
    cached at or before their position; returns (logits, updated cache). Positions then
    default to the slot numbers, a negative position marks padding that no token attends to,
    and segment ids are not taken."""
    cfg = self.cfg
    if cache is not None and segment_ids is not None:
      raise ValueError("segment_ids are not supported with a cache; give padding tokens a "
                       "negative position instead.")
    if positions is None:
      first = 0 if cache is None else cache["index"]
      positions = jnp.broadcast_to(first + jnp.arange(input_ids.shape[1]), input_ids.shape)
    x = constrain(self.embed(input_ids), RESIDUAL)
    layer_def, layer_state = nnx.split(self.layers)
    layer_rngs = (None if dropout_rng is None or cfg.dropout_rate == 0.0
                  else jax.random.split(dropout_rng, cfg.num_layers))
    kv = shared = None
    if cache is not None:
      key_positions = jax.lax.dynamic_update_slice(
          cache["positions"], positions.astype(jnp.int32), (0, cache["index"]))
      kv = {"k": cache["k"], "v": cache["v"]}
      shared = {"index": cache["index"], "key_positions": key_positions}

    def one_layer(x, inputs):
      state, rng, layer_kv = inputs
      layer_cache = None if layer_kv is None else {**layer_kv, **shared}
      return nnx.merge(layer_def, state)(x, positions, segment_ids, rng, layer_cache)

    one_layer = remat(one_layer, cfg.remat_policy, prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      x, kv = jax.lax.scan(one_layer, x, (layer_state, layer_rngs, kv))
    else:
      per_layer = []
      for i in range(cfg.num_layers):
        x, layer_kv = one_layer(x, jax.tree.map(lambda a: a[i], (layer_state, layer_rngs, kv)))
        per_layer.append(layer_kv)
      kv = jax.tree.map(lambda *layers: jnp.stack(layers), *per_layer)

    x = self.final_norm(x)
    if self.lm_head is None:
      logits = self.embed.attend(x)
    else:
      logits = jnp.einsum("btd,dv->btv", x, self.lm_head.kernel[...].astype(x.dtype),
                          preferred_element_type=jnp.float32)
    logits = constrain(logits, ("act_batch", "act_length", "act_vocab"))
    if cache is None:
      return logits
    return logits, {**kv, "positions": shared["key_positions"],
                    "index": cache["index"] + input_ids.shape[1]}
