"""attention_impl='pallas': jax's Pallas flash-attention kernel (Triton on a GPU, run
interpreted here) gives XLA's attention, document mask and gradients included, on each
device's shard of a sharded model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import ConfigError
from jaxlm.layers.attention import causal_attention
from jaxlm.layers.sharding import activation_sharding, per_shard
from jaxlm.models.config import from_preset
from jaxlm.parallel.mesh import build_mesh
from jaxlm.parallel.rules import LogicalRules
from jaxlm.train.loop import Run

from tests.helpers import assert_trees_close


def _qkv(batch=2, length=64, heads=4, kv_heads=2, head_dim=16, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(batch, length, n, head_dim)), jnp.float32)
          for n in (heads, kv_heads, kv_heads)]


def _documents(batch, length):
  """Three documents of uneven lengths, then padding (segment 0), in every row."""
  return jnp.asarray(np.tile(np.repeat([1, 2, 3, 0], [20, 7, 29, length - 56]), (batch, 1)),
                     jnp.int32)


@pytest.mark.parametrize("documents", [False, True], ids=["one-stream", "packed"])
def test_pallas_attention_matches_xla_with_gradients(documents):
  q, k, v = _qkv()
  segment_ids = _documents(2, 64) if documents else None

  def loss(impl):
    return lambda q, k, v: jnp.sum(jnp.sin(causal_attention(q, k, v, segment_ids,
                                                             implementation=impl)))

  for impl_out, xla_out in zip(
      (causal_attention(q, k, v, segment_ids, implementation="pallas"),
       *jax.grad(loss("pallas"), argnums=(0, 1, 2))(q, k, v)),
      (causal_attention(q, k, v, segment_ids, implementation="xla"),
       *jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v))):
    np.testing.assert_allclose(impl_out, xla_out, rtol=1e-5, atol=2e-5)


def test_per_shard_hands_the_kernel_each_devices_shard():
  """Under fsdp=4 x tensor=2 the kernel sees a quarter of the rows and half of the heads
  (query and key/value alike), and the result comes back as the whole array."""
  mesh = build_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  rules = LogicalRules(mesh)
  q, k, v = _qkv(batch=8, heads=4, kv_heads=2)
  seen = []

  def kernel(q, k, v, segment_ids):
    seen.append((q.shape, k.shape, segment_ids.shape))
    return causal_attention(q, k, v, segment_ids, implementation="xla")

  names = [("act_batch", None, "act_heads", None), ("act_batch", None, "act_kv_heads", None),
           ("act_batch", None, "act_kv_heads", None), ("act_batch", None)]
  segment_ids = _documents(8, 64)
  with activation_sharding(rules.activation_resolver()):
    out = jax.jit(per_shard(kernel, names, names[0]))(q, k, v, segment_ids)
  assert seen == [((2, 64, 2, 16), (2, 64, 1, 16), (2, 64))]
  assert out.sharding.is_equivalent_to(rules.sharding(names[0], out.shape), out.ndim)
  np.testing.assert_allclose(out, causal_attention(q, k, v, segment_ids,
                                                   implementation="xla"), atol=1e-6)


def test_pallas_train_step_matches_xla_on_a_sharded_model(tiny_config):
  """One train step of a packed batch under fsdp x tensor: the same loss and parameters."""
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 4096, (8, 33)).astype(np.int32)
  segment_ids = np.tile(np.repeat([1, 2, 0], [20, 9, 3]), (8, 1)).astype(np.int32)
  rows = {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
          "loss_mask": (segment_ids > 0).astype(np.int32), "segment_ids": segment_ids,
          "positions": np.tile(np.concatenate([np.arange(20), np.arange(9), np.zeros(3)]),
                               (8, 1)).astype(np.int32)}
  results = []
  for impl in ("xla", "pallas"):
    run = Run.build(tiny_config(model__attention_impl=impl, mesh__fsdp=4, mesh__tensor=2))
    state, metrics = run.trainer.train_step(run.trainer.init_state(0), run.global_batch(rows))
    results.append((float(metrics["loss"]), state["params"]))
  assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
  assert_trees_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-6)


def test_pallas_attention_refuses_what_the_kernel_cannot_do(tiny_config):
  q, k, v = _qkv(length=48)
  with pytest.raises(ValueError, match="multiple of them, not 48"):
    causal_attention(q, k, v, implementation="pallas")
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="no sliding window"):
    causal_attention(q, k, v, sliding_window=16, implementation="pallas")
  with pytest.raises(ValueError, match=r"attention_impl='pallas' \(one of None, xla, cudnn\)"):
    from jaxlm.models.factory import encoder_preset
    encoder_preset("bert-tiny", attention_impl="pallas")
  assert from_preset("tiny", attention_impl="pallas").attention_impl == "pallas"
  with pytest.raises(ValueError, match="no sliding window: use 'cudnn' or 'xla' with "
                                       "sliding_window=16"):
    from_preset("tiny", attention_impl="pallas", sliding_window=16)
  with pytest.raises(ConfigError, match=r"tiles the sequence by \[32, 128\]: .* not 160 "
                                        r"\(data.seq_len\)"):
    Run.build(tiny_config(model__attention_impl="pallas", data__seq_len=160))
