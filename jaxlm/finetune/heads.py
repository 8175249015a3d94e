"""Task heads on a pretrained trunk: sequence classification, token classification (NER) and
regression, several at once on one trunk pass, with their losses.

A `TaskModel` holds a trunk (a `Llama` decoder or a `Bert` encoder) and named heads, so head
parameters live at "heads/<task>/kernel" and "heads/<task>/bias". A batch is a dict with
"input_ids" [b, t], optionally "attention_mask" (1 = token, 0 = padding), "token_type_ids"
(encoders), "positions" / "segment_ids" (decoders), and for the losses "labels", a dict
task -> labels ([b] class ids, [b, t] token class ids, or [b] floats for regression).

Unlabelled examples are marked, not dropped, so that one batch can mix tasks: class id
IGNORE (-100, as in transformers) for a row or token of a classification task, NaN for a row
of a regression task.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.layers.dropout import dropout
from jaxlm.layers.linear import float32_logits
from jaxlm.layers.sharding import param
from jaxlm.train.loss import cross_entropy

IGNORE = -100
KINDS = ("sequence", "token", "regression")
POOLINGS = ("last", "first", "mean", "pooler")


def last_token_index(mask: jax.Array) -> jax.Array:
  """The position of the rightmost nonzero of each row of mask [b, t] (0 for an empty row).

  Taking the mask rather than guessing from where the pad id sits makes right and left
  padding alike, and stays right when the pad id also ends real text (GPT-2 pads with its
  end-of-text token). Without a mask, pass `input_ids != pad_id`: the rightmost non-pad
  token, which is what transformers' *ForSequenceClassification pools."""
  positions = jnp.arange(mask.shape[1])
  return jnp.max(jnp.where(mask.astype(bool), positions, 0), axis=1)


def last_token(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """The hidden state of each row's last real token: the only one a causal decoder lets see
  the whole text."""
  index = last_token_index(mask)
  return jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]


def first_token(hidden: jax.Array) -> jax.Array:
  """The hidden state of the first token, an encoder's [CLS] / <s>."""
  return hidden[:, 0]


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """The float32 mean of the hidden states where mask is nonzero (zeros for an empty row)."""
  weights = mask.astype(jnp.float32)[..., None]
  total = jnp.sum(hidden.astype(jnp.float32) * weights, axis=1)
  return total / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


