"""Knowledge distillation (Hinton et al., 2015): a student trained towards a teacher's
softened distribution, optionally mixed with the ordinary loss on the true targets."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.train.loss import cross_entropy


def check_mix(temperature: float, alpha: float) -> None:
  if temperature <= 0:
    raise ValueError(f"The temperature must be positive (got {temperature}).")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha weighs the soft loss and must lie in [0, 1] (got {alpha}).")


def _check(student_logits, teacher_logits, mask, temperature, alpha, targets) -> None:
  if student_logits.shape[-1] != teacher_logits.shape[-1]:
    raise ValueError(f"The student has {student_logits.shape[-1]} output classes (vocabulary "
                     f"size) and the teacher {teacher_logits.shape[-1]}: distillation needs "
                     f"the same vocabulary on both.")
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(f"Student logits {student_logits.shape} and teacher logits "
                     f"{teacher_logits.shape} differ in shape.")
  if mask is not None and mask.shape != student_logits.shape[:-1]:
    raise ValueError(f"The mask {mask.shape} must match the logits' leading axes "
                     f"{student_logits.shape[:-1]}.")
  check_mix(temperature, alpha)
  if alpha < 1.0 and targets is None:
    raise ValueError(f"alpha={alpha} gives the hard loss a weight of {1.0 - alpha}: pass its "
                     f"targets.")


def soft_kl(student_logits: jax.Array, teacher_logits: jax.Array,
            temperature: float) -> jax.Array:
  """KL(softmax(teacher / T) || softmax(student / T)) * T^2 per position, float32 [...].

  The T^2 keeps the soft loss's gradients on the scale of the hard loss's whatever T."""
  log_student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  log_teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  p_teacher = jnp.exp(log_teacher)
  # A class the teacher rules out (logit -inf) adds 0 log 0 = 0, not NaN.
  terms = jnp.where(p_teacher > 0, p_teacher * (log_teacher - log_student), 0.0)
  return jnp.sum(terms, axis=-1) * temperature**2


def distillation_sums(student_logits: jax.Array, teacher_logits: jax.Array,
                      mask: jax.Array | None = None, *, temperature: float = 1.0,
                      alpha: float = 1.0, targets: jax.Array | None = None,
                      label_smoothing: float = 0.0, z_loss: float = 0.0) -> dict:
  """The distillation objective as sums over the masked positions (callers divide by the
  token count, which keeps gradient accumulation exact), float32 scalars:

  kl_sum: `soft_kl` summed; hard_sum, nll_sum, z_loss_sum: the student's cross-entropy on
  targets (with label smoothing and z-loss; only when targets are given); loss_sum:
  alpha * kl_sum + (1 - alpha) * hard_sum; tokens: the mask's sum. The teacher's logits get
  no gradient."""
  _check(student_logits, teacher_logits, mask, temperature, alpha, targets)
  if mask is None:
    mask = jnp.ones(student_logits.shape[:-1], jnp.float32)
  mask = mask.astype(jnp.float32)
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  kl_sum = jnp.sum(soft_kl(student_logits, teacher_logits, temperature) * mask)
  sums = {"kl_sum": kl_sum, "tokens": jnp.sum(mask)}
  loss_sum = alpha * kl_sum
  if targets is not None:
    # Masked-out targets may hold an ignore id such as -100: gather at a valid one instead.
    safe_targets = jnp.where(mask > 0, targets, 0)
    hard = cross_entropy(student_logits, safe_targets, mask, label_smoothing=label_smoothing,
                         z_loss=z_loss)
    sums.update(hard_sum=hard["loss_sum"], nll_sum=hard["nll_sum"],
                z_loss_sum=hard["z_loss_sum"])
    if alpha < 1.0:
      loss_sum = loss_sum + (1.0 - alpha) * hard["loss_sum"]
  sums["loss_sum"] = loss_sum
  return sums


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                      mask: jax.Array | None = None, *, temperature: float = 1.0,
                      alpha: float = 1.0, targets: jax.Array | None = None) -> jax.Array:
  """alpha * soft + (1 - alpha) * hard, a float32 scalar.

  Logits are [b, t, vocab] (language models) or [b, classes] (sequence classifiers); mask
  ([b, t] or [b], nonzero = counts; None = all) selects the positions averaged over. soft is
  `soft_kl` and hard the cross-entropy of the student (at temperature 1) on targets, both
  averaged over the masked positions; the teacher's logits get no gradient. The mean of
  `distillation_sums`."""
  sums = distillation_sums(student_logits, teacher_logits, mask, temperature=temperature,
                           alpha=alpha, targets=targets)
  return sums["loss_sum"] / jnp.maximum(sums["tokens"], 1.0)
