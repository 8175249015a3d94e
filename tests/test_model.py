"""Model behaviour that parity with Hugging Face cannot show: layouts of the same weights,
masking, rope scaling, dropout and remat."""
import contextlib
import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from jaxlm.layers.rotary import inverse_frequencies
from jaxlm.models import Llama, from_preset
from jaxlm.models.bert import Bert, BertConfig
from jaxlm.models.factory import batch_logits


def _model(**changes):
  return Llama(from_preset("tiny", **changes), rngs=nnx.Rngs(0))


def _ids(batch=2, seq=12, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (batch, seq)))


def _with_config(model, **changes):
  """The same weights under another config (e.g. unrolled layers, other remat)."""
  other = Llama(model.cfg.replace(**changes), rngs=nnx.Rngs(1))
  nnx.update(other, nnx.state(model))
  return other


def test_scan_and_unrolled_layers_agree():
  model = _model()
  unrolled = _with_config(model, scan_layers=False)
  np.testing.assert_allclose(model(_ids()), unrolled(_ids()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots", "minimal", "minimal_with_attention"])
def test_remat_policies_keep_gradients(policy):
  model = _model()
  remat = _with_config(model, remat_policy=policy)
  loss = lambda m: jnp.mean(m(_ids()) ** 2)
  g_ref = nnx.grad(loss)(model)
  g = nnx.grad(loss)(remat)
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _saved_residuals(model) -> list[str]:
  graphdef, state = nnx.split(model)
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    print_saved_residuals(lambda s: jnp.mean(nnx.merge(graphdef, s)(_ids()) ** 2), state)
  return sorted(line.split(" ")[0] for line in printed.getvalue().splitlines())


def test_minimal_with_attention_is_minimal_where_attention_is_not_cudnns():
  """It keeps cuDNN's attention forward besides what minimal keeps (tests/test_gpu_target.py
  compiles it for a GPU); with XLA's attention it keeps exactly what minimal keeps."""
  model = _model()
  minimal = _saved_residuals(_with_config(model, remat_policy="minimal"))
  assert _saved_residuals(_with_config(model, remat_policy="minimal_with_attention")) == minimal
  assert minimal != _saved_residuals(_with_config(model, remat_policy="full"))


def test_without_remat_norms_and_activations_are_recomputed_not_kept():
  """remat none keeps every matmul's output, but the MLP activation's intermediates are
  recomputed from their inputs in the backward: per layer the MLP leaves gate, up and the
  down projection's input. With layers scanned so are the norms' float32 copies of their
  input: nothing of [batch, seq, hidden] is kept in float32. Unrolled, the norms keep them
  (XLA's GPU compiler holds little of them, and recomputing moves more: make_norm)."""
  cfg = from_preset("tiny", remat_policy="none", compute_dtype="bfloat16")
  residuals = _saved_residuals(Llama(cfg, rngs=nnx.Rngs(0)))
  batch, seq = _ids().shape
  mlp = f"bf16[{cfg.num_layers},{batch},{seq},{cfg.mlp_dim}]"
  assert residuals.count(mlp) == 3
  hidden_f32 = lambda rs: [r for r in rs if r.startswith("f32[") and r.endswith(
      f"{batch},{seq},{cfg.hidden_size}]")]
  assert not hidden_f32(residuals), residuals
  unrolled = _saved_residuals(Llama(cfg.replace(scan_layers=False), rngs=nnx.Rngs(0)))
  assert unrolled.count(f"bf16[{batch},{seq},{cfg.mlp_dim}]") == 3 * cfg.num_layers
  norms = 2 * cfg.num_layers + 1
  assert len(hidden_f32(unrolled)) == 2 * norms, unrolled


@pytest.mark.parametrize("policy", ["none", "full"])
def test_two_builds_of_a_model_have_equal_graph_definitions(policy):
  """What is jitted on a graph definition (generation, the steps) compiles once per model,
  not once per build: the recomputed norms and activations are shared functions."""
  cfg = from_preset("tiny", remat_policy=policy)
  assert (nnx.graphdef(Llama(cfg, rngs=nnx.Rngs(0)))
          == nnx.graphdef(Llama(cfg, rngs=nnx.Rngs(1))))


def test_unknown_remat_policy_or_attention_is_refused_with_the_choices():
  with pytest.raises(ValueError, match=r"remat_policy='dots_no_batch' \(choose one of none, "
                                       r"full, dots, minimal, minimal_with_attention\); "
                                       r"attention_impl='flash' "
                                       r"\(choose one of None, xla, cudnn, pallas_gpu, splash\)"):
    from_preset("tiny", remat_policy="dots_no_batch", attention_impl="flash")


def test_attention_never_crosses_documents():
  model = _model()
  ids = _ids(batch=1)
  segments = jnp.array([[1] * 5 + [2] * 7])
  positions = jnp.array([list(range(5)) + list(range(7))])
  packed = model(ids, positions, segments)
  # Document 2 alone, at the same positions, gives the same logits...
  alone = model(ids[:, 5:], positions[:, 5:], segments[:, 5:])
  np.testing.assert_allclose(packed[:, 5:], alone, rtol=1e-5, atol=1e-5)
  # ...and changing document 1 does not reach document 2.
  changed = model(ids.at[0, :5].set(7), positions, segments)
  np.testing.assert_allclose(changed[:, 5:], packed[:, 5:], rtol=1e-6, atol=1e-6)
  assert not np.allclose(changed[:, :5], packed[:, :5])


def test_causal_future_tokens_do_not_leak():
  model = _model()
  ids = _ids(batch=1)
  a, b = model(ids), model(ids.at[0, 8:].set(3))
  np.testing.assert_allclose(a[:, :8], b[:, :8], rtol=1e-6, atol=1e-6)


def test_sliding_window_limits_the_context():
  model = _model(sliding_window=4)
  ids = _ids(batch=1, seq=12)
  # Layers stack windows: with 2 layers token t sees back to t - 2 * (4 - 1).
  a, b = model(ids), model(ids.at[0, 0].set(5))
  np.testing.assert_allclose(a[:, 7:], b[:, 7:], rtol=1e-6, atol=1e-6)
  assert not np.allclose(a[:, :7], b[:, :7])


def test_llama3_rope_scaling_matches_the_published_rule():
  inv = inverse_frequencies(64, 500000.0, {"rope_type": "llama3", "factor": 32.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192})
  base = inverse_frequencies(64, 500000.0)
  wavelen = 2 * np.pi / base
  high = wavelen < 8192 / 4
  low = wavelen > 8192
  np.testing.assert_allclose(inv[high], base[high])  # short wavelengths untouched
  np.testing.assert_allclose(inv[low], base[low] / 32, rtol=1e-6)  # long ones slowed 32x
  mid = ~high & ~low
  assert mid.any() and np.all((inv[mid] < base[mid]) & (inv[mid] > base[mid] / 32))


def test_dropout_is_random_only_with_a_key():
  model = _model(dropout_rate=0.5)
  ids = _ids()
  np.testing.assert_array_equal(model(ids), model(ids))
  key = jax.random.PRNGKey(0)
  a, b = model(ids, dropout_rng=key), model(ids, dropout_rng=jax.random.PRNGKey(1))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, model(ids, dropout_rng=key))


def test_bias_tied_and_head_dim_options_build():
  model = _model(qkv_bias=True, tie_embeddings=True, head_dim=32)
  state = nnx.to_pure_dict(nnx.state(model))
  assert "lm_head" not in state
  assert state["layers"]["attention"]["q_proj"]["bias"].shape == (2, 4, 32)
  assert state["layers"]["attention"]["q_proj"]["kernel"].shape == (2, 64, 4, 32)
  assert model(_ids()).shape == (2, 12, 256)


GPT2_OPTIONS = dict(norm_type="layer", position_embedding="learned", mlp_type="gelu",
                   qkv_bias=True, attention_out_bias=True, mlp_bias=True, tie_embeddings=True)


def test_param_count_formula_matches_the_arrays():
  for changes in ({}, {"qkv_bias": True, "tie_embeddings": True}, {"head_dim": 32},
                  {"mlp_bias": True, "attention_out_bias": True}, GPT2_OPTIONS):
    model = _model(**changes)
    arrays = jax.tree.leaves(nnx.state(model))
    assert sum(a.size for a in arrays) == model.cfg.num_params()


def _compiled_flops(fn, *args) -> float:
  """XLA's own FLOP count of fn compiled for args."""
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)["flops"]


