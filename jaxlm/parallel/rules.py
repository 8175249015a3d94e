"""Logical axis names -> PartitionSpecs on a mesh, under rules given by config."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, str | Sequence[str] | None]]

# FSDP shards parameters' embed dimension, TP shards heads / mlp / vocab, and the batch is
# split over data x fsdp. Activations have their own names so FSDP never shards them on embed.
# The residual stream between blocks names its sequence axis apart from the blocks' insides,
# so that sequence parallelism can split the one and not the other.
DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    ("batch", ("data", "fsdp")),
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_residual_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)


class ShardingError(ValueError):
  pass


def sequence_parallel_rules(rules: Rules) -> list[tuple]:
  """rules with the residual stream split along the sequence over tensor, as Megatron-LM's
  sequence parallelism: the norms, residual adds and dropouts between blocks (and the layer
  inputs that remat saves) hold 1/tensor of the sequence, and each block's all-reduce over
  tensor becomes a reduce-scatter after it and an all-gather before the next: the same bytes
  forward, more backward (README, "Sequence parallelism")."""
  return [*((name, axes) for name, axes in rules if name != "act_residual_length"),
          ("act_residual_length", "tensor")]


class LogicalRules:
  """rules: (logical name, mesh axes) pairs; a name they leave out keeps its DEFAULT_RULES
  mapping, so rules saved before a name existed still work."""

  def __init__(self, mesh: jax.sharding.Mesh, rules: Iterable = DEFAULT_RULES):
    self.mesh = mesh
    self.rules: dict[str, tuple[str, ...]] = {}
    for name, axes in {**dict(DEFAULT_RULES), **dict(rules)}.items():
      if axes is None:
        axes = ()
      elif isinstance(axes, str):
        axes = (axes,)
      unknown = [a for a in axes if a not in mesh.shape]
      if unknown:
        raise ShardingError(f"Rule for {name!r} names mesh axes {unknown} not in the mesh "
                            f"{dict(mesh.shape)}.")
      self.rules[name] = tuple(axes)

  def spec(self, names: Sequence[str | None], shape: Sequence[int], what: str = "array"
           ) -> PartitionSpec:
    used: set[str] = set()
    out = []
    for name, size in zip(names, shape):
      if name is not None and name not in self.rules:
        raise ShardingError(f"No sharding rule for logical axis {name!r} of {what}; add one "
                            f"to config.mesh.rules (known: {', '.join(self.rules)}).")
      # Size-1 mesh axes are dropped so specs say only what is really split.
      axes = tuple(a for a in self.rules.get(name, ()) if self.mesh.shape[a] > 1
                   and a not in used)
      parts = math.prod(self.mesh.shape[a] for a in axes)
      if size % parts:
        raise ShardingError(
            f"Cannot shard {what}: axis {name!r} has size {size}, which is not divisible by "
            f"mesh axes {axes} of total size {parts}. Choose a mesh whose "
            f"{'x'.join(axes)} size divides {size}, or map {name!r} to another mesh axis.")
      used.update(axes)
      out.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*out)

  def sharding(self, names, shape, what: str = "array") -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(names, shape, what))

  def activation_resolver(self):
    return lambda names, shape: self.sharding(names, shape, "activation " + str(names))

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())


def state_shardings(rules: LogicalRules, abstract_state: nnx.State) -> dict:
  """NamedShardings (as a pure dict) for the parameters of an abstract NNX state, read from
  each parameter's logical axis names."""

  def one(path, variable):
    names = variable.get_metadata().get("out_sharding") or (None,) * variable.ndim
    where = "parameter " + "/".join(str(getattr(k, "key", k)) for k in path)
    return variable.replace(rules.sharding(names, variable.shape, where))

  specs = jax.tree_util.tree_map_with_path(
      one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(specs)
