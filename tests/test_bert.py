"""BERT / RoBERTa encoders proven against transformers (PyTorch) on tiny random models:
hidden states, pooler and MLM logits, conversion both ways, MLM corruption and loss, and the
parameter layout under FSDP."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from jaxlm.convert.bert_hf import load_bert, read_bert_config, save_bert  # noqa: E402
from jaxlm.convert.errors import ConversionError  # noqa: E402
from jaxlm.layers.sharding import activation_sharding  # noqa: E402
from jaxlm.models.bert import Bert, bert_from_params  # noqa: E402
from jaxlm.parallel.mesh import build_mesh  # noqa: E402
from jaxlm.parallel.rules import LogicalRules, state_shardings  # noqa: E402
from jaxlm.train.mlm import mask_tokens, mlm_loss  # noqa: E402

# Weights 10x larger than transformers' default so that activations leave gelu's near-linear
# range: the exact and tanh gelus then differ by ~1e-3, well above the tolerance.
TINY_HF = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=40, initializer_range=0.2)
# RoBERTa's MLM head uses exact gelu whatever hidden_act is: make them differ.
FAMILY_HF = {"bert": {}, "roberta": {"hidden_act": "gelu_new"}}
CLASS_PREFIX = {"bert": "Bert", "roberta": "Roberta"}
PAD = {"bert": 0, "roberta": 1}
CASES = [(family, head) for family in ("bert", "roberta") for head in ("ForMaskedLM", "Model")]
ATOL = 1e-4


def build_hf(family, head, path, **settings):
  config = getattr(transformers, CLASS_PREFIX[family] + "Config")(
      **TINY_HF, **FAMILY_HF[family], **settings)
  torch.manual_seed(0)
  model = getattr(transformers, CLASS_PREFIX[family] + head)(config).eval()
  # transformers initialises biases to 0 and LayerNorms to identity: randomise them so that a
  # dropped or misplaced one shows in the outputs.
  with torch.no_grad():
    for name, value in model.named_parameters():
      if "LayerNorm.weight" in name or "layer_norm.weight" in name:
        value.normal_(1.0, 0.2)
      elif name.endswith("bias"):
        value.normal_(0.0, 0.2)
  model.save_pretrained(path)
  return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf_bert")
  return {case: (build_hf(*case, root / "".join(case)), root / "".join(case)) for case in CASES}


def padded_batch(family, batch=3, seq=12, seed=0):
  """Right padding of different lengths and two segments, as a tokenizer would give."""
  rng = np.random.default_rng(seed)
  lengths = np.resize([seq, seq - 3, seq - 7], batch)[:, None]
  mask = np.arange(seq)[None, :] < lengths
  ids = np.where(mask, rng.integers(3, TINY_HF["vocab_size"], (batch, seq)), PAD[family])
  token_types = ((np.arange(seq)[None, :] >= seq // 2) & mask).astype(np.int64)
  return ids, mask.astype(np.int64), token_types


def hf_outputs(model, ids, mask, token_types):
  inputs = {k: torch.as_tensor(v) for k, v in
            (("input_ids", ids), ("attention_mask", mask), ("token_type_ids", token_types))}
  with torch.no_grad():
    base = model.base_model(**inputs)
    out = {"hidden": base.last_hidden_state.numpy()}
    if base.pooler_output is not None:
      out["pooled"] = base.pooler_output.numpy()
    if model.base_model is not model:
      out["logits"] = model(**inputs).logits.numpy()
  return out


def jaxlm_outputs(cfg, params, ids, mask, token_types):
  model = bert_from_params(cfg, params)
  hidden = model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(token_types))
  out = {"hidden": hidden}
  if cfg.pooler:
    out["pooled"] = model.pooled(hidden)
  if cfg.mlm_head:
    out["logits"] = model.mlm_logits(hidden)
  return {k: np.asarray(v) for k, v in out.items()}


def assert_outputs_close(got, expected):
  assert got.keys() == expected.keys()
  for key in expected:
    np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=ATOL, err_msg=key)


@pytest.mark.parametrize("family,head", CASES)
def test_matches_transformers_and_exports_back(family, head, hf_dirs, tmp_path):
  hf_model, path = hf_dirs[(family, head)]
  batch = padded_batch(family)
  expected = hf_outputs(hf_model, *batch)

  cfg, params = load_bert(path)
  assert (cfg.pooler, cfg.mlm_head) == (head == "Model", head == "ForMaskedLM")
  assert_outputs_close(jaxlm_outputs(cfg, params, *batch), expected)

  _, read_family, hf_config = read_bert_config(path)
  assert read_family == family
  out = save_bert(cfg, params, tmp_path / "export", family, base=hf_config)
  reloaded, info = getattr(transformers, CLASS_PREFIX[family] + head).from_pretrained(
      out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert_outputs_close(hf_outputs(reloaded.eval(), *batch), expected)


def test_wrong_missing_and_unexpected_tensors_are_named(hf_dirs, tmp_path):
  _, path = hf_dirs[("bert", "ForMaskedLM")]
  tensors = load_file(path / "model.safetensors")
  tensors["bert.encoder.layer.1.attention.self.key.weight"] = np.zeros((32, 31), np.float32)
  del tensors["cls.predictions.bias"]
  tensors["bert.encoder.layer.1.extra.weight"] = np.zeros((2,), np.float32)
  broken = tmp_path / "broken"
  broken.mkdir()
  save_file(tensors, broken / "model.safetensors")
  (broken / "config.json").write_text((path / "config.json").read_text())
  with pytest.raises(ConversionError) as error:
    load_bert(broken)
  message = str(error.value)
  for name in ("bert.encoder.layer.1.attention.self.key.weight", "cls.predictions.bias",
               "bert.encoder.layer.1.extra.weight"):
    assert name in message


def test_original_bert_checkpoint_layout_loads(hf_dirs, tmp_path):
  """Google's BERT files: LayerNorm gamma / beta, a next-sentence head and the position-id
  buffer, none of which changes the converted parameters."""
  _, path = hf_dirs[("bert", "ForMaskedLM")]
  tensors = {name.replace("LayerNorm.weight", "LayerNorm.gamma")
             .replace("LayerNorm.bias", "LayerNorm.beta"): value
             for name, value in load_file(path / "model.safetensors").items()}
  tensors["cls.seq_relationship.weight"] = np.zeros((2, 32), np.float32)
  tensors["cls.seq_relationship.bias"] = np.zeros((2,), np.float32)
  tensors["bert.embeddings.position_ids"] = np.arange(40)[None]
  legacy = tmp_path / "legacy"
  legacy.mkdir()
  save_file(tensors, legacy / "model.safetensors")
  (legacy / "config.json").write_text((path / "config.json").read_text())
  _, expected = load_bert(path)
  _, got = load_bert(legacy)
  jax.tree.map(np.testing.assert_array_equal, got, expected)


def test_mlm_loss_equals_transformers_loss(hf_dirs):
  hf_model, path = hf_dirs[("roberta", "ForMaskedLM")]
  ids, mask, token_types = padded_batch("roberta", seq=30, seed=1)
  corrupt = jax.jit(functools.partial(mask_tokens, mask_token_id=3,
                                      vocab_size=TINY_HF["vocab_size"], special_ids=(0, 1, 2)))
  batch = corrupt(jax.random.key(0), jnp.asarray(ids))
  assert int(batch["loss_mask"].sum()) > 0
  cfg, params = load_bert(path)

  @jax.jit
  def loss(params, batch):
    model = bert_from_params(cfg, params)
    hidden = model(batch["input_ids"], jnp.asarray(mask), jnp.asarray(token_types))
    return mlm_loss(model.mlm_logits(hidden), batch["targets"], batch["loss_mask"])

  labels = np.where(np.asarray(batch["loss_mask"]) == 1, ids, -100)
  with torch.no_grad():
    expected = hf_model(input_ids=torch.as_tensor(np.array(batch["input_ids"])),
                        attention_mask=torch.as_tensor(mask),
                        token_type_ids=torch.as_tensor(token_types),
                        labels=torch.as_tensor(labels)).loss.item()
  np.testing.assert_allclose(float(loss(params, batch)), expected, rtol=1e-5)


def test_mlm_masking_statistics():
  vocab, mask_id, cls_id, sep_id, pad_id = 30000, 103, 101, 102, 0
  rng = np.random.default_rng(0)
  ids = rng.integers(200, vocab, (64, 256))
  ids[:, 0], ids[:, -1] = cls_id, sep_id
  ids[::2, 200:] = pad_id
  corrupt = jax.jit(functools.partial(mask_tokens, mask_token_id=mask_id, vocab_size=vocab,
                                      special_ids=(pad_id, cls_id, sep_id)))
  batch = jax.device_get(corrupt(jax.random.key(0), jnp.asarray(ids, jnp.int32)))
  chosen = batch["loss_mask"] == 1
  out = batch["input_ids"]
  special = np.isin(ids, (pad_id, cls_id, sep_id))

  assert not chosen[special].any()
  np.testing.assert_array_equal(out[~chosen], ids[~chosen])
  np.testing.assert_array_equal(batch["targets"], ids)
  assert abs(chosen[~special].mean() - 0.15) < 0.01
  masked = out[chosen] == mask_id
  kept = out[chosen] == ids[chosen]
  assert abs(masked.mean() - 0.8) < 0.03
  assert abs(kept.mean() - 0.1) < 0.02
  assert abs((~masked & ~kept).mean() - 0.1) < 0.02

  again = jax.device_get(corrupt(jax.random.key(0), jnp.asarray(ids, jnp.int32)))
  np.testing.assert_array_equal(again["input_ids"], out)
  other = jax.device_get(corrupt(jax.random.key(1), jnp.asarray(ids, jnp.int32)))
  assert (other["loss_mask"] != batch["loss_mask"]).any()


def _spec(array):
  spec = tuple(array.sharding.spec)
  return spec + (None,) * (array.ndim - len(spec))


def test_loads_sharded_over_fsdp_as_the_rules_say(hf_dirs):
  hf_model, path = hf_dirs[("bert", "ForMaskedLM")]
  rules = LogicalRules(build_mesh(dict(fsdp=8)))
  cfg, _, _ = read_bert_config(path)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Bert(cfg, rngs=nnx.Rngs(0))))
  _, params = load_bert(path, shardings=state_shardings(rules, abstract))
  expected = {
      ("embeddings", "word", "table"): (None, "fsdp"),
      ("embeddings", "position"): (None, "fsdp"),
      ("embeddings", "token_type"): (None, "fsdp"),
      ("layers", "attention", "q_proj", "kernel"): (None, "fsdp", None, None),
      ("layers", "attention", "k_proj", "kernel"): (None, "fsdp", None, None),
      ("layers", "attention", "o_proj", "kernel"): (None, None, None, "fsdp"),
      ("layers", "attention", "o_proj", "bias"): (None, "fsdp"),
      ("layers", "mlp", "up", "kernel"): (None, "fsdp", None),
      ("layers", "mlp", "down", "kernel"): (None, None, "fsdp"),
      ("layers", "mlp_norm", "scale"): (None, None),
      ("mlm_head", "dense", "kernel"): ("fsdp", None),
      ("mlm_head", "bias"): (None,),
  }
  for where, spec in expected.items():
    array = functools.reduce(lambda tree, key: tree[key], where, params)
    assert _spec(array) == spec, where
    shard = tuple(d // 8 if axis else d for d, axis in zip(array.shape, spec))
    assert all(s.data.shape == shard for s in array.addressable_shards), where

  # The batch splits over fsdp too, with activations constrained by the same rules.
  batch = padded_batch("bert", batch=8)

  @jax.jit
  def logits(params, ids, mask, token_types):
    with activation_sharding(rules.activation_resolver()):
      model = nnx.merge(graphdef, params)
      return model.mlm_logits(model(ids, mask, token_types))

  got = logits(params, *(jnp.asarray(a) for a in batch))
  np.testing.assert_allclose(np.asarray(got), hf_outputs(hf_model, *batch)["logits"], rtol=0,
                             atol=ATOL)
