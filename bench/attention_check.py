"""Correctness and speed of jaxlm's attention (jaxlm.layers.attention.causal_attention) for
each implementation, with and without a document mask: the output and the gradients of q, k
and v against XLA's attention in float32 on the same random inputs, and the median time of a
forward + backward. Prints one JSON line: {"cases": [...], "ok": bool}; a table on stderr.
Exits 1 when a case fails (an error, a non-finite value, or a relative error over --tol).

The defaults are the reference config's attention (batch 8, 2048 tokens, 16 heads of 128)
in bfloat16, with 0 and 4 documents a row, through XLA and, on a GPU, cuDNN flash attention
and jax's Pallas (Triton) flash attention; on a TPU, XLA and splash (elsewhere --impls
pallas_gpu,splash runs the Pallas kernels interpreted):

  python bench/attention_check.py
  python bench/attention_check.py --batch 2 --seq-len 64 --heads 4 --head-dim 16   # CPU
"""
from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.layers.attention import causal_attention
from ceilings import median_seconds
from train_throughput import synthetic_rows


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq-len", type=int, default=2048)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--kv-heads", type=int, help="default: --heads")
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--docs", default="0,4",
                      help="documents per row to try, 0 = no mask (default: 0,4)")
  parser.add_argument("--impls", help="default: xla,cudnn,pallas_gpu on a GPU, xla,splash on "
                      "a TPU, else xla")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--repeats", type=int, default=10, help="timed runs (default: 10)")
  parser.add_argument("--tol", type=float, help="largest relative error (default: 2e-2 in "
                      "16-bit, 1e-4 in float32)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  args.kv_heads = args.kv_heads or args.heads
  args.docs = [int(d) for d in args.docs.split(",")]
  default = {"gpu": "xla,cudnn,pallas_gpu", "tpu": "xla,splash"}.get(jax.default_backend(), "xla")
  args.impls = (args.impls or default).split(",")
  if args.tol is None:
    args.tol = 1e-4 if jnp.dtype(args.dtype) == jnp.float32 else 2e-2
  return args


def relative_error(value, reference) -> float:
  value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
  return float(np.linalg.norm(value - reference) / np.linalg.norm(reference))


def forward_backward(implementation, segment_ids):
  """jitted (q, k, v, cotangent) -> (out, (dq, dk, dv))."""

  def run(q, k, v, cotangent):
    attend = lambda q, k, v: causal_attention(q, k, v, segment_ids,
                                              implementation=implementation)
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(cotangent)

  return jax.jit(run)


def check(args, implementation: str, docs: int, rng) -> dict:
  shape_q = (args.batch, args.seq_len, args.heads, args.head_dim)
  shape_kv = (args.batch, args.seq_len, args.kv_heads, args.head_dim)
  # Fresh inputs for every case, drawn in float32 and rounded once to the tested dtype, so
  # the reference sees exactly the values the implementation does.
  q, k, v, cotangent = (jnp.asarray(rng.standard_normal(s, np.float32)).astype(args.dtype)
                        for s in (shape_q, shape_kv, shape_kv, shape_q))
  segment_ids = (jnp.asarray(synthetic_rows(rng, args.batch, args.seq_len, 2, docs)
                             ["segment_ids"]) if docs else None)
  case = {"implementation": implementation, "docs_per_row": docs, "dtype": args.dtype,
          "q": list(shape_q), "kv": list(shape_kv)}
  try:
    step = forward_backward(implementation, segment_ids)
    out, grads = jax.block_until_ready(step(q, k, v, cotangent))
    reference = forward_backward("xla", segment_ids)(
        *(x.astype(jnp.float32) for x in (q, k, v, cotangent)))
    values, references = (out, *grads), (reference[0], *reference[1])
    case["finite"] = bool(all(jnp.isfinite(x).all() for x in values))
    case["errors"] = {name: relative_error(x, r)
                      for name, x, r in zip(("out", "dq", "dk", "dv"), values, references)}
    seconds = median_seconds(step, [(q, k, v, cotangent)], args.repeats)
  except Exception as e:  # an implementation that refuses the case is a finding, not a crash
    case.update(ok=False, error=f"{type(e).__name__}: {e}"[:500])
    return case
  # Causal: half the score and value matmuls; a backward costs 2.5 forwards (FlashAttention).
  flops = 4 * args.batch * args.heads * args.seq_len ** 2 * args.head_dim * 0.5 * 3.5
  case.update(ms_forward_backward=seconds * 1e3, tflops=flops / seconds / 1e12,
              ok=case["finite"] and max(case["errors"].values()) <= args.tol)
  return case


def format_table(cases) -> str:
  rows = [f"{'implementation':<15}{'docs':>5}{'max rel err':>13}{'ms fwd+bwd':>12}{'TFLOP/s':>9}"
          "  ok"]
  for c in cases:
    if "error" in c:
      rows.append(f"{c['implementation']:<15}{c['docs_per_row']:>5}  {c['error'][:80]}")
      continue
    rows.append(f"{c['implementation']:<15}{c['docs_per_row']:>5}"
                f"{max(c['errors'].values()):>13.2e}{c['ms_forward_backward']:>12.2f}"
                f"{c['tflops']:>9.1f}  {'yes' if c['ok'] else 'NO'}")
  return "\n".join(rows)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  rng = np.random.default_rng(args.seed)
  cases = []
  for impl in args.impls:
    for docs in args.docs:
      cases.append(check(args, impl, docs, rng))
      # Each case as it ends: a run cut short by a timeout still tells what it measured.
      print(f"attention_check: {json.dumps(cases[-1])}", file=sys.stderr, flush=True)
  ok = all(c["ok"] for c in cases)
  print(format_table(cases), file=sys.stderr)
  print(json.dumps({"cases": cases, "ok": ok, "tol": args.tol, "jax": jax.__version__,
                    "device_kind": jax.devices()[0].device_kind}))
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
