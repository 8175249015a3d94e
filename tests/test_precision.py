"""Mixed precision where it is easy to lose: gradients that are long sums (an embedding row
of a frequent token, a bias over every token) must be summed in the float32 of the master
weights, not in the bfloat16 compute dtype; and with model.float32_weight_grads so must the
projections' gradients, across devices too."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.finetune.lora import apply_lora
from jaxlm.layers.linear import Einsum, Embedding, LoRAParam
from jaxlm.models import Llama, from_preset
from jaxlm.models.bert import PRESETS as ENCODER_PRESETS, Bert
from jaxlm.plan import plan


def _bf16(x):
  return np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)


def _relative_error(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.linalg.norm(got - want) / np.linalg.norm(want)


def test_a_frequent_tokens_embedding_gradient_is_summed_in_float32():
  rng = np.random.default_rng(0)
  vocab, dim = 1000, 32
  # Zipf-distributed ids, as in text: the most frequent token appears thousands of times.
  ids = np.minimum(rng.zipf(1.2, (8, 1024)) - 1, vocab - 1)
  assert np.bincount(ids.ravel()).max() > 1500
  cotangent = rng.normal(size=(8, 1024, dim))
  embedding = Embedding(vocab, dim, rngs=nnx.Rngs(0), param_dtype=jnp.float32,
                        compute_dtype=jnp.bfloat16, init_std=0.02)

  def loss(module):
    rows = module(jnp.asarray(ids))
    assert rows.dtype == jnp.bfloat16
    return jnp.sum(rows.astype(jnp.float32) * jnp.asarray(cotangent, jnp.bfloat16))

  grad = nnx.grad(loss)(embedding).table[...]
  want = np.zeros((vocab, dim))
  np.add.at(want, ids, _bf16(cotangent))  # the bf16 cotangent, summed exactly
  assert grad.dtype == jnp.float32
  # Summed in bfloat16 this was 3.7% off (measured).
  assert _relative_error(grad, want) < 1e-5


def test_a_bias_gradient_is_summed_in_float32():
  rng = np.random.default_rng(1)
  layer = Einsum("btd,dm->btm", (16, 24), ("embed", "mlp"), rngs=nnx.Rngs(0),
                 param_dtype=jnp.float32, compute_dtype=jnp.bfloat16, init_std=0.02,
                 bias_shape=(24,), bias_names=("mlp",))
  x = jnp.asarray(rng.normal(size=(16, 1024, 16)), jnp.float32)
  cotangent = rng.normal(size=(16, 1024, 24)) + 0.3

  def loss(module):
    y = module(x)
    assert y.dtype == jnp.bfloat16
    return jnp.sum(y.astype(jnp.float32) * jnp.asarray(cotangent, jnp.bfloat16))

  grad = nnx.grad(loss)(layer).bias[...]
  # Summed in bfloat16 this was 0.7% off (measured).
  assert _relative_error(grad, _bf16(cotangent).sum(axis=(0, 1))) < 1e-6


def _gradients(float32_weight_grads, remat_policy="none", lora=False):
  """(gradients, compiled FLOPs, compiled temp bytes) of a demo model's loss."""
  model = Llama(from_preset("demo", remat_policy=remat_policy,
                            float32_weight_grads=float32_weight_grads), rngs=nnx.Rngs(0))
  if lora:
    apply_lora(model, "attention/(q|v)_proj", rank=4, alpha=8.0, rngs=nnx.Rngs(1))
    # B starts at zero; a nonzero B gives A a gradient to compare.
    for _, variable in nnx.iter_graph(model):
      if isinstance(variable, LoRAParam) and not np.any(variable[...]):
        variable[...] = 0.01 * jnp.ones_like(variable[...])
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 4096, (4, 128)))
  graphdef, state = nnx.split(model)
  grad = jax.jit(jax.grad(lambda s: jnp.mean(nnx.merge(graphdef, s)(ids) ** 2)))
  compiled = grad.lower(state).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return grad(state), cost["flops"], compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("remat_policy", ["none", "minimal", "dots", "full"])
def test_float32_weight_grads_cost_no_matmul_work_or_memory_under_any_remat_policy(
    remat_policy):
  """The policies that keep matmul outputs (dots, minimal) must still find them inside the
  custom_vjp, or the backward would recompute them (more FLOPs)."""
  default, flops, temp = _gradients(False, remat_policy)
  float32, flops32, temp32 = _gradients(True, remat_policy)
  assert flops32 <= flops * 1.001 and temp32 <= temp * 1.01, (flops32 / flops, temp32 / temp)
  # The same gradients, but for the rounding of each weight's gradient to bfloat16.
  for (path, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(float32)[0],
                               jax.tree_util.tree_flatten_with_path(default)[0]):
    assert a.dtype == b.dtype == jnp.float32
    assert _relative_error(a, b) < 1e-2, jax.tree_util.keystr(path)


def test_float32_weight_grads_reach_lora_adapters():
  float32, _, _ = _gradients(True, lora=True)
  default, _, _ = _gradients(False, lora=True)
  adapters = [(a, b) for (path, a), (_, b) in zip(
      jax.tree_util.tree_flatten_with_path(float32)[0],
      jax.tree_util.tree_flatten_with_path(default)[0]) if "lora" in jax.tree_util.keystr(path)]
  assert len(adapters) == 4  # A and B of q_proj and v_proj
  for a, b in adapters:
    assert np.any(a != 0) and _relative_error(a, b) < 1e-2


def test_float32_weight_grads_sum_every_gradient_across_devices_in_float32():
  """data=8: every gradient is all-reduced over data; with the option every one of them in
  float32, without it the layers' projections in bf16 (and the rest in float32)."""
  dtypes, sent = {}, {}
  for option in (False, True):
    (row,) = plan("demo", [{"data": 8}], seq_len=128, batch_size=8, hbm_gib=80,
                  top_collectives=1000, overrides={"model.float32_weight_grads": option})
    reduced = [c for c in row["top_collectives"] if c["kind"] == "all-reduce"]
    dtypes[option] = {c["shape"].split("[")[0] for c in reduced}
    sent[option] = row["sent_bytes"]
  assert dtypes == {False: {"bf16", "f32"}, True: {"f32"}}
  cfg = from_preset("demo")
  projections = cfg.num_layers * (cfg.hidden_size * cfg.resolved_head_dim * (
      2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * cfg.hidden_size * cfg.mlp_dim)
  # Their 2 more bytes a weight, over the ring: 2 x 7/8 of them.
  assert abs(sent[True] - sent[False] - 2 * 7 / 8 * 2 * projections) < 1e-3 * sent[True]


def test_float32_weight_grads_in_an_encoder():
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 1024, (2, 64)))
  grads = []
  for option in (False, True):
    model = Bert(ENCODER_PRESETS["bert-tiny"].replace(float32_weight_grads=option),
                 rngs=nnx.Rngs(0))
    grads.append(nnx.grad(lambda m: jnp.mean(m(ids) ** 2))(model))
  for a, b in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[0])):
    assert not np.any(b) and not np.any(a) or _relative_error(a, b) < 1e-2  # zeros: unused
