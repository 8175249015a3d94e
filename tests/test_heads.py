"""Task heads on Llama and BERT trunks, their losses and knowledge distillation, proven
against hand computations and transformers / PyTorch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxlm.finetune.heads import (  # noqa: E402
    HeadSpec, TaskModel, check_batch_labels, check_labels, first_token, last_token,
    last_token_index, mean_pool, task_losses)
from jaxlm.loading import LoadedParams, save_hf_dir  # noqa: E402
from jaxlm.models import Llama, LlamaConfig  # noqa: E402
from jaxlm.models.bert import Bert, BertConfig  # noqa: E402
from jaxlm.train.distill import distillation_loss  # noqa: E402

TINY_LLAMA = LlamaConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, mlp_dim=64, compute_dtype="float32")
TINY_BERT = BertConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64,
                       max_position_embeddings=40, compute_dtype="float32", mlm_head=False)
PAD = 0


def decoder_model(heads, seed=0, **options):
  return TaskModel(Llama(TINY_LLAMA, rngs=nnx.Rngs(seed)), heads, rngs=nnx.Rngs(seed + 1),
                   **options)


def randomize_biases(model, seed=0):
  """Heads start with zero biases: make them random so that a dropped bias shows."""
  for i, head in enumerate(model.heads.values()):
    head.bias[...] = jax.random.normal(jax.random.key(seed + i), head.bias.shape)


def right_padded(lengths, seq, vocab, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, vocab, (len(lengths), seq)).astype(np.int32)
  mask = (np.arange(seq)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  return ids * mask, mask


def left_pad(ids, mask):
  """The same rows with their padding moved to the front."""
  shifts = mask.shape[1] - mask.sum(axis=1)
  return (np.stack([np.roll(row, s) for row, s in zip(ids, shifts)]),
          np.stack([np.roll(row, s) for row, s in zip(mask, shifts)]))


def ce(logits, labels):
  return float(torch.nn.functional.cross_entropy(torch.as_tensor(np.array(logits)),
                                                 torch.as_tensor(np.asarray(labels)).long(),
                                                 ignore_index=-100))


def test_last_token_with_right_and_left_padding():
  ids, mask = right_padded([5, 2, 8], seq=8, vocab=50)
  _, left_mask = left_pad(ids, mask)
  hidden = jax.random.normal(jax.random.key(0), (3, 8, 4))
  np.testing.assert_array_equal(last_token_index(jnp.asarray(mask)), [4, 1, 7])
  np.testing.assert_array_equal(last_token_index(jnp.asarray(left_mask)), [7, 7, 7])
  np.testing.assert_array_equal(last_token(hidden, jnp.asarray(mask)),
                                hidden[jnp.arange(3), jnp.array([4, 1, 7])])
  # By pad id, as transformers does, when a batch comes without a mask.
  np.testing.assert_array_equal(last_token_index(jnp.asarray(ids != PAD)), [4, 1, 7])


def test_first_token_and_mean_pool():
  hidden = jax.random.normal(jax.random.key(1), (2, 5, 3))
  mask = jnp.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(first_token(hidden), hidden[:, 0])
  expected = [hidden[0, :2].mean(0), hidden[1].mean(0)]
  np.testing.assert_allclose(mean_pool(hidden, mask), np.stack(expected), rtol=1e-6)


def test_decoder_sequence_head_matches_manual_computation():
  model = decoder_model({"topic": HeadSpec("sequence", num_labels=3)})
  randomize_biases(model)
  ids, mask = right_padded([6, 3, 9], seq=9, vocab=128)
  logits = model({"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)})["topic"]

  hidden = model.trunk.hidden_states(jnp.asarray(ids), segment_ids=jnp.asarray(mask))
  pooled = hidden[jnp.arange(3), jnp.array([5, 2, 8])]
  head = model.heads["topic"]
  np.testing.assert_allclose(logits, pooled @ head.kernel[...] + head.bias[...], rtol=1e-5,
                             atol=1e-6)
  assert logits.shape == (3, 3) and logits.dtype == jnp.float32


def test_head_parameters_are_named_and_unsharded_on_labels():
  model = decoder_model({"topic": HeadSpec(num_labels=3), "ner": HeadSpec("token", 5)})
  paths = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert paths["heads/topic/kernel"].shape == (32, 3)
  assert paths["heads/ner/bias"].shape == (5,)
  assert paths["heads/topic/kernel"].get_metadata()["out_sharding"] == ("embed", None)


def test_left_padded_rows_give_the_unpadded_outputs():
  model = decoder_model({"topic": HeadSpec(num_labels=3), "ner": HeadSpec("token", 4)})
  ids, mask = right_padded([6, 3, 9], seq=9, vocab=128)
  left_ids, left_mask = left_pad(ids, mask)
  right = model({"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)})
  left = model({"input_ids": jnp.asarray(left_ids), "attention_mask": jnp.asarray(left_mask)})
  np.testing.assert_allclose(left["topic"], right["topic"], rtol=1e-4, atol=1e-5)
  for row, length in enumerate([6, 3, 9]):
    np.testing.assert_allclose(left["ner"][row, 9 - length:], right["ner"][row, :length],
                               rtol=1e-4, atol=1e-5)


def test_decoder_classification_matches_transformers(tmp_path):
  model = decoder_model({"topic": HeadSpec(num_labels=3)}, pad_id=PAD)
  params = nnx.to_pure_dict(nnx.state(model.trunk))
  hf_dir = save_hf_dir(LoadedParams(TINY_LLAMA, params, "llama", None, None), tmp_path / "hf")
  hf = transformers.LlamaForSequenceClassification.from_pretrained(
      hf_dir, num_labels=3, pad_token_id=PAD).eval()
  # HF's score layer has no bias; ours starts at zero, so the two agree.
  head = model.heads["topic"]
  assert not np.any(np.asarray(head.bias[...]))
  with torch.no_grad():
    hf.score.weight.copy_(torch.as_tensor(np.array(head.kernel[...]).T))

  # Right padding and no mask: both find the last token by pad id.
  ids, _ = right_padded([7, 4, 10], seq=10, vocab=128, seed=3)
  ours = model({"input_ids": jnp.asarray(ids)})["topic"]
  with torch.no_grad():
    theirs = hf(torch.as_tensor(ids).long()).logits.numpy()
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pooling", [None, "pooler"])
def test_encoder_first_token_head(pooling):
  bert = Bert(TINY_BERT, rngs=nnx.Rngs(0))
  model = TaskModel(bert, {"nli": HeadSpec(num_labels=3, pooling=pooling),
                           "sts": HeadSpec("regression", pooling=pooling)}, rngs=nnx.Rngs(1))
  randomize_biases(model)
  ids, mask = right_padded([7, 4], seq=8, vocab=100)
  types = (np.arange(8)[None] >= 3).astype(np.int32) * mask
  batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
           "token_type_ids": jnp.asarray(types)}
  outputs = model(batch)

  hidden = bert(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
  pooled = bert.pooled(hidden) if pooling == "pooler" else hidden[:, 0]
  for name in ("nli", "sts"):
    head = model.heads[name]
    expected = pooled @ head.kernel[...] + head.bias[...]
    np.testing.assert_allclose(outputs[name], expected if name == "nli" else expected[:, 0],
                               rtol=1e-5, atol=1e-6)
  assert outputs["sts"].shape == (2,)


def test_pooling_a_decoder_on_its_first_token_is_refused():
  with pytest.raises(ValueError, match="causal"):
    decoder_model({"topic": HeadSpec(pooling="first")})


def test_multi_task_loss_is_the_weighted_sum_with_unlabelled_rows_ignored():
  specs = {"topic": HeadSpec(num_labels=3, weight=0.5), "sentiment": HeadSpec(weight=2.0),
           "score": HeadSpec("regression", weight=0.25)}
  rng = np.random.default_rng(0)
  outputs = {"topic": rng.normal(size=(4, 3)), "sentiment": rng.normal(size=(4, 2)),
             "score": rng.normal(size=4)}
  # Each row is labelled for some tasks only.
  labels = {"topic": np.array([2, -100, 0, -100]), "sentiment": np.array([-100, 1, 1, 0]),
            "score": np.array([0.5, np.nan, np.nan, -1.0])}
  total, per_task = task_losses(jax.tree.map(jnp.asarray, outputs),
                                {"labels": jax.tree.map(jnp.asarray, labels)}, specs)

  expected = {"topic": ce(outputs["topic"][[0, 2]], [2, 0]),
              "sentiment": ce(outputs["sentiment"][1:], [1, 1, 0]),
              "score": np.mean((outputs["score"][[0, 3]] - [0.5, -1.0]) ** 2)}
  for name in specs:
    assert float(per_task[name]) == pytest.approx(expected[name], rel=1e-5)
  assert float(total) == pytest.approx(
      0.5 * expected["topic"] + 2.0 * expected["sentiment"] + 0.25 * expected["score"], rel=1e-5)
  # A task with no labelled row contributes 0, not NaN.
  _, none = task_losses(outputs, {"labels": {**labels, "topic": np.full(4, -100)}}, specs)
  assert float(none["topic"]) == 0.0


def test_token_head_loss_ignores_minus_100():
  model = decoder_model({"ner": HeadSpec("token", num_labels=5)})
  ids, mask = right_padded([6, 3], seq=6, vocab=128)
  labels = np.where(mask, np.random.default_rng(1).integers(0, 5, mask.shape), -100)
  labels[0, 0] = -100  # e.g. a word's continuation piece
  batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
           "labels": {"ner": jnp.asarray(labels)}}
  outputs = model(batch)
  assert outputs["ner"].shape == (2, 6, 5)
  total, per_task = task_losses(outputs, batch, model.specs)
  expected = ce(np.asarray(outputs["ner"]).reshape(-1, 5), labels.reshape(-1))
  assert float(per_task["ner"]) == pytest.approx(expected, rel=1e-5)
  assert float(total) == pytest.approx(expected, rel=1e-5)


def test_check_labels_names_the_task_value_and_range():
  check_labels(np.array([0, 2, -100]), 3, "topic")
  with pytest.raises(ValueError, match=r"'topic'.* 3 .*\[0, 3\)"):
    check_labels(np.array([0, 3, -100]), 3, "topic")
  with pytest.raises(ValueError, match=r"'ner'.*-1 .*\[0, 5\)"):
    check_batch_labels({"labels": {"ner": np.array([[0, -1]]), "sts": np.array([9.5])}},
                       {"ner": HeadSpec("token", 5), "sts": HeadSpec("regression")})


def test_jitted_sgd_steps_learn_a_separable_task():
  model = decoder_model({"parity": HeadSpec(num_labels=2), "ner": HeadSpec("token", 2)})
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 128, (16, 6)).astype(np.int32)
  # The class is the last token's id parity for the sequence task, each token's for "ner".
  batch = {"input_ids": jnp.asarray(ids),
           "labels": {"parity": jnp.asarray(ids[:, -1] % 2), "ner": jnp.asarray(ids % 2)}}
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def step(params, batch):
    def loss_fn(params):
      merged = nnx.merge(graphdef, params, rest)
      return task_losses(merged(batch), batch, merged.specs)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    return jax.tree.map(lambda p, g: p - 0.5 * g, params, grads), loss

  losses = []
  for _ in range(30):
    params, loss = step(params, batch)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0], losses


def torch_kd(student, teacher, temperature):
  s, t = torch.as_tensor(student), torch.as_tensor(teacher)
  F = torch.nn.functional
  return float(F.kl_div(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1),
                        reduction="batchmean") * temperature**2)


def test_distillation_of_a_model_into_itself_is_zero():
  logits = jax.random.normal(jax.random.key(0), (2, 5, 16)) * 4
  assert float(distillation_loss(logits, logits, None, temperature=1.0, alpha=1.0)) == \
      pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_distillation_matches_torch_kl_div_over_masked_tokens(temperature):
  rng = np.random.default_rng(0)
  student = rng.normal(size=(3, 7, 50)).astype(np.float32) * 3
  teacher = rng.normal(size=(3, 7, 50)).astype(np.float32) * 3
  mask = (np.arange(7)[None] < np.array([[7], [2], [5]])).astype(np.int32)
  ours = distillation_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(mask),
                           temperature=temperature, alpha=1.0)
  kept = mask.astype(bool)
  assert float(ours) == pytest.approx(torch_kd(student[kept], teacher[kept], temperature),
                                      rel=1e-5)
  # Sequence logits [b, classes] average over rows.
  rows = distillation_loss(jnp.asarray(student[:, 0]), jnp.asarray(teacher[:, 0]),
                           temperature=temperature)
  assert float(rows) == pytest.approx(torch_kd(student[:, 0], teacher[:, 0], temperature),
                                      rel=1e-5)


def test_distillation_mixes_in_the_hard_loss():
  rng = np.random.default_rng(1)
  student = rng.normal(size=(2, 4, 10)).astype(np.float32)
  teacher = rng.normal(size=(2, 4, 10)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]])
  targets = np.where(mask, rng.integers(0, 10, mask.shape), -100)
  ours = distillation_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(mask),
                           temperature=2.0, alpha=0.3, targets=jnp.asarray(targets))
  kept = mask.astype(bool)
  expected = (0.3 * torch_kd(student[kept], teacher[kept], 2.0)
              + 0.7 * ce(student.reshape(-1, 10), targets.reshape(-1)))
  assert float(ours) == pytest.approx(expected, rel=1e-5)


def test_distillation_refuses_a_vocabulary_mismatch_and_missing_targets():
  with pytest.raises(ValueError, match="student has 32 .*teacher 48"):
    distillation_loss(jnp.zeros((2, 3, 32)), jnp.zeros((2, 3, 48)), temperature=2.0,
                      alpha=1.0)
  with pytest.raises(ValueError, match="targets"):
    distillation_loss(jnp.zeros((2, 8)), jnp.zeros((2, 8)), temperature=1.0, alpha=0.5)
