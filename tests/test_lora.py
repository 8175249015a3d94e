"""LoRA adapters and trainable subsets: an adapted model starts as its base, training moves
only what is trainable, merges and PEFT exports reproduce the adapted model, and learning
rate multipliers and shardings land where they should."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlm.checkpoint import Checkpointer
from jaxlm.finetune.lora import (
  LoRAConfig,
  apply_lora,
  export_peft_adapter,
  merge_lora,
)
from jaxlm.loading import LoadedParams, save_hf_dir
from jaxlm.models import Llama, from_preset
from jaxlm.parallel.mesh import build_mesh
from jaxlm.parallel.rules import LogicalRules
from jaxlm.train.trainer import Trainer
from tests.helpers import assert_trees_close, random_batch

CFG = from_preset("tiny", vocab_size=128, compute_dtype="float32")
IDS = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12)), jnp.int32)
# Every kernel layout of the HF table: split-out heads (q, v; GQA k), split-in heads (o) and
# plain transposes (mlp).
ALL_LAYOUTS = "attention/(q|k|v|o)_proj|mlp/(down|up)_proj"


def _base_graphdef():
  return nnx.graphdef(nnx.eval_shape(lambda: Llama(CFG, rngs=nnx.Rngs(0))))


def _single_device_rules():
  return LogicalRules(build_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1]))


@functools.cache
def _adapted():
  """(base model's params, adapted model, LoRAConfig), B random so the adapters matter.
  Shared by tests that only read it; built under jit, which is faster than op by op."""
  def build():
    model = Llama(CFG, rngs=nnx.Rngs(0))
    apply_lora(model, ALL_LAYOUTS, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
    keys = iter(jax.random.split(jax.random.PRNGKey(2), 64))
    for _, module in nnx.iter_modules(model):
      if getattr(module, "lora_b", None) is not None:
        module.lora_b[...] = 0.05 * jax.random.normal(next(keys), module.lora_b.shape)
    return model

  model = nnx.jit(build)()
  params = jax.device_get(nnx.to_pure_dict(nnx.state(model)))
  return _strip(params), model, LoRAConfig(ALL_LAYOUTS, rank=4, alpha=8.0)


def _strip(params):
  """The base model's parameters: an adapted tree without its adapters."""
  if not isinstance(params, dict):
    return params
  return {k: _strip(v) for k, v in params.items() if not k.startswith("lora_")}


def test_adapters_start_at_zero_and_leave_the_model_unchanged():
  model = Llama(CFG, rngs=nnx.Rngs(0))
  before = model(IDS)
  matched = apply_lora(model, "attention/(q|v)_proj", rank=4, alpha=8.0, rngs=nnx.Rngs(1))
  assert matched == ["layers/attention/q_proj", "layers/attention/v_proj"]
  q = model.layers.attention.q_proj
  # A: [layers, embed, r]; B: [layers, r, heads, head_dim], with the kernel's logical names.
  assert q.lora_a.shape == (2, 64, 4) and q.lora_b.shape == (2, 4, 4, 16)
  assert q.lora_a.get_metadata()["out_sharding"] == ("layers", "embed", None)
  assert q.lora_b.get_metadata()["out_sharding"] == ("layers", None, "heads", "head_dim")
  assert not np.any(np.asarray(q.lora_b[...]))
  np.testing.assert_array_equal(np.asarray(model(IDS)), np.asarray(before))


def test_a_pattern_matching_nothing_names_the_available_projections():
  model = Llama(CFG, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"'attn/q' match none .*layers/attention/q_proj.*"
                                       r"layers/mlp/up_proj"):
    apply_lora(model, "attn/q", rank=4, alpha=8.0, rngs=nnx.Rngs(1))


def test_merge_folds_scaled_ba_into_the_kernel_and_keeps_the_logits():
  _, model, lora = _adapted()
  adapted_logits = model(IDS)
  params = nnx.to_pure_dict(nnx.state(model))
  merged = merge_lora(params, lora)
  for name, equation in (("q_proj", "ldr,lrnh->ldnh"), ("o_proj", "lnhr,lrd->lnhd")):
    module = params["layers"]["attention"][name]
    a, b = np.asarray(module["lora_a"]), np.asarray(module["lora_b"])
    expected = np.asarray(module["kernel"]) + lora.scale * np.einsum(equation, a, b)
    np.testing.assert_allclose(merged["layers"]["attention"][name]["kernel"], expected,
                               rtol=1e-6, atol=1e-6)
    assert set(merged["layers"]["attention"][name]) == {"kernel"}
  plain = nnx.merge(_base_graphdef(), merged)
  np.testing.assert_allclose(plain(IDS), adapted_logits, rtol=1e-5, atol=1e-5)


def test_peft_loads_the_exported_adapter_onto_the_hf_model(tmp_path):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  from transformers import AutoModelForCausalLM

  base, model, lora = _adapted()
  adapted_logits = np.asarray(model(IDS))
  base_only_logits = np.asarray(nnx.merge(_base_graphdef(), base)(IDS))
  assert np.abs(adapted_logits - base_only_logits).max() > 1e-2  # the adapters matter
  params = nnx.to_pure_dict(nnx.state(model))
  save_hf_dir(LoadedParams(CFG, base, "llama", None, None), tmp_path / "base",
              dtype="float32")
  export_peft_adapter(params, CFG, "llama", tmp_path / "adapter", str(tmp_path / "base"),
                      lora=lora)
  config = peft.PeftConfig.from_pretrained(tmp_path / "adapter")
  assert (config.r, config.lora_alpha) == (4, 8.0)
  assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj",
                                        "down_proj"}
  hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
  with_adapter = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
  with torch.no_grad():
    peft_logits = with_adapter(torch.as_tensor(np.array(IDS))).logits.numpy()
  assert np.abs(peft_logits - adapted_logits).max() <= 1e-4


