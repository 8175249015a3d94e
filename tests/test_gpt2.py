"""GPT-2 through the shared decoder: Hugging Face -> jaxlm -> Hugging Face, generation,
packed documents and fine-tuning, proven against transformers' GPT2LMHeadModel (PyTorch)
on tiny random models."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxlm  # noqa: E402
from jaxlm.cli import main  # noqa: E402
from jaxlm.convert.errors import ConversionError  # noqa: E402
from jaxlm.convert.hf_config import read_hf_config  # noqa: E402
from jaxlm.loading import load_params  # noqa: E402

TINY = dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
            bos_token_id=127, eos_token_id=127)


def build_hf(tmp_path, name="hf", **changes):
  """A random GPT-2 saved to tmp_path/name. Norm weights and every bias are random too, so
  that a dropped or misplaced one shows in the logits."""
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**TINY, **changes})).eval()
  with torch.no_grad():
    for name_, param in model.named_parameters():
      if name_.endswith("bias") or ".ln_" in name_:
        param.normal_(0, 0.5)
  path = tmp_path / name
  model.save_pretrained(path)
  return model, path


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
  return build_hf(tmp_path_factory.mktemp("gpt2"))


def ids(batch=2, seq=12, vocab=128):
  return np.random.default_rng(0).integers(0, vocab, (batch, seq))


def torch_logits(model, input_ids):
  with torch.no_grad():
    return model(torch.as_tensor(input_ids)).logits.float().numpy()


def assert_close(ours, theirs, atol=1e-4):
  assert np.max(np.abs(np.asarray(ours, np.float32) - np.asarray(theirs, np.float32))) <= atol


def test_logits_and_hidden_states_match_transformers(hf_gpt2):
  model, path = hf_gpt2
  ours = jaxlm.load_model(path)
  x = ids()
  assert_close(ours(x), torch_logits(model, x))
  with torch.no_grad():
    final = model(torch.as_tensor(x), output_hidden_states=True).hidden_states[-1].numpy()
  assert_close(ours.hidden_states(x), final)  # after ln_f, before the tied output


def test_cli_round_trip_to_transformers(hf_gpt2, tmp_path):
  model, path = hf_gpt2
  assert main(["convert", "--from-hf", str(path), "--out", str(tmp_path / "ckpt")]) == 0
  assert main(["convert", "--to-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back")]) == 0
  config = json.loads((tmp_path / "back" / "config.json").read_text())
  assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
  reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
  x = ids()
  assert_close(torch_logits(reloaded, x), torch_logits(model, x), atol=1e-6)


def test_base_model_names_and_mask_buffers_are_accepted(hf_gpt2, tmp_path):
  """Files saved from GPT2Model (openai-community/gpt2) have no "transformer." prefix and
  may hold the causal-mask buffers attn.bias / attn.masked_bias."""
  from safetensors.numpy import load_file, save_file
  model, path = hf_gpt2
  tensors = {name.removeprefix("transformer."): value
             for name, value in load_file(path / "model.safetensors").items()}
  tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
  tensors["h.0.attn.masked_bias"] = np.array(-1e4, np.float32)
  base = tmp_path / "base"
  base.mkdir()
  save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
  (base / "config.json").write_text((path / "config.json").read_text())
  x = ids()
  assert_close(jaxlm.load_model(base)(x), torch_logits(model, x))


def test_packed_documents_restart_their_positions(hf_gpt2):
  model, path = hf_gpt2
  ours = jaxlm.load_model(path)
  x = ids(batch=1, seq=12)
  segments = np.array([[1] * 5 + [2] * 7])
  positions = np.array([list(range(5)) + list(range(7))])
  packed = np.asarray(ours(x, positions, segments))
  assert_close(packed[:, :5], torch_logits(model, x[:, :5]))
  assert_close(packed[:, 5:], torch_logits(model, x[:, 5:]))


def test_greedy_generation_matches_transformers(hf_gpt2):
  from jaxlm.generate.decode import generate
  model, path = hf_gpt2
  ours = jaxlm.load_model(path)
  prompts = [[5, 17, 99, 3], [42, 7, 8, 120, 64, 2, 31]]  # different lengths: left-padded
  got = generate(ours, prompts, max_new_tokens=10)
  for prompt, tokens in zip(prompts, got):
    with torch.no_grad():
      hf = model.generate(torch.as_tensor([prompt]), max_new_tokens=10, min_new_tokens=10,
                          do_sample=False, num_beams=1, pad_token_id=0)
    assert tokens == hf[0, len(prompt):].tolist()
  with pytest.raises(ValueError, match="64 learned positions"):
    generate(ours, prompts, max_new_tokens=60)


@pytest.mark.parametrize("option, value", [
    ("scale_attn_by_inverse_layer_idx", True), ("reorder_and_upcast_attn", True),
    ("add_cross_attention", True), ("scale_attn_weights", False),
    ("activation_function", "relu")])
def test_unsupported_options_are_named(option, value):
  config = transformers.GPT2Config(**TINY).to_dict()
  assert read_hf_config(config)[1] == "gpt2"
  with pytest.raises(ConversionError, match=f"{option}={value!r}"):
    read_hf_config({**config, option: value})


def test_unsupported_option_in_a_directory_is_refused(hf_gpt2, tmp_path):
  _, path = hf_gpt2
  (tmp_path / "bad").mkdir()
  config = json.loads((path / "config.json").read_text())
  (tmp_path / "bad" / "config.json").write_text(
      json.dumps({**config, "scale_attn_by_inverse_layer_idx": True}))
  with pytest.raises(ConversionError, match="scale_attn_by_inverse_layer_idx"):
    load_params(tmp_path / "bad")


def test_fine_tune_from_gpt2_and_export(tiny_config, tmp_path):
  """init_from starts from the GPT-2 weights: two small steps move the logits a little,
  and the run exports to a GPT-2 that transformers loads."""
  from jaxlm.train.loop import train
  model, path = build_hf(tmp_path, vocab_size=4096)  # the embedded tokenizer's vocabulary
  run = tiny_config(model__init_from=str(path), model__compute_dtype="float32",
                    train__steps=2, optim__learning_rate=1e-4)
  assert np.isfinite(train(run, tmp_path / "run")["loss"])
  assert main(["convert", "--to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
  exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
  x = ids(vocab=4096)
  assert_close(jaxlm.load_model(tmp_path / "run")(x), torch_logits(exported, x))
  change = np.abs(torch_logits(exported, x) - torch_logits(model, x)).max()
  assert 1e-5 < change < 0.1


def test_export_refuses_what_gpt2_cannot_express():
  from jaxlm.convert.hf_config import write_hf_config
  from jaxlm.models import from_preset
  gpt2 = from_preset("gpt2")
  assert read_hf_config(write_hf_config(gpt2, dtype="float32"))[0] == gpt2.replace(
      compute_dtype="float32")
  with pytest.raises(ConversionError, match="num_kv_heads=4"):
    write_hf_config(gpt2.replace(num_kv_heads=4), dtype="float32")
