"""The one table that maps Hugging Face BERT / RoBERTa tensors to jaxlm `Bert` parameters,
and the checked, tensor-by-tensor transfer in both directions.

Encoder tensors carry a "bert." / "roberta." prefix in the *ForMaskedLM and
*For{Sequence,Token}Classification classes and none in BertModel / RobertaModel; heads are
never prefixed. Layouts are the decoder's (see
llama_weights.py): HF Linear weights are (out, in), jaxlm kernels (in, ...out) with heads
split out, layer weights stacked on a leading layers axis.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxlm.convert.hf import check_tensors, expected_tensors, read_table, write_table
from jaxlm.convert.llama_weights import (COPY, SPLIT_BIAS_HEADS, SPLIT_IN_HEADS,
                                         SPLIT_OUT_HEADS, TRANSPOSE, Entry)
from jaxlm.convert.safetensors_io import ShardedSafetensorsWriter
from jaxlm.models.bert import Bert, BertConfig

FAMILIES = ("bert", "roberta")
# Saved by some classes or older transformers, but derived or not modelled here: tied copies
# of the word embedding and output bias, the position-id buffer, BERT's next-sentence head.
IGNORED = ("embeddings.position_ids", "cls.predictions.decoder.weight",
           "cls.predictions.decoder.bias", "lm_head.decoder.weight", "lm_head.decoder.bias",
           "cls.seq_relationship.weight", "cls.seq_relationship.bias")


def _linear(path, hf_name, kernel_layout=TRANSPOSE, bias_layout=COPY) -> list[Entry]:
  return [Entry(path + ("kernel",), hf_name + ".weight", kernel_layout),
          Entry(path + ("bias",), hf_name + ".bias", bias_layout)]


def _layer_norm(path, hf_name) -> list[Entry]:
  return [Entry(path + ("scale",), hf_name + ".weight", COPY),
          Entry(path + ("bias",), hf_name + ".bias", COPY)]


def _mlm_head(family: str) -> list[Entry]:
  head = ("mlm_head",)
  if family == "roberta":
    return [*_linear(head + ("dense",), "lm_head.dense"),
            *_layer_norm(head + ("norm",), "lm_head.layer_norm"),
            Entry(head + ("bias",), "lm_head.bias", COPY)]
  return [*_linear(head + ("dense",), "cls.predictions.transform.dense"),
          *_layer_norm(head + ("norm",), "cls.predictions.transform.LayerNorm"),
          Entry(head + ("bias",), "cls.predictions.bias", COPY)]


def bert_table(cfg: BertConfig, family: str, prefix: str) -> list[Entry]:
  """prefix: "" or f"{family}.", put before every encoder (not head) tensor name."""
  emb, layer, attn = prefix + "embeddings.", prefix + "encoder.layer.{i}.", ("layers", "attention")
  table = [
      Entry(("embeddings", "word", "table"), emb + "word_embeddings.weight", COPY),
      Entry(("embeddings", "position"), emb + "position_embeddings.weight", COPY),
      Entry(("embeddings", "token_type"), emb + "token_type_embeddings.weight", COPY),
      *_layer_norm(("embeddings", "norm"), emb + "LayerNorm"),
      *_linear(attn + ("q_proj",), layer + "attention.self.query", SPLIT_OUT_HEADS,
               SPLIT_BIAS_HEADS),
      *_linear(attn + ("k_proj",), layer + "attention.self.key", SPLIT_OUT_HEADS,
               SPLIT_BIAS_HEADS),
      *_linear(attn + ("v_proj",), layer + "attention.self.value", SPLIT_OUT_HEADS,
               SPLIT_BIAS_HEADS),
      *_linear(attn + ("o_proj",), layer + "attention.output.dense", SPLIT_IN_HEADS),
      *_layer_norm(("layers", "attention_norm"), layer + "attention.output.LayerNorm"),
      *_linear(("layers", "mlp", "up"), layer + "intermediate.dense"),
      *_linear(("layers", "mlp", "down"), layer + "output.dense"),
      *_layer_norm(("layers", "mlp_norm"), layer + "output.LayerNorm"),
  ]
  # RobertaClassificationHead's dense + tanh on <s> is BERT's pooler under another name.
  roberta_sequence = family == "roberta" and cfg.num_labels and cfg.classifier != "token"
  if cfg.pooler:
    table += _linear(("pooler",), "classifier.dense" if roberta_sequence else
                     prefix + "pooler.dense")
  if cfg.mlm_head:
    table += _mlm_head(family)
  if cfg.num_labels:
    table += _linear(("score",), "classifier.out_proj" if roberta_sequence else "classifier")
  return table


def abstract_bert_params(cfg: BertConfig) -> dict:
  return nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Bert(cfg, rngs=nnx.Rngs(0)))))


def params_from_reader(reader, cfg: BertConfig, family: str, prefix: str,
                       shardings: dict | None = None) -> dict:
  """reader: HF tensor names -> host arrays (names(), shape(name), get(name)); each tensor
  is converted to cfg.param_dtype and placed (on its sharding, if given) before the next is
  read, so host memory holds about one tensor at a time."""
  shapes = abstract_bert_params(cfg)
  table = bert_table(cfg, family, prefix)
  check_tensors(reader, expected_tensors(table, shapes, cfg.num_layers),
                lambda name: name.removeprefix(prefix) in IGNORED)
  return read_table(reader, table, shapes, cfg.num_layers, jnp.dtype(cfg.param_dtype),
                    shardings)


def write_tensors(writer: ShardedSafetensorsWriter, cfg: BertConfig, params: dict,
                  family: str, prefix: str, dtype: str) -> None:
  write_table(writer, bert_table(cfg, family, prefix), params, cfg.num_layers, dtype)
