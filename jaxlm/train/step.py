"""The pure train and eval steps: (state, batch) -> (state, metrics).

For a classifier (cfg.num_labels > 0) nothing changes here: its logits are over classes and
the data puts each example's class index as the target of its last token (data/shaping.py).
A regression head (`regression`, cfg.classifier "regression") has one output, and its target
there is a float32 score carried in the int32 targets (shaping.encode_scores): the loss is
the squared error of logits[..., 0], summed over the loss_mask tokens like cross-entropy, so
`loss` is the mean squared error and gradient accumulation stays exact.

state is a plain dict {"step", "params", "opt_state", "rng"} of arrays, plus "frozen" when
only part of the model trains: then "params" holds the trainable parameters (the only ones
with gradients and optimizer state) and "frozen" the rest, in the same nesting. batch is a
dict of int [batch, seq] arrays: input_ids, targets, loss_mask and optionally positions and
segment_ids. Nothing here knows about meshes: shardings are applied by the caller's jit.

With knowledge distillation (`Distill`) the step also takes the teacher's parameters, a
separate argument outside the state (no gradients, no optimizer state, not checkpointed),
and the loss becomes alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * cross-entropy
over the loss_mask tokens (see distill.py), still as sums over token counts.

For a masked-LM encoder (`mlm`, see mlm.py) the step first corrupts the batch with a key
drawn from the step's own: targets become the original tokens and loss_mask the chosen
ones, before gradient accumulation splits the batch, so accumulation stays exact. Evaluation
corrupts with a fixed key (mlm.eval_key).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlm.finetune.trainable import combine
from jaxlm.layers.linear import lora_dropout
from jaxlm.layers.sharding import activation_sharding, constrain
from jaxlm.models.bert import pair_token_types
from jaxlm.models.factory import DECODER_INPUTS, batch_logits
from jaxlm.models.llama import Llama
from jaxlm.train.distill import distillation_sums
from jaxlm.train.loss import SUM_KEYS, chunked_cross_entropy, cross_entropy
from jaxlm.train.mlm import MLM, corrupt_batch, eval_key


@dataclasses.dataclass(frozen=True)
class LossConfig:
  label_smoothing: float = 0.0
  z_loss: float = 0.0
  # > 0: a language model's logits and cross-entropy are computed this many positions at a
  # time (loss.chunked_cross_entropy); 0: the whole sequence at once.
  chunk_len: int = 0


@dataclasses.dataclass(frozen=True)
class Distill:
  """A teacher's graph (its parameters are the step's `teacher` argument) and the mix."""
  graphdef: object
  temperature: float = 2.0
  alpha: float = 0.5


DISTILL_SUM_KEYS = SUM_KEYS + ("kl_sum", "hard_sum")
REGRESSION_SUM_KEYS = ("loss_sum", "tokens")  # loss_sum: the summed squared error


# Folded into the step's key for LoRA dropout and for MLM masking, apart from the model's
# own dropout stream.
LORA_STREAM = 1
MLM_STREAM = 2


def mlm_step_key(state_rng, step):
  """The key a train step corrupts its batch with: fixed by the seed and the step."""
  return jax.random.fold_in(jax.random.fold_in(state_rng, step), MLM_STREAM)


def is_regression(cfg) -> bool:
  """Whether a model config (decoder or encoder) has a regression head."""
  return cfg.num_labels > 0 and cfg.classifier == "regression"


def target_scores(targets: jax.Array) -> jax.Array:
  """A regression batch's float32 scores from its int32 targets (the inverse of
  jaxlm.data.shaping.encode_scores)."""
  return jax.lax.bitcast_convert_type(targets.astype(jnp.int32), jnp.float32)


def squared_error(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  """Sums over the mask of (prediction - score)^2, the prediction being the head's one output."""
  mask = mask.astype(jnp.float32)
  error = logits[..., 0].astype(jnp.float32) - target_scores(targets)
  return {"loss_sum": jnp.sum(jnp.square(error) * mask), "tokens": jnp.sum(mask)}


def with_pair_token_types(batch: dict, separator_id: int | None) -> dict:
  """The batch with BERT's token types of text pairs (models/bert.py pair_token_types) when
  separator_id is given, else as it is."""
  if separator_id is None:
    return batch
  return dict(batch, token_type_ids=pair_token_types(
      batch["input_ids"], batch["positions"], batch["segment_ids"], separator_id))


def model_params(state) -> dict:
  """The whole model's parameters: the trainable ones and, when some are frozen, the rest."""
  frozen = state.get("frozen")
  return state["params"] if frozen is None else combine(frozen, state["params"])


def _logits(graphdef, params, batch, dropout_rng, lora_key=None):
  model = nnx.merge(graphdef, params)
  with lora_dropout(lora_key):
    return batch_logits(model, batch, dropout_rng)


