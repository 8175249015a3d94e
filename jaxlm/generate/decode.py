"""Generation with a key/value cache: one jitted prefill of the prompts, then one jitted
`lax.while_loop` that decodes greedily, by sampling or by beam search.

Prompts of different lengths are left-padded: every row then appends its next token at the
same cache slot, so a step writes with one dynamic_update_slice and the prefill's next-token
logits are all in the last column. Positions count from each row's first real token (padding
gets -1, which the cache masks out), so a padded row computes what it would alone.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.generate.beam import beam_search
from jaxlm.generate.sampling import sample
from jaxlm.layers.sharding import activation_sharding
from jaxlm.models.llama import init_cache, take_cache_rows


def generate(model, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             num_beams: int = 1, length_penalty: float = 1.0, gnmt_length_penalty: bool = False,
             eos_ids: Sequence[int] = (),
             seed: int = 0, activation_resolver=None) -> list[list[int]]:
  """The new tokens for each prompt, up to max_new_tokens, ending before the first EOS.

  model: a Llama, or its (graphdef, params) with params an nnx.State or pure dict.
  temperature 0 decodes greedily; above 0 it samples from softmax(logits / temperature)
  limited to the top_k tokens (0: all) and to the top_p nucleus (1: all), with
  jax.random.key(seed). num_beams > 1 runs deterministic beam search ranked by
  sum_logp / new_tokens ** length_penalty, as Hugging Face, or with gnmt_length_penalty by
  sum_logp / ((5 + new_tokens) / 6) ** length_penalty (see jaxlm.generate.beam).
  activation_resolver: a mesh's logical-axis resolver (`LogicalRules.activation_resolver()`)
  to shard activations and the cache; None runs wherever the params are.
  """
  _check(prompt_ids, max_new_tokens, temperature, top_k, top_p, num_beams)
  graphdef, params = model if isinstance(model, tuple) else nnx.split(model)
  if not prompt_ids or max_new_tokens == 0:
    return [[] for _ in prompt_ids]
  ids, positions = _left_pad(prompt_ids, _padded_width(
      max(len(p) for p in prompt_ids), max_new_tokens, nnx.merge(graphdef, params).cfg))
  eos_ids = tuple(int(e) for e in eos_ids)
  static = dict(graphdef=graphdef, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                activation_resolver=activation_resolver)
  logits, cache = _prefill(graphdef, params, ids, positions,
                           slots=ids.shape[1] + max_new_tokens - 1,
                           activation_resolver=activation_resolver)
  next_positions = positions[:, -1] + 1
  if num_beams > 1:
    tokens, lengths = _beam_decode(params, cache, logits, next_positions,
                                   jnp.float32(length_penalty), num_beams=num_beams,
                                   gnmt=gnmt_length_penalty, **static)
  else:
    tokens, lengths = _sample_decode(
        params, cache, logits, next_positions, jax.random.key(seed), jnp.float32(temperature),
        jnp.int32(top_k), jnp.float32(top_p), greedy=temperature == 0.0, **static)
  return _trim(np.asarray(tokens), np.asarray(lengths), eos_ids)


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> str:
  """text up to, not including, the earliest occurrence of any (non-empty) stop string."""
  found = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
  return text[:min(found, default=len(text))]


def _check(prompt_ids, max_new_tokens, temperature, top_k, top_p, num_beams) -> None:
  problems = []
  if any(len(p) == 0 for p in prompt_ids):
    problems.append("every prompt needs at least one token")
  if max_new_tokens < 0:
    problems.append(f"max_new_tokens must be >= 0, got {max_new_tokens}")
  if temperature < 0:
    problems.append(f"temperature must be >= 0 (0: greedy), got {temperature}")
  if top_k < 0:
    problems.append(f"top_k must be >= 0 (0: off), got {top_k}")
  if not 0.0 < top_p <= 1.0:
    problems.append(f"top_p must be in (0, 1] (1: off), got {top_p}")
  if num_beams < 1:
    problems.append(f"num_beams must be >= 1, got {num_beams}")
  if num_beams > 1 and temperature > 0:
    problems.append("beam search is deterministic: use temperature=0 with num_beams > 1")
  if problems:
    raise ValueError("Invalid generation settings: " + "; ".join(problems))


def _padded_width(longest: int, max_new_tokens: int, cfg) -> int:
  """The prompt width to pad to: the next power of two (at least 16), so that batches of
  other lengths (an evaluation's) reuse the compiled prefill and decode loop instead of
  compiling their own; never past a learned position table's end."""
  width = max(16, 1 << (longest - 1).bit_length())
  if cfg.position_embedding == "learned":
    width = min(width, cfg.max_seq_len - max_new_tokens + 1)
  return max(width, longest)


def _left_pad(prompt_ids, width: int) -> tuple[np.ndarray, np.ndarray]:
  """int32 ids and positions [batch, width], padding on the left at position -1."""
  ids = np.zeros((len(prompt_ids), width), np.int32)
  positions = np.full((len(prompt_ids), width), -1, np.int32)
  for row, prompt in enumerate(prompt_ids):
    ids[row, width - len(prompt):] = prompt
    positions[row, width - len(prompt):] = np.arange(len(prompt))
  return ids, positions


def _trim(tokens: np.ndarray, lengths: np.ndarray, eos_ids: tuple[int, ...]) -> list[list[int]]:
  out = []
  for row, length in zip(tokens.tolist(), lengths.tolist()):
    row = row[:length]
    ends = [i for i, token in enumerate(row) if token in eos_ids]
    out.append(row[:ends[0]] if ends else row)
  return out


@functools.partial(jax.jit, static_argnames=("graphdef", "slots", "activation_resolver"))
def _prefill(graphdef, params, ids, positions, *, slots, activation_resolver):
  """-> logits [batch, vocab] for each row's next token, and the cache of the prompts."""
  with activation_sharding(activation_resolver):
    model = nnx.merge(graphdef, params)
    cache = init_cache(model.cfg, ids.shape[0], slots)
    logits, cache = model(ids, positions, cache=cache)
    return logits[:, -1], cache


def _one_token_forward(model, first_positions):
  """forward(tokens [batch], step, cache) for the decode loops: the token at `step` sits at
  position first_positions + step."""

  def forward(tokens, step, cache):
    logits, cache = model(tokens[:, None], (first_positions + step)[:, None], cache=cache)
    return logits[:, 0], cache

  return forward


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_ids", "greedy",
                                             "activation_resolver"))
