"""LoRA: low-rank adapters on the model's Einsum projections, merged back into the kernels or
exported as a PEFT adapter that `peft.PeftModel.from_pretrained` loads onto the HF model.

An adapted Einsum computes y = x W + (alpha / r) * (dropout(x) A) B with A [inputs..., r]
and B [r, outputs...] (the kernel's own axis split, so a head-split q_proj gets
B [r, heads, head_dim]). B starts at zero, so an adapted model starts equal to its base.
Dropout applies only inside `jaxlm.layers.linear.lora_dropout(key)`, which the Trainer's step
enters; evaluation and generation run without it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.layers.linear import Einsum, LoRAParam, LoRASalt

LORA_KEYS = ("lora_a", "lora_b", "lora_salt")
# Llama applies the kernels of lm_head and a classifier's score itself (for float32 logits)
# rather than calling the Einsum, so an adapter there would never run; it is not offered (a
# new score head trains whole beside the adapters instead).
NOT_ADAPTABLE = re.compile(r"^(lm_head|score)$")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  targets: str  # regex searched in Einsum paths, e.g. "attention/(q|v)_proj"
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def einsum_paths(model: nnx.Module) -> dict[str, Einsum]:
  """The model's adaptable projections by path ("layers/attention/q_proj")."""
  found = {}
  for path, module in nnx.iter_modules(model):
    name = "/".join(map(str, path))
    if isinstance(module, Einsum) and not NOT_ADAPTABLE.search(name):
      found[name] = module
  return found


def apply_lora(model: nnx.Module, targets: str, rank: int, alpha: float,
               dropout: float = 0.0, *, rngs: nnx.Rngs) -> list[str]:
  """Attaches adapters to every Einsum whose path `targets` matches (re.search); returns
  the matched paths."""
  if rank < 1 or not 0.0 <= dropout < 1.0:
    raise ValueError(f"LoRA needs rank >= 1 and 0 <= dropout < 1 (got rank={rank}, "
                     f"dropout={dropout}).")
  available = einsum_paths(model)
  matched = [name for name in sorted(available) if re.search(targets, name)]
  if not matched:
    raise ValueError(f"LoRA targets {targets!r} match none of the model's projections: "
                     f"{', '.join(sorted(available))}.")
  next_salt = 0
  for name in matched:
    next_salt = _attach(available[name], rank, alpha / rank, dropout, rngs, next_salt)
  return matched


def _attach(module: Einsum, rank: int, scale: float, dropout: float, rngs: nnx.Rngs,
            first_salt: int) -> int:
  """Adds A, B (and dropout salts) to one Einsum; returns the next unused salt."""
  module.lora_equations()  # refuses equations whose A and B would not be kernel views
  kernel = module.kernel
  kernel_letters = module.equation.split("->")[0].split(",")[1]
  inputs = module.equation.split(",")[0]
  num_in = sum(c in inputs for c in kernel_letters)
  lead = kernel.ndim - len(kernel_letters)  # stacked layer axes, e.g. ("layers",)
  names = tuple(kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim)
  stack, ins, outs = (kernel.shape[:lead], kernel.shape[lead:lead + num_in],
                      kernel.shape[lead + num_in:])
  stack_names, in_names, out_names = names[:lead], names[lead:lead + num_in], names[lead + num_in:]
  # PEFT's default: kaiming-uniform A, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  bound = 1.0 / math.sqrt(math.prod(ins))
  a = jax.random.uniform(rngs.params(), stack + ins + (rank,), kernel.dtype, -bound, bound)
  module.lora_a = _lora_param(a, stack_names + in_names + (None,))
  module.lora_b = _lora_param(jnp.zeros(stack + (rank,) + outs, kernel.dtype),
                              stack_names + (None,) + out_names)
  module.lora_scale = scale
  module.lora_dropout_rate = dropout
  count = math.prod(stack)
  if dropout > 0.0:
    salts = jnp.arange(first_salt, first_salt + count, dtype=jnp.uint32).reshape(stack)
    module.lora_salt = LoRASalt(salts, out_sharding=stack_names, eager_sharding=False)
  return first_salt + count


def _lora_param(value: jax.Array, names) -> LoRAParam:
  # The rank axis is tiny: never sharded (None), so no mesh rule is needed for it.
  return LoRAParam(value, out_sharding=tuple(names), eager_sharding=False)


# -- pure-dict parameters ----------------------------------------------------------------

