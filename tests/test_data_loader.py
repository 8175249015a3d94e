"""Loading cached rows: batch k depends only on (seed, k), so resuming, resharding over another
number of processes and prefetching all give exactly the batches of one uninterrupted run;
mixtures hold their weights."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxlm.data.loader import RowBatches, assign_sources
from jaxlm.data.pipeline import build_train_data
from jaxlm.data.shaping import FIELDS
from jaxlm.data.text import load_tokenizer

SEQ = 4


def _part(source, rows):
  """Rows whose tokens name their source and row number."""
  ids = np.repeat((source * 1000 + np.arange(rows, dtype=np.int32))[:, None], SEQ, 1)
  return {f: ids if f in ("input_ids", "targets") else np.ones_like(ids) for f in FIELDS}


def _loader(parts, global_batch=8, process_index=0, process_count=1, **kwargs):
  return RowBatches(parts, global_batch, seed=3, process_index=process_index,
                    process_count=process_count, **kwargs)


def _equal(a, b):
  for field in FIELDS:
    np.testing.assert_array_equal(a[field], b[field], err_msg=field)


def _ids(batch):
  return batch["input_ids"][:, 0].tolist()


def test_resume_reproduces_the_uninterrupted_batches():
  parts = [_part(0, 37), _part(1, 11)]
  straight = [next(loader) for loader in [_loader(parts)] for _ in range(14)]
  first = _loader(parts)
  for _ in range(5):
    next(first)
  state = json.loads(json.dumps(first.state()))  # it must survive a JSON checkpoint
  first.close()
  for prefetch in (0, 3):
    resumed = _loader(parts, prefetch=prefetch)
    resumed.restore(state)
    for k in range(5, 14):
      _equal(next(resumed), straight[k])
    resumed.close()
  for k in (0, 7, 13):
    _equal(_loader(parts).batch(k), straight[k])
  with pytest.raises(ValueError, match="seed"):
    _loader(parts).restore({**state, "seed": 4})


def test_two_processes_read_the_one_process_batch_in_order():
  parts = [_part(0, 23), _part(1, 9)]
  whole = _loader(parts)
  halves = [_loader(parts, process_index=i, process_count=2) for i in range(2)]
  for k in range(12):  # crosses several epochs of both sources
    expected = whole.batch(k)
    got = [next(h) for h in halves]
    for field in FIELDS:
      np.testing.assert_array_equal(np.concatenate([g[field] for g in got]), expected[field])
  # Resuming a 2-process run's state on 1 process (and back) continues the same stream.
  single = _loader(parts)
  single.restore(halves[0].state())
  _equal(next(single), whole.batch(12))
  for h in halves:
    h.close()


def test_every_row_once_per_epoch_and_reshuffled():
  loader = _loader([_part(0, 40)])
  epochs = [[i for k in range(e * 5, e * 5 + 5) for i in _ids(loader.batch(k))] for e in range(3)]
  for rows in epochs:
    assert sorted(rows) == list(range(40))
  assert epochs[0] != epochs[1] != epochs[2]
  assert _ids(_loader([_part(0, 40)]).batch(0)) == _ids(loader.batch(0))
  other_seed = RowBatches([_part(0, 40)], 8, seed=4)
  assert _ids(other_seed.batch(0)) != _ids(loader.batch(0))


def test_mixture_holds_its_weights_in_every_prefix():
  shares = [3, 1, 2]
  source, draw = assign_sources(np.arange(6000), shares)
  for n in (1, 7, 100, 999, 6000):
    counts = np.bincount(source[:n], minlength=3)
    assert np.all(np.abs(counts - n * np.array(shares) / 6) <= 1), (n, counts)
  for s in range(3):  # each source's draws are numbered 0, 1, 2, ... in order
    np.testing.assert_array_equal(draw[source == s], np.arange((source == s).sum()))

  loader = _loader([_part(0, 10), _part(1, 500)], weights=[0.75, 0.25])
  sources = np.array([i // 1000 for k in range(50) for i in _ids(loader.batch(k))])
  assert abs(np.mean(sources == 0) - 0.75) < 0.01  # the small source repeats to keep its share
  with pytest.raises(ValueError, match="no training rows"):
    _loader([_part(0, 10), _part(1, 0)], weights=[1, 1])


def test_validation_batches_cover_each_row_once_with_padding():
  val = _loader([_part(0, 5), _part(1, 6)], global_batch=4, shuffle=False)
  assert val.batches_per_epoch == 3
  batches = [val.batch(k) for k in range(3)]
  ids = [i for b in batches for i, m in zip(_ids(b), b["loss_mask"][:, 0]) if m]
  assert sorted(ids) == [0, 1, 2, 3, 4, 1000, 1001, 1002, 1003, 1004, 1005]
  assert batches[2]["loss_mask"][3].sum() == 0 and batches[2]["segment_ids"][3].sum() == 0
  # One fixed order, not the stored one: the first batch samples both sources.
  assert ids == [i for b in map(val.batch, range(3)) for i, m in
                 zip(_ids(b), b["loss_mask"][:, 0]) if m]
  assert {i // 1000 for i in ids[:4]} == {0, 1}


def test_mixture_of_files_end_to_end(tmp_path):
  for name, letter in (("alpha", "a"), ("beta", "b")):
    rows = [{"text": f"{letter * 3} {i} " * 30} for i in range(40)]
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  sources = (f"{tmp_path / 'alpha.jsonl'}?weight=3", f"{tmp_path / 'beta.jsonl'}?weight=1")
  config = {"sources": sources, "cache_dir": str(tmp_path / "cache"), "validation_fraction": 0.1}
  tokenizer = load_tokenizer("embedded")
  data = build_train_data(config, "embedded", 32, 8, seed=0)
  train, val = data.train, data.validation
  rows = [tokenizer.decode(row.tolist()) for _ in range(25) for row in next(train)["input_ids"]]
  alpha = sum("aaa" in r for r in rows)
  assert abs(alpha - 150) <= 1 and alpha + sum("bbb" in r for r in rows) == 200
  assert val is not None and val.batches_per_epoch >= 1
  state = train.state()
  again = build_train_data(config, "embedded", 32, 8, seed=0, process_index=1,
                           process_count=2).train
  again.restore(state)
  _equal(next(again), {f: a[4:] for f, a in next(train).items()})
  train.close()
  again.close()


def test_throughput_benchmark_prints_one_json_line(tmp_path):
  bench = Path(__file__).resolve().parent.parent / "bench" / "data_throughput.py"
  out = subprocess.run([sys.executable, str(bench), "--seq-len", "64", "--batch-size", "8",
                        "--seconds", "0.3", "--cache-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 1
  result = json.loads(lines[0])
  assert result["tokens_per_s"] > 0 and result["local_batch_shape"] == [8, 64]
  assert result["cache_built"] and result["batches"] > 0
