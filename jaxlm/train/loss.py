"""Masked cross-entropy with label smoothing and z-loss, in float32, whole or a chunk of
positions at a time."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.layers.linear import float32_logits
from jaxlm.layers.sharding import constrain

SUM_KEYS = ("loss_sum", "nll_sum", "z_loss_sum", "tokens")


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
  # The target's logit picked by comparison, not take_along_axis: the gradient is then a
  # select that fuses with softmax's into one pass over the logits, where a gather's is a
  # scatter-add into a zeroed float32 [batch, seq, vocab] array (3 more passes over it).
  vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  target_logit = jnp.sum(jnp.where(vocab_ids == targets[..., None], logits, 0.0), axis=-1)
  nll = log_z - target_logit
  loss = nll
  if label_smoothing:  # mean(log p) = mean(logits) - log_z
    loss = (1.0 - label_smoothing) * nll - label_smoothing * (jnp.mean(logits, axis=-1) - log_z)
  z_term = z_loss * jnp.square(log_z)
  if z_loss:
    loss = loss + z_term
  return {
      "loss_sum": jnp.sum(loss * mask),
      "nll_sum": jnp.sum(nll * mask),
      "z_loss_sum": jnp.sum(z_term * mask),
      "tokens": jnp.sum(mask),
  }


def chunked_cross_entropy(hidden: jax.Array, equation: str, weight: jax.Array,
                          targets: jax.Array, mask: jax.Array, *, chunk_len: int,
                          label_smoothing: float = 0.0, z_loss: float = 0.0
                          ) -> dict[str, jax.Array]:
  """`cross_entropy` of the logits float32_logits(equation, hidden, weight) (a language-model
  head whose vocabulary axis is `v`), computed chunk_len positions of every row at a time:
  only one chunk's [batch, chunk_len, vocab] float32 logits exist at once, where the whole
  logits and their gradient are often a large-vocabulary step's largest temporaries. The
  backward recomputes each chunk's logits (one more output-projection matmul) and sums the
  weight's gradient over the chunks in float32. hidden: [batch, seq, hidden]; seq must be a
  multiple of chunk_len."""
  batch, length = targets.shape
  if chunk_len <= 0 or length % chunk_len:
    raise ValueError(f"The loss chunk ({chunk_len} positions) must divide the sequence "
                     f"length ({length}); set train.loss_chunk_len to a divisor of it, or 0.")
  count = length // chunk_len
  # Whole on every device but split over tensor as the logits are: FSDP gathers it once
  # here, not once per chunk.
  weight_axes = equation.split("->")[0].split(",")[1]
  weight = constrain(weight, tuple("act_vocab" if axis == "v" else None for axis in weight_axes))

  def chunks(x):  # [batch, seq, ...] -> [count, batch, chunk_len, ...]
    x = x.reshape(batch, count, chunk_len, *x.shape[2:])
    return constrain(jnp.swapaxes(x, 0, 1), (None, "act_batch") + (None,) * (x.ndim - 2))

  def chunk_sums(w, h, t, m):
    return cross_entropy(float32_logits(equation, h, w), t, m,
                         label_smoothing=label_smoothing, z_loss=z_loss)

  @jax.custom_vjp
  def sums(w, h, t, m):
    def add_chunk(total, inputs):
      return jax.tree.map(jnp.add, total, chunk_sums(w, *inputs)), None

    zeros = {key: jnp.zeros((), jnp.float32) for key in SUM_KEYS}
    return jax.lax.scan(add_chunk, zeros, (chunks(h), chunks(t), chunks(m)))[0]

  def sums_forward(w, h, t, m):
    return sums(w, h, t, m), (w, h, t, m)

  def sums_backward(residuals, cotangent):
    w, h, t, m = residuals

    def chunk_gradients(weight_gradient, inputs):
      h_chunk, t_chunk, m_chunk = inputs
      _, pullback = jax.vjp(lambda w, h: chunk_sums(w, h, t_chunk, m_chunk), w, h_chunk)
      dw, dh = pullback(cotangent)
      return weight_gradient + dw.astype(jnp.float32), dh

    # Laid out as the parameter is (FSDP splits it): each chunk's gradient is reduced into
    # its shard, where a whole float32 copy per device would outweigh the chunking's gain.
    zeros = constrain(jnp.zeros(w.shape, jnp.float32),
                      tuple("vocab" if axis == "v" else "embed" for axis in weight_axes))
    dw, dh = jax.lax.scan(chunk_gradients, zeros, (chunks(h), chunks(t), chunks(m)))
    dh = jnp.swapaxes(dh, 0, 1).reshape(h.shape)
    return dw.astype(w.dtype), constrain(dh, ("act_batch", None, None)), None, None

  sums.defvjp(sums_forward, sums_backward)
  return sums(weight, hidden, targets, mask)
