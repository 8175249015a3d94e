"""Classification heads on BERT / RoBERTa encoders, proven against transformers (PyTorch) on
tiny random models: *ForSequenceClassification (and its regression form) and
*ForTokenClassification logits, conversion both ways, packed rows read as each example alone,
and `jaxlm train` on encoder classification and tagging data with exports that transformers
loads with the same logits."""
import json
import random

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxlm import cli  # noqa: E402
from jaxlm.config import apply_overrides, base_config  # noqa: E402
from jaxlm.convert.bert_hf import load_bert, read_bert_config, save_bert  # noqa: E402
from jaxlm.convert.bert_hf import save_random_encoder  # noqa: E402
from jaxlm.loading import load_params  # noqa: E402
from jaxlm.models.bert import bert_from_params  # noqa: E402
from jaxlm.train.loop import Run, train  # noqa: E402

from tests.test_bert import CLASS_PREFIX, build_hf, padded_batch  # noqa: E402

HEADS = {"sequence": ("ForSequenceClassification", {"num_labels": 3}),
         "token": ("ForTokenClassification", {"num_labels": 5}),
         "regression": ("ForSequenceClassification",
                        {"num_labels": 1, "problem_type": "regression"})}
CASES = [(family, kind) for family in ("bert", "roberta") for kind in HEADS]
ATOL = 1e-4


def _hf_logits(model, ids, mask, token_types=None):
  inputs = {"input_ids": torch.as_tensor(ids), "attention_mask": torch.as_tensor(mask)}
  if token_types is not None:
    inputs["token_type_ids"] = torch.as_tensor(token_types)
  with torch.no_grad():
    return model(**inputs).logits.numpy()


def _our_logits(model, ids, mask, token_types=None):
  """transformers' shapes: [batch, classes] for a sequence head, [batch, seq, classes] for
  a token head."""
  hidden = model(jnp.asarray(ids), jnp.asarray(mask),
                 None if token_types is None else jnp.asarray(token_types))
  logits = np.asarray(model.class_logits(hidden))
  return logits if model.cfg.classifier == "token" else logits[:, 0]


