"""Import llama.cpp GGUF files (architecture "llama"), dequantised with the gguf package,
so small quantised models can be fine-tuned. Tensors are renamed to Hugging Face's names and
then go through the same table and checks as safetensors."""
from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from jaxlm.convert.errors import ConversionError
from jaxlm.convert.hf import params_from_reader
from jaxlm.models import LlamaConfig

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def _reader(path: Path):
  """The file's GGUFReader, parsed once per version of the file: parsing a vocabulary's
  metadata takes seconds, and a conversion reads the config, then the tensors."""
  stat = Path(path).stat()
  return _parsed(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _parsed(path: str, mtime_ns: int, size: int):
  try:
    from gguf import GGUFReader
  except ImportError:
    raise ConversionError("Reading GGUF needs the gguf package: pip install gguf") from None
  return GGUFReader(path)


def _field(reader, key, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def read_gguf_config(path: Path) -> tuple[LlamaConfig, str]:
  reader = _reader(path)
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise ConversionError(f"GGUF architecture {arch!r} is not supported; supported: llama "
                          f"(Llama, Mistral, SmolLM and other llama-architecture files).")
  names = {t.name for t in reader.tensors}
  if "rope_freqs.weight" in names or _field(reader, "llama.rope.scaling.type"):
    raise ConversionError("GGUF files with rope scaling (rope_freqs) are not supported yet; "
                          "convert the original Hugging Face checkpoint instead.")
  heads = _field(reader, "llama.attention.head_count")
  hidden = _field(reader, "llama.embedding_length")
  tokens = _field(reader, "tokenizer.ggml.tokens")
  cfg = LlamaConfig(
      vocab_size=_field(reader, "llama.vocab_size") or len(tokens), hidden_size=hidden,
      num_layers=_field(reader, "llama.block_count"), num_heads=heads,
      num_kv_heads=_field(reader, "llama.attention.head_count_kv", heads),
      head_dim=_field(reader, "llama.rope.dimension_count", hidden // heads),
      mlp_dim=_field(reader, "llama.feed_forward_length"),
      rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
      max_seq_len=_field(reader, "llama.context_length", 2048),
      norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
      tie_embeddings="output.weight" not in names, compute_dtype="float32")
  return cfg, "llama"


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp interleaves the two rotary halves of each head's q/k rows; undo that."""
  rows = weight.shape[0]
  return (weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


class GGUFTensors:
  """GGUF tensors under Hugging Face names, dequantised to float32 on demand."""

  def __init__(self, path: Path, cfg: LlamaConfig):
    self.cfg = cfg
    self._tensors = {}
    for tensor in _reader(path).tensors:
      self._tensors[self._hf_name(tensor.name)] = tensor

  @staticmethod
  def _hf_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
      return _GLOBAL_NAMES[name]
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if match and match.group(2) in _LAYER_NAMES:
      return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return "gguf:" + name  # reported as unexpected by the checks

  def names(self) -> list[str]:
    return list(self._tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(self._tensors[name].shape))  # GGUF lists ne0 first

  def get(self, name: str) -> np.ndarray:
    from gguf.quants import dequantize
    tensor = self._tensors[name]
    weight = dequantize(tensor.data, tensor.tensor_type).reshape(self.shape(name))
    if name.endswith("q_proj.weight"):
      weight = _unpermute(weight, self.cfg.num_heads)
    elif name.endswith("k_proj.weight"):
      weight = _unpermute(weight, self.cfg.num_kv_heads)
    return weight.astype(np.float32)


def load_gguf_params(path: Path, cfg: LlamaConfig, shardings=None) -> dict:
  return params_from_reader(GGUFTensors(path, cfg), cfg, shardings)


def save_gguf_tokenizer(path: Path, dest: Path) -> None:
  """The GGUF's tokenizer and chat template as Hugging Face tokenizer files."""
  from transformers import AutoTokenizer
  AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(dest)
