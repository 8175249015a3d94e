"""Checks of a training config against its model and mesh, made before anything is
compiled: each failure names the config keys involved and the fix."""
from __future__ import annotations

from jaxlm import config as config_lib
from jaxlm.data.formats import DEFAULT_PROMPTS, HEAD_FORMATS
from jaxlm.layers.flash_kernels import KERNELS, config_problem as kernel_config_problem
from jaxlm.models.factory import is_encoder
from jaxlm.train.step import is_regression


def check_run(model_cfg, mesh, config) -> None:
  """Every check of this module, as `Run.build` makes them: layout (mesh, batch, sequence,
  settings of the loop), labels, loss."""
  check_layout(model_cfg, mesh, config)
  check_labels(model_cfg, config)
  check_regression_loss(model_cfg, config)
  check_loss_chunk(model_cfg, config)


def check_labels(model_cfg, config) -> None:
  """A classifier's head needs a label per example (a tag per word for a token classifier)
  and as many labels as it has classes; a regression head a number per example, and no
  labels."""
  fmt = config.data.format
  if model_cfg.classifier == "regression" and not model_cfg.num_labels:
    raise config_lib.ConfigError(
        "model.classifier = 'regression' is a head with one output, the score: set "
        "model.num_labels = 1.")
  if is_regression(model_cfg):
    _check_regression_data(config)
    return
  if not model_cfg.num_labels:
    if fmt == "tagging":
      raise config_lib.ConfigError(
          f"data.format = 'tagging' trains a token classifier: set model.num_labels to the "
          f"number of data.labels ({len(config.data.labels)}).")
    return
  if fmt not in HEAD_FORMATS:
    raise config_lib.ConfigError(
        f"model.num_labels = {model_cfg.num_labels} trains a classification head, which needs "
        f"data.format 'classification' or 'pairs' (rows with a label) or 'tagging' (a tag per "
        f"word), not {fmt!r}; or set model.num_labels = 0 for a language model.")
  wanted = "token" if fmt == "tagging" else "sequence"
  if model_cfg.classifier != wanted:
    raise config_lib.ConfigError(
        f"data.format = {fmt!r} needs a {wanted} classifier, but the model is a "
        f"{model_cfg.classifier} classifier (model.classifier = {model_cfg.classifier!r}, or "
        f"that of model.init_from); set model.classifier = {wanted!r}.")
  if len(config.data.labels) != model_cfg.num_labels:
    raise config_lib.ConfigError(
        f"The classification head has model.num_labels = {model_cfg.num_labels} classes but "
        f"data.labels names {len(config.data.labels)} ({list(config.data.labels)}); make them "
        f"agree.")


def _check_regression_data(config) -> None:
  fmt = config.data.format
  if fmt not in DEFAULT_PROMPTS:
    raise config_lib.ConfigError(
        f"A regression head (model.classifier = 'regression') reads a number per example: "
        f"set data.format to 'classification' ({{text, label}}) or 'pairs' ({{text_a, text_b, "
        f"label}}) with a number as the label, not {fmt!r}.")
  if config.data.labels:
    raise config_lib.ConfigError(
        f"data.labels names classes ({list(config.data.labels)}), but a regression head "
        f"(model.classifier = 'regression') predicts each row's number label: unset "
        f"data.labels, or train a classifier (model.classifier = 'sequence', "
        f"model.num_labels = {len(config.data.labels)}).")


def check_regression_loss(model_cfg, config) -> None:
  """A regression head trains by squared error alone: there are no classes to smooth, no
  softmax normaliser for z-loss to hold and no teacher distribution to match."""
  if not is_regression(model_cfg):
    return
  given = [name for name, value in (("train.label_smoothing", config.train.label_smoothing),
                                    ("train.z_loss", config.train.z_loss),
                                    ("distill.teacher", config.distill.teacher)) if value]
  if given:
    raise config_lib.ConfigError(
        f"A regression head (model.classifier = 'regression') trains by squared error, to "
        f"which {' and '.join(given)} do not apply; unset {'it' if len(given) == 1 else 'them'}.")


