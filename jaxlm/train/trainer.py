"""Wires a model, an optimizer and a mesh together: the sharded train state and the jitted
step functions with explicit in/out shardings and buffer donation."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from jaxlm.models import Llama, LlamaConfig
from jaxlm.parallel.rules import LogicalRules, state_shardings
from jaxlm.train import step as steps

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "positions", "segment_ids")


class Trainer:

  def __init__(self, model_cfg: LlamaConfig, tx: optax.GradientTransformation, schedule,
               rules: LogicalRules, *, loss_cfg: steps.LossConfig = steps.LossConfig(),
               grad_accum_steps: int = 1, skip_nonfinite: bool = False):
    self.model_cfg = model_cfg
    self.tx = tx
    self.rules = rules
    self.mesh = rules.mesh
    abstract_model = nnx.eval_shape(lambda: Llama(model_cfg, rngs=nnx.Rngs(0)))
    self.graphdef, abstract_params = nnx.split(abstract_model)
    self.param_shardings = state_shardings(rules, abstract_params)
    self.state_shardings = self._state_shardings(nnx.to_pure_dict(abstract_params))
    resolver = rules.activation_resolver()
    train_fn = functools.partial(
        steps.train_step, graphdef=self.graphdef, tx=tx, schedule=schedule,
        loss_cfg=loss_cfg, grad_accum_steps=grad_accum_steps, skip_nonfinite=skip_nonfinite,
        dropout=model_cfg.dropout_rate > 0, activation_resolver=resolver)
    self._train_fn = train_fn
    self._eval_fn = functools.partial(steps.eval_step, graphdef=self.graphdef,
                                      activation_resolver=resolver)
    self._compiled_steps = {}

  # -- shardings ------------------------------------------------------------------------

  def _state_shardings(self, abstract_params):
    replicated = self.rules.replicated()
    opt_shapes = jax.eval_shape(self.tx.init, abstract_params)

    def like_param(leaf, param, sharding):
      # Optimizer moments mirror their parameter; factored statistics (adafactor) do not.
      return sharding if getattr(leaf, "shape", None) == param.shape else replicated

    opt_shardings = optax.tree_map_params(
        self.tx, like_param, opt_shapes, abstract_params, self.param_shardings,
        transform_non_params=lambda _: replicated)
    return {"step": replicated, "params": self.param_shardings, "opt_state": opt_shardings,
            "rng": replicated}

  def batch_sharding(self, seq_len: int, batch_size: int) -> NamedSharding:
    return self.rules.sharding(("batch", None), (batch_size, seq_len), "batch")

  def abstract_state(self):
    """ShapeDtypeStructs with shardings: the restore target for checkpoints."""
    shapes = jax.eval_shape(functools.partial(self._init_fn, 0))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.state_shardings)

  # -- state ----------------------------------------------------------------------------

  def _init_fn(self, seed):
    model = Llama(self.model_cfg, rngs=nnx.Rngs(seed))
    params = nnx.to_pure_dict(nnx.state(model))
    return self.state_from_params(params, seed)

  def state_from_params(self, params, seed):
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": self.tx.init(params), "rng": jax.random.PRNGKey(seed)}

  def init_from_params(self, params, seed: int):
    """A fresh optimizer around given (already sharded) parameters, e.g. a converted model."""
    return jax.jit(self.state_from_params, static_argnums=1,
                   out_shardings=self.state_shardings, donate_argnums=0)(params, seed)

  def init_state(self, seed: int):
    """Initialises directly into the target shardings: no device ever holds the whole model
    unless the layout says so."""
    return jax.jit(self._init_fn, static_argnums=0, out_shardings=self.state_shardings)(seed)

  # -- steps ----------------------------------------------------------------------------

  def _batch_shardings(self, batch):
    return {k: self.rules.sharding(("batch",) + (None,) * (v.ndim - 1), v.shape, "batch " + k)
            for k, v in batch.items()}

  def _jitted_train_step(self, batch):
    """One jitted step per batch layout (shapes and keys), shared by running and lowering."""
    key = ("train", tuple(sorted((k, v.shape) for k, v in batch.items())))
    if key not in self._compiled_steps:
      self._compiled_steps[key] = jax.jit(
          self._train_fn,
          in_shardings=(self.state_shardings, self._batch_shardings(batch)),
          out_shardings=(self.state_shardings, self.rules.replicated()),
          donate_argnums=(0,))
    return self._compiled_steps[key]

  def train_step(self, state, batch):
    return self._jitted_train_step(batch)(state, batch)

  def eval_step(self, params, batch):
    key = ("eval", tuple(sorted((k, v.shape) for k, v in batch.items())))
    if key not in self._compiled_steps:
      self._compiled_steps[key] = jax.jit(
          self._eval_fn, in_shardings=(self.param_shardings, self._batch_shardings(batch)),
          out_shardings=self.rules.replicated())
    return self._compiled_steps[key](params, batch)

  def lower_train_step(self, batch_shapes: dict):
    """Ahead-of-time lowering with abstract inputs (no allocation), e.g. for memory plans."""
    batch = {k: jax.ShapeDtypeStruct(s, jnp.int32) for k, s in batch_shapes.items()}
    return self._jitted_train_step(batch).lower(self.abstract_state(), batch)
