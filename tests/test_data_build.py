"""Building the tokenized cache: duplicates dropped before the split, malformed rows located and
budgeted, stale caches rebuilt, concurrent builders safe, and every kind of source readable."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxlm.data.cache import open_split
from jaxlm.data.pipeline import build_train_data, prepare_data
from jaxlm.data.sources import DataError
from jaxlm.data.text import load_tokenizer

TOKENIZER = load_tokenizer("embedded")
# Public-domain Tang poems (from Debian's fortunes-zh, tang300).
POEMS = """\
《登鹳雀楼》
作者：王之涣
白日依山尽，黄河入海流。
欲穷千里目，更上一层楼。

《静夜思》
作者：李白
床前明月光，疑是地上霜。
举头望明月，低头思故乡。

《春晓》
作者：孟浩然
春眠不觉晓，处处闻啼鸟。
夜来风雨声，花落知多少。

《相思》
作者：王维
红豆生南国，春来发几枝。
愿君多采撷，此物最相思。

《送别》
作者：王维
下马饮君酒，问君何所之。
君言不得意，归卧南山陲。
但去莫复问，白云无尽时。
"""


def _jsonl(path, rows):
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
  return str(path)


def _config(tmp_path, *sources, **overrides):
  return {"sources": tuple(map(str, sources)), "cache_dir": str(tmp_path / "cache"),
          "prefetch": 0, **overrides}


def _documents(directory, meta, split, tokenizer=TOKENIZER):
  """Every segment of a split's rows, decoded (end-of-text removed)."""
  docs = []
  for part in open_split(directory, meta, split):
    for r in range(len(part["input_ids"])):
      segments = part["segment_ids"][r]
      for s in np.unique(segments[segments > 0]):
        mask = segments == s
        ids = part["input_ids"][r][mask].tolist() + [int(part["targets"][r][mask][-1])]
        docs.append(tokenizer.decode(ids, skip_special_tokens=True))
  return docs


def test_duplicates_are_dropped_before_the_split(tmp_path):
  rng = np.random.default_rng(0)
  distinct = [f"Document {i}: " + " ".join(rng.choice(["tea", "ball", "letter", "walk"], 12))
              for i in range(150)]
  rows = [{"text": t} for t in distinct * 3]
  rng.shuffle(rows)
  source = _jsonl(tmp_path / "dups.jsonl", rows)
  directory, meta, _ = prepare_data(_config(tmp_path, source, validation_fraction=0.3),
                                    "embedded", 64, seed=0)
  train, val = (_documents(directory, meta, split) for split in ("train", "validation"))
  assert meta["stats"]["duplicates"] == 300 and meta["stats"]["examples"] == 150
  assert 20 < len(val) < 80 and not set(train) & set(val)
  assert sorted(train + val) == sorted(distinct)

  # Even kept, copies of a text fall on one side: the split hashes the content.
  directory, meta, _ = prepare_data(
      _config(tmp_path, source, validation_fraction=0.3, dedupe=False), "embedded", 64, seed=0)
  train, val = (_documents(directory, meta, split) for split in ("train", "validation"))
  assert len(train) + len(val) == 450 and not set(train) & set(val)


def test_malformed_rows_are_located_and_budgeted(tmp_path):
  path = tmp_path / "mixed.jsonl"
  good = [json.dumps({"text": f"fine row {i}", "label": "pos"}).encode() for i in range(8)]
  bad = [b'{"text": "unterminated', b'{"text": "caf\xe9 latin-1", "label": "pos"}',
         b'{"body": "no text field", "label": "pos"}', b'{"text": "a label", "label": 2.5}',
         b'{"text": "unknown label", "label": "maybe"}', b'["not", "an", "object"]']
  path.write_bytes(b"\n".join(good[:4] + bad + [b""] + good[4:]) + b"\n")
  config = _config(tmp_path, path, format="classification", labels=("neg", "pos"),
                   validation_fraction=0.0)
  with pytest.raises(DataError) as failure:
    prepare_data(config, "embedded", 32, seed=0)
  message = str(failure.value)
  assert "6 of 14 rows" in message
  for line, reason in [(5, "invalid JSON"), (6, "not UTF-8"), (7, "missing field 'text'"),
                       (8, "label must be a string or an int"), (9, "label 'maybe' is not one of"),
                       (10, "expected a JSON object")]:
    assert f"{path}:{line}: {reason}" in message
  assert not [p for p in (tmp_path / "cache").glob("rows-*") if p.is_dir()]  # none half-built

  for budget in (6, 0.5):
    _, meta, _ = prepare_data({**config, "error_budget": budget}, "embedded", 32, seed=0)
    assert meta["problems"]["malformed"] == 6 and meta["stats"]["examples"] == 8
  for budget in (5, 0.4):  # also when the cache built under a looser budget is reused
    with pytest.raises(DataError, match="more than data.error_budget"):
      prepare_data({**config, "error_budget": budget}, "embedded", 32, seed=0)