def _adapted(params: dict, prefix=()):
  """(path of the module, its dict) for every module in params that carries an adapter."""
  if "lora_a" in params:
    yield prefix, params
  for key, value in params.items():
    if isinstance(value, dict):
      yield from _adapted(value, prefix + (key,))


def lora_delta(module: dict, scale: float) -> jax.Array:
  """scale * A B in the kernel's shape (float32): A and B are views of the kernel's input
  and output axes, behind any stacked layer axes."""
  a, b, kernel = module["lora_a"], module["lora_b"], module["kernel"]
  lead = a.ndim + b.ndim - 2 - kernel.ndim
  stack = kernel.shape[:lead]
  rank = a.shape[-1]
  a2 = jnp.reshape(a, stack + (-1, rank)).astype(jnp.float32)
  b2 = jnp.reshape(b, stack + (rank, -1)).astype(jnp.float32)
  product = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)
  return scale * product.reshape(kernel.shape)


def merge_lora(params: dict, lora: LoRAConfig) -> dict:
  """Parameters of the plain model: W + (alpha / r) A B folded into each adapted kernel and
  the adapter entries dropped. Works on a pure-dict parameter tree (e.g. a Trainer state's
  params and frozen parts combined)."""
  def merge(node):
    if not isinstance(node, dict):
      return node
    out = {k: merge(v) for k, v in node.items() if k not in LORA_KEYS}
    if "lora_a" in node:
      _check_rank(node, lora)
      kernel = node["kernel"]
      out["kernel"] = (kernel.astype(jnp.float32) + lora_delta(node, lora.scale)
                       ).astype(kernel.dtype)
    return out

  return merge(params)


def _check_rank(module: dict, lora: LoRAConfig) -> None:
  rank = module["lora_a"].shape[-1]
  if rank != lora.rank:
    raise ValueError(f"The adapter has rank {rank} but the LoRA config says {lora.rank}; "
                     f"the scale alpha / r would be wrong.")


# -- exports -----------------------------------------------------------------------------

DECODER_FAMILIES = ("llama", "mistral", "qwen2", "gpt2")
ENCODER_FAMILIES = ("bert", "roberta")
PEFT_FAMILIES = DECODER_FAMILIES + ENCODER_FAMILIES


def _hf_table(cfg, family: str):
  """The HF mapping table of cfg, encoders with the "bert." / "roberta." prefix of the
  *For{Sequence,Token}Classification base that PEFT loads them onto."""
  from jaxlm.convert.bert_weights import bert_table
  from jaxlm.convert.llama_weights import gpt2_table, llama_table
  if family not in PEFT_FAMILIES:
    raise ValueError(f"PEFT export supports the {', '.join(PEFT_FAMILIES)} families, "
                     f"not {family!r}.")
  if family in ENCODER_FAMILIES:
    return bert_table(cfg, family, f"{family}.")
  gpt2 = family == "gpt2"
  if gpt2 != (cfg.position_embedding == "learned"):
    raise ValueError(f"The model config does not fit the {family!r} family "
                     f"(position_embedding={cfg.position_embedding!r}).")
  return gpt2_table(cfg) if gpt2 else llama_table(cfg)


def _module_name(hf_module: str, family: str) -> str:
  """The name target_modules gives an adapted HF module: its last part ("q_proj"); GPT-2's
  last two ("attn.c_proj", as "c_proj" alone would hit both projections); an encoder's path
  inside its layer ("attention.output.dense", "output.dense"), which export_peft_adapter
  anchors in a regex since one is a suffix of the other."""
  if family in ENCODER_FAMILIES:
    return hf_module.split(".{i}.")[1]
  return ".".join(hf_module.split(".")[-2 if family == "gpt2" else -1:])


