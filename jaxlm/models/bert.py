"""BERT-family encoders (BERT, RoBERTa) in Flax NNX: post-LayerNorm bidirectional layers with
biases everywhere, learned absolute positions, an optional pooler and masked-LM head, and an
optional classification head (`score`, num_labels > 0): on the pooled first token of each
segment ([CLS] / <s>) for a sequence classifier or regressor, on every token for a token
classifier (NER).

Layers are stacked on a leading "layers" axis and scanned, as in the Llama decoder, and use
the same logical axis names, so the same sharding rules and checkpoint layout apply.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.layers.attention import resolve_attention_impl, segment_mask
from jaxlm.layers.dropout import dropout
from jaxlm.layers.linear import Einsum, Embedding, lookup
from jaxlm.layers.norms import LayerNorm
from jaxlm.layers.remat import POLICIES as REMAT_POLICIES, remat
from jaxlm.layers.sharding import constrain, param

RESIDUAL = ("act_batch", "act_residual_length", "act_embed")
CLASSIFIERS = ("sequence", "token", "regression")
# The attention mask of an encoder may hide only padded keys (attention_mask), which the
# Pallas kernel's segment ids cannot say: it keeps to jax.nn.dot_product_attention.
ENCODER_ATTENTION_IMPLS = (None, "xla", "cudnn")
ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"  # gelu (exact erf), gelu_new / gelu_pytorch_tanh (tanh approx.)
  # RoBERTa's head always uses exact gelu, whatever hidden_act says.
  mlm_head_act: str = "gelu"
  # 0: positions are 0..t-1 (BERT). n > 0: non-padding tokens count from n and padding sits
  # at n - 1 (RoBERTa: n = pad_token_id + 1), positions derived from input_ids.
  position_offset: int = 0
  pad_token_id: int = 0
  # On the embeddings and on each residual branch (HF hidden_dropout_prob); attention
  # probabilities are not dropped.
  dropout_rate: float = 0.0
  pooler: bool = True
  mlm_head: bool = True
  # A classification head over num_labels classes (0: none): "sequence" (and "regression",
  # one output) reads the pooler's output, so needs pooler=True; "token" reads every token.
  num_labels: int = 0
  classifier: str = "sequence"
  param_dtype: str = "float32"
  compute_dtype: str = "bfloat16"
  # True: the projections' weight gradients leave their matmuls, and are summed across
  # devices, in float32 rather than the compute dtype (as LlamaConfig's)
  float32_weight_grads: bool = False
  scan_layers: bool = True
  remat_policy: str = "none"  # see layers/remat.py
  attention_impl: str | None = None  # None: cuDNN on GPU for 16-bit, XLA elsewhere
  init_std: float = 0.02
  # What the trainer asks of every model config (a LlamaConfig field): positions are a table.
  position_embedding: ClassVar[str] = "learned"

  def __post_init__(self):
    problems = []
    if self.hidden_size % self.num_heads:
      problems.append(f"hidden_size ({self.hidden_size}) is not divisible by num_heads "
                      f"({self.num_heads})")
    for field in ("hidden_act", "mlm_head_act"):
      if getattr(self, field) not in ACTIVATIONS:
        problems.append(f"{field}={getattr(self, field)!r} (supported: {', '.join(ACTIVATIONS)})")
    for field, allowed in (("remat_policy", tuple(REMAT_POLICIES)),
                           ("attention_impl", ENCODER_ATTENTION_IMPLS)):
      if getattr(self, field) not in allowed:
        problems.append(f"{field}={getattr(self, field)!r} (one of "
                        f"{', '.join(map(str, allowed))})")
    if self.classifier not in CLASSIFIERS:
      problems.append(f"classifier={self.classifier!r} (one of {', '.join(CLASSIFIERS)})")
    elif self.num_labels and self.classifier != "token" and not self.pooler:
      problems.append(f"a {self.classifier} classifier reads the pooler: set pooler=True")
    if self.num_labels and self.classifier == "regression" and self.num_labels != 1:
      problems.append(f"a regression head has one output, not num_labels={self.num_labels}")
    if problems:
      raise ValueError("Invalid BERT config: " + "; ".join(problems))

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def num_kv_heads(self) -> int:
    return self.num_heads

  @property
  def max_seq_len(self) -> int:
    """The longest row the position table covers (RoBERTa's first position_offset rows are
    never used by real tokens)."""
    return self.max_position_embeddings - self.position_offset

  def num_params(self, include_embedding: bool = True) -> int:
    """All parameters, or without the embedding lookups those that do matmul work (the tied
    word embedding still does the MLM head's vocabulary projection)."""
    d, m, v = self.hidden_size, self.mlp_dim, self.vocab_size
    layer = 4 * (d * d + d) + 2 * d * m + m + d + 4 * d  # attention, MLP, two LayerNorms
    heads = ((d * d + d if self.pooler else 0) + (d * d + 3 * d + v if self.mlm_head else 0)
             + (self.num_labels * (d + 1)))
    tables = v * d + (self.max_position_embeddings + self.type_vocab_size) * d + 2 * d
    if include_embedding:
      return self.num_layers * layer + heads + tables
    return self.num_layers * layer + heads + (v * d if self.mlm_head else 0)

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token: 6 x the parameters whose matmuls training runs, plus
    bidirectional attention (QK^T and AV, not halved by a causal mask). Training runs the
    layers and one head: the masked-LM head without a classifier, else the classifier (a
    sequence classifier's through the pooler); the others sit idle."""
    d, v = self.hidden_size, self.vocab_size
    pooler = d * d + d if self.pooler else 0
    mlm = d * d + 3 * d + v + v * d if self.mlm_head else 0  # with the tied projection
    if not self.num_labels:
      idle = pooler
    else:
      idle = mlm + (pooler if self.classifier == "token" else 0)
    return 6 * (self.num_params(include_embedding=False) - idle) + 12 * self.num_layers * (
        seq_len * d)

  def replace(self, **changes) -> "BertConfig":
    return dataclasses.replace(self, **changes)


def _dtypes(cfg: BertConfig) -> dict:
  return dict(param_dtype=jnp.dtype(cfg.param_dtype), compute_dtype=jnp.dtype(cfg.compute_dtype))


def _dense(cfg, equation, shape, names, bias_names, rngs):
  """An Einsum with a bias over the kernel's trailing (output) axes."""
  return Einsum(equation, shape, names, rngs=rngs, init_std=cfg.init_std,
                bias_shape=shape[len(shape) - len(bias_names):], bias_names=bias_names,
                float32_weight_grads=cfg.float32_weight_grads, **_dtypes(cfg))


def _norm(cfg: BertConfig) -> LayerNorm:
  return LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **_dtypes(cfg),
                   recompute_in_backward=cfg.remat_policy == "none")


def bert_positions(cfg: BertConfig, input_ids: jax.Array) -> jax.Array:
  if cfg.position_offset == 0:
    return jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
  # RoBERTa counts only real tokens, so left padding does not shift positions.
  real = (input_ids != cfg.pad_token_id).astype(jnp.int32)
  return jnp.cumsum(real, axis=1) * real + cfg.position_offset - 1


def pair_token_types(input_ids: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                     separator_id: int) -> jax.Array:
  """BERT's token types of packed text pairs, int32 [batch, seq]: 0 up to and including the
  first separator of each segment ([CLS] a [SEP]), 1 after it (b [SEP]), 0 for padding; a
  segment without a separator inside is all 0, a single text. The types BERT's tokenizer
  gives `tokenizer(a, b)`, recovered from the ids so that rows need no extra field.
  positions: 0 at each segment's first token; segment_ids: 0 for padding."""
  is_separator = (input_ids == separator_id).astype(jnp.int32)
  before = jnp.cumsum(is_separator, axis=1) - is_separator  # separators before each token
  start = jnp.arange(input_ids.shape[1]) - positions  # each token's segment start
  within = before - jnp.take_along_axis(before, start, axis=1)
  return ((within > 0) & (segment_ids > 0)).astype(jnp.int32)


def _attention_mask(attention_mask, segment_ids) -> jax.Array | None:
  """[batch, 1, 1 | seq, seq] bool: keys that are not padding, and with segment_ids only
  those of the query's own segment (the decoder's segment mask)."""
  if segment_ids is not None:
    return segment_mask(segment_ids)
  if attention_mask is None:
    return None
  return attention_mask.astype(bool)[:, None, None, :]


class Embeddings(nnx.Module):

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.param_dtype)
    self.word = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs, init_std=cfg.init_std,
                          **_dtypes(cfg))
    # Positions and token types are not a vocabulary: tensor parallelism must not split them.
    self.position = param(cfg.init_std * jax.random.normal(
        rngs.params(), (cfg.max_position_embeddings, cfg.hidden_size), dtype), (None, "embed"))
    self.token_type = param(cfg.init_std * jax.random.normal(
        rngs.params(), (cfg.type_vocab_size, cfg.hidden_size), dtype), (None, "embed"))
    self.norm = _norm(cfg)
    self.compute_dtype = jnp.dtype(cfg.compute_dtype)

  def __call__(self, input_ids, positions, token_type_ids):
    x = (self.word(input_ids)
         + lookup(self.position[...], positions, self.compute_dtype)
         + lookup(self.token_type[...], token_type_ids, self.compute_dtype))
    return self.norm(x)


