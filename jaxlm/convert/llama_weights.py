"""The one table that maps Hugging Face Llama / Mistral / Qwen2 tensors to jaxlm parameters.

HF Linear weights are (out, in); jaxlm kernels are (in, ...out) with heads split out, and
layer weights are stacked on a leading layers axis. HF's q/k weights are already in the
half-split rotary layout that jaxlm uses, so no permutation is needed (GGUF differs: see
gguf_import.py).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from jaxlm.models.config import LlamaConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one HF tensor becomes one jaxlm array (per layer for stacked parameters)."""
  to_jaxlm: Callable[[np.ndarray, tuple], np.ndarray]  # (hf, jaxlm shape) -> jaxlm
  to_hf: Callable[[np.ndarray], np.ndarray]


COPY = Layout(lambda x, shape: x.reshape(shape), lambda x: x)
TRANSPOSE = Layout(lambda x, shape: x.T.reshape(shape), lambda x: x.T)
# (heads * head_dim, embed) <-> (embed, heads, head_dim)
SPLIT_OUT_HEADS = Layout(lambda x, shape: x.T.reshape(shape),
                         lambda x: x.reshape(x.shape[0], -1).T)
# (heads * head_dim,) <-> (heads, head_dim)
SPLIT_BIAS_HEADS = Layout(lambda x, shape: x.reshape(shape), lambda x: x.reshape(-1))
# (embed, heads * head_dim) <-> (heads, head_dim, embed)
SPLIT_IN_HEADS = Layout(lambda x, shape: x.T.reshape(shape),
                        lambda x: x.reshape(-1, x.shape[-1]).T)


@dataclasses.dataclass(frozen=True)
class Entry:
  path: Path
  hf_name: str  # "{i}" marks a per-layer tensor stacked on the layers axis
  layout: Layout

  @property
  def stacked(self) -> bool:
    return "{i}" in self.hf_name

  def hf_names(self, num_layers: int) -> list[str]:
    return ([self.hf_name.format(i=i) for i in range(num_layers)] if self.stacked
            else [self.hf_name])


def llama_table(cfg: LlamaConfig) -> list[Entry]:
  layer = "model.layers.{i}."
  attn = ("layers", "attention")
  table = [
      Entry(("embed", "table"), "model.embed_tokens.weight", COPY),
      Entry(("final_norm", "scale"), "model.norm.weight", COPY),
      Entry(("layers", "input_norm", "scale"), layer + "input_layernorm.weight", COPY),
      Entry(("layers", "post_attention_norm", "scale"),
            layer + "post_attention_layernorm.weight", COPY),
      Entry(attn + ("q_proj", "kernel"), layer + "self_attn.q_proj.weight", SPLIT_OUT_HEADS),
      Entry(attn + ("k_proj", "kernel"), layer + "self_attn.k_proj.weight", SPLIT_OUT_HEADS),
      Entry(attn + ("v_proj", "kernel"), layer + "self_attn.v_proj.weight", SPLIT_OUT_HEADS),
      Entry(attn + ("o_proj", "kernel"), layer + "self_attn.o_proj.weight", SPLIT_IN_HEADS),
      Entry(("layers", "mlp", "gate_proj", "kernel"), layer + "mlp.gate_proj.weight", TRANSPOSE),
      Entry(("layers", "mlp", "up_proj", "kernel"), layer + "mlp.up_proj.weight", TRANSPOSE),
      Entry(("layers", "mlp", "down_proj", "kernel"), layer + "mlp.down_proj.weight", TRANSPOSE),
  ]
  if cfg.qkv_bias:
    table += [Entry(attn + (p, "bias"), layer + f"self_attn.{p}.bias", SPLIT_BIAS_HEADS)
              for p in ("q_proj", "k_proj", "v_proj")]
  if not cfg.tie_embeddings:
    table.append(Entry(("lm_head", "kernel"), "lm_head.weight", TRANSPOSE))
  return table


# Present in some HF files but derived, not learned.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_shape(entry: Entry, jaxlm_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape HF stores for one (per-layer) tensor of this entry."""
  shape = jaxlm_shape[1:] if entry.stacked else jaxlm_shape
  return entry.layout.to_hf(np.empty(shape, np.int8)).shape
