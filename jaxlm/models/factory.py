"""One place that turns a model config into its module: the decoder (`LlamaConfig` ->
`Llama`) or the BERT / RoBERTa encoder (`BertConfig` -> `Bert`), and runs either on a
training batch. Everything else (trainer, loading, export) asks here instead of branching."""
from __future__ import annotations

import dataclasses

import jax

from flax import nnx

from jaxlm.models.bert import PRESETS as ENCODER_PRESETS
from jaxlm.models.bert import Bert, BertConfig
from jaxlm.models.config import LlamaConfig, from_preset
from jaxlm.models.llama import Llama

ENCODER_FIELDS = tuple(f.name for f in dataclasses.fields(BertConfig))
DECODER_INPUTS = ("positions", "segment_ids")


def is_encoder(cfg) -> bool:
  return isinstance(cfg, BertConfig)


def build_model(cfg: LlamaConfig | BertConfig, rngs: nnx.Rngs) -> Llama | Bert:
  return Bert(cfg, rngs=rngs) if is_encoder(cfg) else Llama(cfg, rngs=rngs)


def abstract_model(cfg: LlamaConfig | BertConfig) -> Llama | Bert:
  """The module with ShapeDtypeStructs for parameters: nothing is allocated."""
  return nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))


# The fields that say which heads a model has; the rest is its trunk.
DECODER_HEAD_FIELDS = ("num_labels", "classifier")
ENCODER_HEAD_FIELDS = ("num_labels", "classifier", "pooler", "mlm_head")
# A head's parameters sit under one top-level key; lm_head and score are read out only when
# the two models' outputs are the same.
OUTPUT_HEADS = ("lm_head", "score")


def head_fields(cfg) -> dict:
  return {f: getattr(cfg, f) for f in (ENCODER_HEAD_FIELDS if is_encoder(cfg)
                                       else DECODER_HEAD_FIELDS)}


def with_heads_of(cfg, source_cfg):
  """cfg's trunk (and dtypes) with source_cfg's heads: the architecture a pretrained
  source loads into before `reusable_params` keeps what cfg reuses."""
  return cfg.replace(**head_fields(source_cfg))


def reusable_params(params: dict, source_cfg, cfg) -> dict:
  """The parameters of a model of source_cfg that a model of cfg (the same trunk) starts
  from: the trunk, the output head when both predict the same thing (same vocabulary or
  the same classes), and any other head (pooler, masked-LM head) both have. What is not
  returned cfg initialises fresh, e.g. a new classification head on a language model."""
  wanted = nnx.to_pure_dict(nnx.state(abstract_model(cfg)))
  same_outputs = all(getattr(source_cfg, f) == getattr(cfg, f) for f in DECODER_HEAD_FIELDS)
  return {key: value for key, value in params.items()
          if key in wanted and (same_outputs or key not in OUTPUT_HEADS)}


def encoder_family(cfg: BertConfig) -> str:
  """The Hugging Face family that computes what cfg does: RoBERTa's positions count from
  pad_token_id + 1, BERT's from 0."""
  return "roberta" if cfg.position_offset else "bert"


def encoder_preset(name: str, **fields) -> BertConfig | None:
  """An encoder preset updated by `fields`, or None when `name` is not an encoder preset."""
  if name not in ENCODER_PRESETS:
    return None
  return ENCODER_PRESETS[name].replace(**fields)


def batch_logits(model, batch: dict, dropout_rng=None):
  """float32 logits of a training batch (input_ids, and positions / segment_ids /
  token_type_ids where present): the decoder's next-token logits [batch, seq, vocab] (or its head's, [batch, seq,
  num_labels]); the encoder's, with attention kept within each segment, from its
  classification head when it has one, else its masked-LM logits."""
  if isinstance(model, Bert):
    head_rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, 1)
    hidden = model(batch["input_ids"], token_type_ids=batch.get("token_type_ids"),
                   positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
                   dropout_rng=dropout_rng)
    if model.score is not None:
      return model.class_logits(hidden, batch.get("positions"), head_rng)
    return model.mlm_logits(hidden)
  return model(batch["input_ids"], *(batch.get(k) for k in DECODER_INPUTS),
               dropout_rng=dropout_rng)


__all__ = ["ENCODER_FIELDS", "ENCODER_PRESETS", "abstract_model", "batch_logits",
           "build_model", "encoder_family", "encoder_preset", "from_preset", "head_fields",
           "is_encoder", "reusable_params", "with_heads_of"]
