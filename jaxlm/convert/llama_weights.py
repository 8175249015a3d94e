"""The tables that map Hugging Face Llama / Mistral / Qwen2 and GPT-2 tensors to jaxlm
parameters.

HF Linear weights are (out, in); jaxlm kernels are (in, ...out) with heads split out, and
layer weights are stacked on a leading layers axis. HF's q/k weights are already in the
half-split rotary layout that jaxlm uses, so no permutation is needed (GGUF differs: see
gguf_import.py). GPT-2's Conv1D weights are (in, out), and its c_attn holds q, k and v in
one tensor: a fused entry.
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
# Conv1D, (in, out): (embed, heads * head_dim) <-> (embed, heads, head_dim)
CONV_OUT_HEADS = Layout(lambda x, shape: x.reshape(shape),
                        lambda x: x.reshape(x.shape[0], -1))
# Conv1D, (in, out): (heads * head_dim, embed) <-> (heads, head_dim, embed)
CONV_IN_HEADS = Layout(lambda x, shape: x.reshape(shape),
                       lambda x: x.reshape(-1, x.shape[-1]))


@dataclasses.dataclass(frozen=True)
class Entry:
  path: Path
  hf_name: str  # "{i}" marks a per-layer tensor stacked on the layers axis
  layout: Layout
  # Further jaxlm arrays that HF stores in the same tensor, after path's along its last axis
  # (GPT-2's c_attn: q, k, v). Each part has `layout`.
  fused_with: tuple[Path, ...] = ()

  @property
  def stacked(self) -> bool:
    return "{i}" in self.hf_name

  @property
  def paths(self) -> tuple[Path, ...]:
    return (self.path, *self.fused_with)

  def hf_names(self, num_layers: int) -> list[str]:
    return ([self.hf_name.format(i=i) for i in range(num_layers)] if self.stacked
            else [self.hf_name])

  def to_jaxlm(self, tensor: np.ndarray, shapes: list[tuple]) -> list[np.ndarray]:
    """One (per-layer) HF tensor -> the arrays of `paths`, of the given (per-layer) shapes."""
    if not self.fused_with:
      return [self.layout.to_jaxlm(tensor, shapes[0])]
    widths = [self.layout.to_hf(np.empty(shape, np.int8)).shape[-1] for shape in shapes]
    parts = np.split(tensor, np.cumsum(widths)[:-1], axis=-1)
    return [self.layout.to_jaxlm(part, shape) for part, shape in zip(parts, shapes)]

  def to_hf(self, arrays: list[np.ndarray]) -> np.ndarray:
    """The (per-layer) arrays of `paths` -> one HF tensor."""
    parts = [self.layout.to_hf(array) for array in arrays]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)


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
  return table + output_entries(cfg)


def gpt2_table(cfg: LlamaConfig) -> list[Entry]:
  layer = "transformer.h.{i}."
  attn = ("layers", "attention")
  mlp = ("layers", "mlp")
  table = [
      Entry(("embed", "table"), "transformer.wte.weight", COPY),
      Entry(("position_embed", "table"), "transformer.wpe.weight", COPY),
      Entry(("final_norm", "scale"), "transformer.ln_f.weight", COPY),
      Entry(("final_norm", "bias"), "transformer.ln_f.bias", COPY),
      Entry(("layers", "input_norm", "scale"), layer + "ln_1.weight", COPY),
      Entry(("layers", "input_norm", "bias"), layer + "ln_1.bias", COPY),
      Entry(("layers", "post_attention_norm", "scale"), layer + "ln_2.weight", COPY),
      Entry(("layers", "post_attention_norm", "bias"), layer + "ln_2.bias", COPY),
      Entry(attn + ("q_proj", "kernel"), layer + "attn.c_attn.weight", CONV_OUT_HEADS,
            fused_with=(attn + ("k_proj", "kernel"), attn + ("v_proj", "kernel"))),
      Entry(attn + ("q_proj", "bias"), layer + "attn.c_attn.bias", SPLIT_BIAS_HEADS,
            fused_with=(attn + ("k_proj", "bias"), attn + ("v_proj", "bias"))),
      Entry(attn + ("o_proj", "kernel"), layer + "attn.c_proj.weight", CONV_IN_HEADS),
      Entry(attn + ("o_proj", "bias"), layer + "attn.c_proj.bias", COPY),
      Entry(mlp + ("up_proj", "kernel"), layer + "mlp.c_fc.weight", COPY),
      Entry(mlp + ("up_proj", "bias"), layer + "mlp.c_fc.bias", COPY),
      Entry(mlp + ("down_proj", "kernel"), layer + "mlp.c_proj.weight", COPY),
      Entry(mlp + ("down_proj", "bias"), layer + "mlp.c_proj.bias", COPY),
  ]
  return table + output_entries(cfg)


def head_module(cfg: LlamaConfig) -> str:
  """The HF name of a classifier's head, a top-level Linear beside the decoder: "score" in
  every *ForSequenceClassification and in Llama / Mistral / Qwen2 *ForTokenClassification,
  "classifier" in GPT2ForTokenClassification."""
  gpt2 = cfg.position_embedding == "learned"
  return "classifier" if gpt2 and cfg.classifier == "token" else "score"


def output_entries(cfg: LlamaConfig) -> list[Entry]:
  """The output projection: a classifier's head (with a bias for a token classifier, as in
  transformers), else an untied lm_head."""
  if cfg.num_labels:
    head = head_module(cfg)
    entries = [Entry(("score", "kernel"), f"{head}.weight", TRANSPOSE)]
    if cfg.classifier == "token":
      entries.append(Entry(("score", "bias"), f"{head}.bias", COPY))
    return entries
  if cfg.tie_embeddings:
    return []
  return [Entry(("lm_head", "kernel"), "lm_head.weight", TRANSPOSE)]


def hf_table(cfg: LlamaConfig) -> list[Entry]:
  """The table for cfg's Hugging Face family."""
  return gpt2_table(cfg) if cfg.position_embedding == "learned" else llama_table(cfg)


# Present in some HF files but derived, not learned: rotary frequencies, and the causal-mask
# buffers of older GPT-2 files.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


def hf_shape(entry: Entry, *jaxlm_shapes: tuple[int, ...]) -> tuple[int, ...]:
  """The shape HF stores for one (per-layer) tensor of this entry, given the full shapes of
  its jaxlm arrays (one per path)."""
  per_layer = [shape[1:] if entry.stacked else shape for shape in jaxlm_shapes]
  return entry.to_hf([np.empty(shape, np.int8) for shape in per_layer]).shape
