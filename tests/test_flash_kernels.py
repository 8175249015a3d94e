"""The Pallas flash-attention kernels (attention_impl 'pallas_gpu' and 'splash', run
interpreted here) give XLA's attention, document and sliding-window masks and gradients
included, on each device's shard of a sharded model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import ConfigError
from jaxlm.layers.attention import causal_attention
from jaxlm.layers.sharding import activation_sharding, per_shard
from jaxlm.models.config import from_preset
from jaxlm.models.factory import encoder_preset
from jaxlm.parallel.mesh import build_mesh
from jaxlm.parallel.rules import LogicalRules
from jaxlm.train.loop import Run

from tests.helpers import assert_trees_close

LENGTH = 128  # the least that splash tiles


def _qkv(batch=2, length=LENGTH, heads=4, kv_heads=2, head_dim=16, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(batch, length, n, head_dim)), jnp.float32)
          for n in (heads, kv_heads, kv_heads)]


def _documents(batch, length=LENGTH):
  """Three documents of uneven lengths, then padding (segment 0), in every row."""
  sizes = [40, 7, 61, length - 108]
  return np.tile(np.repeat([1, 2, 3, 0], sizes), (batch, 1)).astype(np.int32)


@pytest.mark.parametrize("implementation, documents, window", [
    ("pallas_gpu", False, None), ("pallas_gpu", True, None),
    ("splash", False, None), ("splash", True, None), ("splash", True, 24),
])
def test_kernel_matches_xla_with_gradients(implementation, documents, window):
  q, k, v = _qkv()
  segment_ids = jnp.asarray(_documents(2)) if documents else None

  def attend(impl):
    return lambda q, k, v: causal_attention(q, k, v, segment_ids, sliding_window=window,
                                            implementation=impl)

  def loss(impl):
    return lambda q, k, v: jnp.sum(jnp.sin(attend(impl)(q, k, v)))

  ours = (attend(implementation)(q, k, v), *jax.grad(loss(implementation), (0, 1, 2))(q, k, v))
  xla = (attend("xla")(q, k, v), *jax.grad(loss("xla"), (0, 1, 2))(q, k, v))
  for name, a, b in zip(("out", "dq", "dk", "dv"), ours, xla):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5, err_msg=name)


def test_per_shard_hands_the_kernel_each_devices_shard():
  """Under fsdp=4 x tensor=2 the kernel sees a quarter of the rows and half of the heads
  (query and key/value alike), and the result comes back as the whole array."""
  mesh = build_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  rules = LogicalRules(mesh)
  q, k, v = _qkv(batch=8, length=64)
  seen = []

  def kernel(q, k, v, segment_ids):
    seen.append((q.shape, k.shape, segment_ids.shape))
    return causal_attention(q, k, v, segment_ids, implementation="xla")

  names = [("act_batch", None, "act_heads", None), ("act_batch", None, "act_kv_heads", None),
           ("act_batch", None, "act_kv_heads", None), ("act_batch", None)]
  segment_ids = jnp.asarray(_documents(8)[:, :64])
  with activation_sharding(rules.activation_resolver()):
    out = jax.jit(per_shard(kernel, names, names[0]))(q, k, v, segment_ids)
  assert seen == [((2, 64, 2, 16), (2, 64, 1, 16), (2, 64))]
  assert out.sharding.is_equivalent_to(rules.sharding(names[0], out.shape), out.ndim)
  np.testing.assert_allclose(out, causal_attention(q, k, v, segment_ids,
                                                   implementation="xla"), atol=1e-6)


@pytest.mark.parametrize("implementation", ["pallas_gpu", "splash"])
def test_kernel_train_step_matches_xla_on_a_sharded_model(tiny_config, implementation):
  """One train step of a packed batch under fsdp x tensor: the same loss and parameters."""
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 4096, (8, LENGTH + 1)).astype(np.int32)
  segment_ids = _documents(8)
  starts = np.r_[0, np.flatnonzero(np.diff(segment_ids[0]))+ 1]
  positions = np.arange(LENGTH) - np.repeat(starts, np.diff(np.r_[starts, LENGTH]))
  rows = {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
          "loss_mask": (segment_ids > 0).astype(np.int32), "segment_ids": segment_ids,
          "positions": np.tile(positions, (8, 1)).astype(np.int32)}
  results = []
  for impl in ("xla", implementation):
    run = Run.build(tiny_config(model__attention_impl=impl, mesh__fsdp=4, mesh__tensor=2,
                                data__seq_len=LENGTH))
    state, metrics = run.trainer.train_step(run.trainer.init_state(0), run.global_batch(rows))
    results.append((float(metrics["loss"]), state["params"]))
  assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
  assert_trees_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-6)


def test_kernels_refuse_what_they_cannot_do(tiny_config):
  q, k, v = _qkv(length=48)
  with pytest.raises(ValueError, match="multiple of them, not 48"):
    causal_attention(q, k, v, implementation="pallas_gpu")
  with pytest.raises(ValueError, match="splash' tiles the sequence by 128: .* not 48"):
    causal_attention(q, k, v, implementation="splash")
  with pytest.raises(ValueError, match="no sliding window: use 'splash', 'cudnn' or 'xla' "
                                       "with sliding_window=16"):
    from_preset("tiny", attention_impl="pallas_gpu", sliding_window=16)
  assert from_preset("tiny", attention_impl="splash", sliding_window=16).sliding_window == 16
  with pytest.raises(ConfigError, match=r"tiles the sequence by \[32, 128\]: .* not 160 "
                                        r"\(data.seq_len\)"):
    Run.build(tiny_config(model__attention_impl="pallas_gpu", data__seq_len=160))
  with pytest.raises(ValueError, match=r"attention_impl='splash' \(one of None, xla, cudnn\)"):
    encoder_preset("bert-tiny", attention_impl="splash")


def test_splash_kernel_built_inside_one_jit_serves_the_next():
  """The kernel is built once per shape, whichever trace asks first; a later trace must not
  meet that first trace's tracers."""
  q, k, v = _qkv(length=2 * LENGTH)  # a shape no other test builds

  def attend(q, k, v):
    return causal_attention(q, k, v, implementation="splash")

  first = jax.jit(attend)(q, k, v)
  np.testing.assert_allclose(jax.jit(lambda *x: attend(*x) + 0.0)(q, k, v), first)