@pytest.mark.parametrize("changes", [{}, {"tie_embeddings": True},
                                     {**GPT2_OPTIONS, "num_kv_heads": 4}],
                         ids=["gqa", "tied", "gpt2"])
def test_mfu_flop_count_matches_the_compilers(changes):
  """flops_per_token, MFU's numerator, against XLA's own count of a compiled forward +
  backward. XLA's attention computes the masked half too, so that half is added to ours;
  what is left over is elementwise work (norms, softmax, activations): under 2%. Layers
  unrolled: XLA's cost analysis counts a scanned layer's loop body once."""
  batch, seq = 4, 64
  cfg = from_preset("tiny", **{"hidden_size": 256, "num_heads": 4, "num_kv_heads": 2,
                               "mlp_dim": 768, "vocab_size": 1024, "scan_layers": False,
                               "attention_impl": "xla", **changes})
  graphdef, params = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq)))

  def loss(params):
    logits = nnx.merge(graphdef, params)(ids)
    return jnp.sum(jax.nn.log_softmax(logits)[..., 0])

  xla = _compiled_flops(jax.grad(loss), params)
  ours = cfg.flops_per_token(seq) * batch * seq
  masked_half = 6 * cfg.num_layers * seq * cfg.num_heads * cfg.resolved_head_dim * batch * seq
  assert 1.0 <= xla / (ours + masked_half) < 1.02