def _batch(seed=0):
  return random_batch(8, 16, CFG.vocab_size, seed)


def test_lora_training_moves_only_the_adapters(tmp_path):
  lora = LoRAConfig("attention/(q|v)_proj", rank=4, alpha=8.0, dropout=0.1)
  trainer = Trainer(CFG, optax.adamw(1e-2), optax.constant_schedule(1e-2),
                    _single_device_rules(), lora=lora, frozen_dtype="bfloat16")
  state = trainer.init_state(0)
  initial = jax.device_get(state)
  # Only the adapters train; the base is held apart, in bfloat16, with no Adam moments.
  adapters = {"attention": {p: {"lora_a", "lora_b"} for p in ("q_proj", "v_proj")}}
  assert jax.tree.map(lambda _: 0, initial["params"]) == {"layers": {"attention": {
      p: {"lora_a": 0, "lora_b": 0} for p in adapters["attention"]}}}
  mu = initial["opt_state"][0].mu
  assert jax.tree.structure(mu) == jax.tree.structure(initial["params"])
  assert {x.dtype for x in jax.tree.leaves(initial["frozen"])} >= {jnp.dtype(jnp.bfloat16)}
  assert initial["frozen"]["embed"]["table"].dtype == jnp.bfloat16

  for seed in range(2):
    state, metrics = trainer.train_step(state, _batch(seed))
    assert np.isfinite(metrics["loss"])
  after = jax.device_get(state)
  assert_trees_close(after["frozen"], initial["frozen"], rtol=0, atol=0)
  for name in ("q_proj", "v_proj"):
    for factor in ("lora_a", "lora_b"):
      moved = np.abs(after["params"]["layers"]["attention"][name][factor]
                     - initial["params"]["layers"]["attention"][name][factor]).max()
      assert moved > 0, (name, factor)

  # The partial state round-trips through a checkpoint, whole or without the frozen base
  # (rebuilt from the same initialisation on resume).
  checkpointer = Checkpointer(tmp_path / "whole", every=1, keep=1, async_save=False)
  checkpointer.save(2, state, {"position": 0}, {"model": "tiny"}, force=True)
  restored, _ = checkpointer.restore(2, trainer.abstract_state())
  checkpointer.close()
  assert_trees_close(restored, after, rtol=0, atol=0)
  assert restored["frozen"]["embed"]["table"].dtype == jnp.bfloat16
  checkpointer = Checkpointer(tmp_path / "slim", every=1, keep=1, async_save=False)
  checkpointer.save(2, trainer.checkpoint_state(state), {"position": 0}, {"model": "tiny"},
                    force=True)
  restored, _ = checkpointer.restore(2, trainer.abstract_state(frozen=False))
  checkpointer.close()
  assert "frozen" not in restored
  resumed = trainer.resume_state(restored, trainer.init_state(0))
  assert_trees_close(resumed, after, rtol=0, atol=0)


