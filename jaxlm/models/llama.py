"""The decoder of the Llama family (Llama 2/3, Mistral, Qwen2 shapes) and GPT-2, in Flax NNX.
GPT-2 differs only in options of the config: LayerNorm, learned absolute positions, a gelu
MLP and biases on every projection.

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
from jaxlm.layers.dropout import dropout
from jaxlm.layers.linear import Einsum, Embedding, float32_logits, lookup
from jaxlm.layers.mlp import make_mlp
from jaxlm.layers.norms import make_norm
from jaxlm.layers.remat import remat
from jaxlm.layers.sharding import constrain, param
from jaxlm.models.config import LlamaConfig

RESIDUAL = ("act_batch", "act_residual_length", "act_embed")
CACHED_KV = (None, "act_batch", None, "act_kv_heads", None)  # [layers, batch, slots, kv, hd]


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=None) -> dict:
  """An empty key/value cache of max_len slots per row for `Llama.__call__(..., cache=)`:
  keys and values per layer (in dtype, default the compute dtype), the position of the token
  in each slot (-1: none) and the next slot to write, shared by all rows. max_len must hold
  every token fed, padding included: writes past the end would land on the last slots."""
  if cfg.position_embedding == "learned" and max_len > cfg.max_seq_len:
    raise ValueError(f"A cache of {max_len} tokens is longer than the model's "
                     f"{cfg.max_seq_len} learned positions; shorten the prompt or the number "
                     f"of new tokens.")
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


class LearnedPositions(nnx.Module):
  """GPT-2's absolute position embeddings: a [max_seq_len, hidden] table indexed by position."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.compute_dtype = jnp.dtype(cfg.compute_dtype)
    shape = (cfg.max_seq_len, cfg.hidden_size)
    self.table = param(cfg.init_std * jax.random.normal(rngs.params(), shape,
                                                        jnp.dtype(cfg.param_dtype)),
                       (None, "embed"))

  def __call__(self, positions: jax.Array) -> jax.Array:
    # Padding in a cache has position -1: any row will do, no token attends to it.
    rows = jnp.clip(positions, 0, self.table.shape[0] - 1)
    return lookup(self.table[...], rows, self.compute_dtype)


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.input_norm = make_norm(cfg)
    self.attention = Attention(cfg, rngs=rngs)
    self.post_attention_norm = make_norm(cfg)
    self.mlp = make_mlp(cfg, rngs=rngs)
    self.dropout_rate = cfg.dropout_rate

  def __call__(self, x, positions, segment_ids, dropout_rng=None, cache=None):
    """-> (x, this layer's updated {"k", "v"} cache, or None without a cache)."""
    attn_rng = mlp_rng = None
    if dropout_rng is not None:
      attn_rng, mlp_rng = jax.random.split(dropout_rng)
    attended = self.attention(self.input_norm(x), positions, segment_ids, cache)
    h, kv = attended if cache is not None else (attended, None)
    x = constrain(x + dropout(h, self.dropout_rate, attn_rng), RESIDUAL)
    h = self.mlp(self.post_attention_norm(x))
    return constrain(x + dropout(h, self.dropout_rate, mlp_rng), RESIDUAL), kv