def test_text_files_report_bad_bytes_by_line(tmp_path):
  path = tmp_path / "notes.txt"
  path.write_bytes(b"first line\n\nsecond \xff line\nthird line\n")
  config = _config(tmp_path, path, text_unit="line", validation_fraction=0.0, error_budget=1)
  directory, meta, _ = prepare_data(config, "embedded", 32, seed=0)
  assert meta["problems"]["first"] == [f"{path}:3: not UTF-8 (byte b'\\xff' at offset 7)"]
  assert sorted(_documents(directory, meta, "train")) == ["first line", "third line"]


def test_stale_cache_is_rebuilt(tmp_path):
  source = tmp_path / "docs.jsonl"
  _jsonl(source, [{"text": f"The {w} of the matter."} for w in ("truth", "heart", "end")])
  config = _config(tmp_path, source, validation_fraction=0.0)
  first, meta, built = prepare_data(config, "embedded", 32, seed=0)
  assert built
  assert prepare_data(config, "embedded", 32, seed=0)[:3:2] == (first, False)

  from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
  other = Tokenizer(models.BPE())
  other.pre_tokenizer, other.decoder = pre_tokenizers.ByteLevel(), decoders.ByteLevel()
  other.train_from_iterator(["The truth of the matter."], trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  changed = {"tokenizer": (config, other), "settings": ({**config, "min_chars": 5}, "embedded"),
             "seq_len": (config, "embedded")}
  seen = {first}
  for what, (cfg, tok) in changed.items():
    directory, meta, built = prepare_data(cfg, tok, 16 if what == "seq_len" else 32, seed=0)
    assert built and directory not in seen, what
    seen.add(directory)
  assert _documents(directory, meta, "train") != []
  _, tokenizer_meta, _ = prepare_data(config, other, 32, seed=0)
  assert tokenizer_meta["stats"]["train_tokens"] > meta["stats"]["train_tokens"]

  source.write_text(source.read_text().replace("heart", "spirit"))  # same path, new bytes
  directory, meta, built = prepare_data(config, "embedded", 32, seed=0)
  assert built and directory not in seen
  assert "The spirit of the matter." in _documents(directory, meta, "train")


def test_concurrent_builders_share_one_cache(tmp_path):
  source = _jsonl(tmp_path / "docs.jsonl", [{"text": f"row {i} " * 20} for i in range(3000)])
  script = ("import sys, json; from jaxlm.data.pipeline import prepare_data; "
            "d, m, built = prepare_data(json.loads(sys.argv[1]), 'embedded', 64, seed=0); "
            "print(json.dumps([str(d), built]))")
  config = json.dumps(_config(tmp_path, source))
  procs = [subprocess.Popen([sys.executable, "-c", script, config], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
           for _ in range(2)]
  results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
  assert all(p.returncode == 0 for p in procs)
  assert results[0][0] == results[1][0] and sorted(r[1] for r in results) == [False, True]
  cache = tmp_path / "cache"
  assert [p.name for p in cache.iterdir() if p.is_dir()] == [Path(results[0][0]).name]


def test_html_is_stripped_and_short_rows_dropped(tmp_path):
  rows = [{"text": "<html><head><style>p {color: red}</style></head><body><h1>Title</h1>"
                   "<p>Fish &amp; chips, <b>twice</b>.</p><script>alert(1)</script></body></html>"},
          {"text": "<p>tiny</p>"}]
  config = _config(tmp_path, _jsonl(tmp_path / "pages.jsonl", rows), strip_html=True,
                   min_chars=8, validation_fraction=0.0)
  directory, meta, _ = prepare_data(config, "embedded", 64, seed=0)
  assert _documents(directory, meta, "train") == ["Title\n\nFish & chips, twice."]
  assert meta["stats"]["too_short"] == 1


def test_chinese_round_trip_with_a_trained_byte_level_bpe(tmp_path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), \
      decoders.ByteLevel()
  bpe.train_from_iterator([POEMS], trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  (tmp_path / "tang.txt").write_text(POEMS, encoding="utf-8")
  config = _config(tmp_path, tmp_path / "tang.txt", text_unit="paragraph",
                   validation_fraction=0.0)
  train = build_train_data(config, bpe, 128, 1, seed=0).train
  poems = POEMS.strip().split("\n\n")
  directory, meta, _ = prepare_data(config, bpe, 128, seed=0)
  assert sorted(_documents(directory, meta, "train", bpe)) == sorted(poems)
  assert meta["stats"]["train_tokens"] < len(POEMS.encode())  # merges learned across bytes
  decoded = bpe.decode(train.batch(0)["input_ids"][0].tolist())
  assert any(line in decoded for poem in poems for line in poem.splitlines()[2:])


def test_columnar_files_through_datasets(tmp_path):
  import datasets
  rows = {"sentence": [f"Row {i} says {'yes' if i % 2 else 'no'}." for i in range(6)],
          "label": [i % 2 for i in range(6)]}
  datasets.Dataset.from_dict(rows).to_parquet(tmp_path / "part.parquet")
  datasets.Dataset.from_dict(rows).to_csv(tmp_path / "part.csv", index=False)
  for name in ("part.parquet", "part.csv"):
    config = _config(tmp_path, f"{tmp_path / name}?text=sentence", format="classification",
                     labels=("no", "yes"), validation_fraction=0.0)
    directory, meta, _ = prepare_data(config, "embedded", 32, seed=0)
    docs = _documents(directory, meta, "train")
    assert sorted(docs) == sorted(f"{s}\nLabel: {['no', 'yes'][i % 2]}"
                                  for i, s in enumerate(rows["sentence"])), name


def test_tfds_array_record_source_without_tensorflow(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("array_record")

  class Reviews(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # no checksums file to look up beside this test module

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "text": tfds.features.Text(), "label": tfds.features.ClassLabel(names=["neg", "pos"])}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(5):
        yield i, {"text": f"评论 {i}: {'好' if i % 2 else '差'}", "label": i % 2}

  builder = Reviews(data_dir=str(tmp_path / "tfds"), file_format="array_record")
  builder.download_and_prepare()
  expected = sorted(f"评论 {i}: {'好' if i % 2 else '差'}\nLabel: {['neg', 'pos'][i % 2]}"
                    for i in range(5))
  for spec in (f"tfds:{builder.data_dir}", f"tfds:reviews?data_dir={tmp_path / 'tfds'}"):
    config = _config(tmp_path, spec, format="classification", labels=("neg", "pos"),
                     validation_fraction=0.0)
    directory, meta, _ = prepare_data(config, "embedded", 32, seed=0)
    assert sorted(_documents(directory, meta, "train")) == expected, spec


def test_hub_dataset_offline_names_the_fix(tmp_path, monkeypatch):
  import huggingface_hub.constants
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  with pytest.raises(DataError, match="pass local files instead"):
    prepare_data(_config(tmp_path, "hf:stanfordnlp/imdb?split=train"), "embedded", 32, seed=0)


def test_missing_files_and_unknown_settings_name_the_fix(tmp_path):
  with pytest.raises(DataError, match="matches no files"):
    prepare_data(_config(tmp_path, tmp_path / "nope-*.jsonl"), "embedded", 32, seed=0)
  with pytest.raises(DataError, match="data.format must be one of"):
    prepare_data(_config(tmp_path, "embedded", format="essay"), "embedded", 32, seed=0)
  with pytest.raises(DataError, match="needs data.labels"):
    prepare_data(_config(tmp_path, "embedded", format="classification"), "embedded", 32, seed=0)