def test_frozen_params_by_regex_get_no_gradients_or_moments():
  trainer = Trainer(CFG, optax.adamw(1e-2), optax.constant_schedule(1e-2),
                    _single_device_rules(), freeze=r"^embed/|layers/attention")
  state = trainer.init_state(0)
  initial = jax.device_get(state)
  mu = initial["opt_state"][0].mu
  assert "embed" not in mu and "attention" not in mu["layers"]
  assert set(mu["layers"]) == {"input_norm", "post_attention_norm", "mlp"}
  assert set(initial["frozen"]) == {"embed", "layers"}
  state, _ = trainer.train_step(state, _batch())
  after = jax.device_get(state)
  assert_trees_close(after["frozen"], initial["frozen"], rtol=0, atol=0)
  assert np.abs(after["params"]["lm_head"]["kernel"]
                - initial["params"]["lm_head"]["kernel"]).max() > 0
  # The whole model's parameters (e.g. for eval_step) are the two parts together.
  whole = trainer.model_params(state)
  assert set(whole["layers"]) == {"attention", "input_norm", "post_attention_norm", "mlp"}
  assert np.isfinite(trainer.eval_step(whole, _batch())["nll_sum"])


def test_layer_lr_decay_scales_each_layers_sgd_update():
  rules = _single_device_rules()
  sgd = optax.sgd(0.1)

  def deltas(**options):
    trainer = Trainer(CFG, sgd, optax.constant_schedule(0.1), rules, **options)
    state = trainer.init_state(0)
    before = jax.device_get(state["params"])
    state, _ = trainer.train_step(state, _batch())
    return jax.tree.map(lambda new, old: np.asarray(new) - old,
                        jax.device_get(state["params"]), before)

  plain = deltas()
  decayed = deltas(layer_lr_decay=0.5, head_pattern=r"^lm_head/", head_lr_multiplier=3.0)

  def ratio(path, layer=None):
    a, b = plain, decayed
    for key in path:
      a, b = a[key], b[key]
    if layer is not None:
      a, b = a[layer], b[layer]
    mask = np.abs(a) > 1e-7
    return np.median(b[mask] / a[mask])

  # 2 layers: the last one at the full rate, the first at 0.5, embeddings at 0.25.
  for path in (("layers", "mlp", "up_proj", "kernel"), ("layers", "attention", "q_proj",
                                                         "kernel")):
    np.testing.assert_allclose(ratio(path, 1), 1.0, rtol=1e-4)
    np.testing.assert_allclose(ratio(path, 0), 0.5, rtol=1e-4)
  np.testing.assert_allclose(ratio(("embed", "table")), 0.25, rtol=1e-4)
  np.testing.assert_allclose(ratio(("lm_head", "kernel")), 3.0, rtol=1e-4)
  np.testing.assert_allclose(ratio(("final_norm", "scale")), 1.0, rtol=1e-4)


