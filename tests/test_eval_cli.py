"""`jaxlm eval`: the same loss as training's evaluation, label scores equal to a brute-force
likelihood, generation metrics on the model's own greedy outputs, and bad input named."""
import json

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlm import cli
from jaxlm.data.tokens import TextTokenizer
from jaxlm.evaluate import run
from jaxlm.evaluate.metrics import generation_metrics
from jaxlm.generate.decode import generate
from jaxlm.loading import LoadedParams, load_model, save_model_dir
from jaxlm.models import Llama
from jaxlm.models.config import from_preset
from jaxlm.train.loop import train

LABELS = ("sports", "politics", "science")
TOPICS = {"sports": "the team scored a late goal in match", "politics": "the senate held a vote "
          "on bill", "science": "the lab measured a new particle in trial"}


def random_model_dir(path, vocab_size=4096):
  """An untrained tiny model that ships the embedded tokenizer, as a converted model would."""
  cfg = from_preset("tiny", vocab_size=vocab_size)
  params = nnx.to_pure_dict(nnx.state(Llama(cfg, rngs=nnx.Rngs(0))))
  return save_model_dir(LoadedParams(cfg, params, "llama", None, None, tokenizer_file="embedded"),
                        path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return random_model_dir(tmp_path_factory.mktemp("models") / "tiny")


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  return str(path)


def classification_rows(count):
  return [{"text": f"{TOPICS[label]} {i}", "label": label}
          for i in range(count) for label in LABELS]


def classification_config(tiny_config, tmp_path, **overrides):
  return tiny_config(data__sources=(write_jsonl(tmp_path / "cls.jsonl", classification_rows(12)),),
                     data__format="classification", data__labels=LABELS,
                     data__validation_fraction=0.5, **overrides)


def test_perplexity_equals_the_training_loops_eval_loss(tiny_config, tmp_path, capsys):
  config = tiny_config(train__steps=2, train__eval_every=2, train__eval_batches=2)
  trained = train(config, tmp_path / "run")
  capsys.readouterr()
  out = tmp_path / "metrics.json"
  # No --config: a workdir is evaluated on its own recipe's held-out rows.
  assert cli.main(["eval", "--model", str(tmp_path / "run"), "--max-batches", "2",
                   "--out", str(out)]) == 0
  printed = capsys.readouterr().out.strip().splitlines()
  result = json.loads(out.read_text())
  assert json.loads(printed[-1]) == result
  assert result["split"] == "validation" and result["examples"] > 0
  np.testing.assert_allclose(result["loss"], trained["eval_loss"], rtol=1e-6)
  np.testing.assert_allclose(result["perplexity"], trained["eval_perplexity"], rtol=1e-6)


def test_evaluation_is_sharded_by_the_recipes_mesh(tiny_config, tmp_path):
  config = tiny_config(train__steps=2)
  train(config, tmp_path / "run")
  results = []
  for data, fsdp, tensor in ((1, 8, 1), (4, 1, 2)):
    layout = tiny_config(mesh__data=data, mesh__fsdp=fsdp, mesh__tensor=tensor)
    model = run.load_eval_model(tmp_path / "run", run.config_mesh(layout))
    kernel = model.params["layers"]["attention"]["q_proj"]["kernel"]
    # Placed by logical axes as it loads: each device holds a slice, not the whole kernel.
    assert kernel.addressable_shards[0].data.size < kernel.size
    results.append(run.evaluate_model(layout, tmp_path / "run", max_batches=2))
  np.testing.assert_allclose(results[0]["loss"], results[1]["loss"], rtol=1e-5)
  assert results[0]["tokens"] == results[1]["tokens"] > 0


@nnx.jit
def logits_of(model, ids):
  return model(ids)


def brute_force_scores(model, prompt, candidates, width=40):
  """Log-likelihood of each candidate after the prompt, from the model's logits for the
  example alone (right-padded to one width, which a causal model never looks at)."""
  scores = []
  for candidate in candidates:
    tokens = np.concatenate([prompt, candidate])
    ids = np.zeros((1, width), np.int32)
    ids[0, :len(tokens)] = tokens
    log_probs = jax.nn.log_softmax(logits_of(model, ids)[0])
    scores.append(sum(float(log_probs[len(prompt) - 1 + i, token])
                      for i, token in enumerate(candidate)))
  return np.array(scores)


def test_label_scores_equal_a_brute_force_likelihood(tiny_config, tmp_path, model_dir):
  config = classification_config(tiny_config, tmp_path)
  result = run.evaluate_model(config, model_dir)

  tok = TextTokenizer(str(model_dir))
  rows = run.eval_rows(config, str(model_dir), "validation")
  examples = [e for k in range(rows.batches_per_epoch) for e in run.segments(rows.batch(k), "")]
  assert len(examples) == result["examples"]
  candidates = run.label_candidates(config, tok)
  assert [tok.decode(c) for c in candidates] == [f" {l}<|endoftext|>" for l in LABELS]
  scores = run.label_scores(run.load_eval_model(model_dir), examples, candidates,
                            config.data.seq_len, config.data.batch_size)
  model = load_model(model_dir)
  # Each packed segment is one whole example: its prompt and its label, from the raw rows.
  texts = {f"{row['text']}\nLabel:": row["label"] for row in classification_rows(12)}
  truth = [LABELS.index(texts[tok.decode(e.prompt)]) for e in examples]
  expected = np.array([brute_force_scores(model, e.prompt, candidates) for e in examples])
  np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
  assert result["accuracy"] == pytest.approx(np.mean(expected.argmax(axis=1) == truth))
  assert np.sum(result["confusion_matrix"], axis=1).tolist() == np.bincount(
      truth, minlength=len(LABELS)).tolist()


def test_a_trained_classifier_beats_chance(tiny_config, tmp_path):
  config = classification_config(tiny_config, tmp_path, train__steps=60,
                                 optim__learning_rate=3e-3, checkpoint__every=60)
  train(config, tmp_path / "run")
  result = run.evaluate_model(config, tmp_path / "run")
  assert result["accuracy"] > 0.6, result


def test_generate_scores_the_models_greedy_completions(tiny_config, tmp_path, model_dir):
  rows = [{"prompt": f"Question {i}: what is {i} plus one?", "completion": f" It is {i + 1}."}
          for i in range(30)]
  config = tiny_config(data__sources=(write_jsonl(tmp_path / "sft.jsonl", rows),),
                       data__format="sft", data__validation_fraction=0.2)
  result = run.evaluate_model(config, model_dir, generate_text=True, max_new_tokens=6)

  tok = TextTokenizer(str(model_dir))
  loader = run.eval_rows(config, str(model_dir), "validation")
  examples = [e for k in range(loader.batches_per_epoch) for e in run.segments(loader.batch(k), "")]
  predictions, references = run.greedy_completions(
      run.load_eval_model(model_dir), tok, str(model_dir), examples, max_new_tokens=6,
      batch_size=8)
  assert set(references) <= {row["completion"] for row in rows}
  alone = generate(load_model(model_dir), [examples[0].prompt.tolist()], max_new_tokens=6,
                   eos_ids=(tok.eos_id,))[0]
  assert predictions[0] == tok.decode(alone)
  scores, signature = generation_metrics(predictions, references)
  assert {k: result[k] for k in scores} == scores
  assert result["bleu_signature"] == signature


@pytest.mark.parametrize("args, message", [
    (["--config.data.format=classification"], "set data.labels"),
    (["--config.data.validation_fraction=0"], "validation split is empty"),
    (["--generate"], "--generate completes sft or chat prompts"),
    (["--max-batches", "0"], "--max-batches must be at least 1"),
])
def test_bad_input_is_named(model_dir, token_cache, capsys, args, message):
  assert cli.main(["eval", "--model", str(model_dir), "--config", "tiny_demo",
                   f"--config.data.cache_dir={token_cache}", *args]) == 2
  err = capsys.readouterr().err
  assert err.startswith("jaxlm eval: error:") and message in err


def test_a_model_smaller_than_the_tokenizer_is_refused(tmp_path, capsys):
  small = random_model_dir(tmp_path / "small", vocab_size=256)
  assert cli.main(["eval", "--model", str(small)]) == 2
  assert "tokenizer has 4096 tokens but the model's vocabulary only 256" in capsys.readouterr().err


def test_a_model_is_required(capsys):
  assert cli.main(["eval", "--config", "tiny_demo"]) == 2
  assert "--model PATH" in capsys.readouterr().err