class Llama(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtypes = dict(param_dtype=jnp.dtype(cfg.param_dtype),
                  compute_dtype=jnp.dtype(cfg.compute_dtype))
    self.embed = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs,
                           init_std=cfg.init_std, **dtypes)
    self.position_embed = (LearnedPositions(cfg, rngs=rngs)
                           if cfg.position_embedding == "learned" else None)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def stacked_layers(rngs):
      return DecoderLayer(cfg, rngs=rngs)

    self.layers = stacked_layers(rngs)
    self.final_norm = make_norm(cfg)
    self.lm_head = None if cfg.tie_embeddings or cfg.num_labels else Einsum(
        "btd,dv->btv", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), rngs=rngs,
        init_std=cfg.init_std, **dtypes)
    # The class axis is a handful of labels: splitting it over devices would gain nothing.
    token_head = cfg.classifier == "token"
    self.score = Einsum("btd,dc->btc", (cfg.hidden_size, cfg.num_labels), ("embed", None),
                        rngs=rngs, init_std=cfg.init_std,
                        bias_shape=(cfg.num_labels,) if token_head else None,
                        bias_names=(None,), **dtypes) if cfg.num_labels else None

  def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, *,
               dropout_rng: jax.Array | None = None, cache: dict | None = None):
    """input_ids, positions, segment_ids: int [batch, seq] -> float32 logits
    [batch, seq, vocab], or [batch, seq, num_labels] for a classifier (cfg.num_labels > 0),
    whose prediction for a text is at its last token (a regression head's: [..., 0], the
    score). Positions default to 0..seq-1; segment ids (documents packed in one row,
    0 = padding) restrict attention to the token's own document.

    With a cache (`init_cache`) the tokens fill its next seq slots and attend to everything
    cached at or before their position; returns (logits, updated cache). Positions then
    default to the slot numbers, a negative position marks padding that no token attends to,
    and segment ids are not taken."""
    if cache is None:
      return self.output_logits(self.hidden_states(input_ids, positions, segment_ids,
                                             dropout_rng=dropout_rng))
    x, cache = self.hidden_states(input_ids, positions, segment_ids, dropout_rng=dropout_rng,
                                  cache=cache)
    return self.output_logits(x), cache

  def output_logits(self, x: jax.Array) -> jax.Array:
    """float32 logits of final-normed hidden states [batch, seq, hidden] (`hidden_states`)."""
    if self.score is not None:
      logits = float32_logits("btd,dc->btc", x, self.score.kernel[...].astype(x.dtype))
      if self.score.bias is not None:
        logits = logits + self.score.bias[...].astype(jnp.float32)
      return constrain(logits, ("act_batch", "act_length", None))
    if self.lm_head is None:
      logits = self.embed.attend(x)  # tied: see Embedding.attend
    else:
      equation, weight = self.output_projection()
      logits = float32_logits(equation, x, weight)  # casts to x.dtype itself
    return constrain(logits, ("act_batch", "act_length", "act_vocab"))

  def output_projection(self) -> tuple[str, jax.Array]:
    """The language-model head as (einsum equation, weight in the compute dtype), whose
    vocabulary axis is `v`: its logits are float32_logits(equation, hidden, weight)."""
    dtype = jnp.dtype(self.cfg.compute_dtype)
    if self.lm_head is None:  # tied to the embedding table
      return "btd,vd->btv", self.embed.table[...].astype(dtype)
    return "btd,dv->btv", self.lm_head.kernel[...].astype(dtype)

  def hidden_states(self, input_ids: jax.Array, positions: jax.Array | None = None,
                    segment_ids: jax.Array | None = None, *,
                    dropout_rng: jax.Array | None = None, cache: dict | None = None):
    """The final-normed hidden states [batch, seq, hidden] (compute dtype) that the output
    projection turns into logits, e.g. for a classification head. Arguments as `__call__`;
    with a cache, returns (hidden states, updated cache)."""
    cfg = self.cfg
    if cache is not None and segment_ids is not None:
      raise ValueError("segment_ids are not supported with a cache; give padding tokens a "
                       "negative position instead.")
    if positions is None:
      first = 0 if cache is None else cache["index"]
      positions = jnp.broadcast_to(first + jnp.arange(input_ids.shape[1]), input_ids.shape)
      if self.position_embed is not None and cache is None and (
          input_ids.shape[1] > cfg.max_seq_len):
        raise ValueError(f"{input_ids.shape[1]} tokens are more than the model's "
                         f"{cfg.max_seq_len} learned positions.")
    x = self.embed(input_ids)
    if self.position_embed is not None:
      x = x + self.position_embed(positions)
    x = constrain(x, RESIDUAL)
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
    if cache is None:
      return x
    return x, {**kv, "positions": shared["key_positions"],
               "index": cache["index"] + input_ids.shape[1]}
