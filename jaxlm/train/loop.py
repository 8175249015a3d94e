"""`jaxlm train`: config -> mesh + model + optimizer -> sharded state -> steps, metrics and
checkpoints, resuming from the workdir's latest checkpoint when there is one."""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import jax
import numpy as np

from jaxlm import config as config_lib
from jaxlm.checkpoint import Checkpointer
from jaxlm.data.loader import RowBatches
from jaxlm.data.pipeline import build_train_data
from jaxlm.data.text import load_tokenizer
from jaxlm.models.factory import reusable_params, with_heads_of
from jaxlm.parallel.mesh import build_mesh
from jaxlm.parallel.rules import LogicalRules, sequence_parallel_rules
from jaxlm.profiling import StepProfiler, format_table
from jaxlm.train.checks import check_run
from jaxlm.train.early_stopping import EarlyStopping
from jaxlm.train.metrics import MetricsWriter, Progress, peak_flops_per_device
from jaxlm.train.optimizer import make_optimizer
from jaxlm.train.options import (encoder_head_options, finetune_options, mlm_options,
                                 teacher_options, training_tokenizer)
from jaxlm.train.preemption import Preempted, PreemptionWatch
from jaxlm.train.step import LossConfig
from jaxlm.train.trainer import Trainer

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  pass


FINETUNE_SIGNATURE = ("lora_targets", "lora_rank", "trainable", "freeze")


def config_mesh(config, devices=None):
  """config.mesh (data / fsdp / tensor sizes, -1 = the rest) over this machine's devices, or
  over `devices` (e.g. a GPU target's, to compile for)."""
  return build_mesh(dict(data=config.mesh.data, fsdp=config.mesh.fsdp,
                         tensor=config.mesh.tensor), devices)


def config_rules(config):
  """config.mesh.rules, with the residual stream split over tensor under
  mesh.sequence_parallel."""
  rules = config.mesh.rules
  return sequence_parallel_rules(rules) if config.mesh.sequence_parallel else rules


