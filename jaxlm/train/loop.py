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
from jaxlm.data.formats import DEFAULT_PROMPTS, HEAD_FORMATS
from jaxlm.data.loader import RowBatches
from jaxlm.data.pipeline import build_train_data
from jaxlm.data.text import load_tokenizer
from jaxlm.finetune.lora import LoRAConfig
from jaxlm.layers.flash_kernels import KERNELS, config_problem as kernel_config_problem
from jaxlm.models.factory import is_encoder, reusable_params, with_heads_of
from jaxlm.parallel.mesh import build_mesh
from jaxlm.parallel.rules import LogicalRules
from jaxlm.profiling import StepProfiler, format_table
from jaxlm.train.distill import check_mix
from jaxlm.train.early_stopping import EarlyStopping
from jaxlm.train.metrics import MetricsWriter, Progress, peak_flops_per_device
from jaxlm.train.mlm import mlm_settings, tokenizer_mlm
from jaxlm.train.optimizer import make_optimizer
from jaxlm.train.preemption import Preempted, PreemptionWatch
from jaxlm.train.step import LossConfig, is_regression
from jaxlm.train.trainer import Trainer

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  pass


FINETUNE_SIGNATURE = ("lora_targets", "lora_rank", "trainable", "freeze")


def finetune_options(config) -> dict:
  """The Trainer's arguments for config.finetune."""
  f = config.finetune
  lora = (LoRAConfig(f.lora_targets, f.lora_rank, f.lora_alpha, f.lora_dropout)
          if f.lora_targets else None)
  return dict(lora=lora, trainable=f.trainable or None, freeze=f.freeze or None,
              frozen_dtype=f.frozen_dtype or None, layer_lr_decay=f.layer_lr_decay,
              head_pattern=f.head_pattern, head_lr_multiplier=f.head_lr_multiplier)


def teacher_options(config, model_cfg) -> dict:
  """The Trainer's arguments for config.distill: the teacher's architecture (read, not
  loaded) in the student's compute dtype, and the loss mix."""
  d = config.distill
  if not d.teacher:
    return {}
  try:
    check_mix(d.temperature, d.alpha)
  except ValueError as e:
    raise config_lib.ConfigError(f"distill.temperature / distill.alpha: {e}") from None
  from jaxlm.loading import read_config
  try:
    teacher_cfg, _ = read_config(d.teacher)
  except (FileNotFoundError, ValueError) as e:
    raise config_lib.ConfigError(f"distill.teacher = {d.teacher!r}: {e}") from None
  if teacher_cfg.vocab_size != model_cfg.vocab_size:
    raise config_lib.ConfigError(
        f"The teacher {d.teacher} has a vocabulary of {teacher_cfg.vocab_size} tokens and the "
        f"student {model_cfg.vocab_size} (model.vocab_size): distillation compares their "
        f"distributions token by token, so both need the same tokenizer and vocab_size.")
  if teacher_cfg.num_labels != model_cfg.num_labels:
    raise config_lib.ConfigError(
        f"The teacher {d.teacher} has {teacher_cfg.num_labels} output classes (0: a language "
        f"model) and the student {model_cfg.num_labels} (model.num_labels): distillation "
        f"needs the same outputs.")
  dtype = model_cfg.compute_dtype
  teacher_cfg = teacher_cfg.replace(param_dtype=dtype, compute_dtype=dtype, dropout_rate=0.0)
  return dict(teacher_cfg=teacher_cfg, distill_temperature=float(d.temperature),
              distill_alpha=float(d.alpha))


def config_mesh(config):
  """config.mesh (data / fsdp / tensor sizes, -1 = the rest) over this machine's devices."""
  return build_mesh(dict(data=config.mesh.data, fsdp=config.mesh.fsdp,
                         tensor=config.mesh.tensor))


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


def training_tokenizer(config) -> str:
  """A fine-tune uses its base model's tokenizer (the directory, which also holds the chat
  template) unless the config names another."""
  init_from = config.model.init_from
  if config.data.tokenizer == "embedded" and init_from and Path(init_from).is_dir() and (
      Path(init_from) / "tokenizer.json").is_file():
    return str(Path(init_from))
  return config.data.tokenizer


