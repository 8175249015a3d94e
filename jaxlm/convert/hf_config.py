"""Hugging Face config.json <-> LlamaConfig, accepting transformers 4 and 5 spellings."""
from __future__ import annotations

import dataclasses

from jaxlm.convert.errors import ConversionError
from jaxlm.models.config import LlamaConfig

FAMILIES = ("llama", "mistral", "qwen2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM"}


def _rope(hf: dict) -> tuple[float, dict | None]:
  # transformers 5 nests rope settings in "rope_parameters"; 4 has rope_theta / rope_scaling.
  params = dict(hf.get("rope_parameters") or {})
  theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
  scaling = hf.get("rope_scaling") or params
  scaling = {k: v for k, v in (scaling or {}).items() if k != "rope_theta"}
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  return float(theta), (None if kind == "default" else scaling)


def read_hf_config(hf: dict) -> tuple[LlamaConfig, str]:
  family = hf.get("model_type")
  if family not in FAMILIES:
    raise ConversionError(
        f"Unsupported architecture model_type={family!r} "
        f"({', '.join(hf.get('architectures') or [])}). Supported: "
        f"{', '.join(FAMILIES)} (Llama 2/3/3.1/3.2, Mistral, Qwen2).")
  problems = []
  if hf.get("hidden_act", "silu") != "silu":
    problems.append(f"hidden_act={hf['hidden_act']!r} (only 'silu' is supported)")
  if family == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
    problems.append("Llama attention_bias / mlp_bias (biases on o_proj or the MLP)")
  if family == "qwen2" and hf.get("use_sliding_window"):
    problems.append("Qwen2 use_sliding_window=true (per-layer windows)")
  if problems:
    raise ConversionError("Unsupported config.json settings: " + "; ".join(problems))
  theta, scaling = _rope(hf)
  heads = hf["num_attention_heads"]
  window = hf.get("sliding_window") if family == "mistral" else None
  cfg = LlamaConfig(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"], num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      mlp_dim=hf["intermediate_size"], rope_theta=theta, rope_scaling=scaling,
      max_seq_len=hf.get("max_position_embeddings", 2048),
      norm_eps=hf.get("rms_norm_eps", 1e-6), qkv_bias=family == "qwen2",
      sliding_window=window, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      init_std=hf.get("initializer_range", 0.02), compute_dtype="float32")
  return cfg, family


def hf_dtype(hf: dict) -> str | None:
  return hf.get("dtype") or hf.get("torch_dtype")


def family_for(cfg: LlamaConfig) -> str:
  if cfg.qkv_bias:
    return "qwen2"
  return "mistral" if cfg.sliding_window else "llama"


def write_hf_config(cfg: LlamaConfig, family: str | None = None, *, dtype: str,
                    base: dict | None = None) -> dict:
  """A config.json for `cfg`; keys of `base` (the source model's config) are kept so token
  ids and other settings survive a round trip."""
  family = family or family_for(cfg)
  scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
  hf = dict(base or {})
  for stale in ("rope_scaling", "rope_theta", "torch_dtype", "rope_parameters"):
    hf.pop(stale, None)
  hf.update({
      "architectures": [ARCHITECTURES[family]], "model_type": family,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.resolved_head_dim, "hidden_act": "silu",
      "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
      "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
      "rope_parameters": {"rope_theta": cfg.rope_theta, **(scaling or {"rope_type": "default"})},
      "dtype": dtype,
  })
  if family == "llama":
    hf.update(attention_bias=False, mlp_bias=False)
  if family == "mistral":
    hf["sliding_window"] = cfg.sliding_window
  if family == "qwen2":
    hf.update(use_sliding_window=False)
  return hf


def model_fields(cfg: LlamaConfig) -> dict:
  fields = dataclasses.asdict(cfg)
  fields["rope_scaling"] = dict(cfg.rope_scaling) if cfg.rope_scaling else None
  return fields
