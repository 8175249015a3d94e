"""Trainable subsets of a parameter tree.

Parameters are nested pure dicts; a subset keeps the nesting (so paths, optimizer masks and
shardings still line up) and drops everything else, so the optimizer never sees, and never
allocates moments for, a frozen parameter.
"""
from __future__ import annotations

import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.layers.linear import LoRAParam

NEW_HEAD = "score/"  # a classifier's output projection (models/llama.py)


def path_str(path) -> str:
  """("layers", "attention", "q_proj", "kernel") or a jax key path -> "layers/attention/..."."""
  return "/".join(str(getattr(k, "key", k)) for k in path)


def leaves_with_paths(tree: dict, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from leaves_with_paths(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def select(tree: dict, keep: Callable[[tuple, object], bool]) -> dict:
  """The leaves (path, leaf) -> keep, nested as in `tree`; empty branches are dropped."""
  out: dict = {}
  for path, leaf in leaves_with_paths(tree):
    if keep(path, leaf):
      node = out
      for key in path[:-1]:
        node = node.setdefault(key, {})
      node[path[-1]] = leaf
  return out


def combine(*trees: dict) -> dict:
  """Deep union of disjoint subsets (later trees win on a clash)."""
  out: dict = {}
  for tree in trees:
    for key, value in tree.items():
      if isinstance(value, dict) and isinstance(out.get(key), dict):
        out[key] = combine(out[key], value)
      else:
        out[key] = value
  return out


def partition(tree: dict, mask: dict) -> tuple[dict, dict]:
  """(leaves where mask is True, the others)."""
  flags = dict(leaves_with_paths(mask))
  return (select(tree, lambda path, _: flags[path]),
          select(tree, lambda path, _: not flags[path]))


def trainable_mask(abstract_state: nnx.State, trainable: str | None = None,
                   freeze: str | None = None) -> dict:
  """bool per parameter (a pure dict): matches `trainable` (a regex searched in the
  "layers/attention/q_proj/kernel" path; default: the LoRA factors and a classification head
  when there are adapters, else everything) and not `freeze`. Integer state (LoRA dropout
  salts) is never trained."""
  has_lora = any(isinstance(v, LoRAParam) for _, v in nnx.to_flat_state(abstract_state))

  def decide(path, variable):
    if not jnp.issubdtype(variable.dtype, jnp.inexact):
      return False
    name = path_str(path)
    if trainable is not None:
      chosen = re.search(trainable, name) is not None
    else:
      # A classifier's head is new: it trains beside the adapters (PEFT's modules_to_save).
      chosen = isinstance(variable, LoRAParam) or not has_lora or name.startswith(NEW_HEAD)
    return chosen and not (freeze and re.search(freeze, name))

  mask = jax.tree_util.tree_map_with_path(
      lambda path, v: v.replace(decide(path, v)), abstract_state,
      is_leaf=lambda x: isinstance(x, nnx.Variable))
  mask = nnx.to_pure_dict(mask)
  if not any(flag for _, flag in leaves_with_paths(mask)):
    names = [path_str(p) for p, _ in leaves_with_paths(mask)]
    raise ValueError(f"Nothing left to train: trainable={trainable!r}, freeze={freeze!r} "
                     f"select no floating-point parameter. Parameters: {', '.join(names)}")
  return mask


def logical_names(abstract_state: nnx.State) -> dict:
  """Each parameter's logical axis names (a pure dict of tuples)."""
  names = jax.tree_util.tree_map_with_path(
      lambda _, v: v.replace(tuple(v.get_metadata().get("out_sharding") or ())),
      abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(names)


def cast_floats(tree: dict, dtype) -> dict:
  """Floating-point leaves in dtype (e.g. frozen weights held in bfloat16)."""
  def cast(x):
    return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
  return jax.tree.map(cast, tree)
