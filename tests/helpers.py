"""Small shared pieces for the tests."""
import numpy as np


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  import jax
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(jax.device_get(a))
  flat_b, tree_b = jax.tree_util.tree_flatten_with_path(jax.device_get(b))
  assert tree_a == tree_b
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def random_batch(batch, seq, vocab, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32)
  return {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
          "loss_mask": np.ones((batch, seq), np.int32)}