def test_adapters_and_their_moments_are_sharded_by_their_logical_axes():
  mesh = build_mesh({"fsdp": 4, "tensor": 2})
  lora = LoRAConfig("attention/(q|o)_proj", rank=4, alpha=8.0)
  trainer = Trainer(CFG, optax.adamw(1e-2), optax.constant_schedule(1e-2), LogicalRules(mesh),
                    lora=lora)
  # The train step's out_shardings are the same state shardings that init placed.
  state = trainer.init_state(0)
  expected = {("q_proj", "lora_a"): (None, "fsdp", None),  # [layers, embed, r]
              ("q_proj", "lora_b"): (None, None, "tensor", None),  # [layers, r, heads, hd]
              ("o_proj", "lora_a"): (None, "tensor", None, None),  # [layers, heads, hd, r]
              ("o_proj", "lora_b"): (None, None, "fsdp")}  # [layers, r, embed]
  adam = state["opt_state"][0]
  for (name, factor), spec in expected.items():
    for tree in (state["params"], adam.mu, adam.nu):
      array = tree["layers"]["attention"][name][factor]
      got = tuple(array.sharding.spec) + (None,) * (array.ndim - len(array.sharding.spec))
      assert got == spec, (name, factor, got)
  kernel = state["frozen"]["layers"]["attention"]["q_proj"]["kernel"]
  assert tuple(kernel.sharding.spec)[:3] == (None, "fsdp", "tensor")


