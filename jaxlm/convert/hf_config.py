"""Hugging Face config.json <-> LlamaConfig, accepting transformers 4 and 5 spellings."""
from __future__ import annotations

import dataclasses

from jaxlm.convert.errors import ConversionError
from jaxlm.models.config import LlamaConfig

FAMILIES = ("llama", "mistral", "qwen2", "gpt2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel"}
# LlamaConfig.classifier -> the suffix of the HF classes with that head. A regression head
# is a sequence classifier with one label and problem_type "regression" (PROBLEM_TYPES).
CLASSIFIER_SUFFIXES = {"sequence": "ForSequenceClassification",
                       "token": "ForTokenClassification",
                       "regression": "ForSequenceClassification"}
# What a sequence head's loss is, as config.json's problem_type says it: written on export,
# since transformers takes a head of one label without it for a regression head.
PROBLEM_TYPES = {"sequence": "single_label_classification", "regression": "regression"}
_CLASS_PREFIXES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gpt2": "GPT2"}
# classifier -> family -> HF architecture, e.g. ["token"]["qwen2"] = Qwen2ForTokenClassification
CLASSIFIER_ARCHITECTURES = {kind: {family: prefix + suffix
                                   for family, prefix in _CLASS_PREFIXES.items()}
                            for kind, suffix in CLASSIFIER_SUFFIXES.items()}
# GPT-2 options that change the computation, at the only values jaxlm computes (HF's defaults).
GPT2_FIXED = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
              "reorder_and_upcast_attn": False, "add_cross_attention": False}
# What a config.json must express; dtypes, remat, dropout and init are jaxlm's own.
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                       "resolved_head_dim", "mlp_dim", "max_seq_len", "norm_eps", "norm_type",
                       "position_embedding", "mlp_type", "qkv_bias", "attention_out_bias",
                       "mlp_bias", "sliding_window", "tie_embeddings", "num_labels",
                       "classifier")
ROPE_FIELDS = ("rope_theta", "rope_scaling")


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
        f"{', '.join(FAMILIES)} (Llama 2/3/3.1/3.2, Mistral, Qwen2, GPT-2), and the encoders "
        f"bert, roberta.")
  read = _read_gpt2 if family == "gpt2" else _read_llama
  kind, labels = classifier_kind(hf) or "sequence", num_labels(hf)
  if kind == "regression" and labels != 1:
    raise ConversionError(f"A regression head of {labels} outputs (problem_type 'regression', "
                          f"num_labels={labels}): jaxlm's regression head predicts one score.")
  return read(hf, family).replace(num_labels=labels, classifier=kind), family


def classifier_kind(hf: dict) -> str | None:
  """"sequence", "token" or "regression" (LlamaConfig.classifier) for a classifier's
  config.json, None for a language model's. A sequence classifier regresses as transformers
  decides: problem_type "regression", or one label and no problem_type."""
  for architecture in hf.get("architectures") or []:
    if architecture.endswith(CLASSIFIER_SUFFIXES["token"]):
      return "token"
    if architecture.endswith(CLASSIFIER_SUFFIXES["sequence"]):
      problem = hf.get("problem_type")
      regresses = problem == "regression" or (problem is None and _label_count(hf) == 1)
      return "regression" if regresses else "sequence"
  return None


def is_classifier(hf: dict) -> bool:
  return classifier_kind(hf) is not None


def _label_count(hf: dict) -> int:
  return len(hf.get("id2label") or {}) or hf.get("num_labels", 2)


def num_labels(hf: dict) -> int:
  """HF's num_labels: the size of id2label (config.json keeps no count of its own in
  transformers 5), 2 when a classifier names no labels; 0 for a language model."""
  return _label_count(hf) if is_classifier(hf) else 0


