"""Run configuration: ml_collections ConfigDicts from recipe files, command-line overrides
(`--config.optim.learning_rate=1e-3`) and checks that name the fix."""
from __future__ import annotations

import ast
import difflib
import importlib.util
import json
from pathlib import Path

import ml_collections

from jaxlm.data.pipeline import DEFAULTS as DATA_DEFAULTS
from jaxlm.models.config import FIELDS as MODEL_FIELDS
from jaxlm.models.config import LlamaConfig, from_preset
from jaxlm.models.factory import ENCODER_FIELDS, encoder_preset, is_encoder
from jaxlm.parallel.rules import DEFAULT_RULES

# Keys of earlier versions, so that old commands and workdirs get a pointer, not a guess.
RENAMED_KEYS = {"data.corpus": "data.sources"}
RECIPES_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_RECIPE = "tiny_demo"


class ConfigError(ValueError):
  pass


def base_config() -> ml_collections.ConfigDict:
  """Every recipe starts from this and changes what it needs."""
  c = ml_collections.ConfigDict()
  # A preset names the architecture; any field set here (not None) overrides the preset.
  c.model = ml_collections.ConfigDict({"preset": "tiny", "init_from": "",
                                       **{f: None for f in MODEL_FIELDS}})
  c.mesh = ml_collections.ConfigDict(
      {"data": 1, "fsdp": -1, "tensor": 1, "rules": DEFAULT_RULES,
       # Megatron-style: the residual stream split along the sequence over tensor
       "sequence_parallel": False})
  # Data sources, format, shaping and cleaning: see jaxlm/data/pipeline.py and the README.
  c.data = ml_collections.ConfigDict({
      "tokenizer": "embedded",  # "embedded", a tokenizer.json, or a model directory
      "seq_len": 256,
      "batch_size": 16,  # global, across all devices and processes
      "seed": 0,
      **DATA_DEFAULTS,
      # a count of rows (int) or a fraction of them (float)
      "error_budget": ml_collections.FieldReference(DATA_DEFAULTS["error_budget"],
                                                    field_type=object),
  })
  c.optim = ml_collections.ConfigDict({
      "name": "adamw",  # adamw | adam | sgd | adafactor | lion
      "learning_rate": 3e-4,
      "schedule": "cosine",  # constant | cosine | linear | exponential | step | wsd
      "warmup_steps": 100,
      "decay_steps": 0,  # 0: decay over train.steps
      "final_lr_ratio": 0.1,
      "transition_steps": 1000,  # exponential / step: steps per decay period
      "decay_rate": 0.5,  # exponential / step: multiplier per period
      "staircase": False,
      "boundaries": (),  # step: explicit decay steps (overrides transition_steps)
      "decay_fraction": 0.2,  # wsd: share of steps spent decaying
      "b1": 0.9,
      "b2": 0.95,
      "eps": 1e-8,
      "weight_decay": 0.1,  # never applied to norms and biases
      "momentum": 0.9,  # sgd
      "nesterov": False,  # sgd
      "grad_clip_norm": 1.0,  # 0 disables
  })
  c.train = ml_collections.ConfigDict({
      "steps": 1000,
      "seed": 0,
      "grad_accum_steps": 1,
      "label_smoothing": 0.0,
      "z_loss": 0.0,
      # > 0: a decoder's logits and loss are computed this many positions at a time (a
      # divisor of data.seq_len), so the [batch, seq, vocab] float32 logits never exist whole:
      # less memory for large vocabularies, for one more output-projection matmul.
      "loss_chunk_len": 0,
      "log_every": 10,
      "eval_every": 100,  # 0 disables evaluation
      "eval_batches": 4,
      "peak_tflops_per_device": 0.0,  # 0: look up the device kind; used for MFU only
      # Trace profile_steps steps from step profile_at (0: none) into WORKDIR/profile and
      # print where their device time went (`jaxlm profile`; TensorBoard's profile plugin).
      "profile_at": 0,
      "profile_steps": 3,
      # stop: end the run naming the step and the last good checkpoint; skip: drop the
      # update of any step whose loss or gradients are not finite, and keep going
      "on_nonfinite": "stop",
      # XLA executables kept across runs, so a resumed or repeated run loads its steps
      # instead of compiling them again ("" disables; JAX_COMPILATION_CACHE_DIR wins).
      "compilation_cache_dir": "~/.cache/jaxlm/xla",
      # Stop when `metric` (an evaluation metric, e.g. eval_loss) has not improved by more
      # than min_delta for `patience` evaluations; the best checkpoint is kept and is what
      # loading the workdir gives. "" disables.
      "early_stopping": ml_collections.ConfigDict(
          {"metric": "", "mode": "min", "patience": 3, "min_delta": 0.0}),
  })
  # What trains. Regexes match parameter paths such as "layers/attention/q_proj/kernel".
  c.finetune = ml_collections.ConfigDict({
      "lora_targets": "",  # LoRA on the projections whose path matches, e.g. "attention"
      "lora_rank": 8,
      "lora_alpha": 16.0,
      "lora_dropout": 0.0,
      "trainable": "",  # "": everything (or only the adapters with LoRA)
      "freeze": "",  # removed from the trainable set
      "frozen_dtype": "",  # e.g. "bfloat16": keep frozen weights in less memory
      "layer_lr_decay": 1.0,  # layer i learns at decay ** (num_layers - 1 - i) x the rate
      "head_pattern": "^(lm_head|score)/",
      "head_lr_multiplier": 1.0,  # learning-rate multiplier for head_pattern matches
  })
  # Knowledge distillation: the loss becomes alpha * T^2 * KL(teacher/T || student/T) +
  # (1 - alpha) * cross-entropy. teacher: anything `jaxlm convert` reads (HF or jaxlm model
  # directory, .gguf, training workdir) with the student's vocabulary; "" disables.
  c.distill = ml_collections.ConfigDict({"teacher": "", "temperature": 2.0, "alpha": 0.5})
  # Masked-LM training of an encoder (a BERT / RoBERTa model.init_from or preset): each step
  # chooses `rate` of the tokens (never special tokens or padding), of which mask_fraction
  # become the mask token and random_fraction a random token. Unused by decoders.
  c.mlm = ml_collections.ConfigDict(
      {"rate": 0.15, "mask_fraction": 0.8, "random_fraction": 0.1})
  c.checkpoint = ml_collections.ConfigDict({"every": 500, "keep": 3, "async_save": True})
  # Multi-task training: several heads on one trunk, each task its own data and labelled
  # examples (README "Several tasks on one trunk"). Each entry, by task name: any data.* key
  # (sources, format, labels, prompt_template, ...; the rest comes from data), "classifier"
  # ("sequence", "token" or "regression"; default: "token" for format "tagging", else
  # "sequence") and "weight" (of the task's loss in the total, default 1). Empty: one head.
  c.tasks = ml_collections.ConfigDict()
  return c