class SelfAttention(nnx.Module):
  """Bidirectional multi-head attention under a boolean mask [batch, 1, 1 | seq, seq]."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    d, n, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    self.q_proj = _dense(cfg, "btd,dnh->btnh", (d, n, hd), ("embed", "heads", "head_dim"),
                         ("heads", "head_dim"), rngs)
    self.k_proj = _dense(cfg, "btd,dnh->btnh", (d, n, hd), ("embed", "kv_heads", "head_dim"),
                         ("kv_heads", "head_dim"), rngs)
    self.v_proj = _dense(cfg, "btd,dnh->btnh", (d, n, hd), ("embed", "kv_heads", "head_dim"),
                         ("kv_heads", "head_dim"), rngs)
    self.o_proj = _dense(cfg, "btnh,nhd->btd", (n, hd, d), ("heads", "head_dim", "embed"),
                         ("embed",), rngs)
    self.implementation = cfg.attention_impl

  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    q = constrain(self.q_proj(x), ("act_batch", "act_length", "act_heads", None))
    k = constrain(self.k_proj(x), ("act_batch", "act_length", "act_kv_heads", None))
    v = constrain(self.v_proj(x), ("act_batch", "act_length", "act_kv_heads", None))
    out = jax.nn.dot_product_attention(
        q, k, v, mask=mask, implementation=resolve_attention_impl(self.implementation, q.dtype))
    out = constrain(out, ("act_batch", "act_length", "act_heads", None))
    return self.o_proj(out)


class MLP(nnx.Module):

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    d, m = cfg.hidden_size, cfg.mlp_dim
    self.up = _dense(cfg, "btd,dm->btm", (d, m), ("embed", "mlp"), ("mlp",), rngs)
    self.down = _dense(cfg, "btm,md->btd", (m, d), ("mlp", "embed"), ("embed",), rngs)
    self.act = ACTIVATIONS[cfg.hidden_act]

  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = constrain(self.act(self.up(x)), ("act_batch", "act_length", "act_mlp"))
    return self.down(hidden)


class EncoderLayer(nnx.Module):

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.attention = SelfAttention(cfg, rngs=rngs)
    self.attention_norm = _norm(cfg)
    self.mlp = MLP(cfg, rngs=rngs)
    self.mlp_norm = _norm(cfg)
    self.dropout_rate = cfg.dropout_rate

  def __call__(self, x, mask, dropout_rng=None):
    attn_rng = mlp_rng = None
    if dropout_rng is not None:
      attn_rng, mlp_rng = jax.random.split(dropout_rng)
    h = dropout(self.attention(x, mask), self.dropout_rate, attn_rng)
    x = constrain(self.attention_norm(x + h), RESIDUAL)
    h = dropout(self.mlp(x), self.dropout_rate, mlp_rng)
    return constrain(self.mlp_norm(x + h), RESIDUAL)


class MLMHead(nnx.Module):
  """dense -> activation -> LayerNorm; the vocabulary projection is the word embedding."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.dense = _dense(cfg, "btd,de->bte", (d, d), ("embed", None), (None,), rngs)
    self.norm = _norm(cfg)
    self.bias = param(jnp.zeros((cfg.vocab_size,), jnp.dtype(cfg.param_dtype)), ("vocab",))
    self.act = ACTIVATIONS[cfg.mlm_head_act]

  def __call__(self, hidden: jax.Array, word: Embedding) -> jax.Array:
    h = self.norm(self.act(self.dense(hidden)))
    return word.attend(h) + self.bias[...].astype(jnp.float32)


