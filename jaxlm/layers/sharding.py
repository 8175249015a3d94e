"""Logical-axis annotations for parameters and activations.

Layers name every axis ("embed", "mlp", "heads", ...). Whoever runs the model under a mesh
installs a resolver with `activation_sharding(resolver)`; outside of one, `constrain` is a
no-op, so the same model runs unsharded in tests and notebooks.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Sequence

import jax
from flax import nnx

LogicalAxes = Sequence[str | None]
# (logical names, shape) -> jax.sharding.Sharding
Resolver = Callable[[LogicalAxes, tuple[int, ...]], jax.sharding.Sharding]

_resolver: contextvars.ContextVar[Resolver | None] = contextvars.ContextVar(
    "jaxlm_activation_resolver", default=None)


@contextlib.contextmanager
def activation_sharding(resolver: Resolver | None):
  token = _resolver.set(resolver)
  try:
    yield
  finally:
    _resolver.reset(token)


def constrain(x: jax.Array, names: LogicalAxes) -> jax.Array:
  resolver = _resolver.get()
  if resolver is None:
    return x
  return jax.lax.with_sharding_constraint(x, resolver(tuple(names), x.shape))


def per_shard(fn: Callable, in_names: Sequence[LogicalAxes], out_names: LogicalAxes):
  """fn applied to each device's shard of its arguments under the installed resolver's mesh
  (in_names: logical names per argument; out_names: of fn's one output, which has the first
  argument's shape); without a resolver, fn itself. For kernels XLA cannot partition (a
  Pallas call), which would otherwise be handed whole arrays."""
  resolver = _resolver.get()
  if resolver is None:
    return fn

  def sharded(*args):
    in_shardings = [resolver(tuple(names), arg.shape) for names, arg in zip(in_names, args)]
    mesh = in_shardings[0].mesh
    out_spec = resolver(tuple(out_names), args[0].shape).spec
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(s.spec for s in in_shardings),
                         out_specs=out_spec, check_vma=False)(*args)

  return sharded


def param(value: jax.Array, names: LogicalAxes) -> nnx.Param:
  """A parameter annotated with logical axis names. Placement is decided later from the
  names (parallel/), so flax must not try to shard it eagerly here."""
  if len(names) != value.ndim:
    raise ValueError(f"{len(names)} axis names {tuple(names)} for a {value.ndim}-d parameter")
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)