def check_loss_chunk(model_cfg, config) -> None:
  """train.loss_chunk_len splits a decoder's language-model loss along the sequence."""
  chunk_len, seq_len = config.train.loss_chunk_len, config.data.seq_len
  if not chunk_len:
    return
  if chunk_len < 0 or seq_len % chunk_len:
    raise config_lib.ConfigError(
        f"train.loss_chunk_len = {chunk_len} must divide data.seq_len = {seq_len} (e.g. "
        f"{_largest_divisor_at_most(seq_len, 512)}), or be 0 for no chunking.")
  applies_to = [why for why, given in (
      ("an encoder", is_encoder(model_cfg)),
      ("a classification or regression head", model_cfg.num_labels > 0),
      ("distillation (distill.teacher)", bool(config.distill.teacher))) if given]
  if applies_to:
    raise config_lib.ConfigError(
        f"train.loss_chunk_len chunks a decoder's language-model loss over its vocabulary; "
        f"it does not apply to {applies_to[0]}: set train.loss_chunk_len = 0.")


def _largest_divisor_at_most(n: int, limit: int) -> int:
  return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def check_layout(model_cfg, mesh, config) -> None:
  """Catches layouts that cannot work before anything is compiled, with the fix."""
  if config.train.on_nonfinite not in ("stop", "skip"):
    raise config_lib.ConfigError(
        f"train.on_nonfinite must be 'stop' or 'skip', not {config.train.on_nonfinite!r}.")
  profile_at, profile_steps = config.train.profile_at, config.train.profile_steps
  if profile_at < 0 or profile_at == 1 or profile_steps < 1:
    raise config_lib.ConfigError(
        f"train.profile_at = {profile_at}, train.profile_steps = {profile_steps}: profile_at "
        f"is 0 (no trace) or a step after the first, which compiles (2 or later), and "
        f"profile_steps is at least 1.")
  if model_cfg.attention_impl in KERNELS and (problem := kernel_config_problem(
      model_cfg.attention_impl, config.data.seq_len, sliding_window=None)):
    raise config_lib.ConfigError(f"{problem.removesuffix('.')} (data.seq_len).")
  if model_cfg.position_embedding == "learned" and config.data.seq_len > model_cfg.max_seq_len:
    raise config_lib.ConfigError(
        f"data.seq_len = {config.data.seq_len} is longer than the model's learned position "
        f"table (max_seq_len = {model_cfg.max_seq_len}); use data.seq_len <= "
        f"{model_cfg.max_seq_len}.")
  tensor = mesh.shape["tensor"]
  for name, count in (("num_heads", model_cfg.num_heads),
                      ("num_kv_heads", model_cfg.num_kv_heads)):
    if count % tensor:
      raise config_lib.ConfigError(
          f"model.{name} = {count} is not divisible by mesh.tensor = {tensor}; use a tensor "
          f"size that divides {count}.")
  if config.mesh.sequence_parallel and config.data.seq_len % tensor:
    raise config_lib.ConfigError(
        f"mesh.sequence_parallel splits the sequence over mesh.tensor = {tensor}, which does "
        f"not divide data.seq_len = {config.data.seq_len}; use a seq_len that is a multiple "
        f"of {tensor}.")
  batch_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = config.data.batch_size // config.train.grad_accum_steps
  if config.data.batch_size % config.train.grad_accum_steps:
    raise config_lib.ConfigError(
        f"data.batch_size = {config.data.batch_size} is not divisible by "
        f"train.grad_accum_steps = {config.train.grad_accum_steps}.")
  if micro % batch_parallel:
    raise config_lib.ConfigError(
        f"The per-step batch ({micro} = data.batch_size / train.grad_accum_steps) is not "
        f"divisible by the data-parallel size data x fsdp = {batch_parallel}; use a batch "
        f"that is a multiple of {batch_parallel * config.train.grad_accum_steps}.")