@dataclasses.dataclass
class Run:
  """Everything a training run is made of, built from a config."""
  config: object
  model_cfg: object
  mesh: object
  trainer: Trainer
  schedule: object

  @classmethod
  def build(cls, config, *, planning: bool = False, devices=None) -> "Run":
    """planning: for a step that is compiled but never run (see mlm_options), over
    `devices` when given (default: this machine's)."""
    model_cfg = config_lib.model_config(config)
    mesh = config_mesh(config, devices)
    check_run(model_cfg, mesh, config)
    tx, schedule = make_optimizer(config.optim, config.train.steps)
    trainer = Trainer(
        model_cfg, tx, schedule, LogicalRules(mesh, config_rules(config)),
        loss_cfg=LossConfig(config.train.label_smoothing, config.train.z_loss,
                            config.train.loss_chunk_len),
        grad_accum_steps=config.train.grad_accum_steps,
        skip_nonfinite=config.train.on_nonfinite == "skip", **finetune_options(config),
        **teacher_options(config, model_cfg), **mlm_options(config, model_cfg, planning),
        **encoder_head_options(config, model_cfg))
    return cls(config, model_cfg, mesh, trainer, schedule)

  def signature(self) -> dict:
    """What a checkpoint must match to be resumed by this run: the model's shapes and, when
    only part of it trains, which part (a checkpoint then holds only that part)."""
    signature = config_lib.shape_signature(self.model_cfg)
    if self.trainer.partial or self.trainer.lora is not None:
      signature["finetune"] = {key: self.config.finetune[key] for key in FINETUNE_SIGNATURE}
    return signature

  def fresh_state(self):
    """The state a new run starts from: the init_from model (with fresh adapters and
    optimizer), or a random initialisation."""
    if self.config.model.init_from:
      from jaxlm.loading import load_params, read_config
      # The source as it is, then what this model reuses: a new classification head on a
      # language model, another head on a classifier, a fresh MLM head on a BertModel.
      source_cfg = read_config(self.config.model.init_from)[0]
      base_cfg = with_heads_of(self.model_cfg, source_cfg)
      loaded = load_params(self.config.model.init_from, cfg=base_cfg,
                           shardings=self.trainer.base_param_shardings(base_cfg))
      params = reusable_params(loaded.params, source_cfg, self.model_cfg)
      return self.trainer.init_from_params(params, self.config.train.seed)
    return self.trainer.init_state(self.config.train.seed)

  def load_teacher(self):
    """The distillation teacher's parameters (None without one): loaded once, sharded on
    this run's mesh, frozen; passed to every train step and never checkpointed."""
    if self.trainer.teacher_cfg is None:
      return None
    return self.trainer.load_teacher(self.config.distill.teacher)

  def load_data(self, tokenizer_spec):
    """The run's TrainData: its training and validation loaders over the tokenized cache."""
    config = self.config
    return build_train_data(
        config.data, tokenizer_spec, config.data.seq_len, config.data.batch_size,
        config.data.seed, jax.process_index(), jax.process_count(),
        label_head=self.model_cfg.num_labels > 0, regression=self.trainer.regression)

  def evaluate(self, params, batches: RowBatches, num_batches: int) -> dict:
    return evaluate(self, params, batches, num_batches)

  def global_batch(self, local_rows: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assembles each process's rows into global arrays sharded over data x fsdp."""
    out = {}
    for key, rows in local_rows.items():
      global_shape = (rows.shape[0] * jax.process_count(),) + rows.shape[1:]
      sharding = self.trainer.rules.sharding(("batch",) + (None,) * (rows.ndim - 1),
                                             global_shape, "batch " + key)
      out[key] = jax.make_array_from_process_local_data(sharding, rows, global_shape)
    return out


def build_run(config) -> Run:
  """A Run, or with config.tasks a MultiTaskRun (several heads on one trunk)."""
  if config_lib.task_names(config):
    from jaxlm.train.multitask import MultiTaskRun
    return MultiTaskRun.build(config)
  return Run.build(config)


def evaluate(run: Run, params, batches: RowBatches, num_batches: int) -> dict:
  """Loss and perplexity over the first num_batches validation batches; for a classifier,
  its loss and accuracy / macro and weighted F1 instead (of its words, for a token
  classifier, plus entity-level precision / recall / F1 when the tags spell entities); for
  a regression head, see evaluate_regression."""
  if run.trainer.regression:
    return evaluate_regression(run, params, batches, num_batches)
  from jaxlm.evaluate.ner import entity_metrics, is_entity_tagset, segment_tags
  labels = run.config.data.labels
  entities = run.trainer.token_classifier and is_entity_tagset(labels)
  nll, tokens, confusion, true_tags, pred_tags = 0.0, 0.0, 0.0, [], []
  for k in range(min(num_batches, batches.batches_per_epoch)):
    rows = batches.batch(k)
    sums = jax.device_get(run.trainer.eval_step(params, run.global_batch(rows)))
    nll += float(sums["nll_sum"])
    tokens += float(sums["tokens"])
    confusion = confusion + sums.get("confusion", 0.0)
    if entities:
      # Every process holds the whole replicated prediction; its own rows are its slice.
      first = jax.process_index() * len(rows["segment_ids"])
      local = np.asarray(sums["predictions"])[first:first + len(rows["segment_ids"])]
      true, pred = segment_tags(rows, local, labels)
      true_tags += true
      pred_tags += pred
  loss = nll / max(tokens, 1.0)
  if not run.model_cfg.num_labels:
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
  metrics = {"eval_loss": loss,
             **classifier_metrics(np.rint(confusion).astype(np.int64), labels)}
  if entities:
    scores = entity_metrics(true_tags, pred_tags)
    metrics.update({f"eval_entity_{k}": scores[k] for k in ("precision", "recall", "f1")})
  return metrics


def evaluate_regression(run: Run, params, batches: RowBatches, num_batches: int) -> dict:
  """eval_loss (the mean squared error, = eval_mse), eval_rmse, eval_mae, eval_pearson and
  eval_spearman of a regression head's predictions over the first num_batches validation
  batches, one per example."""
  from jaxlm.evaluate.metrics import regression_metrics
  predictions, scores = [], []
  for k in range(min(num_batches, batches.batches_per_epoch)):
    out = jax.device_get(run.trainer.eval_step(params, run.global_batch(batches.batch(k))))
    # Replicated, the whole global batch: every process computes the same metrics, so all
    # take the same early-stopping decision.
    scored = np.asarray(out["loss_mask"]).astype(bool)
    predictions.append(np.asarray(out["predictions"])[scored])
    scores.append(np.asarray(out["scores"])[scored])
  metrics = regression_metrics(np.concatenate(scores), np.concatenate(predictions))
  return {"eval_loss": metrics["mse"], **{f"eval_{k}": v for k, v in metrics.items()}}


def classifier_metrics(confusion: np.ndarray, label_names) -> dict:
  """eval_accuracy, eval_f1_macro and eval_f1_weighted of a confusion matrix [true, predicted]
  (scikit-learn's, on the predictions it counts)."""
  from jaxlm.evaluate.metrics import classification_metrics
  classes = len(label_names)
  pairs = np.repeat(np.arange(classes * classes), confusion.ravel())
  metrics = classification_metrics(pairs // classes, pairs % classes, label_names)
  return {f"eval_{k}": metrics[k] for k in ("accuracy", "f1_macro", "f1_weighted")}


def _early_stopping(config, val_data) -> EarlyStopping | None:
  settings = config.train.early_stopping
  if not settings.metric:
    return None
  if val_data is None:
    raise config_lib.ConfigError(
        f"train.early_stopping.metric = {settings.metric!r} needs evaluation: set "
        f"train.eval_every > 0 and data.validation_fraction > 0.")
  try:
    return EarlyStopping(settings.metric, settings.mode, settings.patience, settings.min_delta)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None


def _check_finite(metrics: dict, step: int, checkpointer: Checkpointer) -> None:
  """The step's loss and gradients, and the parameters it produced, must be finite."""
  bad = [k for k in ("loss", "grad_norm", "param_norm") if not math.isfinite(float(metrics[k]))]
  if bad and not int(metrics["skipped"]):
    last = checkpointer.latest_step()
    raise NonFiniteLossError(
        f"Non-finite {' and '.join(bad)} at step {step} (loss={float(metrics['loss'])}, "
        f"grad_norm={float(metrics['grad_norm'])}, updated param_norm="
        f"{float(metrics['param_norm'])}). Nothing was saved for it; the last good "
        f"checkpoint is {'step ' + str(last) if last is not None else 'none'} in "
        f"{checkpointer.directory}. Lower optim.learning_rate or enable optim.grad_clip_norm.")


def use_compilation_cache(directory: str) -> None:
  """JAX's persistent compilation cache in `directory`, unless one is set already (e.g. by
  JAX_COMPILATION_CACHE_DIR) or `directory` is empty. Only programs that took a second or
  more to compile are kept (JAX's default threshold)."""
  if directory and not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", str(Path(directory).expanduser()))


def train(config, workdir: str | Path) -> dict:
  """Trains until config.train.steps; returns the last logged metrics."""
  workdir = Path(workdir).expanduser().absolute()
  use_compilation_cache(config.train.compilation_cache_dir)
  is_main = jax.process_index() == 0
  run = build_run(config)
  model_cfg, trainer = run.model_cfg, run.trainer
  signature = run.signature()

  tokenizer_spec = training_tokenizer(config)
  tokenizer_vocab = load_tokenizer(tokenizer_spec).get_vocab_size()
  if tokenizer_vocab > model_cfg.vocab_size:
    raise config_lib.ConfigError(
        f"The tokenizer has {tokenizer_vocab} tokens but model.vocab_size is "
        f"{model_cfg.vocab_size}; set --config.model.vocab_size={tokenizer_vocab} or more.")
  loaded_data = run.load_data(tokenizer_spec)
  data = loaded_data.train
  val_data = loaded_data.validation if config.train.eval_every else None

  stopper = _early_stopping(config, val_data)
  checkpointer = Checkpointer(workdir / "checkpoints", every=config.checkpoint.every,
                              keep=config.checkpoint.keep,
                              async_save=config.checkpoint.async_save,
                              best_metric=stopper.metric if stopper else "",
                              best_mode=stopper.mode if stopper else "min")
  # Checkpoints hold what trains; a frozen base is rebuilt from where it came from.
  restored = checkpointer.restore_latest_good(trainer.abstract_state(frozen=False), signature)
  if restored is not None:
    latest, state, data_state = restored
    if trainer.partial:
      state = trainer.resume_state(state, run.fresh_state())
    data.restore(data_state)
    if is_main:
      print(f"Resuming from step {latest} in {checkpointer.directory}", flush=True)
  else:
    state = run.fresh_state()
    if is_main and config.model.init_from:
      print(f"Initialised from {config.model.init_from}", flush=True)
  teacher = run.load_teacher()
  if is_main and teacher is not None:
    print(f"Distilling from {config.distill.teacher}", flush=True)
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

  start = int(jax.device_get(state["step"]))
  total = config.train.steps
  if stopper and (best := checkpointer.best()) is not None:
    stopper.resume(best[0], best[1].get(stopper.metric), start, config.train.eval_every)
    if stopper.exhausted:  # this run already stopped early: nothing left to do
      total = start
  # A multi-task step reads a batch for every task.
  tokens_per_step = (config.data.batch_size * config.data.seq_len
                     * max(1, len(config_lib.task_names(config))))
  flops_per_step = model_cfg.flops_per_token(config.data.seq_len) * tokens_per_step
  peak = peak_flops_per_device(config.train.peak_tflops_per_device)
  writer = MetricsWriter(workdir, enabled=is_main)
  progress = Progress(total, start, enabled=is_main)
  if is_main:
    progress.write(loaded_data.summary())
    progress.write(f"model: {model_cfg.num_params() / 1e6:.2f}M params | mesh "
                   f"{dict(run.mesh.shape)} | {jax.device_count()} x "
                   f"{jax.devices()[0].device_kind} | {tokens_per_step:,} tokens/step")

  # Everything opened from here on is closed in the finally, whatever raises first.
  profiler = preemption = None
  pending = 0
  try:
    if val_data is not None and start == 0:
      # The starting point, so that a fine-tune's gain is visible from its first eval.
      baseline = run.evaluate(trainer.model_params(state), val_data, config.train.eval_batches)
      if stopper and stopper.metric not in baseline:
        raise config_lib.ConfigError(
            f"train.early_stopping.metric = {stopper.metric!r} is not an evaluation metric; "
            f"choose one of {', '.join(sorted(baseline))}.")
      writer.write(0, baseline)
      if is_main:
        progress.write("step 0: " + " ".join(f"{k} {v:.4f}" for k, v in baseline.items()
                                              if k != "eval_perplexity"))

    if config.train.profile_at:
      trace_dir = workdir / "profile"
      if jax.process_count() > 1:  # each process traces its own devices
        trace_dir = trace_dir / f"process_{jax.process_index()}"
      profiler = StepProfiler(trace_dir, config.train.profile_at, config.train.profile_steps)
    last_logged: dict = {}
    skipped = None  # summed on device: no sync per step
    preemption = PreemptionWatch(config.train.log_every)
    timer = time.perf_counter()
    timed_steps = 0
    for step in range(start, total):
      if profiler:
        profiler.before(step + 1, state)
      state, metrics = trainer.train_step(state, run.global_batch(next(data)), teacher)
      done = step + 1
      if profiler and (summary := profiler.after(done, (state, metrics))) and is_main:
        progress.write(f"profile failed, training goes on: {summary['error']}"
                       if "error" in summary else
                       f"{format_table(summary)}\n(trace in {profiler.directory}: TensorBoard's "
                       f"profile plugin, or `jaxlm profile {profiler.directory} --steps "
                       f"{config.train.profile_steps}`)")
      pending += 1
      # Started from the step's own count, so that every sum sees one sharding: one compile.
      skipped = metrics["skipped"] if skipped is None else skipped + metrics["skipped"]
      if step == start:
        # The first step includes compilation: report it and start timing afterwards.
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - timer
        if is_main:
          progress.write(f"step {done}: compiled and ran in {compile_s:.1f}s")
        timer, timed_steps = time.perf_counter(), 0
      else:
        timed_steps += 1
      eval_now = val_data is not None and (done % config.train.eval_every == 0 or done == total)
      log_now = done % config.train.log_every == 0 or done == total or eval_now
      # With early stopping every evaluated step is saved, so that the best one exists.
      will_save = checkpointer.manager.should_save(done) or done == total or (
          eval_now and stopper is not None)
      if log_now or will_save:
        host = jax.device_get(metrics)
        _check_finite(host, done, checkpointer)
      if log_now:
        elapsed = time.perf_counter() - timer
        step_time = elapsed / timed_steps if timed_steps else float("nan")
        tokens_per_s = tokens_per_step / step_time if timed_steps else float("nan")
        last_logged = {
            "loss": float(host["loss"]),
            # A regression head's loss is a squared error: it has no perplexity.
            **({"perplexity": math.exp(min(float(host["nll"]), 50.0))} if "nll" in host
               else {}),
            "learning_rate": float(host["learning_rate"]),
            "grad_norm": float(host["grad_norm"]), "param_norm": float(host["param_norm"]),
            "step_time_s": step_time,
            "skipped_steps": int(skipped),
            "tokens_per_s": tokens_per_s, "tokens_seen": done * tokens_per_step,
            "mfu": (flops_per_step / step_time / (peak * jax.device_count())
                    if peak and timed_steps else None),
        }
        last_logged.update({k: float(v) for k, v in host.items() if k.startswith("loss_")})
        if config.train.z_loss and "z_loss" in host:
          last_logged["z_loss"] = float(host["z_loss"])
        if teacher is not None:
          last_logged["distill_kl"] = float(host["distill_kl"])
          last_logged["hard_loss"] = float(host["hard_loss"])
        if eval_now:
          last_logged.update(run.evaluate(trainer.model_params(state), val_data,
                                          config.train.eval_batches))
        writer.write(done, last_logged)
        progress.update(pending, last_logged)
        pending = 0
        timer, timed_steps = time.perf_counter(), 0
      stop_early = bool(eval_now and stopper and stopper.update(done, last_logged))
      stop = preemption.should_stop(done)
      if stop and not will_save:
        _check_finite(jax.device_get(metrics), done, checkpointer)
      if will_save or stop:
        checkpointer.save(
            done, trainer.checkpoint_state(state), data.state(), signature,
            force=done == total or stop or eval_now,
            metrics={stopper.metric: last_logged[stopper.metric]} if stopper and eval_now
            else None)
      if stop:
        raise Preempted(done, checkpointer.directory)
      if stop_early:
        last_logged["stopped_early_at"] = done
        if is_main:
          progress.write(
              f"Early stop at step {done}: {stopper.metric} has not improved for "
              f"{stopper.patience} evaluations; best {stopper.best:.4f} at step "
              f"{stopper.best_step} (kept; loading this workdir gives it).")
        break
    if stopper and is_main:
      checkpointer.wait()
      stopper.write_best(workdir)
  finally:
    if profiler:
      profiler.close()
    loaded_data.close()
    if preemption:
      preemption.close()
    progress.update(pending)
    progress.close()
    writer.close()
    checkpointer.close()
  return last_logged
