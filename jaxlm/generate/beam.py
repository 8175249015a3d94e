"""Beam search as Hugging Face transformers does it (`GenerationMixin._beam_search`, with its
default early_stopping=False), in one `lax.while_loop`.

A finished hypothesis of n new tokens (its EOS included) with summed log-probability
sum_logp scores

    sum_logp / n ** length_penalty

(HF's `length_penalty`: > 0 favours longer outputs, < 0 shorter ones, 0 ranks by sum_logp),
or with gnmt=True by GNMT's penalty (Wu et al. 2016): sum_logp / ((5 + n) / 6) ** alpha. Each step keeps the best num_beams unfinished
continuations out of the top max(2, 1 + len(eos_ids)) * num_beams by sum_logp; those of the top
num_beams that end (EOS, or the last allowed token) compete for num_beams finished slots. A
prompt stops once its slots are full and its best running beam, scored at the current
length, cannot beat the worst of them.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxlm.generate.sampling import is_eos

DEAD = -1.0e9  # HF's score for what may not be chosen


class Finished(NamedTuple):
  """Each prompt's best num_beams finished hypotheses, best first."""
  tokens: jax.Array  # int [batch, beams, max_new_tokens]
  scores: jax.Array  # [batch, beams]: length-penalised
  lengths: jax.Array  # int [batch, beams]
  filled: jax.Array  # bool [batch, beams]: the slot holds a hypothesis


class Beams(NamedTuple):
  step: jax.Array  # tokens generated so far
  tokens: jax.Array  # int [batch, beams, max_new_tokens]: the running hypotheses
  scores: jax.Array  # [batch, beams]: their summed log-probs
  parents: jax.Array  # int [batch * beams]: the flat row each came from in the last step
  finished: Finished
  improvable: jax.Array  # bool [batch]: running beams may still beat the finished ones
  stop: jax.Array  # bool: no prompt can improve, or every candidate ended


def _start(batch: int, beams: int, max_new_tokens: int) -> Beams:
  empty = jnp.zeros((batch, beams, max_new_tokens), jnp.int32)
  # Beams start as copies of the prompt; only the first may extend it at the first step.
  scores = jnp.where(jnp.arange(beams) == 0, 0.0, DEAD) * jnp.ones((batch, 1), jnp.float32)
  finished = Finished(empty, jnp.full((batch, beams), DEAD, jnp.float32),
                      jnp.zeros((batch, beams), jnp.int32), jnp.zeros((batch, beams), bool))
  return Beams(jnp.int32(0), empty, scores, jnp.zeros((batch * beams,), jnp.int32), finished,
               jnp.ones((batch,), bool), jnp.bool_(False))


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [batch, n, ...] at index [batch, k] along n."""
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _add_finished(finished: Finished, tokens, scores, eligible, length) -> Finished:
  """Keeps the best of the finished and the eligible new hypotheses [batch, candidates]."""
  merge = lambda old, new: jnp.concatenate([old, new], axis=1)
  scores = jnp.where(eligible, scores, DEAD + scores)
  best_scores, best = jax.lax.top_k(merge(finished.scores, scores), finished.scores.shape[1])
  lengths = jnp.full(eligible.shape, length)
  return Finished(_gather(merge(finished.tokens, tokens), best), best_scores,
                  _gather(merge(finished.lengths, lengths), best),
                  _gather(merge(finished.filled, eligible), best))


def _advance(b: Beams, logits: jax.Array, *, eos_ids: tuple[int, ...], max_new_tokens: int,
             length_penalty, gnmt: bool) -> Beams:
  """One step on logits [batch * beams, vocab] for the running beams' next token."""
  batch, beams = b.scores.shape
  vocab = logits.shape[-1]
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  log_probs = log_probs.reshape(batch, beams, vocab) + b.scores[..., None]
  keep = min(max(2, 1 + len(eos_ids)) * beams, beams * vocab)
  top_scores, top = jax.lax.top_k(log_probs.reshape(batch, beams * vocab), keep)
  parents, new = top // vocab, top % vocab
  candidates = _gather(b.tokens, parents).at[:, :, b.step].set(new)
  length = b.step + 1
  ends = is_eos(new, eos_ids) | (length >= max_new_tokens)

  scores, alive = jax.lax.top_k(top_scores + jnp.where(ends, DEAD, 0.0), beams)
  n = length.astype(jnp.float32)
  penalty = ((5.0 + n) / 6.0 if gnmt else n) ** length_penalty
  eligible = ends & (jnp.arange(keep) < beams) & b.improvable[:, None]
  finished = _add_finished(b.finished, candidates, top_scores / penalty, eligible, length)
  worst = jnp.where(finished.filled, jnp.min(finished.scores, axis=1, keepdims=True), DEAD)
  improvable = b.improvable & jnp.any(scores[:, :1] / penalty > worst, axis=1)
  parents = _gather(parents, alive) + beams * jnp.arange(batch)[:, None]
  return Beams(length, _gather(candidates, alive), scores, parents.reshape(-1), finished,
               improvable, stop=~jnp.any(improvable) | jnp.all(ends))


def beam_search(forward: Callable, reorder: Callable, logits: jax.Array, cache, *,
                num_beams: int, max_new_tokens: int, eos_ids: tuple[int, ...],
                length_penalty, gnmt: bool = False) -> tuple[jax.Array, jax.Array]:
  """logits: [batch * num_beams, vocab] for the first new token, each prompt's row repeated
  num_beams times, and the matching cache; forward(tokens [batch * num_beams], step, cache)
  -> (logits, cache) feeds each beam's token at `step`; reorder(cache, rows) moves the cache
  rows to follow the beams. Returns each prompt's best finished hypothesis: tokens
  [batch, max_new_tokens] and lengths [batch] (a final EOS counted)."""
  advance = lambda b, logits: _advance(b, logits, eos_ids=eos_ids,
                                       max_new_tokens=max_new_tokens,
                                       length_penalty=length_penalty, gnmt=gnmt)

  def next_step(carry):
    b, cache = carry
    logits, cache = forward(b.tokens[:, :, b.step - 1].reshape(-1), b.step - 1,
                            reorder(cache, b.parents))
    return advance(b, logits), cache

  first = advance(_start(logits.shape[0] // num_beams, num_beams, max_new_tokens), logits)
  b, _ = jax.lax.while_loop(lambda carry: ~carry[0].stop, next_step, (first, cache))
  return b.finished.tokens[:, 0], b.finished.lengths[:, 0]