def _lm_sums_by_chunks(graphdef, params, batch, loss_cfg: LossConfig, dropout_rng,
                       lora_key=None):
  """A decoder language model's cross-entropy sums, loss_cfg.chunk_len positions at a time."""
  model = nnx.merge(graphdef, params)
  if not isinstance(model, Llama) or model.score is not None:
    raise ValueError("A chunked loss (train.loss_chunk_len) is for a decoder's language-model "
                     "head; set train.loss_chunk_len = 0 for encoders and classifiers.")
  with lora_dropout(lora_key):
    hidden = model.hidden_states(batch["input_ids"], *(batch.get(k) for k in DECODER_INPUTS),
                                 dropout_rng=dropout_rng)
  equation, weight = model.output_projection()
  return chunked_cross_entropy(hidden, equation, weight, batch["targets"], batch["loss_mask"],
                               chunk_len=loss_cfg.chunk_len,
                               label_smoothing=loss_cfg.label_smoothing, z_loss=loss_cfg.z_loss)


def _forward_sums(graphdef, params, batch, loss_cfg: LossConfig, dropout_rng, lora_key=None,
                  distill: Distill | None = None, teacher=None, regression: bool = False):
  if loss_cfg.chunk_len and distill is None and not regression:
    return _lm_sums_by_chunks(graphdef, params, batch, loss_cfg, dropout_rng, lora_key)
  logits = _logits(graphdef, params, batch, dropout_rng, lora_key)
  if regression:
    return squared_error(logits, batch["targets"], batch["loss_mask"])
  if distill is None:
    return cross_entropy(logits, batch["targets"], batch["loss_mask"],
                         label_smoothing=loss_cfg.label_smoothing, z_loss=loss_cfg.z_loss)
  # The teacher runs deterministically (no dropout) and gets no gradient.
  teacher_logits = jax.lax.stop_gradient(_logits(distill.graphdef, teacher, batch, None))
  sums = distillation_sums(logits, teacher_logits, batch["loss_mask"],
                           temperature=distill.temperature, alpha=distill.alpha,
                           targets=batch["targets"], label_smoothing=loss_cfg.label_smoothing,
                           z_loss=loss_cfg.z_loss)
  return {k: sums[k] for k in DISTILL_SUM_KEYS}


def _split_microbatches(batch, num_micro: int):
  """[B, ...] -> [num_micro, B // num_micro, ...] such that each device keeps its own rows
  (micro-batch i holds rows i, i + num_micro, ...), so no data moves between devices."""

  def split(x):
    x = x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:])
    x = constrain(x, ("act_batch",) + (None,) * (x.ndim - 1))
    return jnp.swapaxes(x, 0, 1)

  return jax.tree.map(split, batch)


def train_step(state, batch, teacher=None, *, graphdef, tx: optax.GradientTransformation, schedule,
               loss_cfg: LossConfig, grad_accum_steps: int = 1, dropout: bool = False,
               skip_nonfinite: bool = False, adapter_dropout: bool = False,
               activation_resolver=None, distill: Distill | None = None,
               mlm: MLM | None = None, regression: bool = False,
               pair_separator: int | None = None):
  """teacher: the teacher's parameters, with `distill` only. regression: a regression head
  (squared error; label smoothing, z-loss and distillation do not apply). pair_separator:
  a BERT encoder's [SEP] id, for text pairs read with token types (with_pair_token_types)."""
  with activation_sharding(activation_resolver):
    step = state["step"]
    batch = with_pair_token_types(batch, pair_separator)
    if mlm is not None:
      batch = corrupt_batch(mlm_step_key(state["rng"], step), batch, mlm)
    step_rng = jax.random.fold_in(state["rng"], step)
    dropout_rng = step_rng if dropout else None
    lora_key = jax.random.fold_in(step_rng, LORA_STREAM) if adapter_dropout else None
    total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    frozen = state.get("frozen")

    def sum_loss(params, micro, rng, lora_rng):
      # Differentiating with respect to the trainable part only: no frozen weight gradients.
      full = params if frozen is None else combine(frozen, params)
      sums = _forward_sums(graphdef, full, micro, loss_cfg, rng, lora_rng, distill, teacher,
                           regression)
      return sums["loss_sum"], sums

    grad_fn = jax.grad(sum_loss, has_aux=True)
    if grad_accum_steps == 1:
      grads, sums = grad_fn(state["params"], batch, dropout_rng, lora_key)
    else:
      micro_batches = _split_microbatches(batch, grad_accum_steps)
      zeros = jax.tree.map(jnp.zeros_like, state["params"])

      def accumulate(carry, micro_and_index):
        micro, index = micro_and_index
        rng, lora_rng = (None if key is None else jax.random.fold_in(key, index)
                         for key in (dropout_rng, lora_key))
        grads, sums = grad_fn(state["params"], micro, rng, lora_rng)
        carry_grads, carry_sums = carry
        return (jax.tree.map(jnp.add, carry_grads, grads),
                jax.tree.map(jnp.add, carry_sums, sums)), None

      sum_keys = (REGRESSION_SUM_KEYS if regression else
                  SUM_KEYS if distill is None else DISTILL_SUM_KEYS)
      empty_sums = {k: jnp.zeros((), jnp.float32) for k in sum_keys}
      (grads, sums), _ = jax.lax.scan(
          accumulate, (zeros, empty_sums),
          (micro_batches, jnp.arange(grad_accum_steps)))

    grads = jax.tree.map(lambda g: g / total_tokens, grads)
    new_state, metrics = apply_gradients(state, grads, sums["loss_sum"] / total_tokens, tx=tx,
                                         schedule=schedule, skip_nonfinite=skip_nonfinite)
    metrics["tokens"] = sums["tokens"]
    if not regression:
      metrics["nll"] = sums["nll_sum"] / total_tokens
      metrics["z_loss"] = sums["z_loss_sum"] / total_tokens
    if distill is not None:
      metrics["distill_kl"] = sums["kl_sum"] / total_tokens
      metrics["hard_loss"] = sums["hard_sum"] / total_tokens
    return new_state, metrics


