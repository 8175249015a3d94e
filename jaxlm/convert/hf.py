"""Parameters between Hugging Face safetensors directories and jaxlm's pure-dict params."""
from __future__ import annotations

import json
from collections.abc import Callable
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


def tree_get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def tree_set(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def expected_tensors(table, shapes: dict, num_layers: int) -> dict[str, tuple[int, ...]]:
  """HF tensor name -> shape, for a mapping table and the jaxlm parameter shapes."""
  expected = {}
  for entry in table:
    want = hf_shape(entry, *(tree_get(shapes, path).shape for path in entry.paths))
    expected.update({name: want for name in entry.hf_names(num_layers)})
  return expected


def check_tensors(reader, expected: dict, ignored: Callable[[str], bool]) -> None:
  """Every problem at once: missing, unexpected (unless ignored) and mis-shaped tensors, by
  name."""
  found = set(reader.names())
  missing = [f"{n} {expected[n]}" for n in expected if n not in found]
  unexpected = sorted(n for n in found - set(expected) if not ignored(n))
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


def read_table(reader, table, shapes: dict, num_layers: int, dtype,
               shardings: dict | None = None) -> dict:
  """Reads tensor by tensor, converting each to dtype and placing it on its sharding (or the
  default device) before the next is read, so host memory holds about one tensor."""
  params: dict = {}
  for entry in table:
    full = [tree_get(shapes, path).shape for path in entry.paths]
    per_layer = [shape[1:] for shape in full] if entry.stacked else full
    # pieces[layer][part]: the arrays of entry.paths, layer by layer
    pieces = [entry.to_jaxlm(reader.get(n).astype(dtype), per_layer)
              for n in entry.hf_names(num_layers)]
    for part, path in enumerate(entry.paths):
      host = np.stack([p[part] for p in pieces]) if entry.stacked else pieces[0][part]
      sharding = tree_get(shardings, path) if shardings is not None else None
      tree_set(params, path, jax.device_put(host, sharding))
    del pieces
  return params


def write_table(writer: ShardedSafetensorsWriter, table, params: dict, num_layers: int,
                dtype) -> None:
  np_dtype = jnp.dtype(dtype)
  for entry in table:
    hosts = [np.asarray(jax.device_get(tree_get(params, path))) for path in entry.paths]
    for i, name in enumerate(entry.hf_names(num_layers)):
      arrays = [host[i] for host in hosts] if entry.stacked else hosts
      writer.add(name, entry.to_hf(arrays).astype(np_dtype))
    del hosts
  writer.close()


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
  """reader: HF tensor names -> host arrays (names(), shape(name), get(name))."""
  shapes = abstract_params(cfg)
  table = hf_table(cfg)
  allowed_extra = {"lm_head.weight"} if cfg.tie_embeddings else set()
  check_tensors(reader, expected_tensors(table, shapes, cfg.num_layers),
                lambda name: name in allowed_extra or name.endswith(IGNORED_SUFFIXES))
  return read_table(reader, table, shapes, cfg.num_layers, jnp.dtype(cfg.param_dtype),
                    shardings)


def save_hf_params(directory: Path, cfg: LlamaConfig, params: dict, *, dtype: str,
                   max_shard_bytes: int) -> None:
  write_table(ShardedSafetensorsWriter(directory, max_shard_bytes), hf_table(cfg), params,
              cfg.num_layers, dtype)


def source_dtype(hf: dict) -> str:
  return hf_dtype(hf) or "float32"