def mlm_options(config, model_cfg, planning: bool = False) -> dict:
  """The Trainer's masked-LM settings for an encoder ({} for a decoder): the training
  tokenizer's mask and special tokens, and config.mlm. An encoder with a classification
  head (model.num_labels) trains that instead. planning: a step that is compiled but never
  fed data (`jaxlm plan`) needs no tokenizer; token id 0 stands in for the mask token,
  which changes no shape."""
  if not is_encoder(model_cfg) or model_cfg.num_labels:
    return {}
  if config.data.format != "text":
    raise config_lib.ConfigError(
        f"A BERT / RoBERTa encoder without a head trains by masked-LM on plain text: set "
        f"data.format = 'text', not {config.data.format!r}, or give it a classification "
        f"head with model.num_labels.")
  if config.distill.teacher:
    raise config_lib.ConfigError("Distillation (distill.teacher) trains decoders only; unset "
                                 "it for a masked-LM encoder.")
  rates = dict(rate=config.mlm.rate, mask_fraction=config.mlm.mask_fraction,
               random_fraction=config.mlm.random_fraction)
  try:
    if planning:
      return {"mlm": mlm_settings(0, (), model_cfg.vocab_size, **rates)}
    spec = training_tokenizer(config)
    return {"mlm": tokenizer_mlm(load_tokenizer(spec), model_cfg.vocab_size,
                                 what=f"data.tokenizer = {spec!r}", **rates)}
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None


SEPARATOR_TOKENS = ("[SEP]", "</s>")  # BERT's, RoBERTa's


def encoder_head_options(config, model_cfg, tokenizer_spec: str | None = None) -> dict:
  """An encoder head reads its examples as transformers' tokenizer gives them: each wrapped
  in [CLS] ... [SEP], a pair's texts joined by [SEP] in data.prompt_template, and, when the
  encoder has token types (BERT), the second text of a pair as type 1 ({"pair_separator":
  the [SEP] id} for the Trainer). {} for a decoder or a masked-LM encoder."""
  if not is_encoder(model_cfg) or not model_cfg.num_labels:
    return {}
  if not config.data.add_special_tokens:
    raise config_lib.ConfigError(
        "An encoder's classification head reads each example as its tokenizer wraps it "
        "([CLS] ... [SEP], <s> ... </s>), as transformers does: set "
        "data.add_special_tokens = True.")
  if config.data.format != "pairs":
    return {}
  tokenizer = load_tokenizer(tokenizer_spec or training_tokenizer(config))
  separator = next((t for t in SEPARATOR_TOKENS if tokenizer.token_to_id(t) is not None), None)
  template = config.data.prompt_template or ""
  at = [template.find(part) for part in ("{text_a}", separator or "[SEP]", "{text_b}")]
  if separator is None or -1 in at or at != sorted(at):
    example = {"[SEP]": "{text_a} [SEP] {text_b}", "</s>": "{text_a}</s></s>{text_b}"}
    raise config_lib.ConfigError(
        f"An encoder reads a pair as one sequence with its separator between the texts: set "
        f"data.prompt_template to e.g. {example.get(separator, example['[SEP]'])!r} (the "
        f"tokenizer's own pair encoding), not {template!r}.")
  if model_cfg.type_vocab_size < 2:
    return {}  # RoBERTa: no token types
  return {"pair_separator": int(tokenizer.token_to_id(separator))}


@dataclasses.dataclass
class Run:
  """Everything a training run is made of, built from a config."""
  config: object
  model_cfg: object
  mesh: object
  trainer: Trainer
  schedule: object

  @classmethod
  def build(cls, config, *, planning: bool = False) -> "Run":
    """planning: for a step that is compiled but never run (see mlm_options)."""
    model_cfg = config_lib.model_config(config)
    mesh = config_mesh(config)
    check_layout(model_cfg, mesh, config)
    check_labels(model_cfg, config)
    check_regression_loss(model_cfg, config)
    check_loss_chunk(model_cfg, config)
    tx, schedule = make_optimizer(config.optim, config.train.steps)
    trainer = Trainer(
        model_cfg, tx, schedule, LogicalRules(mesh, config.mesh.rules),
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
