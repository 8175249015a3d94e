"""One place that turns a model config into its module: the decoder (`LlamaConfig` ->
`Llama`) or the BERT / RoBERTa encoder (`BertConfig` -> `Bert`), and runs either on a
training batch. Everything else (trainer, loading, export) asks here instead of branching."""
from __future__ import annotations

import dataclasses

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
  """float32 logits [batch, seq, vocab] of a training batch (input_ids, and positions /
  segment_ids where present): the decoder's next-token logits, the encoder's masked-LM
  logits with attention kept within each segment."""
  if isinstance(model, Bert):
    hidden = model(batch["input_ids"], positions=batch.get("positions"),
                   segment_ids=batch.get("segment_ids"), dropout_rng=dropout_rng)
    return model.mlm_logits(hidden)
  return model(batch["input_ids"], *(batch.get(k) for k in DECODER_INPUTS),
               dropout_rng=dropout_rng)


__all__ = ["ENCODER_FIELDS", "ENCODER_PRESETS", "abstract_model", "batch_logits",
           "build_model", "encoder_family", "encoder_preset", "from_preset", "is_encoder"]