def label_names(hf: dict) -> tuple[str, ...] | None:
  """A classifier's label names in class order, from id2label (keys are strings in JSON);
  None for a regression head, whose one output is a score, not a class."""
  id2label = hf.get("id2label") if classifier_kind(hf) in ("sequence", "token") else None
  return tuple(id2label[k] for k in sorted(id2label, key=int)) if id2label else None


def _refuse(problems: list[str]) -> None:
  if problems:
    raise ConversionError("Unsupported config.json settings: " + "; ".join(problems))


def _read_llama(hf: dict, family: str) -> LlamaConfig:
  problems = []
  if hf.get("hidden_act", "silu") != "silu":
    problems.append(f"hidden_act={hf['hidden_act']!r} (only 'silu' is supported)")
  if family == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
    problems.append("Llama attention_bias / mlp_bias (biases on o_proj or the MLP)")
  if family == "qwen2" and hf.get("use_sliding_window"):
    problems.append("Qwen2 use_sliding_window=true (per-layer windows)")
  # GenericForTokenClassification's score has a bias unless this says otherwise (GPT-2's
  # classifier always has one); jaxlm's token head always has one.
  if classifier_kind(hf) == "token" and not hf.get("token_classification_bias", True):
    problems.append("token_classification_bias=false (jaxlm's token classifier head always "
                    "has a bias: save the model with a zero score.bias and "
                    "token_classification_bias=true to convert it)")
  _refuse(problems)
  theta, scaling = _rope(hf)
  heads = hf["num_attention_heads"]
  window = hf.get("sliding_window") if family == "mistral" else None
  return LlamaConfig(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"], num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      mlp_dim=hf["intermediate_size"], rope_theta=theta, rope_scaling=scaling,
      max_seq_len=hf.get("max_position_embeddings", 2048),
      norm_eps=hf.get("rms_norm_eps", 1e-6), qkv_bias=family == "qwen2",
      sliding_window=window, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      init_std=hf.get("initializer_range", 0.02), compute_dtype="float32")


def _read_gpt2(hf: dict, family: str) -> LlamaConfig:
  activation = hf.get("activation_function", "gelu_new")
  problems = [] if activation == "gelu_new" else [
      f"activation_function={activation!r} (only 'gelu_new' is supported)"]
  problems += [f"{name}={hf[name]!r} (only {value!r} is supported)"
               for name, value in GPT2_FIXED.items() if hf.get(name, value) != value]
  _refuse(problems)
  d, heads = hf["n_embd"], hf["n_head"]
  return LlamaConfig(
      vocab_size=hf["vocab_size"], hidden_size=d, num_layers=hf["n_layer"], num_heads=heads,
      num_kv_heads=heads, mlp_dim=hf.get("n_inner") or 4 * d,
      max_seq_len=hf.get("n_positions", 1024), norm_type="layer",
      norm_eps=hf.get("layer_norm_epsilon", 1e-5), position_embedding="learned",
      mlp_type="gelu", qkv_bias=True, attention_out_bias=True, mlp_bias=True,
      tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
      init_std=hf.get("initializer_range", 0.02), compute_dtype="float32")


def hf_dtype(hf: dict) -> str | None:
  return hf.get("dtype") or hf.get("torch_dtype")


def family_for(cfg: LlamaConfig) -> str:
  if cfg.position_embedding == "learned":
    return "gpt2"
  if cfg.qkv_bias:
    return "qwen2"
  return "mistral" if cfg.sliding_window else "llama"


