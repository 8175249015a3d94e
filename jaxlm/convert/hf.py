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
from jaxlm.convert.llama_weights import IGNORED_SUFFIXES, hf_shape, hf_table
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
  for entry in hf_table(cfg):
    want = hf_shape(entry, *(_get(shapes, path).shape for path in entry.paths))
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


class _Prefixed:
  """A reader whose names all gain `prefix`."""

  def __init__(self, reader, prefix: str):
    self.reader, self.prefix = reader, prefix

  def names(self) -> list[str]:
    return [self.prefix + name for name in self.reader.names()]

  def shape(self, name: str) -> tuple[int, ...]:
    return self.reader.shape(name.removeprefix(self.prefix))

  def get(self, name: str) -> np.ndarray:
    return self.reader.get(name.removeprefix(self.prefix))


def load_hf_params(directory: Path, cfg: LlamaConfig, shardings: dict | None = None) -> dict:
  reader = SafetensorsReader(directory)
  # GPT-2 files saved from the base model (openai-community/gpt2 among them) lack
  # GPT2LMHeadModel's "transformer." prefix, which transformers adds as it loads them.
  if (cfg.position_embedding == "learned"
      and not any(name.startswith("transformer.") for name in reader.names())):
    reader = _Prefixed(reader, "transformer.")
  return params_from_reader(reader, cfg, shardings)


def params_from_reader(reader, cfg: LlamaConfig, shardings: dict | None = None) -> dict:
  """reader: HF tensor names -> host arrays (names(), shape(name), get(name)). Reads
  tensor by tensor, converting each to cfg.param_dtype and placing it on its sharding (or
  the default device) before the next is read."""
  shapes = abstract_params(cfg)
  check_tensors(reader, cfg, shapes)
  dtype = jnp.dtype(cfg.param_dtype)
  params: dict = {}
  for entry in hf_table(cfg):
    full = [_get(shapes, path).shape for path in entry.paths]
    per_layer = [shape[1:] for shape in full] if entry.stacked else full
    # pieces[layer][part]: the arrays of entry.paths, layer by layer
    pieces = [entry.to_jaxlm(reader.get(n).astype(dtype), per_layer)
              for n in entry.hf_names(cfg.num_layers)]
    for part, path in enumerate(entry.paths):
      host = np.stack([p[part] for p in pieces]) if entry.stacked else pieces[0][part]
      sharding = _get(shardings, path) if shardings is not None else None
      _set(params, path, jax.device_put(host, sharding))
    del pieces
  return params


def save_hf_params(directory: Path, cfg: LlamaConfig, params: dict, *, dtype: str,
                   max_shard_bytes: int) -> None:
  np_dtype = jnp.dtype(dtype)
  writer = ShardedSafetensorsWriter(directory, max_shard_bytes)
  for entry in hf_table(cfg):
    hosts = [np.asarray(jax.device_get(_get(params, path))) for path in entry.paths]
    for i, name in enumerate(entry.hf_names(cfg.num_layers)):
      arrays = [host[i] for host in hosts] if entry.stacked else hosts
      writer.add(name, entry.to_hf(arrays).astype(np_dtype))
    del hosts
  writer.close()


def source_dtype(hf: dict) -> str:
  return hf_dtype(hf) or "float32"
