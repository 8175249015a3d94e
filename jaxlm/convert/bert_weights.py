"""The one table that maps Hugging Face BERT / RoBERTa tensors to jaxlm `Bert` parameters,
and the checked, tensor-by-tensor transfer in both directions.

Encoder tensors carry a "bert." / "roberta." prefix in the *ForMaskedLM classes and none in
BertModel / RobertaModel; heads are never prefixed. Layouts are the decoder's (see
llama_weights.py): HF Linear weights are (out, in), jaxlm kernels (in, ...out) with heads
split out, layer weights stacked on a leading layers axis.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.convert.errors import ConversionError
from jaxlm.convert.llama_weights import (COPY, SPLIT_BIAS_HEADS, SPLIT_IN_HEADS,
                                         SPLIT_OUT_HEADS, TRANSPOSE, Entry, hf_shape)
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
  if cfg.pooler:
    table += _linear(("pooler",), prefix + "pooler.dense")
  if cfg.mlm_head:
    table += _mlm_head(family)
  return table


def abstract_bert_params(cfg: BertConfig) -> dict:
  return nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Bert(cfg, rngs=nnx.Rngs(0)))))


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def check_tensors(reader, table: list[Entry], cfg: BertConfig, shapes: dict,
                  prefix: str) -> None:
  """Every problem at once: missing, unexpected and mis-shaped tensors, by name."""
  expected = {}
  for entry in table:
    want = hf_shape(entry, _get(shapes, entry.path).shape)
    expected.update({name: want for name in entry.hf_names(cfg.num_layers)})
  found = set(reader.names())
  missing = [f"{n} {expected[n]}" for n in expected if n not in found]
  unexpected = sorted(n for n in found - set(expected)
                      if n.removeprefix(prefix) not in IGNORED)
  misshaped = [f"{n}: expected {expected[n]}, found {reader.shape(n)}"
               for n in expected if n in found and reader.shape(n) != expected[n]]
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing tensor(s): " + ", ".join(missing[:20]))
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected tensor(s): " + ", ".join(unexpected[:20]))
  if misshaped:
    problems.append(f"{len(misshaped)} tensor(s) with the wrong shape: "
                    + "; ".join(misshaped[:20]))
  if problems:
    raise ConversionError("The weights do not match config.json: " + " | ".join(problems))


def params_from_reader(reader, cfg: BertConfig, family: str, prefix: str,
                       shardings: dict | None = None) -> dict:
  """reader: HF tensor names -> host arrays (names(), shape(name), get(name)); each tensor
  is converted to cfg.param_dtype and placed (on its sharding, if given) before the next is
  read, so host memory holds about one tensor at a time."""
  shapes = abstract_bert_params(cfg)
  table = bert_table(cfg, family, prefix)
  check_tensors(reader, table, cfg, shapes, prefix)
  dtype = jnp.dtype(cfg.param_dtype)
  params: dict = {}
  for entry in table:
    shape = _get(shapes, entry.path).shape
    per_layer = shape[1:] if entry.stacked else shape
    pieces = [entry.layout.to_jaxlm(reader.get(n).astype(dtype), per_layer)
              for n in entry.hf_names(cfg.num_layers)]
    host = np.stack(pieces) if entry.stacked else pieces[0]
    sharding = _get(shardings, entry.path) if shardings is not None else None
    _set(params, entry.path, jax.device_put(host, sharding))
  return params


def write_tensors(writer: ShardedSafetensorsWriter, cfg: BertConfig, params: dict,
                  family: str, prefix: str, dtype: str) -> None:
  np_dtype = jnp.dtype(dtype)
  for entry in bert_table(cfg, family, prefix):
    host = np.asarray(jax.device_get(_get(params, entry.path)))
    for i, name in enumerate(entry.hf_names(cfg.num_layers)):
      tensor = host[i] if entry.stacked else host
      writer.add(name, entry.layout.to_hf(tensor).astype(np_dtype))
  writer.close()
