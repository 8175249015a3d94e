"""Data, FSDP and tensor parallelism are layouts of one computation: a sharded step must
equal the single-device step, and the arrays must really be laid out as the rules say."""
import os
import re
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxlm.models import from_preset
from jaxlm.parallel.mesh import build_mesh
from jaxlm.parallel.rules import DEFAULT_RULES, LogicalRules, sequence_parallel_rules
from jaxlm.train.trainer import Trainer

from tests.helpers import assert_trees_close, random_batch

CFG = from_preset("tiny", compute_dtype="float32")
LAYOUTS = {
    "dp8": dict(data=8),
    "fsdp8": dict(fsdp=8),
    "tp2_fsdp4": dict(fsdp=4, tensor=2),
}
# (parameter path, expected spec per layout); the leading axis of layer weights is "layers".
EXPECTED = {
    ("embed", "table"): {"dp8": (None, None), "fsdp8": (None, "fsdp"),
                         "tp2_fsdp4": ("tensor", "fsdp")},
    ("lm_head", "kernel"): {"dp8": (None, None), "fsdp8": ("fsdp", None),
                            "tp2_fsdp4": ("fsdp", "tensor")},
    ("layers", "attention", "q_proj", "kernel"): {
        "dp8": (None,) * 4, "fsdp8": (None, "fsdp", None, None),
        "tp2_fsdp4": (None, "fsdp", "tensor", None)},
    ("layers", "attention", "k_proj", "kernel"): {
        "dp8": (None,) * 4, "fsdp8": (None, "fsdp", None, None),
        "tp2_fsdp4": (None, "fsdp", "tensor", None)},
    ("layers", "attention", "o_proj", "kernel"): {
        "dp8": (None,) * 4, "fsdp8": (None, None, None, "fsdp"),
        "tp2_fsdp4": (None, "tensor", None, "fsdp")},
    ("layers", "mlp", "down_proj", "kernel"): {
        "dp8": (None,) * 3, "fsdp8": (None, None, "fsdp"),
        "tp2_fsdp4": (None, "tensor", "fsdp")},
    ("layers", "input_norm", "scale"): {"dp8": (None, None), "fsdp8": (None, None),
                                        "tp2_fsdp4": (None, None)},
}


def _trainer(mesh, tx=None, rules=DEFAULT_RULES):
  # Equality checks use SGD: Adam's first step is lr * sign(grad), which turns rounding
  # noise in near-zero gradients into full-size differences.
  tx = tx or optax.adamw(1e-2, weight_decay=0.1)
  return Trainer(CFG, tx, optax.constant_schedule(1e-2), LogicalRules(mesh, rules))


SGD = optax.sgd(0.5)


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _normalise(spec, ndim):
  return tuple(spec) + (None,) * (ndim - len(tuple(spec)))


@pytest.fixture(scope="module")
def single_device_result():
  trainer = _trainer(build_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1]),
                     SGD)
  state = trainer.init_state(0)
  state, metrics = trainer.train_step(state, random_batch(8, 16, CFG.vocab_size))
  return jax.device_get(state["params"]), jax.device_get(metrics)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sharded_step_equals_single_device(layout, single_device_result):
  trainer = _trainer(build_mesh(LAYOUTS[layout]), SGD)
  state = trainer.init_state(0)
  state, metrics = trainer.train_step(state, random_batch(8, 16, CFG.vocab_size))
  ref_params, ref_metrics = single_device_result
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
  assert_trees_close(state["params"], ref_params, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", [dict(fsdp=4, tensor=2), dict(data=4, tensor=2)],
                         ids=["tp2_fsdp4", "tp2_dp4"])
