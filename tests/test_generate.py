"""Generation with the key/value cache: cached logits equal full forwards, and greedy,
sampling, beam search and EOS handling equal their definitions computed the slow way."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.generate import decode
from jaxlm.generate.decode import generate, truncate_at_stop
from jaxlm.generate.sampling import filter_logits
from jaxlm.layers.sharding import activation_sharding
from jaxlm.models import Llama, from_preset
from jaxlm.models.llama import init_cache
from jaxlm.parallel.mesh import build_mesh
from jaxlm.parallel.rules import LogicalRules

PROMPTS = [[5, 17, 3, 99, 42], [7, 1, 250, 8, 8, 61, 13, 2, 90], [31, 4]]
WIDTH = 16  # reference forwards right-pad to this, so they compile once per model


def _model(seed=0, **changes):
  return Llama(from_preset("tiny", compute_dtype="float32", **changes), rngs=nnx.Rngs(seed))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, ids):
  return nnx.merge(graphdef, params)(ids)


def _full_logits(model, rows, width=WIDTH):
  """Logits of a full forward per row; right padding cannot reach real tokens (causal)."""
  ids = np.zeros((len(rows), width), np.int32)
  for i, row in enumerate(rows):
    ids[i, :len(row)] = row
  return np.asarray(_forward(*nnx.split(model), ids))


@functools.partial(jax.jit, static_argnums=0)
def _prefill_then_decode(graphdef, params, ids, positions, fed):
  """Logits of a left-padded prefill, then of feeding fed [batch, steps] one at a time."""
  model = nnx.merge(graphdef, params)
  cache = init_cache(model.cfg, ids.shape[0], ids.shape[1] + fed.shape[1])
  prompt_logits, cache = model(ids, positions, cache=cache)

  def step(carry, token):
    cache, position = carry
    logits, cache = model(token[:, None], position[:, None], cache=cache)
    return (cache, position + 1), logits[:, 0]

  _, step_logits = jax.lax.scan(step, (cache, positions[:, -1] + 1), fed.T)
  return prompt_logits, step_logits.swapaxes(0, 1)


def _greedy_by_full_forwards(model, prompts, steps):
  rows = [list(p) for p in prompts]
  for _ in range(steps):
    logits = _full_logits(model, rows)
    for i, row in enumerate(rows):
      row.append(int(np.argmax(logits[i, len(row) - 1])))
  return [row[len(p):] for row, p in zip(rows, prompts)]


@pytest.mark.parametrize("changes", [
    {},  # grouped-query attention, 4 heads over 2 kv heads, scanned layers
    {"num_kv_heads": 4, "scan_layers": False},  # multi-head, unrolled layers
    {"sliding_window": 3},  # the window is shorter than every prompt
], ids=["gqa", "mha_unrolled", "sliding_window"])
def test_cached_logits_equal_full_forward_at_every_step(changes):
  model = _model(**changes)
  fed = np.random.default_rng(0).integers(0, 256, (len(PROMPTS), 5)).astype(np.int32)
  # Wider than the longest prompt, as generate pads: every row has padding to ignore.
  ids, positions = decode._left_pad(PROMPTS, max(map(len, PROMPTS)) + 3)
  prompt_logits, step_logits = _prefill_then_decode(*nnx.split(model), ids, positions, fed)
  full = _full_logits(model, [p + f.tolist() for p, f in zip(PROMPTS, fed)])
  for i, prompt in enumerate(PROMPTS):
    n = len(prompt)
    np.testing.assert_allclose(prompt_logits[i, ids.shape[1] - n:], full[i, :n],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(step_logits[i], full[i, n:n + fed.shape[1]], rtol=1e-5, atol=1e-5)


def test_greedy_equals_argmax_of_full_forwards():
  model = _model()
  expected = _greedy_by_full_forwards(model, PROMPTS, 6)
  assert generate(model, PROMPTS, max_new_tokens=6) == expected
  # (graphdef, params) works the same; num_beams=1 is greedy, as in Hugging Face.
  assert generate(nnx.split(model), PROMPTS, max_new_tokens=6, num_beams=1) == expected


def test_prompt_batches_of_other_lengths_reuse_the_compiled_steps():
  """An evaluation generates batch after batch: prompts pad to a power-of-two width, so
  lengths 2 to 12 share one prefill and one decode loop, and the answers are unchanged."""
  model = _model()
  graphdef, params = nnx.split(model)
  batches = [[[5, 6, 7], [8, 9]], [list(range(1, 12)), [3] * 12]]
  compiled = []
  for prompts in batches:
    assert generate((graphdef, params), prompts, max_new_tokens=4) == (
        _greedy_by_full_forwards(model, prompts, 4))
    compiled.append((decode._prefill._cache_size(), decode._sample_decode._cache_size()))
  assert compiled[1] == compiled[0]
  assert decode._padded_width(17, 4, model.cfg) == 32
  # A learned position table caps the width where the cache would pass its end.
  learned = model.cfg.replace(position_embedding="learned", max_seq_len=40)
  assert decode._padded_width(17, 12, learned) == 29
  assert decode._padded_width(30, 12, learned) == 30  # longer prompts are init_cache's to refuse


def test_sampling_top_k_1_is_greedy_and_seeds_reproduce():
  model = _model()
  greedy = generate(model, PROMPTS, max_new_tokens=6)
  assert generate(model, PROMPTS, max_new_tokens=6, temperature=0.7, top_k=1, seed=3) == greedy
  sample = functools.partial(generate, model, PROMPTS, max_new_tokens=6, temperature=1.0,
                             top_p=0.95)
  assert sample(seed=5) == sample(seed=5)
  assert sample(seed=5) != sample(seed=6)
  assert sample(seed=5) != greedy


def test_top_p_keeps_exactly_the_nucleus():
  probs = np.array([0.05, 0.5, 0.1, 0.2, 0.15], np.float32)
  logits = jnp.log(jnp.asarray(probs))[None]

  def kept(top_p, top_k=0, temperature=1.0):
    return set(np.flatnonzero(np.isfinite(filter_logits(logits, temperature, top_k, top_p)[0])))

  assert kept(0.45) == {1}  # the most likely token alone reaches 0.45
  assert kept(0.6) == {1, 3}  # 0.5 < 0.6 <= 0.5 + 0.2
  assert kept(0.8) == {1, 3, 4}
  assert kept(0.9) == {1, 3, 4, 2}
  assert kept(1.0) == {0, 1, 2, 3, 4}
  # top-k first, then the nucleus of the renormalised rest: 0.5/0.85 < 0.7 <= 0.7/0.85.
  assert kept(0.7, top_k=3) == {1, 3}
  # A high temperature flattens the distribution, so the nucleus grows.
  assert kept(0.6, temperature=10.0) == {1, 3, 4}


def test_one_beam_without_eos_is_greedy():
  model = _model()
  graphdef, params = nnx.split(model)
  ids, positions = decode._left_pad(PROMPTS, max(map(len, PROMPTS)))
  logits, cache = decode._prefill(graphdef, params, ids, positions, slots=ids.shape[1] + 5,
                                  activation_resolver=None)
  tokens, lengths = decode._beam_decode(
      params, cache, logits, positions[:, -1] + 1, jnp.float32(1.0), graphdef=graphdef,
      num_beams=1, max_new_tokens=6, eos_ids=(), activation_resolver=None, gnmt=False)
  assert np.asarray(tokens).tolist() == _greedy_by_full_forwards(model, PROMPTS, 6)
  assert np.asarray(lengths).tolist() == [6] * len(PROMPTS)


def _best_by_enumeration(model, prompt, eos, new_tokens, length_penalty, gnmt=False):
  """The continuation with the highest sum_logp / length ** length_penalty among all that
  end at EOS or after new_tokens tokens, with its margin over the runner-up."""
  tails = [list(t) for t in itertools.product(range(model.cfg.vocab_size), repeat=new_tokens)]
  log_probs = jax.nn.log_softmax(_full_logits(model, [prompt + t for t in tails]), axis=-1)
  scores = {}
  for tail, lp in zip(tails, np.asarray(log_probs)):
    total = 0.0
    for i, token in enumerate(tail):
      total += lp[len(prompt) - 1 + i, token]
      if token == eos or i == new_tokens - 1:
        n = i + 1
        scores[tuple(tail[:n])] = total / ((5 + n) / 6 if gnmt else n) ** length_penalty
        break
  ranked = sorted(scores, key=scores.get, reverse=True)
  return list(ranked[0]), scores[ranked[0]] - scores[ranked[1]]


def test_beam_search_finds_the_best_length_penalised_sequence():
  # Vocab 8, 3 new tokens: 64 beams keep every live hypothesis, so beam search must return
  # the best of all of them. Larger weights give decided, uneven distributions.
  model = _model(seed=1, vocab_size=8, init_std=0.5)
  prompts, eos = [[3, 1, 4, 1], [5, 2]], 0
  lengths = set()
  for length_penalty in (-2.0, 1.0, 3.0):
    expected = []
    for prompt in prompts:
      best, margin = _best_by_enumeration(model, prompt, eos, 3, length_penalty)
      assert margin > 1e-4  # a real winner, not a float tie
      lengths.add(len(best))
      expected.append(best[:-1] if best[-1] == eos else best)
    assert generate(model, prompts, max_new_tokens=3, num_beams=64, eos_ids=(eos,),
                    length_penalty=length_penalty) == expected
  assert len(lengths) > 1  # the length penalty really changed which length wins


def test_beam_search_with_the_gnmt_length_penalty():
  model = _model(seed=1, vocab_size=8, init_std=0.5)
  prompts, eos = [[3, 1, 4, 1], [5, 2]], 0
  for alpha in (-8.0, 0.6, 8.0):
    expected = []
    for prompt in prompts:
      best, margin = _best_by_enumeration(model, prompt, eos, 3, alpha, gnmt=True)
      assert margin > 1e-4
      expected.append(best[:-1] if best[-1] == eos else best)
    assert generate(model, prompts, max_new_tokens=3, num_beams=64, eos_ids=(eos,),
                    length_penalty=alpha, gnmt_length_penalty=True) == expected


def test_eos_stops_one_row_while_others_continue():
  model = _model()
  free = generate(model, PROMPTS, max_new_tokens=6)
  # As EOS, a token that one row produces mid-way, for the first time, and no other row does.
  row, step = next((r, s) for r in range(len(free)) for s in range(1, 5)
                   if free[r][s] not in free[r][:s]
                   and all(free[r][s] not in other for other in free[:r] + free[r + 1:]))
  out = generate(model, PROMPTS, max_new_tokens=6, eos_ids=(free[row][step],))
  assert out == free[:row] + [free[row][:step]] + free[row + 1:]


def test_cache_and_generation_shard_over_a_mesh():
  rules = LogicalRules(build_mesh(dict(data=4, tensor=2)))
  resolver = rules.activation_resolver()
  model = _model()
  with activation_sharding(resolver):
    cache = jax.jit(lambda: init_cache(model.cfg, 4, 8))()
  assert cache["k"].sharding.is_equivalent_to(
      rules.sharding((None, "act_batch", None, "act_kv_heads", None), cache["k"].shape), 5)
  assert cache["k"].sharding.spec[1:4] == ("data", None, "tensor")
  prompts = PROMPTS + [[9, 9, 9]]
  assert (generate(model, prompts, max_new_tokens=4, activation_resolver=resolver)
          == generate(model, prompts, max_new_tokens=4))


def test_stop_strings_and_bad_settings():
  assert truncate_at_stop("Yes. No.\n\nMaybe", ["\n\n", ". N"]) == "Yes"
  assert truncate_at_stop("abc", ["x", ""]) == "abc"
  model = _model()
  for bad in (dict(top_p=0.0), dict(top_k=-1), dict(num_beams=2, temperature=1.0)):
    with pytest.raises(ValueError, match="Invalid generation settings"):
      generate(model, PROMPTS, max_new_tokens=2, **bad)
  with pytest.raises(ValueError, match="at least one token"):
    generate(model, [[1], []], max_new_tokens=2)
  assert generate(model, PROMPTS, max_new_tokens=0) == [[], [], []]
