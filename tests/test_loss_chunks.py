"""train.loss_chunk_len: a decoder's logits and loss a chunk of positions at a time give the
same step as the whole sequence at once, hold less memory, and refuse what they cannot do."""
import re

import numpy as np
import pytest

from jaxlm.config import ConfigError
from jaxlm.plan import compiled_memory
from jaxlm.train.loop import Run

from tests.helpers import assert_trees_close


def _packed_batch(batch, seq, vocab, seed=0):
  """Random tokens in rows of two documents (positions restart, segment ids change) with
  some positions out of the loss, as the data pipeline gives them."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32)
  split = seq // 3
  positions = np.concatenate([np.arange(split), np.arange(seq - split)])
  return {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
          "loss_mask": (rng.random((batch, seq)) > 0.2).astype(np.int32),
          "positions": np.tile(positions, (batch, 1)).astype(np.int32),
          "segment_ids": np.tile(np.repeat([1, 2], [split, seq - split]), (batch, 1)
                                 ).astype(np.int32)}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_chunked_loss_gives_the_same_step(tiny_config, tied):
  """Loss, z-loss, gradients and the updated parameters of one step (label smoothing,
  z-loss, gradient accumulation, vocab split over tensor) match the whole-sequence loss,
  and so does evaluation."""
  common = dict(model__tie_embeddings=tied, train__label_smoothing=0.1, train__z_loss=1e-3,
                train__grad_accum_steps=2, mesh__fsdp=4, mesh__tensor=2)
  whole = Run.build(tiny_config(**common))
  chunked = Run.build(tiny_config(train__loss_chunk_len=8, **common))
  rows = _packed_batch(8, 32, 4096)
  results = []
  for run in (whole, chunked):
    state = run.trainer.init_state(0)
    batch = run.global_batch(rows)
    evaluated = run.trainer.eval_step(run.trainer.model_params(state), batch)
    new_state, metrics = run.trainer.train_step(state, batch)  # donates state
    results.append((new_state["params"], metrics, evaluated))
  (params_a, metrics_a, eval_a), (params_b, metrics_b, eval_b) = results
  for key in ("loss", "nll", "z_loss", "grad_norm", "tokens"):
    np.testing.assert_allclose(float(metrics_b[key]), float(metrics_a[key]), rtol=2e-6,
                               err_msg=key)
  assert_trees_close(params_b, params_a, rtol=1e-5, atol=1e-7)
  assert_trees_close(eval_b, eval_a, rtol=2e-6, atol=0)


def test_chunked_loss_holds_one_chunk_of_logits(tiny_config):
  """The compiled step's scratch shrinks by more than the float32 logits (the whole loss's
  gradient is one fused pass over them, so they are most of what it adds), and FSDP gathers
  the output projection once, outside the chunk loop."""
  vocab, seq, batch = 32000, 256, 8
  logits_per_device = batch // 8 * seq * vocab * 4
  temp, hlo = {}, {}
  for chunk in (0, 32):
    run = Run.build(tiny_config(model__vocab_size=vocab, data__seq_len=seq,
                                data__batch_size=batch, train__loss_chunk_len=chunk))
    shape = (batch, seq)
    compiled = run.trainer.lower_train_step(
        {k: shape for k in ("input_ids", "targets", "loss_mask")}).compile()
    temp[chunk] = compiled_memory(compiled)["temp_bytes"]
    hlo[chunk] = compiled.as_text()
  assert temp[0] - temp[32] > 1.25 * logits_per_device, temp
  gathers = [line for line in hlo[32].splitlines()
             if re.search(r"all-gather(-start)?\(", line) and str(vocab) in line]
  assert gathers and not any("while/body" in line for line in gathers), gathers


@pytest.mark.parametrize("overrides, message", [
    (dict(train__loss_chunk_len=24), "must divide data.seq_len = 32 (e.g. 32)"),
    (dict(train__loss_chunk_len=8, model__num_labels=2, data__format="classification",
          data__labels=("neg", "pos")), "does not apply to a classification"),
    (dict(train__loss_chunk_len=8, model__preset="bert-tiny", model__vocab_size=320),
     "does not apply to an encoder"),
])
def test_chunked_loss_refuses_what_it_cannot_do(tiny_config, overrides, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    Run.build(tiny_config(**overrides))
