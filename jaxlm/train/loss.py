"""Masked cross-entropy with label smoothing and z-loss, in float32."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array, *,
                  label_smoothing: float = 0.0, z_loss: float = 0.0) -> dict[str, jax.Array]:
  """Sums over the positions where mask is nonzero (callers divide by the token count, which
  keeps gradient accumulation exact).

  With label smoothing a the target distribution is (1 - a) * one_hot + a / vocab, so the
  loss is (1 - a) * nll + a * mean(-log p). The z-loss term z * logsumexp(logits)^2 keeps
  the softmax normaliser near 1 (PaLM)."""
  logits = logits.astype(jnp.float32)
  mask = mask.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  log_probs = logits - log_z[..., None]
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  loss = nll
  if label_smoothing:
    loss = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(log_probs, axis=-1)
  z_term = z_loss * jnp.square(log_z)
  if z_loss:
    loss = loss + z_term
  return {
      "loss_sum": jnp.sum(loss * mask),
      "nll_sum": jnp.sum(nll * mask),
      "z_loss_sum": jnp.sum(z_term * mask),
      "tokens": jnp.sum(mask),
  }