@pytest.mark.parametrize("changes", [{}, {"num_labels": 3}, {"num_labels": 5,
                                                             "classifier": "token"}],
                         ids=["mlm", "sequence", "token"])
def test_encoder_flop_count_matches_the_compilers(changes):
  """The same for BERT, whose training runs one head: the masked-LM head (the pooler idle),
  or a classifier (the masked-LM head idle; a token classifier's pooler too). Its GELUs and
  LayerNorms leave a little more elementwise work: under 3%."""
  batch, seq = 4, 64
  cfg = BertConfig(vocab_size=1024, hidden_size=256, num_layers=2, num_heads=4, mlp_dim=768,
                   max_position_embeddings=128, scan_layers=False, attention_impl="xla",
                   compute_dtype="float32", **changes)
  graphdef, params = nnx.split(Bert(cfg, rngs=nnx.Rngs(0)))
  ids = jnp.asarray(np.random.default_rng(0).integers(5, cfg.vocab_size, (batch, seq)))
  rows = {"input_ids": ids, "positions": jnp.broadcast_to(jnp.arange(seq), (batch, seq)),
          "segment_ids": jnp.ones((batch, seq), jnp.int32)}

  def loss(params):
    return jnp.sum(jax.nn.log_softmax(batch_logits(nnx.merge(graphdef, params), rows))[..., 0])

  xla = _compiled_flops(jax.grad(loss), params)
  assert 1.0 <= xla / (cfg.flops_per_token(seq) * batch * seq) < 1.03


def test_gpt2_preset_has_the_published_size():
  assert from_preset("gpt2").num_params() == 124_439_808
  # Lookups (token and position tables) do no matmul work; the tied output matrix does.
  gpt2 = from_preset("gpt2")
  assert gpt2.num_params(include_embedding=False) == 124_439_808 - 1024 * 768


def _dots(jaxpr):
  """(operand avals, output aval) of every dot_general in a jaxpr, nested calls included."""
  from jax.extend.core import jaxprs_in_params
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(([v.aval for v in eqn.invars], eqn.outvars[0].aval))
    for inner in jaxprs_in_params(eqn.params):
      found += _dots(inner)
  return found


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_logits_are_float32_but_their_backward_multiplies_in_bf16(tied):
  """The output projection returns float32 logits for the loss, and its two backward matmuls
  over the vocabulary take the cotangent rounded to bf16, as the other projections' do,
  where autodiff would multiply in float32. In float32 the gradients are plain autodiff's."""
  from jaxlm.layers.linear import float32_logits

  vocab = 1000  # no other axis has this size

  def loss(model, ids):
    return jnp.mean(jax.nn.log_softmax(model(ids))[..., 0])

  model = Llama(from_preset("tiny", compute_dtype="bfloat16", tie_embeddings=tied,
                            vocab_size=vocab), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: loss(nnx.merge(graphdef, p), _ids())))(params)
  over_vocab = [(tuple(str(a.dtype) for a in operands), str(out.dtype))
                for operands, out in _dots(jaxpr.jaxpr)
                if any(vocab in a.shape for a in (*operands, out))]
  assert over_vocab == [(("bfloat16", "bfloat16"), "float32")] * 3, over_vocab

  rng = np.random.default_rng(0)
  x, w = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((2, 8, 16), (16, 32)))
  plain = lambda x, w: jnp.einsum("btd,dv->btv", x, w)
  ours, reference = (jax.grad(lambda x, w, f=f: jnp.sum(jnp.sin(f(x, w))), (0, 1))(x, w)
                     for f in (functools.partial(float32_logits, "btd,dv->btv"), plain))
  for a, b in zip(ours, reference):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