def _sample_decode(params, cache, logits, next_positions, key, temperature, top_k, top_p, *,
                   graphdef, max_new_tokens, eos_ids, greedy, activation_resolver):
  with activation_sharding(activation_resolver):
    forward = _one_token_forward(nnx.merge(graphdef, params), next_positions)
    tokens, filled = sample(forward, logits, cache, key, max_new_tokens=max_new_tokens,
                            eos_ids=eos_ids, greedy=greedy, temperature=temperature,
                            top_k=top_k, top_p=top_p)
    return tokens, jnp.full(tokens.shape[:1], filled)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_beams", "max_new_tokens",
                                             "eos_ids", "activation_resolver", "gnmt"))
def _beam_decode(params, cache, logits, next_positions, length_penalty, *, graphdef,
                 num_beams, max_new_tokens, eos_ids, activation_resolver, gnmt):
  with activation_sharding(activation_resolver):
    # Beams of a prompt share its prefill: repeat the rows rather than prefill each beam.
    rows = jnp.repeat(jnp.arange(logits.shape[0]), num_beams)
    forward = _one_token_forward(nnx.merge(graphdef, params), next_positions[rows])
    return beam_search(forward, take_cache_rows, logits[rows], take_cache_rows(cache, rows),
                       num_beams=num_beams, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                       length_penalty=length_penalty, gnmt=gnmt)
