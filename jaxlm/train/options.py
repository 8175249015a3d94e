"""The Trainer's arguments that a config's finetune, distill, mlm and encoder-head settings
give, and the tokenizer a run trains with."""
from __future__ import annotations

from pathlib import Path

from jaxlm import config as config_lib
from jaxlm.data.text import load_tokenizer
from jaxlm.finetune.lora import LoRAConfig
from jaxlm.models.factory import is_encoder
from jaxlm.train.distill import check_mix
from jaxlm.train.mlm import mlm_settings, tokenizer_mlm


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
