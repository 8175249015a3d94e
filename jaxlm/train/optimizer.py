"""Optax optimizers and learning-rate schedules from config."""
from __future__ import annotations

import re

import jax
import numpy as np
import optax

OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor", "lion")
SCHEDULES = ("constant", "cosine", "linear", "exponential", "step", "wsd")

# Norm scales and biases are not decayed: shrinking them towards zero only hurts.
NO_DECAY = re.compile(r"(norm|bias)")


def make_schedule(cfg, total_steps: int) -> optax.Schedule:
  """cfg: the `optim` config section. Every schedule starts with `warmup_steps` of linear
  warm-up from 0; decays run until `decay_steps` (default: total_steps) and end at
  learning_rate * final_lr_ratio."""
  peak, warmup = cfg.learning_rate, cfg.warmup_steps
  decay_steps = cfg.decay_steps or total_steps
  final = peak * cfg.final_lr_ratio
  after = max(decay_steps - warmup, 1)
  kind = cfg.schedule
  if kind == "constant":
    main = optax.constant_schedule(peak)
  elif kind == "cosine":
    main = optax.cosine_decay_schedule(peak, after, alpha=cfg.final_lr_ratio)
  elif kind == "linear":
    main = optax.linear_schedule(peak, final, after)
  elif kind == "exponential":
    main = optax.exponential_decay(peak, cfg.transition_steps, cfg.decay_rate,
                                   staircase=cfg.staircase, end_value=final or None)
  elif kind == "step":
    boundaries = list(cfg.boundaries) or list(range(cfg.transition_steps, after,
                                                    cfg.transition_steps))
    main = optax.piecewise_constant_schedule(peak, {b: cfg.decay_rate for b in boundaries})
  elif kind == "wsd":
    # Warmup-stable-decay: hold the peak, then decay linearly over the last decay_fraction.
    decay_len = max(int(round(after * cfg.decay_fraction)), 1)
    main = optax.join_schedules(
        [optax.constant_schedule(peak), optax.linear_schedule(peak, final, decay_len)],
        [after - decay_len])
  else:
    raise ValueError(f"Unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def decay_mask(params):
  def keep(path, _):
    return not NO_DECAY.search("/".join(str(getattr(k, "key", k)) for k in path))

  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = make_schedule(cfg, total_steps)
  wd = cfg.weight_decay
  name = cfg.name
  if name == "adamw":
    core = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd,
                       mask=decay_mask)
  elif name == "adam":
    core = optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  elif name == "sgd":
    core = optax.chain(optax.add_decayed_weights(wd, mask=decay_mask),
                       optax.sgd(schedule, momentum=cfg.momentum or None,
                                 nesterov=cfg.nesterov))
  elif name == "adafactor":
    core = optax.adafactor(schedule, weight_decay_rate=wd or None,
                           weight_decay_mask=decay_mask)
  elif name == "lion":
    core = optax.lion(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=wd, mask=decay_mask)
  else:
    raise ValueError(f"Unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
  if cfg.grad_clip_norm:
    core = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), core)
  return core, schedule


def lr_multipliers(names: dict, *, num_layers: int, layer_decay: float | None = None,
                   head_pattern: str | None = None, head_multiplier: float = 1.0,
                   embedding_pattern: str = r"^embed/") -> dict:
  """Per-parameter learning-rate multipliers (a pure dict like `names`, each parameter's
  logical axis names). Layer-wise decay: layer i of a stack (leading "layers" axis) gets
  decay ** (num_layers - 1 - i), shaped [layers, 1, ...] to scale each layer's slice of the
  shared array; embeddings sit below the first layer, at decay ** num_layers. Parameters
  matching head_pattern (e.g. a freshly initialised head) get head_multiplier."""
  decay = 1.0 if layer_decay is None else layer_decay

  def one(path, axes):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if head_pattern and re.search(head_pattern, name):
      return np.float32(head_multiplier)
    if axes and axes[0] == "layers":
      per_layer = decay ** (num_layers - 1 - np.arange(num_layers, dtype=np.float64))
      return per_layer.astype(np.float32).reshape((num_layers,) + (1,) * (len(axes) - 1))
    if re.search(embedding_pattern, name):
      return np.float32(decay ** num_layers)
    return np.float32(1.0)

  return jax.tree_util.tree_map_with_path(one, names, is_leaf=lambda x: isinstance(x, tuple))


def scale_by_multipliers(multipliers: dict) -> optax.GradientTransformation:
  """Multiplies each update by its (broadcast) multiplier; stateless, so it adds no
  optimizer state. Chained last, it scales the learning rate, weight decay included."""
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, multipliers), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)
