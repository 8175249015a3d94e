"""Schedules, optimizers and the loss, against worked values."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm.config import base_config
from jaxlm.train.loss import cross_entropy
from jaxlm.train.optimizer import OPTIMIZERS, decay_mask, make_optimizer, make_schedule


def optim(**changes):
  cfg = base_config().optim
  cfg.update(changes)
  return cfg


def test_exponential_decay_per_epoch():
  # lr0 = 5e-5 decayed by 0.99 per epoch of 100 steps: 5e-5 * 0.99**10 after 10 epochs.
  schedule = make_schedule(optim(schedule="exponential", learning_rate=5e-5, warmup_steps=0,
                                 transition_steps=100, decay_rate=0.99, staircase=True,
                                 final_lr_ratio=0.0), total_steps=5000)
  assert float(schedule(1000)) == pytest.approx(4.5219e-5, rel=1e-4)
  assert float(schedule(1050)) == pytest.approx(4.5219e-5, rel=1e-4)  # staircase holds
  assert float(schedule(0)) == pytest.approx(5e-5)


def test_warmup_cosine_endpoints():
  schedule = make_schedule(optim(schedule="cosine", learning_rate=1e-3, warmup_steps=100,
                                 final_lr_ratio=0.1), total_steps=1000)
  assert float(schedule(0)) == 0.0
  assert float(schedule(50)) == pytest.approx(5e-4)
  assert float(schedule(100)) == pytest.approx(1e-3)
  assert float(schedule(550)) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4), rel=1e-5)
  assert float(schedule(1000)) == pytest.approx(1e-4)


def test_linear_step_wsd_and_constant():
  lin = make_schedule(optim(schedule="linear", learning_rate=1.0, warmup_steps=0,
                            final_lr_ratio=0.0), total_steps=10)
  assert [float(lin(s)) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
  step = make_schedule(optim(schedule="step", learning_rate=1.0, warmup_steps=0,
                             boundaries=(3, 6), decay_rate=0.1), total_steps=10)
  assert [float(step(s)) for s in (2, 3, 6)] == pytest.approx([1.0, 0.1, 0.01])
  wsd = make_schedule(optim(schedule="wsd", learning_rate=1.0, warmup_steps=10,
                            decay_fraction=0.2, final_lr_ratio=0.0), total_steps=110)
  assert [float(wsd(s)) for s in (5, 10, 90, 100, 110)] == pytest.approx(
      [0.5, 1.0, 1.0, 0.5, 0.0])
  const = make_schedule(optim(schedule="constant", learning_rate=0.3, warmup_steps=0), 10)
  assert float(const(7)) == pytest.approx(0.3)


def test_unknown_schedule_and_optimizer_are_named():
  with pytest.raises(ValueError, match="choose one of constant, cosine"):
    make_schedule(optim(schedule="cosin"), 10)
  with pytest.raises(ValueError, match="choose one of adamw, adam"):
    make_optimizer(optim(name="adam_w"), 10)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_descends_a_quadratic(name):
  tx, _ = make_optimizer(optim(name=name, learning_rate=0.05, warmup_steps=0,
                               schedule="constant", weight_decay=0.0), total_steps=100)
  params = {"w": jnp.array([[3.0, -2.0], [1.0, 4.0]])}
  state = tx.init(params)
  loss = lambda p: jnp.sum(p["w"] ** 2)
  start = loss(params)
  for _ in range(20):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  assert loss(params) < 0.9 * start


def test_weight_decay_skips_norms_and_biases():
  params = {"layers": {"input_norm": {"scale": 1}, "attention": {
      "q_proj": {"kernel": 1, "bias": 1}}}, "final_norm": {"scale": 1}}
  mask = decay_mask(params)
  assert mask["layers"]["attention"]["q_proj"] == {"kernel": True, "bias": False}
  assert mask["layers"]["input_norm"]["scale"] is False
  assert mask["final_norm"]["scale"] is False


def test_label_smoothing_targets():
  # With a = 0.1 over 3 classes the target distribution is [0.9333, 0.0333, 0.0333].
  logits = jnp.array([[[2.0, -1.0, 0.5]]])
  target = jnp.array([[0]])
  out = cross_entropy(logits, target, jnp.ones((1, 1)), label_smoothing=0.1)
  q = np.array([0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3])
  np.testing.assert_allclose(q, [0.9333, 0.0333, 0.0333], atol=1e-4)
  expected = float(-np.sum(q * jax.nn.log_softmax(np.array([2.0, -1.0, 0.5]))))
  assert float(out["loss_sum"]) == pytest.approx(expected, rel=1e-6)


def test_masked_positions_are_ignored_exactly():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 7, (2, 5)))
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
  base = cross_entropy(logits, targets, mask)
  # Garbage (even inf) logits and any targets at masked positions change nothing.
  poisoned = logits.at[0, 3:].set(1e30).at[1, 4].set(-1e30)
  other_targets = targets.at[0, 3:].set(0).at[1, 4].set(6)
  out = cross_entropy(poisoned, other_targets, mask)
  assert float(out["loss_sum"]) == float(base["loss_sum"])
  assert float(out["tokens"]) == 7.0
  manual = sum(-jax.nn.log_softmax(logits[b, t])[targets[b, t]]
               for b in range(2) for t in range(5) if mask[b, t])
  assert float(base["loss_sum"]) == pytest.approx(float(manual), rel=1e-6)


def test_z_loss_adds_squared_log_normaliser():
  logits = jnp.array([[[1.0, 2.0, 3.0]]])
  out = cross_entropy(logits, jnp.array([[2]]), jnp.ones((1, 1)), z_loss=1e-2)
  log_z = float(jax.nn.logsumexp(logits))
  nll = log_z - 3.0
  assert float(out["loss_sum"]) == pytest.approx(nll + 1e-2 * log_z ** 2, rel=1e-6)


@pytest.mark.parametrize("label_smoothing,z_loss", [(0.0, 0.0), (0.1, 1e-3)])
def test_cross_entropy_and_its_gradient_match_log_softmax(label_smoothing, z_loss):
  # cross_entropy picks the target's logit by comparison (for a fusable gradient); check it
  # and its gradient against the textbook log-softmax form.
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(scale=3.0, size=(2, 6, 11)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 11, (2, 6)))
  mask = jnp.asarray(rng.integers(0, 2, (2, 6)))

  def reference(logits):
    log_p = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]
    loss = (1 - label_smoothing) * nll - label_smoothing * jnp.mean(log_p, axis=-1)
    loss = loss + z_loss * jnp.square(jax.nn.logsumexp(logits, axis=-1))
    return jnp.sum(loss * mask)

  def ours(logits):
    return cross_entropy(logits, targets, mask, label_smoothing=label_smoothing,
                         z_loss=z_loss)["loss_sum"]

  np.testing.assert_allclose(ours(logits), reference(logits), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(reference)(logits),
                             rtol=1e-5, atol=1e-7)
