"""Token classifiers (model.classifier = "token") between Hugging Face and jaxlm, both ways,
proven by logits at every token against transformers' *ForTokenClassification (PyTorch) on
tiny random models whose head has a non-zero bias."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxlm  # noqa: E402
from jaxlm.cli import main  # noqa: E402
from jaxlm.convert.errors import ConversionError  # noqa: E402
from jaxlm.convert.hf_config import read_hf_config, write_hf_config  # noqa: E402
from jaxlm.loading import load_params, save_hf_dir, save_model_dir  # noqa: E402
from tests.test_classifier_hf import (  # noqa: E402
    EOS, VOCAB, max_diff, padded_batch, randomize, save, torch_logits)

FAMILIES = ("llama", "mistral", "qwen2", "gpt2")
PREFIXES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gpt2": "GPT2"}
NUM_LABELS = 5
TAGS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
LLAMA_SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=64)
HF_CONFIGS = {
    "llama": dict(LLAMA_SHAPE, num_key_value_heads=2, tie_word_embeddings=False),
    # GQA 4:1 and a sliding window shorter than the rows
    "mistral": dict(LLAMA_SHAPE, num_key_value_heads=1, sliding_window=5),
    "qwen2": dict(LLAMA_SHAPE, num_key_value_heads=2),  # q, k, v biases
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=EOS),
}


def hf_config(family: str, **extra):
  name = "GPT2Config" if family == "gpt2" else PREFIXES[family] + "Config"
  return getattr(transformers, name)(vocab_size=VOCAB, num_labels=NUM_LABELS,
                                     eos_token_id=EOS, **HF_CONFIGS[family], **extra)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  """family -> (transformers *ForTokenClassification in eval mode, its saved directory)."""
  models = {}
  for family in FAMILIES:
    torch.manual_seed(0)
    model_cls = getattr(transformers, PREFIXES[family] + "ForTokenClassification")
    model = randomize(model_cls(hf_config(family)).eval())
    models[family] = save(model, tmp_path_factory.mktemp(family) / "hf")
  return models


def head_bias(model):
  return (model.classifier if isinstance(model, transformers.GPT2ForTokenClassification)
          else model.score).bias


def token_logits(model, ids, mask):
  """[real tokens, num_labels]: every token's logits, padding left out (transformers masks
  it, jaxlm's causal attention never lets it reach a real token)."""
  if isinstance(model, torch.nn.Module):
    return torch_logits(model, ids, mask)[mask]
  return np.asarray(model(ids))[mask]


@pytest.mark.parametrize("family", FAMILIES)
def test_token_classifier_matches_transformers(hf_models, family):
  model, path = hf_models[family]
  assert float(head_bias(model).detach().abs().min()) > 0  # a dropped bias would show
  ours = jaxlm.load_model(path)
  assert ours.cfg.classifier == "token" and ours.cfg.num_labels == NUM_LABELS
  assert ours.lm_head is None and ours.score.bias is not None
  ids, mask = padded_batch(pad_id=0)
  theirs = token_logits(model, ids, mask)
  assert theirs.shape == (mask.sum(), NUM_LABELS)
  diff = max_diff(token_logits(ours, ids, mask), theirs)
  print(f"{family}: max |jaxlm - transformers| = {diff:.2e}")
  assert diff <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_export_through_a_model_directory_keeps_head_and_labels(hf_models, family, tmp_path):
  model, path = hf_models[family]
  loaded = load_params(path)
  assert loaded.labels == tuple(f"LABEL_{i}" for i in range(NUM_LABELS))
  loaded.labels = TAGS  # as a training run's data.labels
  save_model_dir(loaded, tmp_path / "jaxlm")
  back = load_params(tmp_path / "jaxlm")
  assert back.cfg.classifier == "token" and back.labels == TAGS
  out = save_hf_dir(back, tmp_path / "back")
  config = json.loads((out / "config.json").read_text())
  assert config["architectures"] == [PREFIXES[family] + "ForTokenClassification"]
  assert config["id2label"] == {str(i): tag for i, tag in enumerate(TAGS)}
  reloaded = transformers.AutoModelForTokenClassification.from_pretrained(out).eval()
  assert type(reloaded) is type(model)
  assert reloaded.config.id2label == dict(enumerate(TAGS))
  assert reloaded.config.label2id == {tag: i for i, tag in enumerate(TAGS)}
  ids, mask = padded_batch(pad_id=0)
  diff = max_diff(token_logits(reloaded, ids, mask), token_logits(model, ids, mask))
  print(f"{family}: max |exported - source| = {diff:.2e}")
  assert diff <= 1e-6


