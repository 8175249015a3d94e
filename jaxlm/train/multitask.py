"""Multi-task training: several heads on one trunk, each task with its own data, trained
together on a weighted sum of the tasks' losses (config.tasks; README "Several tasks on one
trunk").

Each task is the single-head run its config (`config.task_config`) describes: its model is
the shared trunk with that task's `score` head, so everything a single head does (pooling,
packing, BERT's token types, regression, its evaluation metrics, its Hugging Face export)
is reused as it is. The multi-task parameter tree is the trunk (every top-level key but
"score", e.g. "embed", "layers", a BERT pooler) plus "score/<task>/...", one head per task;
`TaskLayout` maps between it and each task's own model tree. A train step draws a batch for
every task and minimises sum_t weight_t * mean loss_t, each task's loss the mean over its
labelled examples (tokens for a token task), as a single-head run's is.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlm import config as config_lib
from jaxlm.finetune import trainable as subsets
from jaxlm.finetune.trainable import combine
from jaxlm.layers.sharding import activation_sharding
from jaxlm.models.factory import reusable_params, with_heads_of
from jaxlm.train import step as steps
from jaxlm.train.loop import Run, evaluate
from jaxlm.train.optimizer import make_optimizer
from jaxlm.train.options import finetune_options
from jaxlm.train.trainer import Trainer

HEAD = "score"
TASK_STREAMS = 1000  # folded into the step's key, past steps.LORA_STREAM and MLM_STREAM


class TaskLayout:
  """Maps between each task's model tree (trunk + "score") and the multi-task tree (trunk +
  "score/<task>"). Works on any tree of that nesting: parameters, shardings, masks."""

  def __init__(self, task_trees: dict[str, dict]):
    self.trunk_keys = {task: tuple(k for k in tree if k != HEAD)
                       for task, tree in task_trees.items()}

  def merge(self, task_trees: dict[str, dict]) -> dict:
    """Per-task trees (any may lack keys, e.g. a head not loaded) -> one multi-task tree;
    the trunk is taken from the first task that has each part."""
    merged, heads = {}, {}
    for task, tree in task_trees.items():
      for key in self.trunk_keys[task]:
        if key in tree:
          merged.setdefault(key, tree[key])
      if HEAD in tree:
        heads[task] = tree[HEAD]
    if heads:
      merged[HEAD] = heads
    return merged

  def view(self, tree: dict, task: str) -> dict:
    """The multi-task tree as task's own model tree."""
    return {**{k: tree[k] for k in self.trunk_keys[task]}, HEAD: tree[HEAD][task]}


@dataclasses.dataclass(frozen=True)
class TaskStep:
  """What the train step needs of one task: its model's graph and how it is scored."""
  graphdef: object
  regression: bool
  pair_separator: int | None
  weight: float


def multitask_train_step(state, batches, *, tasks: dict[str, TaskStep], layout: TaskLayout,
                         tx: optax.GradientTransformation, schedule,
                         loss_cfg: steps.LossConfig, skip_nonfinite: bool = False,
                         dropout: bool = False, adapter_dropout: bool = False,
                         activation_resolver=None):
  """One update on a batch per task (batches: task -> batch dict): the loss is
  sum_t weight_t * (task t's mean loss over its labelled examples)."""
  with activation_sharding(activation_resolver):
    step_rng = jax.random.fold_in(state["rng"], state["step"])
    frozen = state.get("frozen")

    def weighted_loss(params):
      full = params if frozen is None else combine(frozen, params)
      losses = {}
      for index, (name, task) in enumerate(tasks.items()):
        # Each task's dropout and LoRA-dropout keys, apart from the step's other streams.
        task_rng = jax.random.fold_in(step_rng, TASK_STREAMS + index)
        lora_key = jax.random.fold_in(task_rng, steps.LORA_STREAM) if adapter_dropout else None
        batch = steps.with_pair_token_types(batches[name], task.pair_separator)
        sums = steps._forward_sums(task.graphdef, layout.view(full, name), batch, loss_cfg,
                                   task_rng if dropout else None, lora_key,
                                   regression=task.regression)
        losses[name] = sums["loss_sum"] / jnp.maximum(sums["tokens"], 1.0)
      total = sum(tasks[name].weight * loss for name, loss in losses.items())
      return total, losses

    (loss, losses), grads = jax.value_and_grad(weighted_loss, has_aux=True)(state["params"])
    new_state, metrics = steps.apply_gradients(state, grads, loss, tx=tx, schedule=schedule,
                                               skip_nonfinite=skip_nonfinite)
    metrics.update({f"loss_{name}": value for name, value in losses.items()})
    return new_state, metrics


