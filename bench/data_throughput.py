"""Tokens per second the data loader delivers from the tokenized cache; prints one JSON line.

The cache is built first if absent (timed separately as build_s), then batches are drawn with
next() as fast as the consumer takes them, prefetched by the loader's background thread, for
--seconds after --warmup batches. tokens_per_s counts every token of every row served
(input_ids elements); loss_tokens_per_s only those with loss_mask 1.

  python bench/data_throughput.py
  python bench/data_throughput.py --sources '/data/*.jsonl' --seq-len 4096 --batch-size 64
  python bench/data_throughput.py --process-count 8   # one process's share of the batch
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from jaxlm.data.pipeline import build_train_data, prepare_data


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sources", nargs="+", default=["embedded"])
  parser.add_argument("--tokenizer", default="embedded")
  parser.add_argument("--seq-len", type=int, default=2048)
  parser.add_argument("--batch-size", type=int, default=32, help="global batch")
  parser.add_argument("--process-count", type=int, default=1)
  parser.add_argument("--prefetch", type=int, default=2)
  parser.add_argument("--seconds", type=float, default=5.0)
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(),
                                                          "jaxlm-data-bench"))
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  config = {"sources": tuple(args.sources), "cache_dir": args.cache_dir,
            "prefetch": args.prefetch}
  start = time.perf_counter()
  _, meta, built = prepare_data(config, args.tokenizer, args.seq_len, seed=0)
  build_s = time.perf_counter() - start
  train = build_train_data(config, args.tokenizer, args.seq_len, args.batch_size, seed=0,
                           process_count=args.process_count).train
  for _ in range(args.warmup):
    next(train)
  batches = tokens = loss_tokens = 0
  start = time.perf_counter()
  while (elapsed := time.perf_counter() - start) < args.seconds:
    batch = next(train)
    batches += 1
    tokens += batch["input_ids"].size
    loss_tokens += int(batch["loss_mask"].sum())
  train.close()
  print(json.dumps({
      "tokens_per_s": tokens / elapsed, "loss_tokens_per_s": loss_tokens / elapsed,
      "batches_per_s": batches / elapsed, "batches": batches,
      "local_batch_shape": list(batch["input_ids"].shape), "seq_len": args.seq_len,
      "global_batch": args.batch_size, "process_count": args.process_count,
      "prefetch": args.prefetch, "cache_built": built, "build_s": build_s,
      "cached_train_rows": meta["stats"].get("train_rows", 0), "cpu_count": os.cpu_count(),
  }))


if __name__ == "__main__":
  main()