def apply_gradients(state, grads, loss, *, tx: optax.GradientTransformation, schedule,
                    skip_nonfinite: bool = False):
  """One optimizer update of state["params"] by grads (of the trainable parameters) ->
  (the next state, metrics: loss, grad_norm, param_norm, skipped, learning_rate). With
  skip_nonfinite an update whose loss, gradients or result is not finite is dropped."""
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  # The new parameters' norm catches an update that overflowed even from finite gradients
  # (of the trainable ones: the frozen ones do not change). Unless the update may be
  # dropped, the barrier has XLA write the update in one pass over each weight and read the
  # result once for the norm; fused into the update instead, the norm split it in two
  # passes (reference 1.1B on an H100: 1.95 GB more a step, README "What the kernels move").
  param_norm = optax.tree.norm(params if skip_nonfinite else
                               jax.lax.optimization_barrier(params))
  finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss) & jnp.isfinite(param_norm)
  if skip_nonfinite:
    # Drop the whole update (params and optimizer moments) when anything overflowed.
    keep = lambda new, old: jnp.where(finite, new, old)
    params = jax.tree.map(keep, params, state["params"])
    opt_state = jax.tree.map(keep, opt_state, state["opt_state"])
  metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "param_norm": param_norm,
      "skipped": (~finite).astype(jnp.int32) if skip_nonfinite else jnp.zeros((), jnp.int32),
      "learning_rate": jnp.asarray(schedule(state["step"]), jnp.float32),
  }
  return dict(state, step=state["step"] + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, *, graphdef, activation_resolver=None, num_labels: int = 0,
              token_predictions: bool = False, mlm: MLM | None = None,
              regression: bool = False, pair_separator: int | None = None,
              loss_chunk_len: int = 0):
  """Summed loss over the loss_mask tokens (a language model's loss_chunk_len positions at
  a time when > 0, as in training); for a classifier (num_labels > 0) also the
  confusion matrix [true, predicted] of its predictions there, which sums over batches, and
  with token_predictions (a token classifier) the predicted class at every token, from which
  the host scores whole entities. For a regression head instead the prediction and the
  score at every token, float32 [batch, seq], and the loss_mask that picks the examples':
  correlations need every pair, not sums."""
  with activation_sharding(activation_resolver):
    batch = with_pair_token_types(batch, pair_separator)
    if mlm is not None:
      batch = corrupt_batch(eval_key(mlm, batch["input_ids"]), batch, mlm)
    if loss_chunk_len and not num_labels and mlm is None:
      sums = _lm_sums_by_chunks(graphdef, params, batch, LossConfig(chunk_len=loss_chunk_len),
                                None)
      return {"nll_sum": sums["nll_sum"], "tokens": sums["tokens"]}
    logits = _logits(graphdef, params, batch, None)
    if regression:
      return {"predictions": logits[..., 0].astype(jnp.float32),
              "scores": target_scores(batch["targets"]), "loss_mask": batch["loss_mask"]}
    sums = cross_entropy(logits, batch["targets"], batch["loss_mask"])
    out = {"nll_sum": sums["nll_sum"], "tokens": sums["tokens"]}
    if num_labels:
      weight = batch["loss_mask"].astype(jnp.float32)
      true = jax.nn.one_hot(batch["targets"], num_labels, dtype=jnp.float32)
      predicted = jax.nn.one_hot(jnp.argmax(logits, axis=-1), num_labels, dtype=jnp.float32)
      out["confusion"] = jnp.einsum("bt,btc,btk->ck", weight, true, predicted)
    if token_predictions:
      out["predictions"] = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return out