TASK_KEYS = ("weight", "classifier")


def task_names(config) -> list[str]:
  return list(config.tasks.keys()) if "tasks" in config else []


def task_weight(config, name: str) -> float:
  return float(config.tasks[name].get("weight", 1.0))


def task_config(config, name: str) -> ml_collections.ConfigDict:
  """The single-head config that task `name` of a multi-task config trains: its data keys
  in data, its head (classifier, num_labels = the number of its labels) in model."""
  if name not in config.tasks:
    raise ConfigError(f"No task {name!r}; the config's tasks are "
                      f"{', '.join(task_names(config)) or '(none)'}.")
  task = config.tasks[name]
  unknown = [k for k in task.keys() if k not in TASK_KEYS and k not in DATA_DEFAULTS]
  if unknown:
    close = difflib.get_close_matches(unknown[0], [*TASK_KEYS, *DATA_DEFAULTS], n=3)
    raise ConfigError(
        f"tasks.{name}.{unknown[0]} is not a task key; a task takes data.* keys "
        f"({', '.join(DATA_DEFAULTS)}), 'classifier' and 'weight'."
        + (f" Did you mean {', '.join(close)}?" if close else ""))
  single = config.copy_and_resolve_references()
  with single.unlocked():
    single.tasks = ml_collections.ConfigDict()
    for key, value in task.items():
      if key in DATA_DEFAULTS:
        single.data[key] = tuple(value) if isinstance(value, list) else value
    default = "token" if single.data.format == "tagging" else "sequence"
    single.model.classifier = task.get("classifier", default)
    single.model.num_labels = (1 if single.model.classifier == "regression"
                               else len(single.data.labels))
  return single