def test_sequence_parallel_step_equals_single_device(layout, single_device_result):
  """Splitting the residual stream along the sequence changes where the sums happen, not
  what they are. The stream between layers really is split: a block's input, [batch, seq,
  hidden], is all-gathered along the sequence from the tensor devices' halves."""
  trainer = _trainer(build_mesh(layout), SGD, sequence_parallel_rules(DEFAULT_RULES))
  batch = random_batch(8, 16, CFG.vocab_size)
  hlo = trainer.lower_train_step({k: (8, 16) for k in batch}).compile().as_text()
  rows = 8 // (layout.get("fsdp", 1) * layout.get("data", 1))
  assert re.search(rf"= f32\[{rows},16,{CFG.hidden_size}\]\S* all-gather\(.*dimensions=\{{1\}}",
                   hlo)
  state, metrics = trainer.train_step(trainer.init_state(0), batch)
  ref_params, ref_metrics = single_device_result
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
  assert_trees_close(state["params"], ref_params, rtol=1e-5, atol=1e-6)


def _sharded_value_and_grad(model, ids, rules):
  """((mean square of the model's float32 outputs for ids, its parameter gradients), the
  compiled program) under an fsdp=4 x tensor=2 mesh with rules (None: no mesh at all)."""
  from flax import nnx
  from jaxlm.layers.sharding import activation_sharding
  graphdef, params = nnx.split(model)
  resolver = None if rules is None else LogicalRules(
      build_mesh(dict(fsdp=4, tensor=2)), rules).activation_resolver()

  def total(params):
    with activation_sharding(resolver):
      return jax.numpy.square(nnx.merge(graphdef, params)(ids).astype("float32")).mean()

  step = jax.jit(jax.value_and_grad(total))
  return step(params), step.lower(params).compile().as_text()


@pytest.mark.parametrize("family", ["bert_classifier", "learned_positions"])
def test_sequence_parallel_encoder_and_gpt2_style_models_compute_the_same(family):
  """BERT (post-norm, a pooler reading the first token) and a decoder with learned
  positions put the residual stream through other paths than Llama's; split along the
  sequence they still compute what they compute on one device."""
  from flax import nnx
  from jaxlm.models.bert import PRESETS, Bert
  from jaxlm.models.llama import Llama
  if family == "bert_classifier":
    model = Bert(PRESETS["bert-tiny"].replace(num_labels=3, param_dtype="float32",
                                              compute_dtype="float32"), rngs=nnx.Rngs(0))
  else:
    model = Llama(CFG.replace(position_embedding="learned", max_seq_len=16),
                  rngs=nnx.Rngs(0))
  ids = random_batch(8, 16, 256)["input_ids"]
  (value, grads), _ = _sharded_value_and_grad(model, ids, None)
  (split_value, split_grads), hlo = _sharded_value_and_grad(
      model, ids, sequence_parallel_rules(DEFAULT_RULES))
  hidden = model.cfg.hidden_size
  assert re.search(rf"= f32\[2,16,{hidden}\]\S* all-gather\(.*dimensions=\{{1\}}", hlo)
  np.testing.assert_allclose(split_value, value, rtol=1e-5)
  assert_trees_close(split_grads, grads, rtol=1e-4, atol=1e-6)


def test_rules_saved_before_a_logical_name_existed_still_resolve_it():
  """A workdir's config.json keeps the rules it ran with; names added since keep their
  default mapping, and a name the rules give overrides it."""
  mesh = build_mesh(dict(fsdp=4, tensor=2))
  old = [rule for rule in DEFAULT_RULES if rule[0] != "act_residual_length"]
  assert LogicalRules(mesh, old).spec(("act_residual_length",), (16,)) == P(None)
  split = LogicalRules(mesh, sequence_parallel_rules(old))
  assert split.spec(("act_batch", "act_residual_length", "act_embed"), (8, 16, 4)) == P(
      "fsdp", "tensor", None)


@pytest.mark.parametrize("layout", [dict(data=2, fsdp=4), dict(data=2, fsdp=2, tensor=2)],
                         ids=["dp2_fsdp4", "dp2_fsdp2_tp2"])