def peft_tensors(params: dict, cfg, family: str = "llama") -> tuple[dict, list[str]]:
  """({PEFT tensor name: float32 array}, HF module names adapted, e.g. ["q_proj"]).
  Names and layouts come from the HF mapping table: A and B are kernels with the rank in
  place of the output (A) or input (B) axes, so each Layout's to_hf turns them into
  lora_A [r, in] and lora_B [out, r] as for the weight itself.

  GPT-2 ("gpt2"): its Conv1D weights are (in, out), so the Layout's to_hf result is
  transposed. Its module names are "attn.c_attn", "attn.c_proj", "mlp.c_fc" and
  "mlp.c_proj" (PEFT matches target_modules as name suffixes, and "c_proj" alone would hit
  both projections). q, k and v share one fused c_attn, so their adapters are exported
  stacked, exactly: lora_A = the adapted projections' A concatenated on the rank axis
  ([n * r, in] for n adapted of q/k/v) and lora_B block-diagonal ([q+k+v out, n * r], zero
  rows for an unadapted projection), so lora_B @ lora_A is each projection's B A side by
  side. c_attn's rank is then n * r: export_peft_adapter gives it a rank_pattern /
  alpha_pattern entry keeping the scale alpha / r."""
  from jaxlm.convert.llama_weights import hf_shape
  table = _hf_table(cfg, family)
  gpt2 = family == "gpt2"
  # Module path -> (its table entry, its part of a fused HF tensor).
  by_module = {path[:-1]: (entry, part) for entry in table if entry.path[-1] == "kernel"
               for part, path in enumerate(entry.paths)}
  adapted = {}  # entry -> {part: module dict}
  for path, module in _adapted(params):
    if path not in by_module:
      raise ValueError(f"No Hugging Face name for the adapter on {'/'.join(path)}.")
    entry, part = by_module[path]
    adapted.setdefault(entry, {})[part] = module
  if not adapted:
    raise ValueError("These parameters carry no LoRA adapter (no lora_a / lora_b entries).")

  def to_hf(entry, array):  # a (per-layer) A or B -> PEFT's [r, in] / [out, r]
    out = entry.layout.to_hf(array)
    return out.T if gpt2 else out

  tensors, modules = {}, set()
  for entry, parts in adapted.items():
    modules.add(_module_name(entry.hf_name.removesuffix(".weight"), family))
    host = {part: tuple(np.asarray(jax.device_get(m[key]), np.float32)
                        for key in ("lora_a", "lora_b"))
            for part, m in parts.items()}
    if entry.fused_with:  # every part's (per-layer) HF output width, adapted or not
      kernels = [_at(params, path).shape for path in entry.paths]
      widths = [hf_shape(entry, shape)[-1] for shape in kernels]
    for i, name in enumerate(entry.hf_names(cfg.num_layers)):
      layer = {part: tuple(x[i] if entry.stacked else x for x in arrays)
               for part, arrays in host.items()}
      if entry.fused_with:
        lora_a, lora_b = _fused_peft(entry, layer, widths, to_hf)
      else:
        a, b = layer[0]
        lora_a, lora_b = to_hf(entry, a), to_hf(entry, b)
      prefix = "base_model.model." + name.removesuffix(".weight")
      tensors[prefix + ".lora_A.weight"] = np.ascontiguousarray(lora_a)
      tensors[prefix + ".lora_B.weight"] = np.ascontiguousarray(lora_b)
  return tensors, sorted(modules)


def _at(params: dict, path: tuple):
  for key in path:
    params = params[key]
  return params


def _fused_peft(entry, layer: dict, widths: list[int], to_hf) -> tuple[np.ndarray, np.ndarray]:
  """One layer's adapters on the parts of a fused HF tensor (GPT-2's c_attn) as one PEFT
  adapter: A stacked on the rank axis, B block-diagonal with zero rows for unadapted parts.
  `layer` maps part -> (A, B) of the adapted parts; `widths` are every part's HF output
  width."""
  a_blocks = [to_hf(entry, layer[part][0]) for part in sorted(layer)]  # [r, in] each
  lora_b = np.zeros((sum(widths), sum(block.shape[0] for block in a_blocks)), np.float32)
  column = 0
  for part, block in zip(sorted(layer), a_blocks):
    row, rank = sum(widths[:part]), block.shape[0]
    lora_b[row:row + widths[part], column:column + rank] = to_hf(entry, layer[part][1])
    column += rank
  return np.concatenate(a_blocks, axis=0), lora_b


# LlamaConfig.classifier -> PEFT's task_type for the HF classifier it exports as.
PEFT_TASKS = {"sequence": "SEQ_CLS", "token": "TOKEN_CLS", "regression": "SEQ_CLS"}


def _head_entries(cfg, family: str) -> list:
  """The HF table entries PEFT saves whole (modules_to_save) beside the adapters: a
  classifier's head, and for an encoder's sequence head also the pooler it reads, which may
  start fresh (from a *ForMaskedLM) and so cannot be taken from the base either."""
  from jaxlm.convert.llama_weights import output_entries
  if not cfg.num_labels:
    return []
  if family not in ENCODER_FAMILIES:
    return output_entries(cfg)
  heads = ("score",) if cfg.classifier == "token" else ("score", "pooler")
  return [entry for entry in _hf_table(cfg, family) if entry.path[0] in heads]