def resolve_recipe(path_or_name: str) -> Path:
  path = Path(path_or_name)
  if path.is_file():
    return path
  named = RECIPES_DIR / (path_or_name if path_or_name.endswith(".py") else path_or_name + ".py")
  if named.is_file():
    return named
  known = sorted(p.stem for p in RECIPES_DIR.glob("*.py")) if RECIPES_DIR.is_dir() else []
  raise ConfigError(f"No config file {path_or_name!r}. Pass a path to a .py file with "
                    f"get_config(), or a recipe name: {', '.join(known) or '(none found)'}.")


def load_config(path_or_name: str = DEFAULT_RECIPE, overrides=()) -> ml_collections.ConfigDict:
  path = resolve_recipe(path_or_name)
  spec = importlib.util.spec_from_file_location(f"jaxlm_recipe_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} defines no get_config() function.")
  config = module.get_config()
  apply_overrides(config, overrides)
  config.lock()
  return config


def fine_tune_encoder(config: ml_collections.ConfigDict, init_from: str,
                      learning_rate: float) -> ml_collections.ConfigDict:
  """A head recipe (configs/bbc_news.py, ner_zh.py) turned to a BERT / RoBERTa encoder at
  init_from: examples wrapped in its special tokens, every parameter trained (no LoRA: an
  encoder is small), BERT's Adam (b2 0.999, weight decay 0.01), 16 rows a step."""
  config.unlock()
  config.model.init_from = init_from
  config.data.add_special_tokens = True
  config.data.batch_size = 16
  config.finetune.lora_targets = ""
  config.finetune.frozen_dtype = ""
  config.optim.learning_rate = learning_rate
  config.optim.b2 = 0.999
  config.optim.weight_decay = 0.01
  return config


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for key, value in config.items():
    full = f"{prefix}{key}"
    keys.append(full)
    if isinstance(value, ml_collections.ConfigDict):
      keys.extend(flat_keys(value, full + "."))
  return keys


def _unknown_key(key: str, config) -> ConfigError:
  if key in RENAMED_KEYS:
    return ConfigError(f"Config key {key!r} is now {RENAMED_KEYS[key]!r}.")
  close = difflib.get_close_matches(key, flat_keys(config), n=3, cutoff=0.6)
  hint = f" Did you mean {', '.join(close)}?" if close else ""
  return ConfigError(f"Unknown config key {key!r}.{hint}")


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare string such as a path or a name


def set_value(config: ml_collections.ConfigDict, key: str, value) -> None:
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
      raise _unknown_key(key, config)
    node = node[part]
  if leaf not in node:
    raise _unknown_key(key, config)
  current = node[leaf]
  if isinstance(current, tuple) and isinstance(value, (list, str)):
    value = tuple(value) if isinstance(value, list) else (value,)
  try:
    with node.unlocked():
      node[leaf] = value
  except TypeError as e:
    raise ConfigError(f"Bad value for {key}: {value!r} ({e}).") from None


def apply_overrides(config, overrides) -> None:
  """overrides: ["--config.a.b=value", "config.a.b=value", "a.b=value"] or a dict."""
  items = overrides.items() if isinstance(overrides, dict) else []
  if not isinstance(overrides, dict):
    parsed = []
    for arg in overrides:
      text = arg.removeprefix("--").removeprefix("config.")
      if "=" not in text:
        raise ConfigError(f"Override {arg!r} needs the form --config.section.key=value.")
      key, raw = text.split("=", 1)
      parsed.append((key, _parse_value(raw)))
    items = parsed
  for key, value in items:
    set_value(config, key, value)


def model_config(config) -> LlamaConfig:
  """The preset, or with model.init_from the source model's own architecture, updated by
  every model field set (not None) in the config. A BERT / RoBERTa source or an encoder
  preset gives a BertConfig (models/bert.py)."""
  fields = {k: v for k, v in config.model.items()
            if k in MODEL_FIELDS and v is not None}
  source = None
  if config.model.init_from:
    from jaxlm.loading import read_config
    source, _ = read_config(config.model.init_from)
  if config.data.format == "tagging" and "classifier" not in fields:
    fields["classifier"] = "token"  # tags are read at every token
  if fields.get("classifier") == "regression" and "num_labels" not in fields:
    fields["num_labels"] = 1  # one score
  encoder = _encoder_config(config, fields, source)
  if encoder is not None:
    if config.data.shaping == "stream":
      raise ConfigError("data.shaping 'stream' makes each row one causal stream for a decoder; "
                        "an encoder reads its rows both ways: use data.shaping 'pack'.")
    return encoder
  # Stream rows hold one stream each: attention masks no document boundary.
  fields["document_mask"] = config.data.shaping != "stream"
  if isinstance(fields.get("rope_scaling"), ml_collections.ConfigDict):
    fields["rope_scaling"] = fields["rope_scaling"].to_dict()
  if source is not None:
    # Training defaults, not the source's: fp32 master weights, bf16 compute.
    defaults = {"param_dtype": "float32", "compute_dtype": "bfloat16"}
    return source.replace(**{**defaults, **fields})
  return from_preset(config.model.preset, **fields)