def test_data_and_fsdp_never_gather_the_whole_batch(layout, single_device_result):
  """With a data axis beside fsdp, no device gathers the activations of the whole batch
  (XLA's partitioner did, replicating the embedding's cotangent to scatter it into the
  table's layout), and the step still equals the single-device one."""
  trainer = _trainer(build_mesh(layout), SGD)
  batch = random_batch(8, 16, CFG.vocab_size)
  hlo = trainer.lower_train_step({k: (8, 16) for k in batch}).compile().as_text()
  whole_batch = [line for line in hlo.splitlines()
                 if re.search(r"= \w+\[8,16,\d+\]\S* all-gather", line)]
  assert not whole_batch, whole_batch
  state, metrics = trainer.train_step(trainer.init_state(0), batch)
  ref_params, ref_metrics = single_device_result
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
  assert_trees_close(state["params"], ref_params, rtol=1e-5, atol=1e-6)


# Compiled in a fresh process without the compilation cache (a cached executable would not
# be partitioned again, so XLA would have nothing to say), one model and layout per line.
_COMPILE_EACH = """
import sys, optax
from jaxlm.models import from_preset
from jaxlm.models.bert import PRESETS
from jaxlm.parallel.mesh import build_mesh
from jaxlm.parallel.rules import LogicalRules
from jaxlm.train.trainer import Trainer
tiny = from_preset("tiny", compute_dtype="float32")
models = {"llama": tiny, "learned_positions": tiny.replace(position_embedding="learned",
          max_seq_len=16), "bert_classifier": PRESETS["bert-tiny"].replace(num_labels=3)}
for line in sys.stdin:
  model, layout = line.split()
  mesh = build_mesh({k: int(v) for k, v in (kv.split("=") for kv in layout.split(","))})
  trainer = Trainer(models[model], optax.sgd(0.1), optax.constant_schedule(0.1),
                    LogicalRules(mesh))
  trainer.lower_train_step({k: (8, 16) for k in ("input_ids", "targets", "loss_mask")}
                           ).compile()
  print("compiled", model, layout, flush=True)
"""


def test_xla_never_replicates_a_tensor_to_reshard_it():
  """On data x fsdp (x tensor) meshes XLA's partitioner finds a way for every tensor of the
  step: it warns "Involuntary full rematerialization" when it has to replicate one (it did,
  for the cotangents of every embedding table: word, learned positions, token types)."""
  cases = [("llama", "data=2,fsdp=4"), ("llama", "data=4,fsdp=2"),
           ("llama", "data=2,fsdp=2,tensor=2"), ("learned_positions", "data=2,fsdp=2,tensor=2"),
           ("bert_classifier", "data=2,fsdp=2,tensor=2")]
  env = dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="false")
  out = subprocess.run([sys.executable, "-c", _COMPILE_EACH], env=env, text=True, timeout=300,
                       input="".join(f"{model} {layout}\n" for model, layout in cases),
                       capture_output=True)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.splitlines() == [f"compiled {model} {layout}" for model, layout in cases]
  assert "Involuntary full rematerialization" not in out.stderr, out.stderr[-3000:]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_params_and_optimizer_state_are_laid_out_by_the_rules(layout):
  mesh = build_mesh(LAYOUTS[layout])
  state = _trainer(mesh).init_state(0)
  adam_state = state["opt_state"][0]
  for path, per_layout in EXPECTED.items():
    expected = per_layout[layout]
    for tree in (state["params"], adam_state.mu, adam_state.nu):
      array = _get(tree, path)
      assert _normalise(array.sharding.spec, array.ndim) == expected, path
      # The bytes on each device are really the shard the spec describes.
      shard_shape = tuple(
          dim // (np.prod([mesh.shape[a] for a in ((ax,) if isinstance(ax, str) else ax)])
                  if ax else 1) for dim, ax in zip(array.shape, expected))
      assert all(s.data.shape == shard_shape for s in array.addressable_shards), path
      assert len(array.addressable_shards) == 8


def test_tensor_and_data_parallel_mix_shards_batch_over_data():
  trainer = _trainer(build_mesh(dict(data=4, tensor=2)))
  sharding = trainer.batch_sharding(16, 8)
  assert sharding.spec == P("data", None)
