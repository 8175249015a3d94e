"""Masked cross-entropy with label smoothing and z-loss, in float32, whole or a chunk of
positions at a time."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.layers.sharding import constrain


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


def chunked_cross_entropy(hidden: jax.Array, output_logits, targets: jax.Array,
                          mask: jax.Array, *, chunk_len: int, label_smoothing: float = 0.0,
                          z_loss: float = 0.0) -> dict[str, jax.Array]:
  """`cross_entropy(output_logits(hidden), ...)` computed chunk_len positions of every row at
  a time, so only one chunk's [batch, chunk_len, vocab] float32 logits exist at once: with a
  large vocabulary (Llama 3's 128,256) the full logits and their gradient are often the
  largest temporaries of a step. The backward recomputes each chunk's logits, which costs
  one more output-projection matmul. hidden: [batch, seq, hidden]; seq must be a multiple
  of chunk_len."""
  batch, length = targets.shape
  if chunk_len <= 0 or length % chunk_len:
    raise ValueError(f"The loss chunk ({chunk_len} positions) must divide the sequence "
                     f"length ({length}); set train.loss_chunk_len to a divisor of it, or 0.")
  count = length // chunk_len

  def chunks(x):  # [batch, seq, ...] -> [count, batch, chunk_len, ...]
    x = x.reshape(batch, count, chunk_len, *x.shape[2:])
    return constrain(jnp.swapaxes(x, 0, 1), (None, "act_batch") + (None,) * (x.ndim - 2))

  @jax.checkpoint
  def chunk_sums(h, t, m):
    return cross_entropy(output_logits(h), t, m, label_smoothing=label_smoothing,
                         z_loss=z_loss)

  def add_chunk(total, inputs):
    return jax.tree.map(jnp.add, total, chunk_sums(*inputs)), None

  zeros = {key: jnp.zeros((), jnp.float32) for key in ("loss_sum", "nll_sum", "z_loss_sum",
                                                        "tokens")}
  total, _ = jax.lax.scan(add_chunk, zeros, (chunks(hidden), chunks(targets), chunks(mask)))
  return total
