"""Parameters between Hugging Face safetensors directories and jaxlm's pure-dict params."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.convert.errors import ConversionError
from jaxlm.convert.hf_config import hf_dtype, read_hf_config
from jaxlm.convert.llama_weights import IGNORED_SUFFIXES, hf_shape, llama_table
from jaxlm.convert.safetensors_io import SafetensorsReader, ShardedSafetensorsWriter
from jaxlm.models import Llama, LlamaConfig

# Files that travel with the weights: tokenizer, chat template, generation defaults.
SIDECAR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                 "generation_config.json", "chat_template.jinja", "chat_template.json")


def is_hf_directory(path: Path) -> bool:
  config = path / "config.json"
  return config.is_file() and "model_type" in json.loads(config.read_text())


def read_hf_directory_config(path: Path) -> tuple[LlamaConfig, str, dict]:
  hf = json.loads((path / "config.json").read_text())
  cfg, family = read_hf_config(hf)
  return cfg, family, hf


def abstract_params(cfg: LlamaConfig) -> dict:
  return nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))))


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def check_tensors(reader, cfg: LlamaConfig, shapes: dict) -> None:
  """Every problem at once: missing, unexpected and mis-shaped tensors, by name."""
  expected = {}
  for entry in llama_table(cfg):
    want = hf_shape(entry, _get(shapes, entry.path).shape)
    expected.update({name: want for name in entry.hf_names(cfg.num_layers)})
  found = set(reader.names())
  missing = [f"{n} {expected[n]}" for n in expected if n not in found]
  allowed_extra = {"lm_head.weight"} if cfg.tie_embeddings else set()
  unexpected = sorted(n for n in found - set(expected)
                      if n not in allowed_extra and not n.endswith(IGNORED_SUFFIXES))
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


def load_hf_params(directory: Path, cfg: LlamaConfig, shardings: dict | None = None) -> dict:
  return params_from_reader(SafetensorsReader(directory), cfg, shardings)


def params_from_reader(reader, cfg: LlamaConfig, shardings: dict | None = None) -> dict:
  """reader: HF tensor names -> host arrays (names(), shape(name), get(name)). Reads
  tensor by tensor, converting each to cfg.param_dtype and placing it on its sharding (or
  the default device) before the next is read."""
  shapes = abstract_params(cfg)
  check_tensors(reader, cfg, shapes)
  dtype = jnp.dtype(cfg.param_dtype)
  params: dict = {}
  for entry in llama_table(cfg):
    shape = _get(shapes, entry.path).shape
    per_layer = shape[1:] if entry.stacked else shape
    pieces = [entry.layout.to_jaxlm(reader.get(n).astype(dtype), per_layer)
              for n in entry.hf_names(cfg.num_layers)]
    host = np.stack(pieces) if entry.stacked else pieces[0]
    del pieces
    sharding = _get(shardings, entry.path) if shardings is not None else None
    _set(params, entry.path, jax.device_put(host, sharding))
  return params


def save_hf_params(directory: Path, cfg: LlamaConfig, params: dict, *, dtype: str,
                   max_shard_bytes: int) -> None:
  np_dtype = jnp.dtype(dtype)
  writer = ShardedSafetensorsWriter(directory, max_shard_bytes)
  for entry in llama_table(cfg):
    host = np.asarray(jax.device_get(_get(params, entry.path)))
    names = entry.hf_names(cfg.num_layers)
    for i, name in enumerate(names):
      tensor = host[i] if entry.stacked else host
      writer.add(name, entry.layout.to_hf(tensor).astype(np_dtype))
    del host
  writer.close()


def source_dtype(hf: dict) -> str:
  return hf_dtype(hf) or "float32"
