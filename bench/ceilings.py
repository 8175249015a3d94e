"""The two ceilings of the device JAX runs on, measured: the bf16 matmul rate (an N x N x N
product on random data) and the memory bandwidth of an elementwise kernel (bytes read plus
bytes written). Prints one JSON line: {"device", "matmul_tflops", "memory_tbps", ...}.

They replace datasheet rates in the bounds of `jaxlm plan --kernels` (`--peak-rates
TFLOPS,TBPS`): the least time a step's kernels can take on this device. Each figure is the
median of --repeats timed runs after a warm-up, over several input sets in turn, so that
no run finds its inputs in the cache.

  python bench/ceilings.py                              # 8192^3 matmul, 2 GiB arrays
  python bench/ceilings.py --matmul-n 256 --memory-mib 16 --repeats 3   # CPU-sized
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--matmul-n", type=int, default=8192, help="matmul size (default: 8192)")
  parser.add_argument("--memory-mib", type=int, default=2048,
                      help="bytes each elementwise run reads (default: 2048 MiB)")
  parser.add_argument("--repeats", type=int, default=20, help="timed runs each (default: 20)")
  parser.add_argument("--sets", type=int, default=3, help="input sets run in turn (default: 3)")
  return parser.parse_args(argv)


def median_seconds(fn, inputs: list, repeats: int) -> float:
  """Median wall time of fn over the inputs in turn, each run waited for; compiled and run
  once on every input first."""
  for x in inputs:
    jax.block_until_ready(fn(*x))
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*inputs[i % len(inputs)]))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure(args) -> dict:
  keys = jax.random.split(jax.random.key(0), 2 * args.sets)
  n = args.matmul_n
  pairs = [(jax.random.normal(keys[2 * i], (n, n), jnp.bfloat16),
            jax.random.normal(keys[2 * i + 1], (n, n), jnp.bfloat16)) for i in range(args.sets)]
  matmul_s = median_seconds(jax.jit(jnp.matmul), pairs, args.repeats)
  del pairs
  elements = args.memory_mib * 2**20 // 4
  arrays = [(jax.random.normal(keys[i], (elements,), jnp.float32),) for i in range(args.sets)]
  # One read and one write of each element: what a memory-bound kernel of the step does.
  scale_s = median_seconds(jax.jit(lambda x: x * 1.5), arrays, args.repeats)
  return {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
          "matmul_n": n, "matmul_tflops": 2 * n**3 / matmul_s / 1e12,
          "memory_bytes": 2 * 4 * elements, "memory_tbps": 2 * 4 * elements / scale_s / 1e12,
          "repeats": args.repeats}


def main(argv=None) -> int:
  result = measure(parse_args(sys.argv[1:] if argv is None else argv))
  print(json.dumps(result))
  print(f"ceilings: {result['matmul_tflops']:.1f} TFLOP/s bf16 matmul, "
        f"{result['memory_tbps']:.3f} TB/s memory on {result['device']}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
