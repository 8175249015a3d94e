"""Training throughput of jaxlm's real train step on synthetic tokens; prints one JSON line.

The defaults are the reference config of DESIGN.md's performance table: preset ref-1.1b,
sequence 2048, global batch 8, AdamW, bf16 compute, fp32 parameters. The step is the one
`jaxlm train` runs: Run.build(config), trainer.init_state, trainer.train_step on
run.global_batch(...) rows. Step 1 compiles (reported as compile_s, compile + one step),
--warmup more steps are untimed. Then --steps steps are timed one by one, each waiting for
its result (step_time_s, their median, includes the host's work per step), and --steps more
are run as `jaxlm train` runs them, dispatched back to back with one wait at the end:
tokens_per_s, TFLOP/s and MFU come from those. Any config value can be set with
--config.SECTION.KEY=VALUE; --mesh takes data/fsdp/tensor sizes (default: fsdp over all
devices). MFU needs a known device kind or --config.train.peak_tflops_per_device=N.
The synthetic rows carry no document boundaries unless --docs-per-row N packs N documents
into each row, with the segment ids (and so the attention mask) that real data gives.
With --profile DIR, --profile-steps more steps run after the timed ones inside a JAX
profiler trace written to DIR; the JSON line then carries "profile": device time per step by
kernel category (matmul, attention, copy, ...) and the top kernels (jaxlm/profiling.py),
also printed as a table on stderr.

  python bench/train_throughput.py
  python bench/train_throughput.py --remat minimal --mesh fsdp=8 --config.optim.grad_clip_norm=0
  python bench/train_throughput.py --preset tiny --seq-len 64 --batch-size 8 --steps 3  # CPU
  python bench/train_throughput.py --profile /tmp/trace   # + where the device time goes
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import flax
import jax
import jaxlib
import numpy as np

from jaxlm.layers.attention import resolve_attention_impl
from jaxlm.plan import experiment_config
from jaxlm.plan_cli import parse_layout
from jaxlm.profiling import StepProfiler, format_table
from jaxlm.train.loop import Run
from jaxlm.train.metrics import peak_flops_per_device

# Lowering is the step every jit cache miss takes, whether or not a persistent compilation
# cache then supplies the executable.
LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="ref-1.1b", help="default: ref-1.1b")
  parser.add_argument("--seq-len", type=int, default=2048, help="default: 2048")
  parser.add_argument("--batch-size", type=int, default=8, help="global batch (default: 8)")
  parser.add_argument("--steps", type=int, default=10, help="timed steps (default: 10)")
  parser.add_argument("--warmup", type=int, default=2,
                      help="untimed steps after the compiling first step (default: 2)")
  parser.add_argument("--remat", help="model.remat_policy (default: the preset's)")
  parser.add_argument("--optimizer", default="adamw", help="optim.name (default: adamw)")
  parser.add_argument("--param-dtype", default="float32", help="default: float32")
  parser.add_argument("--compute-dtype", default="bfloat16", help="default: bfloat16")
  parser.add_argument("--mesh", type=parse_layout, metavar="AXIS=N[,AXIS=N]",
                      help="e.g. fsdp=8 or fsdp=4,tensor=2 (default: fsdp over all devices)")
  parser.add_argument("--seed", type=int, default=0, help="synthetic tokens (default: 0)")
  parser.add_argument("--docs-per-row", type=int, default=0, metavar="N",
                      help="pack N documents into each row, with segment ids and the "
                           "document mask real data gets (default: 0, none)")
  parser.add_argument("--profile", metavar="DIR",
                      help="trace --profile-steps extra steps into DIR and summarise them")
  parser.add_argument("--profile-steps", type=int, default=3, help="default: 3")
  overrides = [a for a in argv if a.startswith("--config.")]
  args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
  if args.steps < 1 or args.warmup < 0 or args.profile_steps < 1:
    parser.error("--steps and --profile-steps must be at least 1 and --warmup at least 0")
  if not 0 <= args.docs_per_row <= args.seq_len:
    parser.error(f"--docs-per-row must be between 0 and --seq-len ({args.seq_len})")
  return args, overrides


class LoweringCounter:
  """Counts jit lowerings through jax.monitoring: each one is a (re)compile."""

  def __init__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event, duration_secs, **kwargs):
    del duration_secs, kwargs
    if event == LOWERING_EVENT:
      self.count += 1


def synthetic_rows(rng, batch_size: int, seq_len: int, vocab_size: int,
                   docs_per_row: int = 0) -> dict:
  """This process's rows of a batch of uniform random tokens. With docs_per_row, each row
  packs that many documents cut at random, with the segment ids and restarting positions
  `jaxlm train`'s data gives (so attention gets the document mask it gets there)."""
  rows = batch_size // jax.process_count()
  ids = rng.integers(0, vocab_size, (rows, seq_len + 1), dtype=np.int32)
  batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
           "loss_mask": np.ones((rows, seq_len), np.int32)}
  if docs_per_row:
    cuts = np.stack([np.sort(rng.choice(np.arange(1, seq_len), docs_per_row - 1, replace=False))
                     for _ in range(rows)])
    index = np.arange(seq_len)
    segment = (index[None, :, None] >= cuts[:, None, :]).sum(-1)  # 0 .. docs_per_row - 1
    starts = np.concatenate([np.zeros((rows, 1), np.int64), cuts], axis=1)
    batch["segment_ids"] = (segment + 1).astype(np.int32)
    batch["positions"] = (index - np.take_along_axis(starts, segment, 1)).astype(np.int32)
  return batch