def _saved_modules(cfg, family: str) -> list[str] | None:
  """modules_to_save: the HF modules of _head_entries ("score", "classifier", "pooler")."""
  entries = _head_entries(cfg, family)
  return sorted({entry.hf_name.removeprefix(f"{family}.").split(".")[0]
                 for entry in entries}) or None


def _head_tensors(params: dict, cfg, family: str) -> dict:
  """The _head_entries as PEFT saves modules_to_save Linears: whole weights and biases
  under their HF names, laid out by the HF mapping table."""
  return {"base_model.model." + entry.hf_name: np.ascontiguousarray(entry.to_hf(
              [np.asarray(jax.device_get(_at(params, entry.path)), np.float32)]))
          for entry in _head_entries(cfg, family)}


def unexported_trained(trainable_mask: dict, cfg, family: str) -> list[str]:
  """Parameters that trained (trainable_mask) but that a PEFT adapter does not carry: not
  an adapter factor and not a _head_entries tensor (e.g. norms under finetune.trainable)."""
  from jaxlm.finetune.trainable import leaves_with_paths, path_str
  carried = {entry.path for entry in _head_entries(cfg, family)}
  return [path_str(path) for path, trained in leaves_with_paths(trainable_mask)
          if trained and path[-1] not in LORA_KEYS and path not in carried]


def export_peft_adapter(params: dict, cfg, family: str, out_dir: str | Path,
                        base_model_name_or_path: str, *, lora: LoRAConfig,
                        dtype: str = "float32") -> Path:
  """adapter_config.json + adapter_model.safetensors for peft.PeftModel.from_pretrained on
  the HF export of the base model. Only the adapters are written, and a classifier's head
  (cfg.num_labels > 0), which trains whole from a fresh start and so cannot come from the
  base: PEFT's task "SEQ_CLS" with modules_to_save ["score"], for the base loaded as its
  *ForSequenceClassification, or for a token classifier "TOKEN_CLS" with the head of its
  *ForTokenClassification ("score", GPT-2's "classifier"), weight and bias. A BERT / RoBERTa
  encoder's adapters are for its classifier base ("bert." / "roberta." names), its head is
  "classifier" and a sequence head also saves the pooler it reads (BERT's "pooler",
  RoBERTa's "classifier.dense"); without a head (masked-LM) the task_type is left unset.
  Other parameters trained alongside the adapters (norms) are not part of a PEFT LoRA
  adapter here. GPT-2's fused c_attn adapter has rank n * r for n adapted of q/k/v (see
  peft_tensors), which rank_pattern / alpha_pattern record; every other module keeps r and
  alpha."""
  from safetensors.numpy import save_file

  tensors, modules = peft_tensors(params, cfg, family)
  tensors.update(_head_tensors(params, cfg, family))
  for module in (m for _, m in _adapted(params)):
    _check_rank(module, lora)
  # A module whose PEFT rank differs from r (GPT-2's c_attn with n of q/k/v adapted has
  # n * r) gets rank_pattern / alpha_pattern entries with alpha = scale * rank, so that
  # PEFT's alpha / rank is still jaxlm's scale. All layers of a module share its rank.
  ranks = {module: next(v.shape[0] for k, v in tensors.items()
                        if k.endswith(f".{module}.lora_A.weight")) for module in modules}
  rank_pattern = {module: rank for module, rank in ranks.items() if rank != lora.rank}
  alpha_pattern = {module: lora.scale * rank for module, rank in rank_pattern.items()}
  out = Path(out_dir).expanduser().absolute()
  out.mkdir(parents=True, exist_ok=True)
  config = {
      "peft_type": "LORA",
      "task_type": (PEFT_TASKS[cfg.classifier] if cfg.num_labels else
                    None if family in ENCODER_FAMILIES else "CAUSAL_LM"),
      "r": lora.rank,
      "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
      # PEFT full-matches a string; a list it matches as name suffixes.
      "target_modules": (rf".*\.layer\.\d+\.({'|'.join(re.escape(m) for m in modules)})"
                         if family in ENCODER_FAMILIES else modules),
      "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
      "bias": "none", "base_model_name_or_path": base_model_name_or_path,
      # GPT-2's Conv1D weights are (in, out); PEFT would set this itself, with a warning.
      "fan_in_fan_out": family == "gpt2", "use_rslora": False, "inference_mode": True,
      "modules_to_save": _saved_modules(cfg, family),
      "init_lora_weights": True,
  }
  (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
  save_file({k: v.astype(jnp.dtype(dtype)) for k, v in tensors.items()},
            str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
  return out
