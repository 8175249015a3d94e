"""A minimal greedy sampler: one compiled forward over a fixed-length buffer per new token
(no KV cache), enough to look at what a checkpoint has learned."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def greedy_generate(graphdef, params, prompt_ids: list[int], max_new_tokens: int,
                    stop_id: int | None = None) -> list[int]:
  total = len(prompt_ids) + max_new_tokens

  @jax.jit
  def next_token(params, buffer, length):
    logits = nnx.merge(graphdef, params)(buffer)
    return jnp.argmax(logits[0, length - 1]).astype(jnp.int32)

  buffer = jnp.zeros((1, total), jnp.int32).at[0, :len(prompt_ids)].set(jnp.asarray(prompt_ids))
  out = []
  for length in range(len(prompt_ids), total):
    token = int(next_token(params, buffer, length))
    if token == stop_id:
      break
    out.append(token)
    buffer = buffer.at[0, length].set(token)
  return out
