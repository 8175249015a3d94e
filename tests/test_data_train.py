"""`jaxlm train` on the data pipeline through config: sources, formats, error budget, the
installable corpora and the Chinese pre-training recipe at a tiny size."""
import json

import pytest

from jaxlm import cli
from jaxlm.config import load_config
from jaxlm.data.corpora import chatterbot_rows, export_corpus, parse_fortunes
from jaxlm.data.sources import DataError
from jaxlm.train.loop import train

# The first entries of fortunes-zh tang300, in its on-disk format (colour escapes included).
TANG_FORTUNES = """\x1b[32m《感遇・其一》\x1b[m
\x1b[33m作者：张九龄\x1b[m
兰叶春葳蕤，桂华秋皎洁。
欣欣此生意，自尔为佳节。
谁知林栖者，闻风坐相悦。
草木有本心，何求美人折？
%
\x1b[32m《梦李白・其二》\x1b[m
\x1b[33m作者：杜甫\x1b[m
浮云终日行，游子久不至。
三夜频梦君，情亲见君意。
%
\x1b[32m《送别》\x1b[m
\x1b[33m作者：王维\x1b[m
下马饮君酒，问君何所之？
君言不得意，归卧南山陲。
但去莫复问，白云无尽时。
%
"""


def _tiny(config, token_cache, **overrides):
  """A recipe shrunk to test size: tiny model, short rows, a few steps."""
  from jaxlm.config import apply_overrides
  config.unlock()
  apply_overrides(config, {"model.preset": "tiny", "model.vocab_size": 4096,
                           "model.compute_dtype": "float32", "data.seq_len": 32,
                           "data.batch_size": 8, "data.cache_dir": token_cache,
                           "train.steps": 3, "train.log_every": 1,
                           "checkpoint.async_save": False, **overrides})
  return config


def _jsonl(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False))
                          + "\n" for r in rows), encoding="utf-8")
  return str(path)


def test_fortune_entries_lose_their_colours_and_separators():
  poems = list(parse_fortunes(TANG_FORTUNES))
  assert len(poems) == 3
  assert poems[0].splitlines()[:2] == ["《感遇・其一》", "作者：张九龄"]
  assert all("\x1b" not in p and "%" not in p for p in poems)


def test_tang_recipe_trains_on_chinese_poems(token_cache, tmp_path):
  rows = [{"text": poem} for poem in parse_fortunes(TANG_FORTUNES)] * 10
  source = _jsonl(tmp_path / "tang.jsonl", [dict(r, n=i) for i, r in enumerate(rows)])
  config = _tiny(load_config("tang_zh"), token_cache, **{
      "data.sources": (source,), "data.validation_fraction": 0.1, "train.eval_every": 3,
      "train.eval_batches": 1})
  metrics = train(config, tmp_path / "run")
  logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert [r["step"] for r in logged] == [0, 1, 2, 3]
  assert logged[0]["eval_loss"] > 8.0 and metrics["eval_loss"] < logged[0]["eval_loss"]


def test_sft_rows_with_a_malformed_line_obey_the_error_budget(token_cache, tmp_path, capsys):
  rows = [{"prompt": f"Question {i}?", "completion": f" Answer {i}."} for i in range(40)]
  source = _jsonl(tmp_path / "sft.jsonl", rows[:7] + ["{not json"] + rows[7:])
  overrides = {"data.sources": (source,), "data.format": "sft", "data.cache_dir":
               str(tmp_path / "cache"), "train.eval_every": 0}
  with pytest.raises(DataError, match=r"sft.jsonl:8"):
    train(_tiny(load_config("tiny_demo"), token_cache, **overrides), tmp_path / "strict")
  assert not (tmp_path / "strict" / "checkpoints").exists()
  overrides["data.error_budget"] = 1
  metrics = train(_tiny(load_config("tiny_demo"), token_cache, **overrides), tmp_path / "run")
  assert metrics["loss"] > 0
  assert "1 malformed rows skipped" in capsys.readouterr().out


def test_chatterbot_conversations_alternate_user_and_assistant():
  rows = list(chatterbot_rows("english"))
  assert len(rows) > 1900  # about 2,000 conversations in chatterbot-corpus 1.3
  for row in rows:
    roles = [m["role"] for m in row["messages"]]
    assert roles[::2] == ["user"] * len(roles[::2])
    assert roles[1::2] == ["assistant"] * len(roles[1::2])
    assert all(m["content"] for m in row["messages"])
  assert any("什么" in m["content"] for r in chatterbot_rows("chinese") for m in r["messages"])


def test_data_cli_exports_and_prepares(token_cache, tmp_path, capsys):
  out = tmp_path / "zh.jsonl"
  assert cli.main(["data", "export", "chatterbot", "--language", "chinese",
                   "--out", str(out)]) == 0
  assert len(out.read_text(encoding="utf-8").splitlines()) == len(
      list(chatterbot_rows("chinese")))
  assert cli.main(["data", "prepare", f"--config.data.sources={out}",
                   "--config.data.format=chat", "--config.data.chat_template="
                   "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}",
                   f"--config.data.cache_dir={tmp_path / 'cache'}"]) == 0
  assert "cache built" in capsys.readouterr().out
  assert cli.main(["data", "export", "chatterbot", "--language", "klingon",
                   "--out", str(tmp_path / "x.jsonl")]) == 2
  assert "no language 'klingon'" in capsys.readouterr().err
  with pytest.raises(DataError, match="Unknown corpus"):
    export_corpus("gutenberg", tmp_path / "y.jsonl")