def _encoder_config(config, fields: dict, source):
  """The BertConfig of an encoder source (init_from's config) or preset with the fields that
  apply to it; None for a decoder."""
  if source is not None and not is_encoder(source):
    return None
  if source is None and encoder_preset(config.model.preset) is None:
    return None
  where = config.model.init_from or f"model.preset {config.model.preset!r}"
  foreign = sorted(set(fields) - set(ENCODER_FIELDS))
  if foreign:
    raise ConfigError(
        f"{where} is a BERT / RoBERTa encoder, which has no "
        f"{', '.join('model.' + k for k in foreign)}; unset them (encoder fields: "
        f"{', '.join(k for k in MODEL_FIELDS if k in ENCODER_FIELDS)}).")
  # An encoder trains one head: a classification head (model.num_labels) or, without one,
  # the masked-LM head (fresh on a BertModel source). A sequence classifier reads the
  # pooler (fresh on a *ForMaskedLM source), a token classifier does not, as in transformers.
  num_labels = fields.get("num_labels", source.num_labels if source is not None else 0)
  classifier = fields.get("classifier", source.classifier if source is not None else "sequence")
  heads = {"mlm_head": not num_labels}
  if num_labels:
    heads["pooler"] = classifier != "token"
  fields = {**heads, **fields}
  if source is None:
    return encoder_preset(config.model.preset, **fields)
  defaults = {"param_dtype": "float32", "compute_dtype": "bfloat16"}
  return source.replace(**{**defaults, **fields})


def read_workdir_config(workdir: Path) -> ml_collections.ConfigDict:
  """The config a `jaxlm train` workdir was run with (its config.json)."""
  path = workdir / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: is {workdir} a `jaxlm train` workdir?")
  saved = json.loads(path.read_text())
  saved["mesh"]["rules"] = [tuple(r) for r in saved["mesh"]["rules"]]
  config = base_config()
  # A task's keys are its own, not the base config's: they are set as they were saved.
  config.tasks = ml_collections.ConfigDict(saved.pop("tasks", {}))
  flat = _flatten(saved)
  for old, new in RENAMED_KEYS.items():
    if old in flat:
      value = flat.pop(old)
      flat[new] = value if isinstance(value, tuple) else (value,)
  config.update_from_flattened_dict(flat)
  return config


def is_workdir(path: Path) -> bool:
  config = path / "config.json"
  return (path / "checkpoints").is_dir() and config.is_file() and "mesh" in json.loads(
      config.read_text())


def _flatten(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and key != "rope_scaling":
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
  return out


ENCODER_SIGNATURE = ("vocab_size", "hidden_size", "num_layers", "num_heads", "mlp_dim",
                     "max_position_embeddings", "type_vocab_size", "pooler", "mlm_head",
                     "param_dtype")


def shape_signature(cfg: LlamaConfig) -> dict:
  """What must match for a checkpoint to be resumable by a config."""
  if is_encoder(cfg):
    sig = {"model": "encoder", **{k: getattr(cfg, k) for k in ENCODER_SIGNATURE}}
    if cfg.num_labels:  # only then, so that masked-LM runs' signatures stay as they were
      sig.update(num_labels=cfg.num_labels, classifier=cfg.classifier)
    return sig
  keys = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "mlp_dim",
          "qkv_bias", "tie_embeddings", "param_dtype")
  sig = {k: getattr(cfg, k) for k in keys}
  sig["head_dim"] = cfg.resolved_head_dim
  if cfg.num_labels:  # only then, so that language models' signatures stay as they were
    sig["num_labels"] = cfg.num_labels
  if cfg.classifier != "sequence":
    sig["classifier"] = cfg.classifier
  return sig
