"""`jaxlm eval`: a model on a recipe's held-out data, built exactly as training built it.

  text / sft / chat        token-weighted loss and perplexity over the trained (loss_mask)
                           tokens, the training loop's eval_loss; with generate=True, sft and
                           chat prompts are also completed greedily and scored by BLEU, chrF
                           and ROUGE against the trained tokens
  classification / pairs   loss and perplexity, and every label in data.labels scored by the
                           log-likelihood of its target tokens after each prompt: accuracy,
                           P/R/F1, top-k and the confusion matrix; a classifier
                           (model.num_labels > 0) is scored by its head's logits instead,
                           and a regression head (number labels) by the mean squared error
                           of its predictions (loss = mse, rmse, mae) and their pearson and
                           spearman correlations with the true scores
  tagging                  a token classifier: loss, accuracy / P/R/F1 / confusion matrix over
                           words (each word's first token) and, when the tags spell entities
                           (O, B-X, I-X, ...), entity-level precision / recall / F1 (seqeval)

Rows are packed, so every example is one segment (segment_ids) of a row.

A BERT / RoBERTa encoder is scored by masked-LM: each batch is corrupted as in training, with
a fixed key (the same masks every time), and loss / perplexity are over the masked tokens.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import config as config_lib
from jaxlm.data.build import tokenize_examples
from jaxlm.data.formats import DEFAULT_PROMPTS, FIELDS, Formatter
from jaxlm.data.loader import RowBatches
from jaxlm.data.pipeline import build_train_data
from jaxlm.data.shaping import decode_scores
from jaxlm.data.tokens import TextTokenizer
from jaxlm.evaluate.metrics import (classification_metrics, format_confusion_matrix,
                                    generation_metrics, perplexity, regression_metrics)
from jaxlm.evaluate.ner import entity_metrics, is_entity_tagset, segment_tags
from jaxlm.generate.decode import generate
from jaxlm.generate.text import eos_ids
from jaxlm.loading import LoadedParams, load_params, resolve_source
from jaxlm.models.factory import abstract_model, batch_logits, is_encoder
from jaxlm.train import step as steps
from jaxlm.train.checks import check_labels
from jaxlm.train.loop import config_mesh
from jaxlm.train.options import encoder_head_options, training_tokenizer

SCORED_FORMATS = tuple(DEFAULT_PROMPTS)  # classification, pairs: a label per example
GENERATED_FORMATS = ("sft", "chat")  # a prompt and an answer per example
SPLITS = ("validation", "train")


@dataclasses.dataclass(frozen=True)
class Segment:
  """One example as a row holds it: its tokens and whether each is a training target."""
  tokens: np.ndarray
  trained: np.ndarray  # bool per token; the first token is never a target
  where: str

  @property
  def prompt(self) -> np.ndarray:
    """The tokens before the first trained one."""
    return self.tokens[:np.argmax(self.trained)]

  @property
  def answer(self) -> np.ndarray:
    """The first run of trained tokens: the reply to `prompt` (a chat's first turn)."""
    start = np.argmax(self.trained)
    untrained = np.flatnonzero(~self.trained[start:])
    return self.tokens[start:start + (untrained[0] if untrained.size else self.tokens.size)]

  @property
  def target(self) -> np.ndarray:
    return self.tokens[self.trained]


@dataclasses.dataclass(frozen=True)
class EvalModel:
  graphdef: object
  params: object
  loaded: LoadedParams
  # A BERT head on text pairs: the [SEP] id its token types follow (train.step).
  pair_separator: int | None = None


def eval_config(recipe: str | None, model: str | None, overrides=(), task: str | None = None):
  """The recipe; without one, a training workdir's own config (its data is then exactly what
  it trained on and held out; with task, that task's of a multi-task run), else the default
  recipe."""
  if recipe is None and model is not None:
    path = Path(model).expanduser()
    if path.exists() and config_lib.is_workdir(path):
      from jaxlm.loading import workdir_task_config
      config = workdir_task_config(path, task)
      config_lib.apply_overrides(config, overrides)
      config.lock()
      return config
  return config_lib.load_config(recipe or config_lib.DEFAULT_RECIPE, overrides)


def load_eval_model(path: str | Path, mesh=None, task: str | None = None) -> EvalModel:
  loaded = load_params(path, mesh=mesh, task=task)
  graphdef, _ = nnx.split(abstract_model(loaded.cfg))
  return EvalModel(graphdef, loaded.params, loaded)


def tokenizer_spec(config, model_path: str | Path, loaded: LoadedParams) -> str:
  """What training would tokenize with: a run's own tokenizer, the model directory's, else
  the recipe's."""
  if loaded.tokenizer_file:
    return loaded.tokenizer_file
  for directory in (loaded.source, resolve_source(model_path)):
    if directory is not None and (directory / "tokenizer.json").is_file():
      return str(directory)
  return training_tokenizer(config)


@functools.partial(jax.jit, static_argnames="graphdef")
def _target_log_probs(graphdef, params, input_ids, targets, positions, segment_ids):
  """log p(target) at every position [batch, seq], computed as the training loss does."""
  logits = nnx.merge(graphdef, params)(input_ids, positions, segment_ids).astype(jnp.float32)
  log_probs = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "pair_separator"))
