"""Sequence classifiers (model.num_labels > 0) between Hugging Face and jaxlm, both ways,
proven by logits against transformers' *ForSequenceClassification (PyTorch) on tiny random
models."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxlm  # noqa: E402
from jaxlm.convert.errors import ConversionError  # noqa: E402
from jaxlm.convert.hf_config import read_hf_config  # noqa: E402
from jaxlm.loading import load_params, save_hf_dir, save_model_dir  # noqa: E402

VOCAB = 128
EOS = 127
LENGTHS = (12, 7, 3)  # rows of different lengths, right-padded to the first
HEAD_WEIGHTS = ("score.weight", "classifier.weight")  # classifier: GPT2ForTokenClassification


def randomize(model):
  """Norm weights and biases (a head's too) at std 0.5 and the head's weight at 1, so that a
  dropped or misplaced one shows in the logits (HF initialises the head at std 0.02 and its
  bias at 0, which would hide a transposed or dropped one)."""
  with torch.no_grad():
    for name, param in model.named_parameters():
      head = name in HEAD_WEIGHTS
      if name.endswith("bias") or "norm" in name or ".ln_" in name or head:
        param.normal_(0, 1.0 if head else 0.5)
  return model


def save(model, path):
  model.save_pretrained(path)
  return model, path


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
  """GQA 2:1, untied, with a pad token."""
  config = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      tie_word_embeddings=False, num_labels=3, pad_token_id=0, eos_token_id=EOS)
  torch.manual_seed(0)
  model = randomize(transformers.LlamaForSequenceClassification(config).eval())
  return save(model, tmp_path_factory.mktemp("llama") / "hf")


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
  """Without a pad token, like openai-community/gpt2."""
  config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                   n_positions=64, num_labels=4, bos_token_id=EOS,
                                   eos_token_id=EOS)
  torch.manual_seed(0)
  model = randomize(transformers.GPT2ForSequenceClassification(config).eval())
  return save(model, tmp_path_factory.mktemp("gpt2") / "hf")


def padded_batch(pad_id):
  ids = np.random.default_rng(0).integers(1, EOS, (len(LENGTHS), LENGTHS[0]))
  mask = np.arange(LENGTHS[0]) < np.array(LENGTHS)[:, None]
  return np.where(mask, ids, pad_id), mask


def torch_logits(model, ids, mask):
  with torch.no_grad():
    return model(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask.astype(np.int64))
                 ).logits.float().numpy()


def pooled_jaxlm_logits(model, ids):
  """Logits at each row's last real token. Attention is causal, so the right padding after
  it does not change them."""
  logits = np.asarray(model(ids))
  return logits[np.arange(len(LENGTHS)), np.array(LENGTHS) - 1]


def max_diff(ours, theirs):
  return float(np.max(np.abs(np.asarray(ours, np.float32) - np.asarray(theirs, np.float32))))


def test_llama_classifier_matches_transformers(hf_llama):
  model, path = hf_llama
  ours = jaxlm.load_model(path)
  assert ours.cfg.num_labels == 3 and ours.lm_head is None
  ids, mask = padded_batch(pad_id=0)
  theirs = torch_logits(model, ids, mask)  # HF pools at the last token that is not pad
  assert theirs.shape == (3, 3)
  assert max_diff(pooled_jaxlm_logits(ours, ids), theirs) <= 1e-4


def test_gpt2_classifier_matches_transformers(hf_gpt2):
  model, path = hf_gpt2
  ours = jaxlm.load_model(path)
  assert ours.cfg.num_labels == 4 and ours.lm_head is None
  ids, mask = padded_batch(pad_id=EOS)
  # Without a pad token transformers takes only one row at a time, and pools its last token.
  theirs = np.concatenate([torch_logits(model, ids[i:i + 1, :n], mask[i:i + 1, :n])
                           for i, n in enumerate(LENGTHS)])
  assert theirs.shape == (3, 4)
  assert max_diff(pooled_jaxlm_logits(ours, ids), theirs) <= 1e-4


def test_llama_export_keeps_labels_through_a_model_directory(hf_llama, tmp_path):
  model, path = hf_llama
  loaded = load_params(path)
  assert loaded.labels == ("LABEL_0", "LABEL_1", "LABEL_2")
  loaded.labels = ("negative", "neutral", "positive")  # as a training run's data.labels
  save_model_dir(loaded, tmp_path / "jaxlm")
  out = save_hf_dir(load_params(tmp_path / "jaxlm"), tmp_path / "back")
  config = json.loads((out / "config.json").read_text())
  assert config["architectures"] == ["LlamaForSequenceClassification"]
  assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
  assert config["pad_token_id"] == 0  # the source's own
  reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
  assert reloaded.config.label2id == {"negative": 0, "neutral": 1, "positive": 2}
  ids, mask = padded_batch(pad_id=0)
  assert max_diff(torch_logits(reloaded, ids, mask), torch_logits(model, ids, mask)) <= 1e-6


def test_gpt2_export_pads_with_eos_for_batches(hf_gpt2, tmp_path):
  """A base without a pad token exports with its eos as pad_token_id, so transformers takes
  batches and pools each eos-padded row at its last text token, as jaxlm trains."""
  _, path = hf_gpt2
  loaded = load_params(path)
  out = save_hf_dir(loaded, tmp_path / "back")
  config = json.loads((out / "config.json").read_text())
  assert config["architectures"] == ["GPT2ForSequenceClassification"]
  assert config["pad_token_id"] == EOS and config["id2label"]["3"] == "LABEL_3"
  reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
  ids, mask = padded_batch(pad_id=EOS)
  ours = pooled_jaxlm_logits(jaxlm.load_model(path), ids)
  assert max_diff(torch_logits(reloaded, ids, mask), ours) <= 1e-4


def test_wrong_num_labels_names_the_score(hf_llama):
  _, path = hf_llama
  cfg = load_params(path).cfg.replace(num_labels=5)
  with pytest.raises(ConversionError, match=r"score\.weight: expected \(5, 64\), found \(3, 64\)"):
    load_params(path, cfg=cfg)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2"])
def test_read_config_counts_labels_of_classifiers_only(family):
  config_cls = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
                "gpt2": "GPT2Config"}[family]
  hf = getattr(transformers, config_cls)(vocab_size=VOCAB, num_labels=6).to_dict()
  prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gpt2": "GPT2"}[family]
  hf["architectures"] = [prefix + "ForSequenceClassification"]
  assert read_hf_config(hf)[0].num_labels == 6
  hf["architectures"] = [prefix + ("LMHeadModel" if family == "gpt2" else "ForCausalLM")]
  assert read_hf_config(hf)[0].num_labels == 0


def test_peft_adapter_of_a_lora_classifier_carries_its_score(hf_llama, tmp_path):
  """LoRA on q and v with a score trained whole: peft applies the adapter to the HF
  classifier base (whose own score it replaces) and gives the adapted jaxlm logits."""
  peft = pytest.importorskip("peft")
  import jax
  from flax import nnx

  from jaxlm.finetune.lora import LoRAConfig, apply_lora, export_peft_adapter
  _, path = hf_llama
  model = jaxlm.load_model(path)
  lora = LoRAConfig("attention/(q|v)_proj", rank=4, alpha=8.0)
  apply_lora(model, lora.targets, lora.rank, lora.alpha, rngs=nnx.Rngs(1))
  keys = iter(jax.random.split(jax.random.PRNGKey(2), 3))
  for module in (model.layers.attention.q_proj, model.layers.attention.v_proj):
    module.lora_b[...] = 0.05 * jax.random.normal(next(keys), module.lora_b.shape)
  model.score.kernel[...] = jax.random.normal(next(keys), model.score.kernel.shape)
  export_peft_adapter(nnx.to_pure_dict(nnx.state(model)), model.cfg, "llama",
                      tmp_path / "adapter", str(path), lora=lora)
  config = peft.PeftConfig.from_pretrained(tmp_path / "adapter")
  assert config.task_type == "SEQ_CLS" and "score" in config.modules_to_save
  base = transformers.AutoModelForSequenceClassification.from_pretrained(path)
  with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
  ids, mask = padded_batch(pad_id=0)
  assert max_diff(torch_logits(with_adapter, ids, mask), pooled_jaxlm_logits(model, ids)) <= 1e-4