class _Projection(nnx.Module):
  """Dropout, then x @ kernel + bias over the last axis, with float32 outputs."""

  def __init__(self, hidden: int, num_outputs: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               compute_dtype=jnp.float32, init_std: float = 0.02, dropout_rate: float = 0.0):
    param_dtype = jnp.dtype(param_dtype)
    # The label axis is a handful of classes: splitting it over devices would gain nothing.
    self.kernel = param(init_std * jax.random.normal(rngs.params(), (hidden, num_outputs),
                                                     param_dtype), ("embed", None))
    self.bias = param(jnp.zeros((num_outputs,), param_dtype), (None,))
    self.compute_dtype = jnp.dtype(compute_dtype)
    self.dropout_rate = dropout_rate

  def __call__(self, x: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
    x = dropout(x.astype(self.compute_dtype), self.dropout_rate, dropout_rng)
    y = float32_logits("...d,dc->...c", x, self.kernel[...].astype(self.compute_dtype))
    return y + self.bias[...].astype(jnp.float32)


class ClassificationHead(_Projection):
  """Pooled vectors [b, hidden] -> class logits [b, num_labels]."""


class TokenClassificationHead(_Projection):
  """Hidden states [b, t, hidden] -> per-token class logits [b, t, num_labels] (NER)."""


class RegressionHead(_Projection):
  """Pooled vectors [b, hidden] -> one float per row (e.g. the similarity of a sentence pair
  encoded as one sequence)."""

  def __init__(self, hidden: int, *, rngs: nnx.Rngs, **options):
    super().__init__(hidden, 1, rngs=rngs, **options)

  def __call__(self, x: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
    return super().__call__(x, dropout_rng=dropout_rng)[..., 0]


@dataclasses.dataclass(frozen=True)
class HeadSpec:
  """One task: kind "sequence", "token" or "regression" (num_labels is then ignored).
  pooling (sequence and regression tasks): "last" (decoder default), "first" (encoder
  default), "mean", or "pooler" (BERT's tanh pooler on [CLS]). weight scales the task's loss
  in the total; dropout_rate applies to the head's input."""
  kind: str = "sequence"
  num_labels: int = 2
  pooling: str | None = None
  weight: float = 1.0
  dropout_rate: float = 0.0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Head kind {self.kind!r} is not one of {', '.join(KINDS)}.")
    if self.pooling is not None and self.pooling not in POOLINGS:
      raise ValueError(f"Pooling {self.pooling!r} is not one of {', '.join(POOLINGS)}.")
    if self.num_labels < 1:
      raise ValueError(f"num_labels must be at least 1 (got {self.num_labels}).")


def is_decoder(trunk: nnx.Module) -> bool:
  return hasattr(trunk, "hidden_states")


def _resolve_pooling(spec: HeadSpec, trunk: nnx.Module, name: str) -> HeadSpec:
  if spec.kind == "token":
    return spec
  decoder = is_decoder(trunk)
  pooling = spec.pooling or ("last" if decoder else "first")
  if decoder and pooling in ("first", "pooler"):
    raise ValueError(f"Task {name!r}: {pooling!r} pooling on a decoder sees only the first "
                     f"token (attention is causal); use 'last' or 'mean'.")
  if pooling == "pooler" and getattr(trunk, "pooler", None) is None:
    raise ValueError(f"Task {name!r}: 'pooler' pooling needs an encoder with a pooler "
                     f"(BertConfig.pooler=True).")
  return dataclasses.replace(spec, pooling=pooling)


def _make_head(spec: HeadSpec, cfg, rngs: nnx.Rngs) -> _Projection:
  options = dict(rngs=rngs, param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype,
                 init_std=cfg.init_std, dropout_rate=spec.dropout_rate)
  if spec.kind == "regression":
    return RegressionHead(cfg.hidden_size, **options)
  head_cls = TokenClassificationHead if spec.kind == "token" else ClassificationHead
  return head_cls(cfg.hidden_size, spec.num_labels, **options)


class TaskModel(nnx.Module):
  """A trunk run once per batch and every head on its hidden states.

  pad_id: without an "attention_mask" in the batch, tokens equal to pad_id count as padding
  for pooling (only: attention is left alone, as in transformers). With an attention mask, a
  decoder also stops real tokens attending to padding and numbers real tokens from 0, so a
  left-padded row gives the same outputs as the unpadded one."""

  def __init__(self, trunk: nnx.Module, heads: dict[str, HeadSpec], *, rngs: nnx.Rngs,
               pad_id: int | None = None):
    if not heads:
      raise ValueError("A TaskModel needs at least one head.")
    self.trunk = trunk
    self.pad_id = pad_id
    self.specs = {name: _resolve_pooling(spec, trunk, name) for name, spec in heads.items()}
    self.heads = nnx.Dict({name: _make_head(spec, trunk.cfg, rngs)
                           for name, spec in self.specs.items()})

  def token_mask(self, batch: dict) -> jax.Array:
    """1 for real tokens, 0 for padding: the batch's attention mask, else by pad id."""
    input_ids = batch["input_ids"]
    if "attention_mask" in batch:
      return batch["attention_mask"].astype(jnp.int32)
    if self.pad_id is not None:
      return (input_ids != self.pad_id).astype(jnp.int32)
    return jnp.ones_like(input_ids, jnp.int32)

  def hidden(self, batch: dict, mask: jax.Array, dropout_rng: jax.Array | None) -> jax.Array:
    if not is_decoder(self.trunk):
      return self.trunk(batch["input_ids"], batch.get("attention_mask"),
                        batch.get("token_type_ids"), dropout_rng=dropout_rng)
    positions, segment_ids = batch.get("positions"), batch.get("segment_ids")
    if "attention_mask" in batch:
      if segment_ids is None:
        segment_ids = mask
      if positions is None:
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    return self.trunk.hidden_states(batch["input_ids"], positions, segment_ids,
                                    dropout_rng=dropout_rng)

  def pool(self, hidden: jax.Array, mask: jax.Array, pooling: str) -> jax.Array:
    if pooling == "last":
      return last_token(hidden, mask)
    if pooling == "first":
      return first_token(hidden)
    if pooling == "mean":
      return mean_pool(hidden, mask)
    return self.trunk.pooled(hidden)

  def __call__(self, batch: dict, *, dropout_rng: jax.Array | None = None) -> dict:
    """-> task -> float32 outputs: logits [b, c] (sequence), [b, t, c] (token), or [b]
    (regression)."""
    trunk_rng, head_rngs = None, {}
    if dropout_rng is not None:
      trunk_rng, *keys = jax.random.split(dropout_rng, len(self.specs) + 1)
      head_rngs = dict(zip(self.specs, keys))
    mask = self.token_mask(batch)
    hidden = self.hidden(batch, mask, trunk_rng)
    outputs = {}
    for name, spec in self.specs.items():
      features = hidden if spec.kind == "token" else self.pool(hidden, mask, spec.pooling)
      outputs[name] = self.heads[name](features, dropout_rng=head_rngs.get(name))
    return outputs


def classification_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy over the labels that are not IGNORE (0 when there are none)."""
  mask = labels != IGNORE
  # A gather at -100 would read out of bounds (NaN), and NaN * 0 is still NaN.
  parts = cross_entropy(logits, jnp.where(mask, labels, 0), mask)
  return parts["loss_sum"] / jnp.maximum(parts["tokens"], 1.0)


def regression_loss(predictions: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean squared error over the labels that are not NaN (0 when there are none)."""
  labels = labels.astype(jnp.float32)
  mask = ~jnp.isnan(labels)
  # Zeroing NaN labels before the square keeps NaN out of the gradient too.
  error = jnp.where(mask, predictions.astype(jnp.float32) - jnp.where(mask, labels, 0.0), 0.0)
  return jnp.sum(jnp.square(error)) / jnp.maximum(jnp.sum(mask), 1)


def task_losses(outputs: dict, batch: dict, specs: dict[str, HeadSpec]
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """-> (sum of weight * task loss, task -> unweighted loss). Each task's loss is its mean
  over its labelled rows (tokens for token tasks) in this batch."""
  per_task = {}
  for name, spec in specs.items():
    labels = batch["labels"][name]
    if spec.kind == "regression":
      per_task[name] = regression_loss(outputs[name], labels)
    else:
      per_task[name] = classification_loss(outputs[name], labels)
  total = sum(specs[name].weight * loss for name, loss in per_task.items())
  return total, per_task


def check_labels(labels, num_labels: int, task: str) -> None:
  """Raises ValueError on a class id outside [0, num_labels) other than IGNORE. Run it on the
  host before the batch goes in: inside jit nothing can raise, and a bad id turns the loss
  into NaN (too large) or silently reads another class (negative ids wrap around)."""
  labels = np.asarray(labels)
  bad = labels[(labels != IGNORE) & ((labels < 0) | (labels >= num_labels))]
  if bad.size:
    raise ValueError(f"Task {task!r}: label {bad.flat[0]} is outside the allowed range "
                     f"[0, {num_labels}) (or {IGNORE} for no label); {bad.size} such labels "
                     f"in the batch.")


def check_batch_labels(batch: dict, specs: dict[str, HeadSpec]) -> None:
  """`check_labels` for every classification task of a batch."""
  for name, spec in specs.items():
    if spec.kind != "regression":
      check_labels(batch["labels"][name], spec.num_labels, name)