def test_cli_convert_round_trip(hf_models, tmp_path):
  """`jaxlm convert --from-hf` then `--to-hf` gives back a GPT2ForTokenClassification whose
  head (`classifier`, not `score`) carries the same weights and bias."""
  model, path = hf_models["gpt2"]
  assert main(["convert", "--from-hf", str(path), "--out", str(tmp_path / "m")]) == 0
  assert main(["convert", "--to-hf", str(tmp_path / "m"), "--out", str(tmp_path / "back")]) == 0
  reloaded = transformers.AutoModelForTokenClassification.from_pretrained(
      tmp_path / "back").eval()
  assert isinstance(reloaded, transformers.GPT2ForTokenClassification)
  ids, mask = padded_batch(pad_id=0)
  assert max_diff(token_logits(reloaded, ids, mask), token_logits(model, ids, mask)) <= 1e-6


def test_token_classification_bias_false_is_refused():
  hf = hf_config("llama", token_classification_bias=False).to_dict()
  hf["architectures"] = ["LlamaForTokenClassification"]
  with pytest.raises(ConversionError, match="token_classification_bias=false"):
    read_hf_config(hf)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_round_trip_names_the_token_classifier(family):
  hf = hf_config(family).to_dict()
  hf["architectures"] = [PREFIXES[family] + "ForTokenClassification"]
  cfg, read_family = read_hf_config(hf)
  assert (cfg.num_labels, cfg.classifier, read_family) == (NUM_LABELS, "token", family)
  written = write_hf_config(cfg, family, dtype="float32", labels=TAGS)
  assert written["architectures"] == [PREFIXES[family] + "ForTokenClassification"]
  assert written["label2id"] == {tag: i for i, tag in enumerate(TAGS)}
  hf["architectures"] = [PREFIXES[family] + "ForSequenceClassification"]
  assert read_hf_config(hf)[0].classifier == "sequence"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_peft_adapter_of_a_lora_token_classifier_carries_its_head(hf_models, family,
                                                                  tmp_path):
  """LoRA on q and v with the head trained whole: peft applies the TOKEN_CLS adapter to the
  HF token classifier (whose own head it replaces, weight and bias) and gives the adapted
  jaxlm logits at every token."""
  peft = pytest.importorskip("peft")
  import jax
  from flax import nnx

  from jaxlm.finetune.lora import LoRAConfig, apply_lora, export_peft_adapter
  _, path = hf_models[family]
  model = jaxlm.load_model(path)
  lora = LoRAConfig("attention/(q|v)_proj", rank=4, alpha=8.0)
  apply_lora(model, lora.targets, lora.rank, lora.alpha, rngs=nnx.Rngs(1))
  keys = iter(jax.random.split(jax.random.PRNGKey(2), 4))
  for module in (model.layers.attention.q_proj, model.layers.attention.v_proj):
    module.lora_b[...] = 0.05 * jax.random.normal(next(keys), module.lora_b.shape)
  model.score.kernel[...] = jax.random.normal(next(keys), model.score.kernel.shape)
  model.score.bias[...] = jax.random.normal(next(keys), model.score.bias.shape)
  export_peft_adapter(nnx.to_pure_dict(nnx.state(model)), model.cfg, family,
                      tmp_path / "adapter", str(path), lora=lora)
  config = peft.PeftConfig.from_pretrained(tmp_path / "adapter")
  head = "classifier" if family == "gpt2" else "score"
  assert config.task_type == "TOKEN_CLS" and config.modules_to_save == [head]
  base = transformers.AutoModelForTokenClassification.from_pretrained(path)
  with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
  ids, mask = padded_batch(pad_id=0)
  diff = max_diff(token_logits(with_adapter, ids, mask), token_logits(model, ids, mask))
  print(f"{family} + PEFT: max |jaxlm - peft| = {diff:.2e}")
  assert diff <= 1e-4