@pytest.mark.parametrize("family,kind", CASES)
def test_heads_match_transformers_and_export_back(family, kind, tmp_path):
  head, settings = HEADS[kind]
  hf_model = build_hf(family, head, tmp_path / "hf", **settings)
  batch = padded_batch(family)
  expected = _hf_logits(hf_model, *batch)

  cfg, params = load_bert(tmp_path / "hf")
  assert (cfg.classifier, cfg.num_labels, cfg.mlm_head) == (kind, settings["num_labels"], False)
  assert cfg.pooler == (kind != "token")
  np.testing.assert_allclose(_our_logits(bert_from_params(cfg, params), *batch), expected,
                             rtol=0, atol=ATOL)

  _, _, hf_config = read_bert_config(tmp_path / "hf")
  labels = tuple(f"class {i}" for i in range(cfg.num_labels))
  out = save_bert(cfg, params, tmp_path / "export", family, base=hf_config, labels=labels)
  reloaded, info = getattr(transformers, CLASS_PREFIX[family] + head).from_pretrained(
      out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert reloaded.config.id2label == dict(enumerate(labels))
  assert reloaded.config.problem_type == settings.get(
      "problem_type", None if kind == "token" else "single_label_classification")
  np.testing.assert_allclose(_hf_logits(reloaded.eval(), *batch), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_packed_examples_get_the_logits_they_get_alone(kind, tmp_path):
  """Training packs examples into rows; a sequence head reads each segment's own first
  token, and every token of the segment carries those logits."""
  from jaxlm.models.factory import batch_logits
  head, settings = HEADS[kind]
  build_hf("roberta", head, tmp_path / "hf", **settings)
  cfg, params = load_bert(tmp_path / "hf")
  model = bert_from_params(cfg, params)
  rng = np.random.default_rng(1)
  first, second = rng.integers(3, 100, 7), rng.integers(3, 100, 4)
  row = np.concatenate([first, second, [cfg.pad_token_id] * 3])[None]
  batch = {"input_ids": jnp.asarray(row),
           "positions": jnp.asarray([[*range(7), *range(4), 0, 0, 0]]),
           "segment_ids": jnp.asarray([[1] * 7 + [2] * 4 + [0] * 3])}
  packed = np.asarray(batch_logits(model, batch))[0]
  for ids, part in ((first, packed[:7]), (second, packed[7:11])):
    alone = np.asarray(model.class_logits(model(jnp.asarray(ids[None]))))[0]
    np.testing.assert_allclose(part, alone, rtol=0, atol=ATOL)
    if kind == "sequence":
      np.testing.assert_allclose(part, np.broadcast_to(part[0], part.shape), rtol=0, atol=ATOL)


COLORS = ("red", "blue", "green")
WORDS = "cat dog bird fish big small old new the a saw near".split()
PEOPLE = ("Emma", "Anne Elliot", "Mr Darcy", "Harriet")
PLACES = ("Bath", "Kellynch Hall", "London", "Highbury")
TAGS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")


def _classified_rows():
  """The label is the one colour word among five others: the [CLS] token must find it."""
  rng = random.Random(0)
  rows = []
  for i in range(400):
    words = rng.sample(WORDS, 5)
    color = rng.choice(COLORS)
    words.insert(rng.randrange(6), color)
    rows.append({"text": " ".join(words) + f" {i}", "label": color})
  return rows


def _scored_pairs():
  """STS-B style: a pair's score is half the number of colour words in the two texts."""
  rng = random.Random(2)
  rows = []
  for i in range(400):
    a, b = ([rng.choice(WORDS + list(COLORS)) for _ in range(5)] for _ in range(2))
    score = sum(w in COLORS for w in a + b) / 2
    rows.append({"text_a": " ".join(a), "text_b": " ".join(b) + f" {i}", "label": score})
  return rows


def _tagged_rows():
  rng = random.Random(1)
  rows = []
  for i in range(300):
    person, place = rng.choice(PEOPLE).split(), rng.choice(PLACES).split()
    filler = rng.sample(WORDS, rng.randrange(1, 4))
    tokens = person + filler + place + [str(i)]
    tags = (["B-PER"] + ["I-PER"] * (len(person) - 1) + ["O"] * len(filler)
            + ["B-LOC"] + ["I-LOC"] * (len(place) - 1) + ["O"])
    rows.append({"tokens": tokens, "tags": tags})
  return rows


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
  root = tmp_path_factory.mktemp("encoder_heads")
  files = {"classification": root / "classified.jsonl", "tagging": root / "tagged.jsonl",
           "pairs": root / "pairs.jsonl"}
  for (fmt, path), rows in zip(files.items(),
                               (_classified_rows(), _tagged_rows(), _scored_pairs())):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  texts = [r["text"] for r in _classified_rows()] + [" ".join(r["tokens"])
                                                     for r in _tagged_rows()]
  encoders = {family: save_random_encoder(root / family, family, texts=texts, vocab_size=300,
                                          hidden_size=32, mlp_dim=64, num_heads=4,
                                          max_positions=64)
              for family in ("bert", "roberta")}
  return files, encoders, str(root / "cache")


def _config(data_files, fmt, family="bert", **overrides):
  files, encoders, cache = data_files
  labels = {"classification": COLORS, "tagging": TAGS, "pairs": ()}[fmt]
  head = ({"model.classifier": "regression",
           "data.prompt_template": "{text_a} [SEP] {text_b}"} if fmt == "pairs" else
          {"model.num_labels": len(labels), "data.prompt_template": "{text}"})
  config = base_config()
  apply_overrides(config, {
      "model.init_from": str(encoders[family]), "model.compute_dtype": "float32", **head,
      "data.sources": (str(files[fmt]),), "data.format": fmt, "data.labels": labels,
      "data.seq_len": 32,
      "data.batch_size": 16, "data.cache_dir": cache, "data.add_special_tokens": True,
      "data.shaping": "pack", "data.validation_fraction": 0.1, "optim.learning_rate": 1e-2,
      "optim.warmup_steps": 2, "train.steps": 60, "train.log_every": 10, "train.eval_every": 60,
      "train.eval_batches": 100, "checkpoint.every": 60, "checkpoint.async_save": False,
      **{k.replace("__", "."): v for k, v in overrides.items()}})
  return config


@pytest.fixture(scope="module")
def runs(data_files, tmp_path_factory):
  """(workdir, final metrics) of a sequence classifier (RoBERTa) and a token classifier
  (BERT), each from a *ForMaskedLM checkpoint: the MLM head is dropped, pooler and score
  start fresh."""
  root = tmp_path_factory.mktemp("encoder_head_runs")
  # A score is learnt more slowly than a label: the regression run takes 150 steps, not 60,
  # at half the rate (at 1e-2 it can settle on predicting the mean score for every pair).
  longer = {"train__steps": 150, "train__eval_every": 150, "checkpoint__every": 150,
            "optim__learning_rate": 5e-3}
  return {fmt: (root / fmt, train(_config(data_files, fmt, family, **extra), root / fmt))
          for fmt, family, extra in (("classification", "roberta", {}), ("tagging", "bert", {}),
                                     ("pairs", "bert", longer))}


def test_sequence_classifier_trains_and_exports_to_transformers(runs, tmp_path):
  workdir, metrics = runs["classification"]
  assert metrics["eval_accuracy"] >= 0.9, metrics
  out = tmp_path / "hf"
  assert cli.main(["convert", "--to-hf", str(workdir), "--out", str(out)]) == 0
  model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
  assert type(model).__name__ == "RobertaForSequenceClassification"
  assert model.config.id2label == dict(enumerate(COLORS))
  # The tokenizer wraps a text in <s> ... </s> as the training rows did.
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  rows = _classified_rows()[:32]
  encoded = tokenizer([r["text"] for r in rows], padding=True, return_tensors="np")
  expected = _hf_logits(model, encoded["input_ids"], encoded["attention_mask"])
  loaded = load_params(workdir)
  ours = _our_logits(bert_from_params(loaded.cfg, loaded.params), encoded["input_ids"],
                     encoded["attention_mask"])
  np.testing.assert_allclose(ours, expected, rtol=0, atol=ATOL)
  predicted = [COLORS[i] for i in expected.argmax(axis=1)]
  assert np.mean([p == r["label"] for p, r in zip(predicted, rows)]) >= 0.9


def test_token_classifier_trains_and_exports_to_transformers(runs, tmp_path):
  workdir, metrics = runs["tagging"]
  assert metrics["eval_entity_f1"] >= 0.9, metrics
  out = tmp_path / "hf"
  assert cli.main(["convert", "--to-hf", str(workdir), "--out", str(out)]) == 0
  model = transformers.AutoModelForTokenClassification.from_pretrained(out).eval()
  assert type(model).__name__ == "BertForTokenClassification"
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  row = _tagged_rows()[0]
  encoded = tokenizer(row["tokens"], is_split_into_words=True, return_tensors="np")
  expected = _hf_logits(model, encoded["input_ids"], encoded["attention_mask"])
  loaded = load_params(workdir)
  ours = _our_logits(bert_from_params(loaded.cfg, loaded.params), encoded["input_ids"],
                     encoded["attention_mask"])
  np.testing.assert_allclose(ours, expected, rtol=0, atol=ATOL)
  word_ids = encoded.word_ids(0)
  first = [i for i, w in enumerate(word_ids) if w is not None and w != word_ids[i - 1]]
  assert [model.config.id2label[i] for i in expected[0, first].argmax(-1)] == row["tags"]


def test_pair_regression_trains_and_exports_to_transformers(runs, tmp_path):
  workdir, metrics = runs["pairs"]
  assert metrics["eval_pearson"] >= 0.9, metrics
  out = tmp_path / "hf"
  assert cli.main(["convert", "--to-hf", str(workdir), "--out", str(out)]) == 0
  model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
  assert model.config.problem_type == "regression" and model.config.num_labels == 1
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  rows = _scored_pairs()[:32]
  # The training rows read "[CLS] a [SEP] b [SEP]" with b as token type 1: the tokenizer's
  # own pair encoding.
  encoded = tokenizer([r["text_a"] for r in rows], [r["text_b"] for r in rows],
                      padding=True, return_tensors="np")
  assert encoded["token_type_ids"].any()
  pair = (encoded["input_ids"], encoded["attention_mask"], encoded["token_type_ids"])
  expected = _hf_logits(model, *pair)
  loaded = load_params(workdir)
  ours = _our_logits(bert_from_params(loaded.cfg, loaded.params), *pair)
  np.testing.assert_allclose(ours, expected, rtol=0, atol=ATOL)
  scores = np.array([r["label"] for r in rows])
  assert np.corrcoef(expected[:, 0], scores)[0, 1] >= 0.9


def test_pair_token_types_are_the_tokenizers(data_files):
  """A packed row of a pair, a single text and padding gets the token types BERT's tokenizer
  gives each alone: 0 through the first [SEP], 1 after it; 0 for a single text."""
  from jaxlm.models.bert import pair_token_types
  _, encoders, _ = data_files
  tokenizer = transformers.AutoTokenizer.from_pretrained(encoders["bert"])
  pair = tokenizer("the big cat", "saw a small red dog")
  single = tokenizer("an old bird near the fish")
  parts = [pair, single, pair]
  ids = np.concatenate([p["input_ids"] for p in parts] + [[0, 0]])[None]
  positions = np.concatenate([np.arange(len(p["input_ids"])) for p in parts] + [[0, 0]])[None]
  segments = np.concatenate([np.full(len(p["input_ids"]), i + 1) for i, p in enumerate(parts)]
                            + [[0, 0]])[None]
  types = pair_token_types(jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(segments),
                           tokenizer.sep_token_id)
  expected = np.concatenate([p["token_type_ids"] for p in parts] + [[0, 0]])
  assert expected.any()
  np.testing.assert_array_equal(np.asarray(types)[0], expected)


def test_jaxlm_eval_reproduces_the_encoder_heads_training_metrics(runs, capsys):
  for fmt, names in (("classification", ("accuracy", "f1_macro")), ("pairs", ("mse", "pearson"))):
    workdir, _ = runs[fmt]
    # No early stopping: the workdir's model is the last step's, evaluated last.
    last = [m for m in map(json.loads, open(workdir / "metrics.jsonl")) if "eval_loss" in m][-1]
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(workdir)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for name in names:
      assert result[name] == pytest.approx(last[f"eval_{name}"], rel=1e-4, abs=1e-6), fmt


def test_a_classifier_starts_another_head_from_its_trunk(runs, data_files, tmp_path):
  """init_from a sequence classifier into a token classifier: the trunk carries over, the
  head (and the pooler a token head does not read) does not."""
  workdir, _ = runs["classification"]
  hf_dir = tmp_path / "hf"
  assert cli.main(["convert", "--to-hf", str(workdir), "--out", str(hf_dir)]) == 0
  config = _config(data_files, "tagging", model__init_from=str(hf_dir))
  run = Run.build(config)
  assert (run.model_cfg.classifier, run.model_cfg.num_labels) == ("token", len(TAGS))
  assert not run.model_cfg.pooler and not run.model_cfg.mlm_head
  params = run.trainer.model_params(run.fresh_state())
  source = load_params(hf_dir).params
  assert set(params) == set(source) - {"pooler"}
  assert params["score"]["kernel"].shape == (32, len(TAGS))
  np.testing.assert_array_equal(params["layers"]["mlp"]["up"]["kernel"],
                                source["layers"]["mlp"]["up"]["kernel"])


def test_encoder_head_refusals(data_files):
  from jaxlm.models.bert import BertConfig
  with pytest.raises(ValueError, match="sequence classifier reads the pooler: set pooler=True"):
    BertConfig(num_labels=2, pooler=False)
  with pytest.raises(ValueError, match="regression head has one output, not num_labels=3"):
    BertConfig(num_labels=3, classifier="regression")
  with pytest.raises(ValueError, match=r"remat_policy='qkv' \(one of none, full, dots, minimal, "
                                       r"minimal_with_attention\)"):
    BertConfig(remat_policy="qkv")
  with pytest.raises(ValueError, match="without a head trains by masked-LM.*model.num_labels"):
    Run.build(_config(data_files, "classification", model__num_labels=0))
  with pytest.raises(ValueError, match="as transformers does: set data.add_special_tokens"):
    Run.build(_config(data_files, "classification", data__add_special_tokens=False))
  with pytest.raises(ValueError, match=r"data.prompt_template to e.g. '\{text_a\} \[SEP\] "):
    Run.build(_config(data_files, "pairs", data__prompt_template="{text_a} {text_b}"))


@pytest.mark.parametrize("recipe, corpus, head", [
    ("bbc_news_bert", "bbc-news", ("sequence", 5)),
    ("ner_zh_bert", "peoples-daily-ner", ("token", 7))])
def test_encoder_recipes_train_on_the_real_data(data_files, tmp_path, recipe, corpus, head):
  """configs/bbc_news_bert.py and ner_zh_bert.py at a tiny size: the real corpus (its first
  300 rows), a tiny random BertForMaskedLM source (no pooler, an MLM head to drop),
  evaluated before and after a step."""
  from jaxlm.config import load_config
  from jaxlm.data.corpora import export_corpus
  _, encoders, _ = data_files
  export_corpus(corpus, tmp_path / "all.jsonl")
  lines = (tmp_path / "all.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
  (tmp_path / "rows.jsonl").write_text("".join(lines[:300]), encoding="utf-8")
  config = load_config(recipe, [
      f"--config.model.init_from={encoders['bert']}",
      f"--config.data.sources={tmp_path / 'rows.jsonl'}",
      f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.data.seq_len=32",
      "--config.data.batch_size=8", "--config.data.validation_fraction=0.1",
      "--config.train.steps=2", "--config.train.log_every=1", "--config.train.eval_every=2",
      "--config.train.eval_batches=2", "--config.checkpoint.every=2",
      "--config.checkpoint.async_save=False"])
  run = Run.build(config)
  assert (run.model_cfg.classifier, run.model_cfg.num_labels) == head
  assert run.model_cfg.pooler == (head[0] == "sequence") and not run.model_cfg.mlm_head
  metrics = train(config, tmp_path / "run")
  logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert logged[0]["step"] == 0 and 0.0 <= logged[0]["eval_accuracy"] <= 1.0
  watched = config.train.early_stopping.metric
  assert np.isfinite(metrics["loss"]) and np.isfinite(metrics[watched])


def test_lora_on_an_encoder_trains_adapters_and_head_only_and_exports(data_files, tmp_path):
  """LoRA on BERT's attention and MLP projections with a token head: the base stays
  bit-identical, the checkpoint holds adapters and head only, and both the merged export
  (transformers' BertForTokenClassification) and the PEFT adapter on the base give the
  jaxlm model's logits."""
  import jax
  import orbax.checkpoint as ocp

  config = _config(data_files, "tagging", finetune__lora_targets="attention/(q|v)_proj|mlp/up",
                   finetune__lora_rank=8, optim__warmup_steps=0)
  run = Run.build(config)
  state = run.fresh_state()
  assert set(state["params"]) == {"layers", "score"}
  assert set(state["params"]["layers"]["attention"]) == {"q_proj", "v_proj"}
  before = jax.device_get(state["frozen"])
  train(config, tmp_path / "run")
  with ocp.StandardCheckpointer() as reader:
    saved = reader.metadata(tmp_path / "run" / "checkpoints" / "60" / "state").item_metadata
  assert set(saved["params"]) == {"layers", "score"}
  assert set(saved["params"]["layers"]["mlp"]["up"]) == {"lora_a", "lora_b"}
  logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  evals = [m for m in logged if "eval_loss" in m]
  assert evals[-1]["eval_loss"] < 0.5 * evals[0]["eval_loss"], evals

  loaded = load_params(tmp_path / "run")
  frozen_q = before["layers"]["attention"]["q_proj"]["kernel"]
  assert np.abs(loaded.params["layers"]["attention"]["q_proj"]["kernel"] - frozen_q).max() > 0
  np.testing.assert_array_equal(loaded.params["layers"]["attention"]["k_proj"]["kernel"],
                                before["layers"]["attention"]["k_proj"]["kernel"])
  out = tmp_path / "hf"
  assert cli.main(["convert", "--to-hf", str(tmp_path / "run"), "--out", str(out)]) == 0
  model = transformers.AutoModelForTokenClassification.from_pretrained(out).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  encoded = tokenizer([r["tokens"] for r in _tagged_rows()[:8]], is_split_into_words=True,
                      padding=True, return_tensors="np")
  expected = _hf_logits(model, encoded["input_ids"], encoded["attention_mask"])
  ours = _our_logits(bert_from_params(loaded.cfg, loaded.params), encoded["input_ids"],
                     encoded["attention_mask"])
  mask = encoded["attention_mask"].astype(bool)
  np.testing.assert_allclose(ours[mask], expected[mask], rtol=0, atol=ATOL)
  peft = pytest.importorskip("peft")
  assert cli.main(["convert", "--to-peft", str(tmp_path / "run"),
                   "--out", str(tmp_path / "adapter")]) == 0
  base = transformers.AutoModelForTokenClassification.from_pretrained(
      config.model.init_from, num_labels=len(TAGS))
  with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
  theirs = _hf_logits(with_adapter, encoded["input_ids"], encoded["attention_mask"])
  np.testing.assert_allclose(theirs[mask], expected[mask], rtol=0, atol=ATOL)


@pytest.mark.parametrize("family,kind", [("bert", "token"), ("bert", "sequence"),
                                         ("roberta", "sequence")])
def test_peft_applies_an_encoder_adapter_with_its_head_and_pooler(family, kind, tmp_path):
  """LoRA on o_proj and mlp/down, whose HF names (attention.output.dense, output.dense) are
  suffixes of one another, and on q: peft applies the adapter to the HF classifier and takes
  the head (and a sequence head's pooler) from it, not from the base."""
  peft = pytest.importorskip("peft")
  import jax
  from flax import nnx

  from jaxlm.finetune.lora import (LoRAConfig, apply_lora, export_peft_adapter,
                                   unexported_trained)
  head, settings = HEADS[kind]
  build_hf(family, head, tmp_path / "hf", **settings)
  cfg, params = load_bert(tmp_path / "hf")
  model = bert_from_params(cfg, params)
  lora = LoRAConfig("attention/(q|o)_proj|mlp/down", rank=4, alpha=8.0)
  apply_lora(model, lora.targets, lora.rank, lora.alpha, rngs=nnx.Rngs(1))
  keys = iter(jax.random.split(jax.random.PRNGKey(2), 8))
  attention = model.layers.attention
  for module in (attention.q_proj, attention.o_proj, model.layers.mlp.down):
    module.lora_b[...] = 0.05 * jax.random.normal(next(keys), module.lora_b.shape)
  retrained = [model.score] + ([model.pooler] if kind == "sequence" else [])
  for module in retrained:  # trained whole: the base's copies must not be what peft uses
    module.kernel[...] = jax.random.normal(next(keys), module.kernel.shape)
    module.bias[...] = jax.random.normal(next(keys), module.bias.shape)
  export_peft_adapter(nnx.to_pure_dict(nnx.state(model)), cfg, family, tmp_path / "adapter",
                      str(tmp_path / "hf"), lora=lora)
  config = peft.PeftConfig.from_pretrained(tmp_path / "adapter")
  assert config.task_type == {"token": "TOKEN_CLS", "sequence": "SEQ_CLS"}[kind]
  assert config.modules_to_save == (["classifier", "pooler"]
                                    if (family, kind) == ("bert", "sequence") else ["classifier"])
  base = getattr(transformers, CLASS_PREFIX[family] + head).from_pretrained(tmp_path / "hf")
  with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
  adapted = [n for n, _ in with_adapter.named_modules() if n.endswith("lora_A")]
  assert len(adapted) == 3 * cfg.num_layers, adapted  # q, attention.output, output only
  batch = padded_batch(family)
  np.testing.assert_allclose(_hf_logits(with_adapter, *batch), _our_logits(model, *batch),
                             rtol=0, atol=ATOL)
  # What trained beside the adapters must be in the adapter, or the export is refused.
  trained = jax.tree.map(lambda _: False, nnx.to_pure_dict(nnx.state(model)))
  trained["layers"]["attention"]["q_proj"].update(lora_a=True, lora_b=True)
  trained["score"] = {"kernel": True, "bias": True}
  assert unexported_trained(trained, cfg, family) == []
  trained["layers"]["mlp_norm"]["scale"] = True
  assert unexported_trained(trained, cfg, family) == ["layers/mlp_norm/scale"]