def _head_logits(graphdef, params, inputs, pair_separator):
  inputs = steps.with_pair_token_types(inputs, pair_separator)
  return batch_logits(nnx.merge(graphdef, params), inputs)


def head_logits(model: EvalModel, batch: dict) -> jax.Array:
  """A head's float32 outputs at every token [batch, seq, num_labels], as training computes
  them (a decoder's or an encoder's)."""
  inputs = {k: batch[k] for k in ("input_ids", "positions", "segment_ids")}
  return _head_logits(model.graphdef, model.params, inputs, model.pair_separator)


def class_log_probs(model: EvalModel, batch: dict) -> np.ndarray:
  """A classifier's log-probability of each class at every token [batch, seq, classes]."""
  return np.asarray(jax.nn.log_softmax(head_logits(model, batch), axis=-1), np.float64)


def head_scores(model: EvalModel, batch: dict,
                log_probs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """A classifier's (log-probability of each class [examples, classes], true class
  [examples]) at the labelled tokens of a batch: each example's last token, or for a token
  classifier each word's first token."""
  log_probs = class_log_probs(model, batch) if log_probs is None else log_probs
  labelled = batch["loss_mask"].astype(bool)
  return log_probs[labelled], batch["targets"][labelled]


def regression_predictions(model: EvalModel, batch: dict) -> tuple[np.ndarray, np.ndarray]:
  """A regression head's (prediction [examples], true score [examples]) at the labelled
  token of each example of a batch (its last)."""
  predicted = np.asarray(head_logits(model, batch)[..., 0])
  scored = batch["loss_mask"].astype(bool)
  return predicted[scored], decode_scores(batch["targets"])[scored]


def target_log_probs(model: EvalModel, batch: dict) -> np.ndarray:
  return np.asarray(_target_log_probs(model.graphdef, model.params, batch["input_ids"],
                                      batch["targets"], batch["positions"],
                                      batch["segment_ids"]), np.float64)


def eval_rows(config, spec: str, split: str, label_head: bool = False,
              regression: bool = False) -> RowBatches:
  """The split's rows, each once; the last batch is padded with loss_mask 0 rows.
  label_head, regression: rows for a classifier or a regression head (see
  jaxlm.data.pipeline.resolve_settings)."""
  if split not in SPLITS:
    raise ValueError(f"--split must be one of {', '.join(SPLITS)}, not {split!r}.")
  if split == "validation" and not config.data.validation_fraction:
    raise ValueError("The validation split is empty: data.validation_fraction is 0. Evaluate "
                     "--split train, or hold data out with --config.data.validation_fraction.")
  data = build_train_data(config.data, spec, config.data.seq_len, config.data.batch_size,
                          config.data.seed, label_head=label_head, regression=regression)
  if split == "train":
    return RowBatches(data.train.parts, config.data.batch_size, seed=config.data.seed,
                      shuffle=False, prefetch=0)
  return data.validation


def segments(batch: dict, where: str) -> list[Segment]:
  """The examples of a batch that have trained tokens; padding (segment 0) is skipped."""
  out = []
  for r, row_segments in enumerate(batch["segment_ids"]):
    for s in np.unique(row_segments[row_segments > 0]):
      idx = np.flatnonzero(row_segments == s)
      mask = batch["loss_mask"][r, idx].astype(bool)
      if mask.any():
        tokens = np.concatenate([batch["input_ids"][r, idx[:1]], batch["targets"][r, idx]])
        out.append(Segment(tokens, np.concatenate([[False], mask]),
                           f"{where} row {r} segment {s}"))
  return out


def label_candidates(config, tok: TextTokenizer) -> list[np.ndarray]:
  """Each label's target tokens, made by the formatter and tokenized as the data cache was."""
  fmt = config.data.format
  formatter = Formatter(fmt, labels=config.data.labels,
                        prompt_template=config.data.prompt_template, tokenizer=tok)
  blank = {name: "" for name in FIELDS[fmt]}
  examples = [formatter({**blank, "label": label}) for label in formatter.labels]
  encoded = tokenize_examples(examples, tok)
  return [ids[trained] for ids, trained in encoded]


def true_labels(examples: list[Segment], candidates: list[np.ndarray], tok: TextTokenizer,
                labels) -> np.ndarray:
  ids = []
  for example in examples:
    match = [c for c, tokens in enumerate(candidates) if np.array_equal(tokens, example.target)]
    if not match:
      raise ValueError(
          f"{example.where}: its trained tokens {tok.decode(example.target)!r} are none of "
          f"data.labels {list(labels)}; was the cache built with other labels, or the label "
          f"cut off (data.overflow)?")
    ids.append(match[0])
  return np.array(ids)


def candidate_batch(prompts: list[np.ndarray], candidate: np.ndarray, seq_len: int,
                    batch_size: int) -> dict:
  """One row per prompt followed by the candidate, as the data builds a row: a long prompt
  loses its start (truncate_left), and only the candidate's tokens are targets."""
  batch = {k: np.zeros((batch_size, seq_len), np.int32)
           for k in ("input_ids", "targets", "loss_mask", "positions", "segment_ids")}
  for r, prompt in enumerate(prompts):
    tokens = np.concatenate([prompt, candidate])[-(seq_len + 1):]
    n = len(tokens) - 1
    batch["input_ids"][r, :n] = tokens[:-1]
    batch["targets"][r, :n] = tokens[1:]
    batch["loss_mask"][r, n - len(candidate):n] = 1
    batch["positions"][r, :n] = np.arange(n)
    batch["segment_ids"][r, :n] = 1
  return batch


def label_scores(model: EvalModel, examples: list[Segment], candidates: list[np.ndarray],
                 seq_len: int, batch_size: int) -> np.ndarray:
  """[examples, labels]: the summed log-probability of each label's tokens after each prompt."""
  scores = np.zeros((len(examples), len(candidates)))
  for start in range(0, len(examples), batch_size):
    prompts = [e.prompt for e in examples[start:start + batch_size]]
    for c, candidate in enumerate(candidates):
      batch = candidate_batch(prompts, candidate, seq_len, batch_size)
      summed = (target_log_probs(model, batch) * batch["loss_mask"]).sum(axis=1)
      scores[start:start + len(prompts), c] = summed[:len(prompts)]
  return scores


def stop_ids(tok: TextTokenizer, spec: str, loaded: LoadedParams) -> tuple[int, ...]:
  """End-of-text and what `jaxlm generate` stops at: the tokenizer directory's eos (a chat
  model's end of turn, which the data's end-of-text id is not) and generation_config.json's."""
  directory = Path(spec).expanduser()
  hf = types.SimpleNamespace(eos_token_id=tok.eos_id)
  if (directory / "tokenizer_config.json").is_file():
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(directory)
  return tuple(sorted({tok.eos_id, *eos_ids(hf, loaded.source)}))


def greedy_completions(model: EvalModel, tok: TextTokenizer, spec: str, examples: list[Segment], *,
                       max_new_tokens: int, batch_size: int) -> tuple[list[str], list[str]]:
  """(greedy completion of each example's prompt, its answer), decoded without special
  tokens (end-of-text, end-of-turn). spec: the tokenizer's, for its stop ids."""
  decode = lambda ids: tok.backend.decode(list(map(int, ids)), skip_special_tokens=True)
  stops = stop_ids(tok, spec, model.loaded)
  predictions = []
  for start in range(0, len(examples), batch_size):
    prompts = [e.prompt.tolist() for e in examples[start:start + batch_size]]
    outputs = generate((model.graphdef, model.params), prompts, max_new_tokens=max_new_tokens,
                       eos_ids=stops)
    predictions += map(decode, outputs)
  return predictions, [decode(e.answer) for e in examples]


def _check_task(config, tok: TextTokenizer, model_cfg, generate_text: bool) -> None:
  fmt = config.data.format
  vocab_size = model_cfg.vocab_size
  check_labels(model_cfg, config)  # a classifier's labels, as training checks them
  if model_cfg.num_labels and generate_text:
    raise ValueError(f"The model is a classifier ({model_cfg.num_labels} classes): it has no "
                     f"text to --generate.")
  if tok.vocab_size > vocab_size:
    raise ValueError(f"The tokenizer has {tok.vocab_size} tokens but the model's vocabulary "
                     f"only {vocab_size}: it was not trained with this tokenizer. Evaluate with "
                     f"its own (--config.data.tokenizer=...).")
  if fmt in SCORED_FORMATS and not config.data.labels and not steps.is_regression(model_cfg):
    raise ValueError(f"data.format = {fmt!r} is scored by its labels; set data.labels, e.g. "
                     f"--config.data.labels=\"('negative', 'positive')\".")
  if generate_text and fmt not in GENERATED_FORMATS:
    raise ValueError(f"--generate completes sft or chat prompts; data.format is {fmt!r}.")


def evaluate_model(config, model_path: str | Path | None = None, *, split: str = "validation",
                   max_batches: int | None = None, generate_text: bool = False,
                   max_new_tokens: int = 64, task: str | None = None) -> dict:
  """Metrics of a model (default: config.model.init_from; task: a head of a multi-task
  workdir) on the recipe's split: floats, plus "examples", "tokens", "split", "model", and
  "confusion_matrix" (classification) or "bleu_signature" (generate_text)."""
  model_path = model_path or config.model.init_from
  if not model_path:
    raise config_lib.ConfigError("Name the model to evaluate: --model PATH, or a recipe whose "
                                 "model.init_from is set.")
  if max_batches is not None and max_batches < 1:
    raise ValueError(f"--max-batches must be at least 1, got {max_batches}.")
  # The recipe's mesh (a workdir's training layout): parameters load sharded by their
  # logical axes, so a model too large for one device evaluates.
  model = load_eval_model(model_path, config_mesh(config), task)
  spec = tokenizer_spec(config, model_path, model.loaded)
  tok = TextTokenizer(spec, config.data.chat_template)
  head = model.loaded.cfg.num_labels > 0
  regression = steps.is_regression(model.loaded.cfg)
  _check_task(config, tok, model.loaded.cfg, generate_text)
  model = dataclasses.replace(model, pair_separator=encoder_head_options(
      config, model.loaded.cfg, spec).get("pair_separator"))
  rows = eval_rows(config, spec, split, label_head=head, regression=regression)
  if regression:
    return _evaluate_regression(model, rows, split, max_batches, model_path)
  if is_encoder(model.loaded.cfg) and not head:
    return _evaluate_mlm(config, model, tok, spec, rows, split, max_batches, model_path)
  # Text is only counted; a split of a large corpus need not be held in memory as examples.
  keep = (config.data.format in SCORED_FORMATS and not head) or generate_text
  entities = head and config.data.format == "tagging" and is_entity_tagset(config.data.labels)
  nll, tokens, count, examples, head_results = 0.0, 0, 0, [], []
  true_tags, pred_tags = [], []
  for k in range(min(max_batches or rows.batches_per_epoch, rows.batches_per_epoch)):
    batch = rows.batch(k)
    if head:
      log_probs = class_log_probs(model, batch)
      scores, labels = head_scores(model, batch, log_probs)
      nll -= float(scores[np.arange(len(labels)), labels].sum())
      head_results.append((scores, labels))
      if entities:
        true, pred = segment_tags(batch, log_probs.argmax(axis=-1), config.data.labels)
        true_tags += true
        pred_tags += pred
    else:
      nll -= float((target_log_probs(model, batch) * batch["loss_mask"]).sum())
    tokens += int(batch["loss_mask"].sum())
    found = segments(batch, f"{split} batch {k}")
    count += len(found)
    examples += found if keep else []
  if not count:
    raise ValueError(f"The {split} split has no examples with trained tokens to evaluate.")
  result = {**perplexity(nll, tokens), "examples": count, "tokens": tokens, "split": split,
            "model": str(model_path)}
  batch_size = config.data.batch_size
  if head:
    scores, labels = (np.concatenate(parts) for parts in zip(*head_results))
    result.update(classification_metrics(labels, scores.argmax(axis=1), config.data.labels,
                                         scores=scores))
    if entities:
      result.update({f"entity_{k}": v for k, v in entity_metrics(true_tags, pred_tags).items()})
  elif config.data.format in SCORED_FORMATS:
    candidates = label_candidates(config, tok)
    labels = true_labels(examples, candidates, tok, config.data.labels)
    scores = label_scores(model, examples, candidates, config.data.seq_len, batch_size)
    result.update(classification_metrics(labels, scores.argmax(axis=1), config.data.labels,
                                         scores=scores))
  if generate_text:
    predictions, references = greedy_completions(model, tok, spec, examples,
                                                 batch_size=batch_size,
                                                 max_new_tokens=max_new_tokens)
    scores, signature = generation_metrics(predictions, references)
    result.update(scores, bleu_signature=signature)
  return result


def _evaluate_regression(model: EvalModel, rows: RowBatches, split: str,
                         max_batches: int | None, model_path) -> dict:
  """The training loop's regression metrics (loss = mse), over every example of the split."""
  predictions, scores = [], []
  for k in range(min(max_batches or rows.batches_per_epoch, rows.batches_per_epoch)):
    predicted, true = regression_predictions(model, rows.batch(k))
    predictions.append(predicted)
    scores.append(true)
  count = sum(map(len, scores))
  if not count:
    raise ValueError(f"The {split} split has no examples with a score to evaluate.")
  metrics = regression_metrics(np.concatenate(scores), np.concatenate(predictions))
  return {"loss": metrics["mse"], **metrics, "examples": count, "tokens": count,
          "split": split, "model": str(model_path)}


@functools.partial(jax.jit, static_argnames=("graphdef", "mlm"))
def _mlm_sums(graphdef, params, batch, mlm):
  return steps.eval_step(params, batch, graphdef=graphdef, mlm=mlm)


def _evaluate_mlm(config, model: EvalModel, tok: TextTokenizer, spec: str, rows: RowBatches,
                  split: str, max_batches: int | None, model_path) -> dict:
  """Masked-LM loss and perplexity over the masked tokens, as training's eval_loss."""
  from jaxlm.train.mlm import tokenizer_mlm
  if config.data.format != "text":
    raise ValueError(f"A masked-LM encoder is evaluated on plain text: data.format = 'text', "
                     f"not {config.data.format!r}.")
  mlm = tokenizer_mlm(tok.backend, model.loaded.cfg.vocab_size, what=f"{spec!r}",
                      rate=config.mlm.rate, mask_fraction=config.mlm.mask_fraction,
                      random_fraction=config.mlm.random_fraction)
  nll, tokens, count = 0.0, 0, 0
  for k in range(min(max_batches or rows.batches_per_epoch, rows.batches_per_epoch)):
    batch = rows.batch(k)
    sums = jax.device_get(_mlm_sums(model.graphdef, model.params,
                                    {key: jnp.asarray(v) for key, v in batch.items()}, mlm))
    nll += float(sums["nll_sum"])
    tokens += int(sums["tokens"])
    count += sum(len(np.unique(r[r > 0])) for r in batch["segment_ids"])
  if not tokens:
    raise ValueError(f"The {split} split has no tokens to mask and evaluate.")
  return {**perplexity(nll, tokens), "examples": count, "tokens": tokens, "split": split,
          "model": str(model_path)}


def format_report(result: dict, labels=()) -> str:
  header = (f"eval: {result['model']} on the {result['split']} split: "
            f"{result['examples']:,} examples, {result['tokens']:,} trained tokens")
  lines = [header] + [f"  {key:<20} {value:.4f}" for key, value in result.items()
                      if isinstance(value, float)]
  if "confusion_matrix" in result:
    lines += ["confusion matrix:", format_confusion_matrix(result["confusion_matrix"], labels)]
  if "bleu_signature" in result:
    lines.append(f"BLEU signature: {result['bleu_signature']}")
  return "\n".join(lines)


def run_eval(args, overrides) -> dict:
  """The `jaxlm eval` command: prints the report, then the metrics as one JSON line."""
  config = eval_config(args.config, args.model, overrides, args.task)
  result = evaluate_model(config, args.model, split=args.split, max_batches=args.max_batches,
                          generate_text=args.generate, max_new_tokens=args.max_new_tokens,
                          task=args.task)
  print(format_report(result, config.data.labels))
  line = json.dumps(result)
  print(line)
  if args.out:
    Path(args.out).expanduser().write_text(line + "\n")
  return result