def test_lora_run_from_an_hf_model_resumes_and_exports_to_peft_and_merged_hf(
    tiny_config, tmp_path):
  """`jaxlm train` with finetune.lora_* on an HF base: checkpoints hold only the adapters and
  their optimizer state, a resumed run equals an uninterrupted one, the workdir loads merged,
  and the PEFT adapter applied by peft to the HF base gives the same logits."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  import jaxlm
  from jaxlm.cli import main
  from jaxlm.train.loop import train

  hf_config = transformers.LlamaConfig(
      vocab_size=4096, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(hf_config).save_pretrained(tmp_path / "base")
  lora = {"model__init_from": str(tmp_path / "base"), "optim__learning_rate": 1e-2,
          "finetune__lora_targets": "attention/(q|v)_proj|mlp/up_proj",
          "finetune__lora_rank": 4, "finetune__frozen_dtype": "bfloat16",
          "optim__decay_steps": 4, "checkpoint__every": 2}
  train(tiny_config(train__steps=4, **lora), tmp_path / "straight")
  train(tiny_config(train__steps=2, **lora), tmp_path / "resumed")
  train(tiny_config(train__steps=4, **lora), tmp_path / "resumed")

  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as reader:
    saved = reader.metadata(tmp_path / "resumed" / "checkpoints" / "4" / "state").item_metadata
  assert set(saved) == {"step", "params", "opt_state", "rng"}  # no frozen base
  adapted = {name: set(module) for name, module in saved["params"]["layers"]["attention"].items()}
  assert adapted == {"q_proj": {"lora_a", "lora_b"}, "v_proj": {"lora_a", "lora_b"}}

  ids = np.random.default_rng(0).integers(0, 4096, (2, 12))
  ours = np.asarray(jaxlm.load_model(tmp_path / "resumed")(ids))
  np.testing.assert_array_equal(ours, np.asarray(jaxlm.load_model(tmp_path / "straight")(ids)))
  base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
  with torch.no_grad():
    before = base(torch.as_tensor(ids)).logits.numpy()
  assert np.abs(ours - before).max() > 1e-3  # the adapters learned something

  assert main(["convert", "--to-peft", str(tmp_path / "resumed"),
               "--out", str(tmp_path / "adapter")]) == 0
  with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
  with torch.no_grad():
    theirs = with_adapter(torch.as_tensor(ids)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4)

  assert main(["convert", "--to-hf", str(tmp_path / "resumed"),
               "--out", str(tmp_path / "merged")]) == 0
  merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
  with torch.no_grad():
    np.testing.assert_allclose(merged(torch.as_tensor(ids)).logits.numpy(), ours, atol=1e-4)
  assert main(["convert", "--to-peft", str(tmp_path / "base"),
               "--out", str(tmp_path / "x")]) == 2


# A tiny GPT-2: Conv1D weights (in, out) and q, k, v fused in one c_attn.
GPT2_CFG = from_preset("gpt2", vocab_size=128, hidden_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=4, mlp_dim=256, max_seq_len=64, compute_dtype="float32")


@pytest.mark.parametrize("targets, c_attn_rank", [
    ("attention/(q|v)_proj|mlp/up_proj", 8),  # c_attn: q's and v's rank 4, k's rows zero
    ("attention/(q|k|v|o)_proj|mlp/(up|down)_proj", 12),  # attn.c_proj next to mlp.c_proj
])
def test_peft_loads_a_gpt2_adapter_with_q_k_v_fused_in_c_attn(tmp_path, targets,
                                                              c_attn_rank):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  from transformers import GPT2LMHeadModel

  lora = LoRAConfig(targets, rank=4, alpha=8.0)

  def build():
    model = Llama(GPT2_CFG, rngs=nnx.Rngs(0))
    apply_lora(model, targets, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
    keys = iter(jax.random.split(jax.random.PRNGKey(2), 64))
    for path, param in nnx.iter_graph(model):
      # Random B, and random biases and norms, so that a misplaced part shows.
      if isinstance(param, nnx.Variable) and path[-1] in ("lora_b", "bias", "scale"):
        param[...] = (param[...] + 0.1 * jax.random.normal(next(keys), param.shape)
                      ).astype(param.dtype)
    return model

  model = nnx.jit(build)()
  params = jax.device_get(nnx.to_pure_dict(nnx.state(model)))
  ids = np.array(IDS)  # writable, for torch.as_tensor
  adapted_logits = np.asarray(model(ids))
  base = _strip(params)
  base_model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: Llama(GPT2_CFG, rngs=nnx.Rngs(0)))),
                         base)
  assert np.abs(adapted_logits - np.asarray(base_model(ids))).max() > 1e-2

  save_hf_dir(LoadedParams(GPT2_CFG, base, "gpt2", None, None), tmp_path / "base",
              dtype="float32")
  export_peft_adapter(params, GPT2_CFG, "gpt2", tmp_path / "adapter", str(tmp_path / "base"),
                      lora=lora)
  config = peft.PeftConfig.from_pretrained(tmp_path / "adapter")
  assert (config.r, config.lora_alpha, config.fan_in_fan_out) == (4, 8.0, True)
  assert config.rank_pattern == {"attn.c_attn": c_attn_rank}
  assert config.alpha_pattern == {"attn.c_attn": 2.0 * c_attn_rank}  # alpha / r kept

  hf = GPT2LMHeadModel.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
  with torch.no_grad():
    hf_base_logits = hf(torch.as_tensor(ids)).logits.numpy()
  assert np.abs(hf_base_logits - np.asarray(base_model(ids))).max() <= 1e-4
  with_adapter = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
  layer = with_adapter.base_model.model.transformer.h[0]
  assert layer.attn.c_attn.lora_A["default"].weight.shape == (c_attn_rank, 64)
  assert layer.attn.c_attn.lora_B["default"].weight.shape == (3 * 64, c_attn_rank)
  assert layer.attn.c_attn.scaling["default"] == lora.scale
  adapted_modules = {name for name, module in with_adapter.named_modules()
                     if hasattr(module, "lora_A") and module.lora_A}
  expected = {"attn.c_attn", "mlp.c_fc"} | ({"attn.c_proj", "mlp.c_proj"}
                                            if "down" in targets else set())
  assert {name.split(".h.0.")[-1] for name in adapted_modules if ".h.0." in name} == expected
  with torch.no_grad():
    peft_logits = with_adapter(torch.as_tensor(ids)).logits.numpy()
  assert np.abs(peft_logits - adapted_logits).max() <= 1e-4
