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
# Llama applies lm_head's kernel itself (for float32 logits) rather than calling the
# Einsum, so an adapter there would never run; it is not offered.
NOT_ADAPTABLE = re.compile(r"^lm_head$")


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

def peft_tensors(params: dict, cfg, family: str = "llama") -> tuple[dict, list[str]]:
  """({PEFT tensor name: float32 array}, HF module names adapted, e.g. ["q_proj"]).
  Names and layouts come from the HF mapping table: A and B are kernels with the rank in
  place of the output (A) or input (B) axes, so each Layout's to_hf turns them into
  lora_A [r, in] and lora_B [out, r] as for the weight itself."""
  from jaxlm.convert.llama_weights import llama_table
  if family not in ("llama", "mistral", "qwen2"):
    raise ValueError(f"PEFT export supports the llama, mistral and qwen2 families, "
                     f"not {family!r}.")
  by_module = {entry.path[:-1]: entry for entry in llama_table(cfg)
               if entry.path[-1] == "kernel"}
  tensors, modules = {}, set()
  for path, module in _adapted(params):
    entry = by_module.get(path)
    if entry is None:
      raise ValueError(f"No Hugging Face name for the adapter on {'/'.join(path)}.")
    a = np.asarray(jax.device_get(module["lora_a"]), np.float32)
    b = np.asarray(jax.device_get(module["lora_b"]), np.float32)
    hf_module = entry.hf_name.removesuffix(".weight")
    modules.add(hf_module.rsplit(".", 1)[-1])
    for i, name in enumerate(entry.hf_names(cfg.num_layers)):
      per_layer = (a[i], b[i]) if entry.stacked else (a, b)
      prefix = "base_model.model." + name.removesuffix(".weight")
      tensors[prefix + ".lora_A.weight"] = np.ascontiguousarray(entry.layout.to_hf(per_layer[0]))
      tensors[prefix + ".lora_B.weight"] = np.ascontiguousarray(entry.layout.to_hf(per_layer[1]))
  if not tensors:
    raise ValueError("These parameters carry no LoRA adapter (no lora_a / lora_b entries).")
  return tensors, sorted(modules)


def export_peft_adapter(params: dict, cfg, family: str, out_dir: str | Path,
                        base_model_name_or_path: str, *, lora: LoRAConfig,
                        dtype: str = "float32") -> Path:
  """adapter_config.json + adapter_model.safetensors for peft.PeftModel.from_pretrained on
  the HF export of the base model. Only the adapters are written: parameters trained
  alongside them (a head, norms) are not part of a PEFT LoRA adapter here."""
  from safetensors.numpy import save_file
  tensors, modules = peft_tensors(params, cfg, family)
  for module in (m for _, m in _adapted(params)):
    _check_rank(module, lora)
  out = Path(out_dir).expanduser().absolute()
  out.mkdir(parents=True, exist_ok=True)
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank,
      "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "target_modules": modules,
      "bias": "none", "base_model_name_or_path": base_model_name_or_path,
      "fan_in_fan_out": False, "use_rslora": False, "inference_mode": True,
      "modules_to_save": None, "init_lora_weights": True,
  }
  (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
  save_file({k: v.astype(jnp.dtype(dtype)) for k, v in tensors.items()},
            str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
  return out
