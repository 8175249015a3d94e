"""Wires a model, an optimizer and a mesh together: the sharded train state and the jitted
step functions with explicit in/out shardings and buffer donation.

Fine-tuning options pick what trains: LoRA adapters (`lora`), a regex of trainable
parameters (`trainable`) minus a regex of frozen ones (`freeze`). When anything is frozen
the state holds it apart under "frozen" (optionally in `frozen_dtype`), with neither
gradients nor optimizer state; see step.py. `layer_lr_decay` and `head_lr_multiplier` scale
the learning rate per layer and for new heads.

With a teacher (`teacher_cfg`, knowledge distillation) the train step takes the teacher's
parameters as a third argument, sharded by `teacher_shardings` (the teacher's own logical
axes under the same rules and mesh) and never donated; without one nothing changes.

The model is whatever models/factory.py builds from model_cfg: the decoder, or a BERT /
RoBERTa encoder, which trains by masked-LM (`mlm`: the steps corrupt each batch) or a
classification head (text pairs with BERT's token types: `pair_separator`)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from jaxlm.finetune import trainable as subsets
from jaxlm.finetune.lora import LORA_KEYS, LoRAConfig, apply_lora
from jaxlm.models import Llama, LlamaConfig
from jaxlm.models.factory import build_model, is_encoder
from jaxlm.parallel.rules import LogicalRules, state_shardings
from jaxlm.train import step as steps
from jaxlm.train.optimizer import lr_multipliers, scale_by_multipliers

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "positions", "segment_ids")


class Trainer:

  def __init__(self, model_cfg: LlamaConfig, tx: optax.GradientTransformation, schedule,
               rules: LogicalRules, *, loss_cfg: steps.LossConfig = steps.LossConfig(),
               grad_accum_steps: int = 1, skip_nonfinite: bool = False,
               lora: LoRAConfig | None = None, trainable: str | None = None,
               freeze: str | None = None, frozen_dtype: str | None = None,
               layer_lr_decay: float | None = None, head_pattern: str = r"^(lm_head|score)/",
               head_lr_multiplier: float = 1.0, teacher_cfg: LlamaConfig | None = None,
               distill_temperature: float = 2.0, distill_alpha: float = 0.5,
               mlm: steps.MLM | None = None, pair_separator: int | None = None):
    if is_encoder(model_cfg) and not model_cfg.num_labels and mlm is None:
      raise ValueError("An encoder without a classification head trains by masked-LM: pass "
                       "mlm (its mask token and special tokens, see "
                       "jaxlm.train.mlm.tokenizer_mlm).")
    self.model_cfg = model_cfg
    self.mlm = mlm
    self.pair_separator = pair_separator
    self.token_classifier = model_cfg.num_labels > 0 and model_cfg.classifier == "token"
    self.regression = steps.is_regression(model_cfg)
    self.lora = lora
    self.frozen_dtype = frozen_dtype
    self.rules = rules
    self.mesh = rules.mesh
    abstract_model = nnx.eval_shape(lambda: self._build_model(0))
    self.graphdef, abstract_params = nnx.split(abstract_model)
    self.param_shardings = state_shardings(rules, abstract_params)
    self.trainable_mask = subsets.trainable_mask(abstract_params, trainable, freeze)
    self.partial = not all(jax.tree.leaves(self.trainable_mask))
    self.tx = self._with_lr_multipliers(
        tx, subsets.logical_names(abstract_params), layer_lr_decay, head_pattern,
        head_lr_multiplier)
    self.state_shardings = self._state_shardings(nnx.to_pure_dict(abstract_params))
    resolver = rules.activation_resolver()
    self.teacher_cfg = teacher_cfg
    distill = None
    if teacher_cfg is not None:
      teacher_graphdef, abstract_teacher = nnx.split(
          nnx.eval_shape(lambda: Llama(teacher_cfg, rngs=nnx.Rngs(0))))
      self.teacher_shardings = state_shardings(rules, abstract_teacher)
      self._abstract_teacher = nnx.to_pure_dict(abstract_teacher)
      distill = steps.Distill(teacher_graphdef, distill_temperature, distill_alpha)
    train_fn = functools.partial(
        steps.train_step, graphdef=self.graphdef, tx=self.tx, schedule=schedule,
        loss_cfg=loss_cfg, grad_accum_steps=grad_accum_steps, skip_nonfinite=skip_nonfinite,
        dropout=model_cfg.dropout_rate > 0,
        adapter_dropout=lora is not None and lora.dropout > 0, activation_resolver=resolver,
        regression=self.regression, pair_separator=pair_separator)
    if mlm is not None:
      train_fn = functools.partial(train_fn, mlm=mlm)
    if distill is not None:
      train_fn = functools.partial(train_fn, distill=distill)
    self._train_fn = train_fn
    self._eval_fn = functools.partial(steps.eval_step, graphdef=self.graphdef,
                                      activation_resolver=resolver,
                                      num_labels=model_cfg.num_labels,
                                      token_predictions=self.token_classifier, mlm=mlm,
                                      regression=self.regression,
                                      pair_separator=pair_separator,
                                      loss_chunk_len=loss_cfg.chunk_len)
    self._compiled_steps = {}

  def _build_model(self, seed) -> Llama:
    rngs = nnx.Rngs(seed)
    model = build_model(self.model_cfg, rngs)
    if self.lora is not None:
      apply_lora(model, self.lora.targets, self.lora.rank, self.lora.alpha, self.lora.dropout,
                 rngs=rngs)
    return model

  def _with_lr_multipliers(self, tx, names, layer_lr_decay, head_pattern, head_multiplier):
    if layer_lr_decay in (None, 1.0) and head_multiplier == 1.0:
      return tx  # the optimizer state keeps its usual layout
    multipliers = lr_multipliers(
        names, num_layers=self.model_cfg.num_layers, layer_decay=layer_lr_decay,
        head_pattern=head_pattern, head_multiplier=head_multiplier)
    return optax.chain(tx, scale_by_multipliers(self.split(multipliers)[0]))

  def split(self, params) -> tuple[dict, dict]:
    """A whole-model tree -> (trainable part, frozen part)."""
    return subsets.partition(params, self.trainable_mask)

  def base_param_shardings(self, base_cfg: LlamaConfig | None = None) -> dict:
    """Shardings of a base model's parameters (default: this model's), without adapters:
    what init_from loads. A classifier's base may be a language model (base_cfg)."""
    from jaxlm.loading import param_shardings
    shardings = self.param_shardings if base_cfg is None else param_shardings(base_cfg,
                                                                               self.rules)
    return subsets.select(shardings, lambda path, _: path[-1] not in LORA_KEYS)

  def model_params(self, state) -> dict:
    """The whole model's parameters of a train state, e.g. for eval_step or an export."""
    return steps.model_params(state)

  # -- shardings ------------------------------------------------------------------------

  def _state_shardings(self, abstract_params):
    replicated = self.rules.replicated()
    trainable_shardings, frozen_shardings = self.split(self.param_shardings)
    abstract_params = self.split(abstract_params)[0]
    opt_shapes = jax.eval_shape(self.tx.init, abstract_params)

    def like_param(leaf, param, sharding):
      # Optimizer moments mirror their parameter; factored statistics (adafactor) do not.
      return sharding if getattr(leaf, "shape", None) == param.shape else replicated

    opt_shardings = optax.tree_map_params(
        self.tx, like_param, opt_shapes, abstract_params, trainable_shardings,
        transform_non_params=lambda _: replicated)
    shardings = {"step": replicated, "params": trainable_shardings,
                 "opt_state": opt_shardings, "rng": replicated}
    if self.partial:
      shardings["frozen"] = frozen_shardings
    return shardings

  def batch_sharding(self, seq_len: int, batch_size: int) -> NamedSharding:
    return self.rules.sharding(("batch", None), (batch_size, seq_len), "batch")

  def abstract_state(self, *, frozen: bool = True):
    """ShapeDtypeStructs with shardings: the restore target for checkpoints (without the
    frozen part: the target for `checkpoint_state`'s saves)."""
    shapes = jax.eval_shape(functools.partial(self._init_fn, 0))
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        shapes, self.state_shardings)
    return abstract if frozen else self.checkpoint_state(abstract)

  # -- checkpoints without the frozen base ------------------------------------------------

  def checkpoint_state(self, state):
    """What changes during training: the state without its frozen part, which a resume
    rebuilds from the same base (init_from, or the seed) with `resume_state`."""
    return {k: v for k, v in state.items() if k != "frozen"}

  def resume_state(self, restored, fresh):
    """A restored `checkpoint_state` with the frozen part of `fresh` (a state built from the
    same base, e.g. by init_from_params)."""
    return dict(restored, frozen=fresh["frozen"]) if "frozen" in fresh else dict(restored)

  # -- state ----------------------------------------------------------------------------

  def _init_fn(self, seed):
    return self._state(self._fresh_params(seed), seed)

  def _fresh_params(self, seed):
    return nnx.to_pure_dict(nnx.state(self._build_model(seed)))

  def state_from_params(self, params, seed):
    """params: the whole model's, or part of it (a base model without adapters or without a
    new classification head): the rest is freshly initialised (what params replace is never
    used, so jit drops its initialisation)."""
    return self._state(subsets.combine(self._fresh_params(seed), params), seed)

  def _state(self, params, seed):
    trainable, frozen = self.split(params)
    state = {"step": jnp.zeros((), jnp.int32), "params": trainable,
             "opt_state": self.tx.init(trainable), "rng": jax.random.PRNGKey(seed)}
    if self.partial:
      state["frozen"] = (subsets.cast_floats(frozen, self.frozen_dtype) if self.frozen_dtype
                         else frozen)
    return state

  def init_from_params(self, params, seed: int):
    """A fresh optimizer (and fresh adapters) around given (already sharded) parameters of
    the whole model or its base, e.g. a converted model."""
    return jax.jit(self.state_from_params, static_argnums=1,
                   out_shardings=self.state_shardings, donate_argnums=0)(params, seed)

  def init_state(self, seed: int):
    """Initialises directly into the target shardings: no device ever holds the whole model
    unless the layout says so."""
    return jax.jit(self._init_fn, static_argnums=0, out_shardings=self.state_shardings)(seed)

  # -- steps ----------------------------------------------------------------------------

  def _batch_shardings(self, batch):
    """Rows over the batch axes, for a batch dict (or a dict of them, one per task)."""
    return {k: self._batch_shardings(v) if isinstance(v, dict) else
            self.rules.sharding(("batch",) + (None,) * (v.ndim - 1), v.shape, "batch " + k)
            for k, v in batch.items()}

  @staticmethod
  def _layout_key(kind: str, batch) -> tuple:
    return (kind, tuple((jax.tree_util.keystr(path), leaf.shape)
                        for path, leaf in jax.tree_util.tree_leaves_with_path(batch)))

  def _jitted_train_step(self, batch):
    """One jitted step per batch layout (shapes and keys), shared by running and lowering."""
    key = self._layout_key("train", batch)
    if key not in self._compiled_steps and self.teacher_cfg is not None:
      # The teacher is read, never updated: not donated, not returned.
      self._compiled_steps[key] = jax.jit(
          self._train_fn,
          in_shardings=(self.state_shardings, self._batch_shardings(batch),
                        self.teacher_shardings),
          out_shardings=(self.state_shardings, self.rules.replicated()),
          donate_argnums=(0,))
    elif key not in self._compiled_steps:
      self._compiled_steps[key] = jax.jit(
          self._train_fn,
          in_shardings=(self.state_shardings, self._batch_shardings(batch)),
          out_shardings=(self.state_shardings, self.rules.replicated()),
          donate_argnums=(0,))
    return self._compiled_steps[key]

  def train_step(self, state, batch, teacher=None):
    """teacher: the teacher's parameters (`load_teacher`), required with a teacher_cfg."""
    if (teacher is None) != (self.teacher_cfg is None):
      raise ValueError("Pass the teacher's parameters exactly when the Trainer has a "
                       "teacher_cfg (knowledge distillation).")
    if teacher is None:
      return self._jitted_train_step(batch)(state, batch)
    return self._jitted_train_step(batch)(state, batch, teacher)

  def eval_step(self, params, batch):
    key = self._layout_key("eval", batch)
    if key not in self._compiled_steps:
      self._compiled_steps[key] = jax.jit(
          self._eval_fn, in_shardings=(self.param_shardings, self._batch_shardings(batch)),
          out_shardings=self.rules.replicated())
    return self._compiled_steps[key](params, batch)

  def lower_train_step(self, batch_shapes: dict):
    """Ahead-of-time lowering with abstract inputs (no allocation), e.g. for memory plans."""
    batch = {k: jax.ShapeDtypeStruct(s, jnp.int32) for k, s in batch_shapes.items()}
    if self.teacher_cfg is None:
      return self._jitted_train_step(batch).lower(self.abstract_state(), batch)
    return self._jitted_train_step(batch).lower(self.abstract_state(), batch,
                                                self.abstract_teacher())

  # -- the distillation teacher ----------------------------------------------------------

  def abstract_teacher(self):
    """The teacher's parameters as ShapeDtypeStructs with their shardings."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, self.teacher_cfg.param_dtype, sharding=sh),
        self._abstract_teacher, self.teacher_shardings)

  def load_teacher(self, path):
    """The teacher's parameters from anything `load_params` reads, placed on
    `teacher_shardings` in the teacher config's dtype (the student's compute dtype): every
    loader converts to cfg.param_dtype as it reads."""
    from jaxlm.loading import load_params
    return load_params(path, cfg=self.teacher_cfg, shardings=self.teacher_shardings).params
