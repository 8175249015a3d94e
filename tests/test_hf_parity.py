"""Hugging Face -> jaxlm -> Hugging Face, proven by logits against transformers (PyTorch)
on tiny random models built from configs here."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxlm  # noqa: E402
from jaxlm.convert.errors import ConversionError  # noqa: E402
from jaxlm.loading import load_params, save_hf_dir, save_model_dir  # noqa: E402

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              max_position_embeddings=64, rms_norm_eps=1e-6)
CASES = {
    # GQA 2:1, untied, Llama 3 rope scaling
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 16})),
    # head_dim != hidden / heads, MHA, linear rope scaling
    "llama_head_dim": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=4, head_dim=24,
        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    # GQA 4:1 and a sliding window shorter than the sequence
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=1, sliding_window=5)),
    # q/k/v biases and tied embeddings
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
}


def build_hf(case, tmp_path, dtype=torch.float32):
  config_cls, model_cls, extra = CASES[case]
  config = getattr(transformers, config_cls)(**COMMON, **extra)
  torch.manual_seed(0)
  model = getattr(transformers, model_cls)(config).to(dtype).eval()
  if case == "qwen2":  # random biases, so that a dropped bias would show
    with torch.no_grad():
      for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
          proj.bias.normal_(0, 0.5)
  path = tmp_path / f"hf_{case}"
  model.save_pretrained(path)
  return model, path


def ids(batch=2, seq=12, vocab=128):
  return np.random.default_rng(0).integers(0, vocab, (batch, seq))


def torch_logits(model, input_ids):
  with torch.no_grad():
    return model(torch.as_tensor(input_ids)).logits.float().numpy()


def assert_logits_match(ours, theirs, atol=1e-4, rel=1e-5):
  ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
  assert np.max(np.abs(ours - theirs)) <= atol
  assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) <= rel


@pytest.mark.parametrize("case", CASES)
def test_hf_to_jaxlm_logits_match_transformers(case, tmp_path):
  model, path = build_hf(case, tmp_path)
  x = ids()
  assert_logits_match(jaxlm.load_model(path)(x), torch_logits(model, x))


@pytest.mark.parametrize("case", CASES)
def test_jaxlm_to_hf_round_trip(case, tmp_path):
  model, path = build_hf(case, tmp_path)
  loaded = load_params(path)
  ckpt = save_model_dir(loaded, tmp_path / "ckpt")
  out = save_hf_dir(load_params(ckpt), tmp_path / "back")
  reloaded = getattr(transformers, CASES[case][1]).from_pretrained(out).eval()
  x = ids()
  assert_logits_match(torch_logits(reloaded, x), torch_logits(model, x), atol=1e-6, rel=1e-7)
  assert reloaded.config.model_type == model.config.model_type


def test_bf16_weights_within_tolerance(tmp_path):
  model, path = build_hf("llama3", tmp_path, dtype=torch.bfloat16)
  reference = getattr(transformers, "LlamaForCausalLM").from_pretrained(
      path, dtype=torch.float32).eval()
  x = ids()
  # bf16 weights read exactly; computing in bf16 keeps logits within 2e-2 of fp32 compute.
  assert_logits_match(jaxlm.load_model(path)(x), torch_logits(reference, x))
  ours_bf16 = np.asarray(jaxlm.load_model(path, dtype="bfloat16")(x))
  assert np.max(np.abs(ours_bf16 - torch_logits(reference, x))) < 2e-2


def test_sharded_safetensors_with_index(tmp_path):
  model, path = build_hf("llama3", tmp_path)
  out = save_hf_dir(load_params(path), tmp_path / "sharded", max_shard_gb=40e3 / 2**30)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 3
  reloaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
  x = ids()
  assert_logits_match(torch_logits(reloaded, x), torch_logits(model, x), atol=1e-6, rel=1e-7)
  assert_logits_match(jaxlm.load_model(out)(x), torch_logits(model, x))


def test_mismatched_tensors_are_listed_by_name(tmp_path):
  from safetensors.numpy import load_file, save_file
  _, path = build_hf("llama3", tmp_path)
  tensors = load_file(path / "model.safetensors")
  del tensors["model.layers.1.mlp.up_proj.weight"]
  tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
  tensors["model.extra.weight"] = np.zeros(3, np.float32)
  save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ConversionError) as error:
    load_params(path)
  message = str(error.value)
  assert "model.layers.1.mlp.up_proj.weight (96, 64)" in message
  assert "model.layers.0.self_attn.k_proj.weight: expected (32, 64), found (64, 64)" in message
  assert "model.extra.weight" in message


def test_unsupported_architecture_and_pickle_are_refused(tmp_path):
  (tmp_path / "t5").mkdir()
  (tmp_path / "t5" / "config.json").write_text(json.dumps({"model_type": "t5"}))
  with pytest.raises(ConversionError, match="Supported: llama, mistral, qwen2.*bert, roberta"):
    load_params(tmp_path / "t5")
  _, path = build_hf("llama3", tmp_path)
  (path / "model.safetensors").rename(path / "pytorch_model.bin")
  with pytest.raises(ConversionError, match="pickle"):
    load_params(path)


def test_transformers4_config_spelling(tmp_path):
  from jaxlm.convert.hf_config import read_hf_config
  v4 = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 500000.0,
        "torch_dtype": "bfloat16", "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                    "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 16}}
  v5 = dict(v4, rope_parameters={"rope_theta": 500000.0, **v4["rope_scaling"]}, dtype="bfloat16")
  del v5["rope_theta"], v5["rope_scaling"], v5["torch_dtype"]
  assert read_hf_config(v4) == read_hf_config(v5)
  assert read_hf_config(v4)[0].rope_theta == 500000.0
  assert dict(read_hf_config(v4)[0].rope_scaling)["factor"] == 8.0


def test_train_init_from_an_hf_directory_and_export_back(tiny_config, tmp_path):
  """init_from: the first step's loss is the HF model's loss on that batch; the trained
  run exports to a directory transformers loads."""
  from jaxlm.cli import main
  from jaxlm.data.pipeline import build_train_data
  from jaxlm.train.loop import train

  config = transformers.LlamaConfig(**dict(COMMON, vocab_size=4096), num_attention_heads=4,
                                    num_key_value_heads=2)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).eval()
  model.save_pretrained(tmp_path / "base")
  run = tiny_config(model__init_from=str(tmp_path / "base"), model__compute_dtype="float32",
                    train__steps=2, optim__learning_rate=1e-4)
  train(run, tmp_path / "run")
  first = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
  train_data = build_train_data(run.data, run.data.tokenizer, run.data.seq_len,
                                run.data.batch_size, run.data.seed).train
  batch = train_data.batch(0)
  train_data.close()
  # The embedded novels are cut into full windows: one document per row, no padding.
  assert batch["loss_mask"].all() and (batch["segment_ids"] == 1).all()
  with torch.no_grad():
    logits = model(torch.as_tensor(batch["input_ids"])).logits
    targets = torch.as_tensor(batch["targets"]).long().reshape(-1)
    hf_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets)
  assert first["loss"] == pytest.approx(float(hf_loss), rel=1e-5)

  assert main(["convert", "--to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
  exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
  assert (tmp_path / "hf" / "tokenizer.json").is_file()
  x = ids(vocab=4096)
  ours = jaxlm.load_model(tmp_path / "run")(x)
  assert_logits_match(ours, torch_logits(exported, x))
  assert not np.allclose(torch_logits(exported, x), torch_logits(model, x), atol=1e-5)


def test_failed_conversion_leaves_nothing_at_out(tmp_path, capsys):
  from jaxlm.cli import main
  _, path = build_hf("llama3", tmp_path)
  (path / "model.safetensors").write_bytes(b"not a safetensors file")
  out = tmp_path / "out"
  assert main(["convert", "--from-hf", str(path), "--out", str(out)]) == 2
  assert "model.safetensors is not a readable safetensors file" in capsys.readouterr().err
  assert not out.exists()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]


def test_offline_hub_id_asks_for_a_local_directory(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(ConversionError, match="pass a local model directory"):
    load_params("some-org/some-model")


@pytest.mark.parametrize("case", CASES)
def test_greedy_generation_matches_transformers(case, tmp_path):
  from jaxlm.generate.decode import generate
  model, path = build_hf(case, tmp_path)
  prompts = [[5, 17, 99, 3], [42, 7, 8, 120, 64, 2, 31]]  # different lengths: left-padded
  eos = model.generation_config.eos_token_id
  eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
  ours = generate(jaxlm.load_model(path), prompts, max_new_tokens=10, eos_ids=eos)
  for prompt, got in zip(prompts, ours):
    with torch.no_grad():
      hf = model.generate(torch.as_tensor([prompt]), max_new_tokens=10, do_sample=False,
                          num_beams=1, pad_token_id=0)[0, len(prompt):].tolist()
    hf = hf[:next((i for i, t in enumerate(hf) if t in eos), len(hf))]
    assert got == hf