class MultiTaskTrainer(Trainer):
  """A Trainer over the multi-task tree, built from one Trainer per task (each task's model
  graph, shardings and trainable parts); state, checkpoints and shardings work as a single
  head's. eval_step is per task: `tasks[name].eval_step(layout.view(params, name), batch)`."""

  def __init__(self, tasks: dict[str, Trainer], weights: dict[str, float],
               tx: optax.GradientTransformation, schedule, *,
               loss_cfg: steps.LossConfig = steps.LossConfig(), skip_nonfinite: bool = False,
               layer_lr_decay: float | None = None, head_pattern: str = r"^(lm_head|score)/",
               head_lr_multiplier: float = 1.0):
    first = next(iter(tasks.values()))
    self.tasks = tasks
    self.model_cfg = first.model_cfg  # the trunk's architecture (and the first head)
    self.mlm, self.pair_separator, self.teacher_cfg = None, None, None
    self.token_classifier = self.regression = False
    self.lora, self.frozen_dtype = first.lora, first.frozen_dtype
    self.rules, self.mesh = first.rules, first.mesh
    abstract = {name: nnx.state(nnx.eval_shape(functools.partial(trainer._build_model, 0)))
                for name, trainer in tasks.items()}
    self.layout = TaskLayout({name: nnx.to_pure_dict(a) for name, a in abstract.items()})
    merge = self.layout.merge
    self.param_shardings = merge({n: t.param_shardings for n, t in tasks.items()})
    self.trainable_mask = merge({n: t.trainable_mask for n, t in tasks.items()})
    self.partial = not all(jax.tree.leaves(self.trainable_mask))
    self.tx = self._with_lr_multipliers(
        tx, merge({n: subsets.logical_names(a) for n, a in abstract.items()}), layer_lr_decay,
        head_pattern, head_lr_multiplier)
    self.state_shardings = self._state_shardings(
        merge({n: nnx.to_pure_dict(a) for n, a in abstract.items()}))
    self._train_fn = functools.partial(
        multitask_train_step,
        tasks={name: TaskStep(t.graphdef, t.regression, t.pair_separator, weights[name])
               for name, t in tasks.items()},
        layout=self.layout, tx=self.tx, schedule=schedule, loss_cfg=loss_cfg,
        skip_nonfinite=skip_nonfinite, dropout=self.model_cfg.dropout_rate > 0,
        adapter_dropout=self.lora is not None and self.lora.dropout > 0,
        activation_resolver=self.rules.activation_resolver())
    self._compiled_steps = {}

  def _fresh_params(self, seed):
    return self.layout.merge({n: t._fresh_params(seed) for n, t in self.tasks.items()})

  def task_params(self, params: dict, name: str) -> dict:
    """Task name's own model parameters (trunk + its head) of the multi-task tree."""
    return self.layout.view(params, name)

  def eval_step(self, params, batch):
    raise TypeError("A multi-task model is evaluated per task: "
                    "trainer.tasks[name].eval_step(trainer.task_params(params, name), batch).")


class MultiTaskData:
  """Each task's TrainData: `train` yields {task: batch} and checkpoints every loader;
  `validation` is {task: loader} (None when a task holds nothing out)."""

  def __init__(self, parts: dict):
    self.parts = parts
    self.train = TaskBatches({name: part.train for name, part in parts.items()})
    loaders = {name: part.validation for name, part in parts.items()}
    self.validation = None if any(v is None for v in loaders.values()) else loaders

  def summary(self) -> str:
    return "\n".join(f"task {name}: {part.summary()}" for name, part in self.parts.items())

  def close(self) -> None:
    for part in self.parts.values():
      part.close()