def peak_memory_bytes() -> int | None:
  """The largest peak over this process's devices; None where the backend keeps no stats
  (CPU)."""
  stats = [d.memory_stats() for d in jax.local_devices()]
  peaks = [s["peak_bytes_in_use"] for s in stats if s and "peak_bytes_in_use" in s]
  return max(peaks) if peaks else None


def benchmark(args, overrides) -> dict:
  counter = LoweringCounter()
  profiled = args.profile_steps if args.profile else 0
  config, applied = experiment_config(
      args.preset, args.mesh, seq_len=args.seq_len, batch_size=args.batch_size,
      optimizer=args.optimizer, remat=args.remat, param_dtype=args.param_dtype,
      compute_dtype=args.compute_dtype,
      # The schedule spans the run, so the learning rate stays sane on every step.
      overrides=[f"--config.train.steps={1 + args.warmup + 2 * args.steps + profiled}", *overrides])
  run = Run.build(config)
  model_cfg = run.model_cfg
  rng = np.random.default_rng(args.seed)
  # Two batches alternate: fresh tokens without generating them inside the timed loop.
  rows = [synthetic_rows(rng, args.batch_size, args.seq_len, model_cfg.vocab_size,
                         args.docs_per_row)
          for _ in range(2)]

  start = time.perf_counter()
  state = jax.block_until_ready(run.trainer.init_state(config.train.seed))
  init_s = time.perf_counter() - start

  def step(i):
    nonlocal state
    begin = time.perf_counter()
    state, metrics = run.trainer.train_step(state, run.global_batch(rows[i % 2]))
    jax.block_until_ready(metrics)
    return time.perf_counter() - begin, metrics

  lowerings_before = counter.count
  compile_s, metrics = step(0)
  first_step_lowerings = counter.count - lowerings_before
  first_loss = float(metrics["loss"])
  lowerings_before = counter.count
  for i in range(args.warmup):
    step(1 + i)
  times = []
  for i in range(args.steps):
    seconds, metrics = step(1 + args.warmup + i)
    times.append(seconds)
  # As `jaxlm train` runs: steps dispatched back to back, one wait at the end, so the host
  # prepares step i+1 while the device runs step i.
  first = 1 + args.warmup + args.steps
  begin = time.perf_counter()
  for i in range(args.steps):
    state, metrics = run.trainer.train_step(state, run.global_batch(rows[(first + i) % 2]))
  jax.block_until_ready((state, metrics))
  pipelined_s = time.perf_counter() - begin
  recompiles = counter.count - lowerings_before
  profile = None
  if args.profile:
    # After the timed steps, so tracing overhead stays out of the figures above; the same
    # window `jaxlm train` traces with train.profile_at, whose failures cost nothing else.
    first += args.steps
    profiler = StepProfiler(args.profile, 1, args.profile_steps)
    for i in range(args.profile_steps):
      profiler.before(1 + i, state)
      _, metrics = step(first + i)
      profile = profiler.after(1 + i, (state, metrics))
    print(f"train_throughput: profile failed: {profile['error']}" if "error" in profile
          else format_table(profile), file=sys.stderr)

  step_s = statistics.median(times)
  tokens_per_step = args.batch_size * args.seq_len
  flops_per_token = model_cfg.flops_per_token(args.seq_len)
  tokens_per_s = tokens_per_step * args.steps / pipelined_s
  tflops = flops_per_token * tokens_per_s / jax.device_count() / 1e12
  peak = peak_flops_per_device(config.train.peak_tflops_per_device)
  device = jax.devices()[0]
  return {
      "preset": args.preset, "tokens_per_s": tokens_per_s,
      "tokens_per_s_synced": tokens_per_step / step_s,
      "step_time_s": step_s, "step_times_s": [round(t, 6) for t in times],
      "tflops_per_device": tflops, "mfu": tflops * 1e12 / peak if peak else None,
      "peak_tflops_per_device": peak / 1e12 if peak else None,
      "peak_memory_bytes": peak_memory_bytes(), "compile_s": compile_s, "init_s": init_s,
      # None when this jax emits no lowering events, so a 0 is never a false all-clear.
      "recompiles": recompiles if first_step_lowerings else None,
      "loss_first": first_loss, "loss_last": float(metrics["loss"]),
      "tokens_per_step": tokens_per_step, "flops_per_token": flops_per_token,
      "num_params": model_cfg.num_params(),
      "seq_len": args.seq_len, "batch_size": args.batch_size, "steps": args.steps,
      "docs_per_row": args.docs_per_row,
      "warmup": args.warmup, "mesh": {k: int(v) for k, v in run.mesh.shape.items()},
      "remat_policy": model_cfg.remat_policy, "scan_layers": model_cfg.scan_layers,
      # As run on this device: None in the config picks per backend and dtype.
      "attention_impl": resolve_attention_impl(model_cfg.attention_impl,
                                               model_cfg.compute_dtype),
      "loss_chunk_len": config.train.loss_chunk_len, "param_dtype": model_cfg.param_dtype,
      "compute_dtype": model_cfg.compute_dtype,
      "device_kind": device.device_kind, "platform": device.platform,
      "device_count": jax.device_count(), "process_count": jax.process_count(),
      "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "overrides": applied, "profile": profile,
  }


def main(argv=None) -> int:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    result = benchmark(args, overrides)
  except ValueError as e:  # ConfigError and mesh / sharding errors name the fix
    print(f"train_throughput: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(result, default=str))
  return 1 if result["recompiles"] else 0


if __name__ == "__main__":
  sys.exit(main())
