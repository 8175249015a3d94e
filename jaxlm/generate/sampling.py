"""Greedy and sampled decoding: the next token from logits (temperature, top-k and nucleus
filtering in Hugging Face's order, then a categorical draw) and the loop that feeds it back."""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp


def filter_logits(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
  """logits [batch, vocab] / temperature, with -inf outside the top_k most likely tokens and
  outside the nucleus: the fewest most likely tokens whose probability (after top-k) reaches
  top_p, the token that crosses top_p included, as HF's TopPLogitsWarper. top_k=0 and
  top_p=1 turn their filter off; tokens tied with the last one kept are kept too."""
  logits = logits.astype(jnp.float32) / temperature
  ranked = -jnp.sort(-logits, axis=-1)
  kth = ranked[:, jnp.clip(top_k, 1, logits.shape[-1]) - 1]
  kth = jnp.where(top_k > 0, kth, -jnp.inf)
  ranked = jnp.where(ranked >= kth[:, None], ranked, -jnp.inf)
  probs = jax.nn.softmax(ranked, axis=-1)
  mass_above = jnp.cumsum(probs, axis=-1) - probs
  # The most likely token always stays, so even top_p -> 0 leaves something to sample.
  in_nucleus = (mass_above < top_p) | (top_p >= 1.0) | (jnp.arange(ranked.shape[-1]) == 0)
  lowest_kept = jnp.min(jnp.where(in_nucleus, ranked, jnp.inf), axis=-1)
  threshold = jnp.maximum(kth, lowest_kept)
  return jnp.where(logits >= threshold[:, None], logits, -jnp.inf)


def choose_tokens(logits: jax.Array, key: jax.Array, *, greedy: bool, temperature, top_k,
                  top_p) -> jax.Array:
  """int32 [batch]: argmax when greedy, else a draw from the filtered distribution."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits, temperature, top_k, top_p)
  return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


def is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
  return functools.reduce(jnp.logical_or, (tokens == e for e in eos_ids),
                          jnp.zeros(tokens.shape, bool))


def sample(forward: Callable, logits: jax.Array, cache, key: jax.Array, *,
           max_new_tokens: int, eos_ids: tuple[int, ...], **choose) -> tuple[jax.Array, jax.Array]:
  """Decodes up to max_new_tokens tokens per row in one `lax.while_loop`, which ends early
  once every row has produced an EOS (rows that did keep going; the caller cuts them).

  logits: [batch, vocab] for the first new token; forward(tokens [batch], step, cache) ->
  (logits, cache) feeds the token chosen at `step`. choose: choose_tokens' settings; step s
  draws with fold_in(key, s). Returns tokens [batch, max_new_tokens] and how many are filled.
  """
  pick = lambda logits, step: choose_tokens(logits, jax.random.fold_in(key, step), **choose)
  first = pick(logits, 0)
  tokens = jnp.zeros((logits.shape[0], max_new_tokens), jnp.int32).at[:, 0].set(first)

  def unfinished(carry):
    step, _, done, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def next_token(carry):
    step, tokens, done, cache = carry
    logits, cache = forward(tokens[:, step - 1], step - 1, cache)
    token = pick(logits, step)
    return step + 1, tokens.at[:, step].set(token), done | is_eos(token, eos_ids), cache

  filled, tokens, _, _ = jax.lax.while_loop(
      unfinished, next_token, (jnp.int32(1), tokens, is_eos(first, eos_ids), cache))
  return tokens, filled
