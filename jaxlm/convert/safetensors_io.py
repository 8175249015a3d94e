"""Reading and writing Hugging Face safetensors, single-file or sharded with an index,
one tensor at a time so that peak host memory stays near one copy of the model."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxlm.convert.errors import ConversionError

INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt",
                  "tf_model.h5", "flax_model.msgpack")


def find_weight_files(directory: Path) -> list[Path]:
  index = directory / INDEX
  if index.is_file():
    names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [directory / n for n in names]
  single = directory / "model.safetensors"
  if single.is_file():
    return [single]
  found = sorted(directory.glob("*.safetensors"))
  if found:
    return found
  pickled = [n for n in PICKLE_WEIGHTS if (directory / n).exists()]
  if pickled:
    raise ConversionError(
        f"{directory} has weights only in {', '.join(pickled)}: pickle-based formats can run "
        f"arbitrary code when loaded, so jaxlm refuses them. Convert them to safetensors first "
        f"(in transformers: model.save_pretrained(dir, safe_serialization=True)).")
  raise ConversionError(f"No *.safetensors weights in {directory}.")


class SafetensorsReader:
  """name -> tensor across all files, read lazily (memory-mapped) on host."""

  def __init__(self, directory: Path):
    self.files = find_weight_files(directory)
    self._where: dict[str, Path] = {}
    self._handles = {}
    for path in self.files:
      try:
        with safe_open(path, framework="flax") as f:
          for name in f.keys():
            self._where[name] = path
      except Exception as e:  # safetensors raises its own error types for bad files
        raise ConversionError(f"{path} is not a readable safetensors file ({e}); it may be "
                              f"truncated or corrupt.") from None

  def names(self) -> list[str]:
    return list(self._where)

  def _handle(self, name):
    path = self._where[name]
    if path not in self._handles:
      self._handles[path] = safe_open(path, framework="flax")
    return self._handles[path]

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handle(name).get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    # framework="flax" understands bfloat16; keep the tensor on the host CPU device.
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
      return np.asarray(self._handle(name).get_tensor(name))


class ShardedSafetensorsWriter:
  """Writes tensors in order into files of at most max_shard_bytes, with an index when
  more than one file results (HF's layout)."""

  def __init__(self, directory: Path, max_shard_bytes: int):
    self.directory = directory
    self.max_shard_bytes = max_shard_bytes
    self._pending: dict[str, np.ndarray] = {}
    self._pending_bytes = 0
    self._shards: list[dict[str, np.ndarray] | list[str]] = []
    self.total_bytes = 0

  def add(self, name: str, tensor: np.ndarray) -> None:
    if self._pending and self._pending_bytes + tensor.nbytes > self.max_shard_bytes:
      self._flush()
    self._pending[name] = np.ascontiguousarray(tensor)
    self._pending_bytes += tensor.nbytes
    self.total_bytes += tensor.nbytes

  def _flush(self) -> None:
    number = len(self._shards) + 1
    save_file(self._pending, self.directory / f"part-{number}.tmp.safetensors",
              metadata={"format": "pt"})
    self._shards.append(list(self._pending))
    self._pending, self._pending_bytes = {}, 0

  def close(self) -> None:
    if self._pending or not self._shards:
      self._flush()
    count = len(self._shards)
    weight_map = {}
    for number, names in enumerate(self._shards, 1):
      final = ("model.safetensors" if count == 1
               else f"model-{number:05d}-of-{count:05d}.safetensors")
      (self.directory / f"part-{number}.tmp.safetensors").rename(self.directory / final)
      weight_map.update({name: final for name in names})
    if count > 1:
      (self.directory / INDEX).write_text(json.dumps(
          {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, indent=2))