def write_hf_config(cfg: LlamaConfig, family: str | None = None, *, dtype: str,
                    base: dict | None = None, labels: tuple[str, ...] | None = None) -> dict:
  """A config.json for `cfg`; keys of `base` (the source model's config) are kept so token
  ids and other settings survive a round trip. labels: a classifier's class names (default
  HF's LABEL_0, LABEL_1, ...). Raises ConversionError if the family cannot express cfg (the
  export would silently compute something else)."""
  family = family or family_for(cfg)
  hf = dict(base or {})
  # token_classification_bias: HF's default (true) is what jaxlm's token head computes.
  for stale in ("rope_scaling", "rope_theta", "torch_dtype", "rope_parameters", "id2label",
                "label2id", "num_labels", "token_classification_bias", "problem_type"):
    hf.pop(stale, None)
  architectures = (CLASSIFIER_ARCHITECTURES[cfg.classifier] if cfg.num_labels
                   else ARCHITECTURES)
  hf.update({"architectures": [architectures[family]], "model_type": family,
             "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
             "initializer_range": cfg.init_std, "dtype": dtype})
  hf.update(_gpt2_fields(cfg) if family == "gpt2" else _llama_fields(cfg, family))
  if cfg.num_labels:
    hf.update(_classifier_fields(cfg, hf, labels))
  _check_expressed(cfg, hf, family)
  return hf


def _llama_fields(cfg: LlamaConfig, family: str) -> dict:
  scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
  fields = {
      "hidden_size": cfg.hidden_size, "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.resolved_head_dim,
      "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
      "rms_norm_eps": cfg.norm_eps,
      "rope_parameters": {"rope_theta": cfg.rope_theta, **(scaling or {"rope_type": "default"})},
  }
  if family == "llama":
    fields.update(attention_bias=False, mlp_bias=False)
  if family == "mistral":
    fields["sliding_window"] = cfg.sliding_window
  if family == "qwen2":
    fields.update(use_sliding_window=False)
  return fields


def _gpt2_fields(cfg: LlamaConfig) -> dict:
  return {"n_embd": cfg.hidden_size, "n_layer": cfg.num_layers, "n_head": cfg.num_heads,
          "n_positions": cfg.max_seq_len, "n_inner": cfg.mlp_dim,
          "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps, **GPT2_FIXED}


def _classifier_fields(cfg: LlamaConfig, hf: dict, labels: tuple[str, ...] | None) -> dict:
  names = list(labels or (f"LABEL_{i}" for i in range(cfg.num_labels)))
  if len(names) != cfg.num_labels:
    raise ConversionError(f"{len(names)} label names ({', '.join(names)}) for a classifier "
                          f"of num_labels={cfg.num_labels}.")
  fields = {"num_labels": cfg.num_labels, "id2label": {str(i): n for i, n in enumerate(names)},
            "label2id": {name: i for i, name in enumerate(names)}}
  if cfg.classifier == "token":  # logits at every token: no pooling, so no pad token needed
    return fields
  fields["problem_type"] = PROBLEM_TYPES[cfg.classifier]
  # transformers pools each row at its last token that is not pad_token_id and refuses
  # batches of more than one row without one. A base without a pad token gets its eos: our
  # training pools at the last token it reads, and a text's eos is a target, never read, so
  # texts given unpadded or padded with eos pool at that same token.
  eos = hf.get("eos_token_id")
  pad = hf.get("pad_token_id")
  if pad is None and eos is not None:
    pad = eos[0] if isinstance(eos, list) else eos
  if pad is not None:
    fields["pad_token_id"] = pad
  return fields


def _check_expressed(cfg: LlamaConfig, hf: dict, family: str) -> None:
  back, _ = read_hf_config(hf)
  fields = ARCHITECTURE_FIELDS + (ROPE_FIELDS if cfg.position_embedding == "rope" else ())
  if not cfg.num_labels:  # a language model has no head for `classifier` to describe
    fields = tuple(name for name in fields if name != "classifier")
  lost = [f"{name}={getattr(cfg, name)!r}" for name in fields
          if getattr(back, name) != getattr(cfg, name)]
  if lost:
    raise ConversionError(f"A {family} config.json cannot express this model's "
                          f"{', '.join(lost)}.")


def model_fields(cfg: LlamaConfig) -> dict:
  fields = dataclasses.asdict(cfg)
  fields["rope_scaling"] = dict(cfg.rope_scaling) if cfg.rope_scaling else None
  return fields