class Bert(nnx.Module):

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embeddings = Embeddings(cfg, rngs=rngs)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def stacked_layers(rngs):
      return EncoderLayer(cfg, rngs=rngs)

    self.layers = stacked_layers(rngs)
    d = cfg.hidden_size
    self.pooler = (_dense(cfg, "...d,de->...e", (d, d), ("embed", None), (None,), rngs)
                   if cfg.pooler else None)
    self.mlm_head = MLMHead(cfg, rngs=rngs) if cfg.mlm_head else None
    self.score = (_dense(cfg, "btd,dc->btc", (d, cfg.num_labels), ("embed", None), (None,), rngs)
                  if cfg.num_labels else None)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None,
               dropout_rng: jax.Array | None = None) -> jax.Array:
    """input_ids, attention_mask (1 = token, 0 = padding), token_type_ids: int [batch, seq]
    -> hidden states [batch, seq, hidden] in the compute dtype. Padded positions get outputs
    too (as in transformers) but no token attends to them.

    Packed rows (the training data's layout) pass segment_ids (0 = padding) instead of
    attention_mask, so that each token attends only within its own segment, and positions
    counting from 0 in each segment (RoBERTa's position_offset is added)."""
    cfg = self.cfg
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    mask = _attention_mask(attention_mask, segment_ids)
    if positions is None:
      positions = bert_positions(cfg, input_ids)
    elif cfg.position_offset:
      positions = positions + cfg.position_offset
    embed_rng = layer_rngs = None
    if dropout_rng is not None and cfg.dropout_rate > 0.0:
      embed_rng, layers_rng = jax.random.split(dropout_rng)
      layer_rngs = jax.random.split(layers_rng, cfg.num_layers)
    x = self.embeddings(input_ids, positions, token_type_ids)
    x = constrain(dropout(x, cfg.dropout_rate, embed_rng), RESIDUAL)
    layer_def, layer_state = nnx.split(self.layers)

    def one_layer(x, inputs):
      state, rng = inputs
      return nnx.merge(layer_def, state)(x, mask, rng), None

    one_layer = remat(one_layer, cfg.remat_policy, prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      x, _ = jax.lax.scan(one_layer, x, (layer_state, layer_rngs))
    else:
      for i in range(cfg.num_layers):
        x, _ = one_layer(x, jax.tree.map(lambda a: a[i], (layer_state, layer_rngs)))
    return x

  def pooled(self, hidden: jax.Array) -> jax.Array:
    """The BERT pooler on the first ([CLS] / <s>) token: [batch, seq, d] -> [batch, d]."""
    if self.pooler is None:
      raise ValueError("This model has no pooler (BertConfig.pooler=False).")
    return jnp.tanh(self.pooler(hidden[:, 0]))

  def mlm_logits(self, hidden: jax.Array) -> jax.Array:
    """Masked-LM logits, float32 [batch, seq, vocab], from the hidden states."""
    if self.mlm_head is None:
      raise ValueError("This model has no masked-LM head (BertConfig.mlm_head=False).")
    logits = self.mlm_head(hidden, self.embeddings.word)
    return constrain(logits, ("act_batch", "act_length", "act_vocab"))


  def class_logits(self, hidden: jax.Array, positions: jax.Array | None = None,
                   dropout_rng: jax.Array | None = None) -> jax.Array:
    """float32 [batch, seq, num_labels]. A token classifier scores each token. A sequence
    classifier scores each segment by its first token ([CLS] / <s>) through the pooler, and
    every token of the segment gets that segment's logits, so that a packed row's examples
    are each read at whichever token the data puts their label (their last). positions
    (0 at each segment's first token; None: one segment per row) locate the segments."""
    if self.score is None:
      raise ValueError("This model has no classification head (BertConfig.num_labels=0).")
    if self.cfg.classifier == "token":
      features = hidden
    else:
      features = jnp.tanh(self.pooler(hidden))
      seq = hidden.shape[1]
      first = (jnp.zeros_like(hidden[..., 0], jnp.int32) if positions is None
               else jnp.arange(seq) - positions)
      features = jnp.take_along_axis(features, first[..., None], axis=1)
    features = dropout(features, self.cfg.dropout_rate, dropout_rng)
    logits = self.score(features).astype(jnp.float32)
    return constrain(logits, ("act_batch", "act_length", None))


def bert_from_params(cfg: BertConfig, params: dict) -> Bert:
  """A `Bert` around existing parameters (a pure dict, e.g. from `load_bert`), without
  initialising random ones first."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Bert(cfg, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, params)


# Architectures to train from scratch (model.preset); BERT-base is Devlin et al.'s. Pair a
# preset with a tokenizer that has a mask token, and set model.vocab_size to its size.
PRESETS: dict[str, BertConfig] = {
    "bert-tiny": BertConfig(vocab_size=1024, hidden_size=128, num_layers=2, num_heads=2,
                            mlp_dim=512, max_position_embeddings=512),
    "bert-base": BertConfig(),
}