@dataclasses.dataclass(frozen=True)
class TaskBatches:
  loaders: dict

  def __next__(self) -> dict:
    return {name: next(loader) for name, loader in self.loaders.items()}

  def state(self) -> dict:
    return {name: loader.state() for name, loader in self.loaders.items()}

  def restore(self, state: dict) -> None:
    missing = sorted(set(self.loaders) - set(state))
    if missing:
      raise ValueError(f"The checkpoint's data state has no position for task(s) "
                       f"{', '.join(missing)}: it was saved by a run with other tasks.")
    for name, loader in self.loaders.items():
      loader.restore(state[name])


@dataclasses.dataclass
class MultiTaskRun(Run):
  """A Run of a config with tasks: one single-head Run per task (`task_runs`) for its data,
  checks and evaluation, and a MultiTaskTrainer over their shared trunk."""
  task_runs: dict = dataclasses.field(default_factory=dict)

  @classmethod
  def build(cls, config) -> "MultiTaskRun":
    if config.distill.teacher:
      raise config_lib.ConfigError("Distillation (distill.teacher) trains one head; unset it "
                                   "for a multi-task run (config.tasks).")
    if config.train.grad_accum_steps != 1:
      raise config_lib.ConfigError(
          "A multi-task step draws a batch for every task: set train.grad_accum_steps = 1 "
          "(and data.batch_size to the rows per task per step).")
    task_runs = {}
    for name in config_lib.task_names(config):
      try:
        task_runs[name] = Run.build(config_lib.task_config(config, name))
      except config_lib.ConfigError as e:
        raise config_lib.ConfigError(f"tasks.{name}: {e}") from None
      if not task_runs[name].model_cfg.num_labels:
        raise config_lib.ConfigError(
            f"tasks.{name} has no labels: give it data.labels (classes or tags), or "
            f"classifier = 'regression' for a number per example.")
    first = next(iter(task_runs.values()))
    tx, schedule = make_optimizer(config.optim, config.train.steps)
    options = finetune_options(config)
    trainer = MultiTaskTrainer(
        {name: run.trainer for name, run in task_runs.items()},
        {name: config_lib.task_weight(config, name) for name in task_runs}, tx, schedule,
        loss_cfg=steps.LossConfig(config.train.label_smoothing, config.train.z_loss),
        skip_nonfinite=config.train.on_nonfinite == "skip",
        **{k: options[k] for k in ("layer_lr_decay", "head_pattern", "head_lr_multiplier")})
    return cls(config, first.model_cfg, first.mesh, trainer, schedule, task_runs)

  def signature(self) -> dict:
    return {"tasks": {name: run.signature() for name, run in self.task_runs.items()}}

  def fresh_state(self):
    """The init_from trunk (and each head the source has for the task, see
    factory.reusable_params) with fresh heads and optimizer, or a random initialisation."""
    init_from = self.config.model.init_from
    if not init_from:
      return self.trainer.init_state(self.config.train.seed)
    from jaxlm.loading import load_params, read_config
    source_cfg = read_config(init_from)[0]
    base_cfg = with_heads_of(self.model_cfg, source_cfg)
    first = next(iter(self.task_runs.values())).trainer
    loaded = load_params(init_from, cfg=base_cfg,
                         shardings=first.base_param_shardings(base_cfg))
    params = self.trainer.layout.merge(
        {name: reusable_params(loaded.params, source_cfg, run.model_cfg)
         for name, run in self.task_runs.items()})
    return self.trainer.init_from_params(params, self.config.train.seed)

  def load_data(self, tokenizer_spec) -> MultiTaskData:
    return MultiTaskData({name: run.load_data(tokenizer_spec)
                          for name, run in self.task_runs.items()})

  def global_batch(self, local_rows: dict) -> dict:
    return {name: run.global_batch(local_rows[name]) for name, run in self.task_runs.items()}

  def evaluate(self, params, batches: dict, num_batches: int) -> dict:
    """Every task's evaluation metrics as eval_<task>_<metric>, and eval_loss: the weighted
    sum of the tasks' eval losses (what training minimises)."""
    metrics, total = {}, 0.0
    for name, run in self.task_runs.items():
      scores = evaluate(run, self.trainer.task_params(params, name), batches[name],
                        num_batches)
      total += config_lib.task_weight(self.config, name) * scores["eval_loss"]
      metrics.update({f"eval_{name}_{k.removeprefix('eval_')}": v for k, v in scores.items()})
    return {"eval_loss": total, **metrics}

