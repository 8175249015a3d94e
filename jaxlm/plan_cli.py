"""`jaxlm plan`: per-device memory and communication of a model under mesh layouts, from an
ahead-of-time compile of the real train step. Also runs alone: `python -m jaxlm.plan_cli --help`."""
from __future__ import annotations

import argparse
import json
import math
import sys

PLAN_HELP = """\
Plan per-device memory and communication for a preset or a recipe under one or more mesh
layouts, without allocating anything: each layout's train step is lowered on abstract
shapes and compiled ahead of time.

  jaxlm plan --preset llama3-8b --mesh fsdp=8 --mesh fsdp=4,tensor=2
  jaxlm plan --preset llama3-8b --sweep --devices 8 --seq-len 2048 --batch-size 8 --hbm-gib 80
  jaxlm plan --config ref_1b --mesh fsdp=8 --mesh data=8
  jaxlm plan --preset llama3-8b --mesh tensor=8 --config.mesh.sequence_parallel=True
  jaxlm plan --preset ref-1.1b --mesh data=1 --target h100 --remat none
  jaxlm plan --preset llama3-8b --devices 64 --mesh data=8,fsdp=8 --mesh fsdp=64 --rates-of h100

A recipe (--config) plans the run `jaxlm train --config RECIPE` would make: its model (a
model.init_from directory must exist), data shape, optimizer and fine-tuning settings;
flags and --config.SECTION.KEY=VALUE override them.

Columns: params+opt GiB/dev is the sharded train state on one device (parameters, optimizer
state, step, rng); x ideal divides it by (unsharded state / devices): 1.0 is perfect
sharding, the device count is full replication. temp GiB is XLA's scratch for the step
(activations, gradients, gathered weights); peak GiB = arguments + outputs - donated
(aliased) bytes + temp + code; fits compares peak with --hbm-gib.

Communication: sent GiB/step is what one device sends per step through the collectives XLA's
SPMD partitioner put in the step (ring algorithms: an all-gather or reduce-scatter sends
(n-1)/n of the array, an all-reduce twice that), "over axes" splits it by the mesh axes the
collectives run along (e.g. data: between nodes when mesh.data is the node count), and
FLOP/B is the model's FLOPs per device per step (as MFU counts them, without remat's
recomputation) over those bytes: communication can hide behind compute where it exceeds
the hardware's FLOP/s over its link's bytes/s (an H100 at 989 TFLOP/s over 450 GB/s of
NVLink: about 2,200).

Devices: the layouts must use exactly the devices JAX sees. --devices N (default: the
device count of the --mesh layouts) asks for N simulated CPU devices before JAX starts,
which takes effect when JAX runs on CPU; on an accelerator host with fewer devices than
the plan, set JAX_PLATFORMS=cpu to plan on simulated CPU devices. Compiled on CPU, the
numbers estimate an accelerator's: XLA's CPU backend fuses differently. Attention is
planned with the splash flash-attention kernel (interpreted) when --seq-len is a multiple
of 128, since accelerators run flash kernels, not XLA's whole [seq, seq] scores;
--config.model.attention_impl=xla plans XLA's attention instead. The line under the table
names the attention planned.

--target h100 compiles for that GPU instead, with XLA's GPU compiler and no GPU (jax's CUDA
plugin must be installed: pip install "jax[cuda12]"): memory is then the GPU compiler's,
attention cuDNN's, and --devices N (or the --mesh layouts) counts GPUs, on hosts of 8.
--sweep adds the standard layouts for the device count: DP, FSDP, TP, FSDP x TP, DP x TP,
DP x FSDP, DP x FSDP x TP (with time bounds, a line names the fastest that fits). Any
config value can be set with --config.SECTION.KEY=VALUE.

Time bounds: where the peak rates of the device compiled for are known (--target h100), or
given with --rates-of KIND (h100, h200, b200, a100), three columns say how long a step
takes at least, from datasheet rates. compute ms: the model's FLOPs per device at peak (no
remat recomputation; with --kernels, the kernels' bound where that is longer). comm ms: the
bytes sent at the link's rate, one collective at a time (NVLink within a host, the network
between hosts; "(host + network)" splits it where some crosses hosts). MFU at most: the
model's FLOPs at peak over the longer of the two (100 % where communication can hide
behind compute). Devices sit on hosts of --devices-per-host (8) in device order, so the
last mesh axes (tensor, then fsdp) stay within a host; --link-gbs HOST,NETWORK sets the
links' GB/s per device, one direction (H100: 450,50), and --peak-rates TFLOPS,TBPS the
peak FLOP/s and memory bandwidth (of the time bounds and of --kernels'), e.g. 798,3.0:
what a bf16 GEMM of 8192^3 and a device-to-device copy reached on an H100, where the
datasheet says 989 and 3.35. A bound is not a measurement: launch gaps, a collective's
latency and kernels below the peak rates add to it.

--top-collectives N lists, under the table, each layout's N largest collectives: bytes sent
per step, kind, axes, runs per step, shape and the jax operation each serves (e.g.
".../btd,dm->btm/dot_general": a projection's matmul).

--kernels [N] adds what each layout's step does on the device, read from the program XLA
compiled (no run): its kernels by category (matmul, attention, collective, copy,
reduction, other), with launches, GB read + written and matmul TFLOP per step, and with
the device's peak rates (known kinds, e.g. --target h100) the milliseconds each category
takes at least (bytes over memory bandwidth or FLOPs over peak, whichever is longer, kernel
by kernel); then the N (default 5) kernels that move the most bytes, with the jax operation
each serves. Copy kernels that grow with the layer count are a scan's per-layer slices and
saved activations (--config.model.scan_layers=False unrolls the layers).

--max-batch finds, per layout, the largest global batch whose step fits --hbm-gib: batches
step by the rows the layout splits a batch over (data x fsdp, times --grad-accum), doubling
from one step while the step fits, then bisecting (a compile per try, so a few per layout).
A "+" means --batch-limit itself fit.
"""


def parse_layout(text: str) -> dict[str, int]:
  """"fsdp=4,tensor=2" -> {"fsdp": 4, "tensor": 2}."""
  layout = {}
  for part in text.split(","):
    axis, _, size = part.partition("=")
    try:
      layout[axis.strip()] = int(size)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"bad mesh {text!r}: use AXIS=SIZE[,AXIS=SIZE], e.g. fsdp=4,tensor=2") from None
  return layout


def rate_pair(flag: str, form: str):
  """A parser of two positive rates, "450,50" -> (450.0, 50.0), whose errors name the flag
  and its form (e.g. "HOST,NETWORK in GB/s, e.g. 450,50")."""
  def parse(text: str) -> tuple[float, float]:
    try:
      first, second = (float(part) for part in text.split(","))
    except ValueError:
      raise argparse.ArgumentTypeError(f"bad {flag} {text!r}: use {form}") from None
    if first <= 0 or second <= 0:
      raise argparse.ArgumentTypeError(f"{flag} {text!r}: rates must be positive")
    return first, second
  return parse


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
  parser = subparsers.add_parser(
      "plan", help="per-device memory and communication of a model under mesh layouts, "
                   "without hardware",
      description=PLAN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", help="model preset, e.g. llama3-8b")
  parser.add_argument("--config", metavar="RECIPE",
                      help="plan a recipe (a configs/ name or path, as `jaxlm train --config`): "
                           "its model, data shape, optimizer and fine-tuning settings")
  parser.add_argument("--mesh", action="append", type=parse_layout, default=[],
                      metavar="AXIS=N[,AXIS=N]",
                      help="a layout over data/fsdp/tensor, e.g. fsdp=8; repeatable")
  parser.add_argument("--sweep", action="store_true", help="also plan the standard layouts")
  parser.add_argument("--devices", type=int,
                      help="device count; simulated on CPU (default: what --mesh uses)")
  parser.add_argument("--target", metavar="GPU",
                      help="compile for GPUs of this model with XLA's GPU compiler, no GPU "
                           "needed (h100, or a GpuTargetConfig text-proto file; needs "
                           "jax[cuda12])")
  parser.add_argument("--rates-of", metavar="KIND",
                      help="time each layout's step at this device's peak FLOP/s and link "
                           "rates (h100, h200, b200, a100; default: the device compiled for)")
  parser.add_argument("--link-gbs", metavar="HOST,NETWORK",
                      type=rate_pair("--link-gbs", "HOST,NETWORK in GB/s, e.g. 450,50"),
                      help="GB/s one device sends within its host and to other hosts, in "
                           "place of the --rates-of device's (e.g. 450,25)")
  parser.add_argument("--peak-rates", metavar="TFLOPS,TBPS",
                      type=rate_pair("--peak-rates", "TFLOPS,TBPS, e.g. 798,3.0"),
                      help="bf16 TFLOP/s and memory TB/s per device in place of the "
                           "datasheet's, for the time bounds and --kernels' (e.g. 798,3.0, "
                           "as measured on an H100)")
  parser.add_argument("--devices-per-host", type=int, default=8, metavar="N",
                      help="devices per host, in device order (default: 8)")
  parser.add_argument("--seq-len", type=int, help="default: the recipe's, else 2048")
  parser.add_argument("--batch-size", type=int,
                      help="global batch (default: the recipe's, else 8)")
  parser.add_argument("--hbm-gib", type=float, default=80.0,
                      help="memory per device to fit in (default: 80)")
  parser.add_argument("--optimizer",
                      help="optim.name (default: the recipe's, else adamw)")
  parser.add_argument("--remat", help="model.remat_policy (default: the preset's)")
  parser.add_argument("--param-dtype", help="default: the preset's")
  parser.add_argument("--compute-dtype", help="default: the preset's")
  parser.add_argument("--grad-accum", type=int,
                      help="train.grad_accum_steps (default: the recipe's, else 1)")
  parser.add_argument("--no-compile", action="store_true",
                      help="only the sharded state sizes (fast): no temp, peak or fits")
  parser.add_argument("--max-batch", action="store_true",
                      help="instead of --batch-size: the largest global batch that fits "
                           "--hbm-gib, per layout (several compiles each)")
  parser.add_argument("--batch-limit", type=int, default=4096,
                      help="--max-batch searches up to this many rows (default: 4096)")
  parser.add_argument("--top-collectives", type=int, default=0, metavar="N",
                      help="also list, per layout, the N collectives that send the most, "
                           "with the jax operation each serves")
  parser.add_argument("--kernels", type=int, nargs="?", const=5, metavar="N",
                      help="also list, per layout, the compiled step's kernels by category "
                           "(bytes moved, matmul FLOPs, a time bound on known devices) and "
                           "the N (default 5) that move the most")
  parser.add_argument("--json", action="store_true", help="print the rows as JSON")
  return parser


def _normal(layout: dict) -> dict:
  return {axis: size for axis, size in layout.items() if size != 1}


def _mesh_device_count(layouts: list[dict]) -> int | None:
  from jaxlm.config import ConfigError

  counts = {math.prod(layout.values()) for layout in layouts
            if all(size > 0 for size in layout.values())}
  if len(counts) > 1:
    raise ConfigError(f"The --mesh layouts use different device counts {sorted(counts)}; "
                      f"plan each count in a run of its own.")
  return counts.pop() if counts else None


def _target_devices(args) -> list:
  from jaxlm.config import ConfigError
  from jaxlm.parallel.gpu_target import target_devices, use_host_backend

  count = args.devices or _mesh_device_count(args.mesh)
  if not count:
    raise ConfigError("--target needs the GPU count: give --devices N (or --mesh layouts).")
  use_host_backend()
  return target_devices(args.target, count, args.devices_per_host)


def arrange_devices(count: int | None) -> int:
  """Asks for `count` simulated CPU devices, which JAX allows only before it starts; returns
  the device count JAX then has, which must be `count`."""
  import jax

  from jaxlm.config import ConfigError

  if count:
    try:
      jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
      pass  # JAX already started in this process: its devices are checked below
  have = jax.device_count()
  if count and have != count:
    raise ConfigError(
        f"The plan is for {count} devices but JAX has {have} "
        f"{jax.default_backend()} device(s). Simulated CPU devices must be set before JAX "
        f"starts: run in a fresh process, or set JAX_PLATFORMS=cpu on an accelerator host.")
  return have


def _progress(layouts: list[dict], instant: bool = False):
  """The layouts, with a progress bar on a terminal's stderr: each takes seconds to compile."""
  from tqdm.auto import tqdm

  from jaxlm.plan import layout_label

  bar = tqdm(layouts, unit="layout", leave=False, file=sys.stderr,
             disable=True if instant else None)  # None: only on a terminal
  for layout in bar:
    bar.set_description(layout_label(layout))
    yield layout


def run_plan(args, overrides=()) -> int:
  """overrides: --config.SECTION.KEY=VALUE strings, applied to every layout."""
  from jaxlm.config import ConfigError, load_config
  from jaxlm.parallel.links import HOST_LINK_GBPS, rates_for
  from jaxlm.plan import (GIB, fastest, format_kernels, format_max_batch_table, format_table,
                          format_top_collectives, max_batch, milliseconds, plan,
                          standard_layouts)

  devices = None
  try:
    if args.devices_per_host < 1:
      raise ConfigError(f"--devices-per-host {args.devices_per_host}: give 1 or more.")
    if args.target:
      devices = _target_devices(args)
      count = len(devices)
    else:
      count = arrange_devices(args.devices or _mesh_device_count(args.mesh))
    layouts = list(args.mesh)
    if args.sweep:
      layouts += [layout for layout in standard_layouts(count)
                  if _normal(layout) not in map(_normal, layouts)]
    if not layouts:
      raise ConfigError("Nothing to plan: give one or more --mesh AXIS=N, or --sweep.")
    if not (args.preset or args.config):
      raise ConfigError("Nothing to plan: give --preset NAME, or --config RECIPE.")
    if args.config:
      load_config(args.config)  # a recipe that cannot load fails once, not once per layout
    # A recipe keeps its own values where a flag is not given; a bare preset gets these.
    fallback = (lambda value, default: value) if args.config else (
        lambda value, default: default if value is None else value)
    options = dict(hbm_gib=args.hbm_gib, optimizer=fallback(args.optimizer, "adamw"),
                   remat=args.remat, param_dtype=args.param_dtype,
                   compute_dtype=args.compute_dtype, grad_accum=fallback(args.grad_accum, 1),
                   overrides=list(overrides), recipe=args.config, devices=devices)
    timing = dict(devices_per_host=args.devices_per_host, rates_of=args.rates_of,
                  link_gbs=args.link_gbs, peak_rates=args.peak_rates)
    if args.link_gbs and not (args.rates_of or args.target or args.peak_rates):
      raise ConfigError("--link-gbs times each step with a device's peak FLOP/s too: add "
                        "--rates-of KIND (e.g. h100) or --peak-rates, or plan with --target.")
    if args.rates_of and not rates_for(args.rates_of, args.link_gbs, args.peak_rates):
      raise ConfigError(f"No peak rates known for --rates-of {args.rates_of!r}: use one of "
                        f"{', '.join(kind.lower() for kind in HOST_LINK_GBPS)}, or give "
                        f"--link-gbs HOST,NETWORK with a kind whose FLOP/s are known.")
    seq_len = fallback(args.seq_len, 2048)
    if args.kernels is not None and (args.no_compile or args.max_batch):
      raise ConfigError("--kernels reads the step compiled at one batch size; drop "
                        f"{'--no-compile' if args.no_compile else '--max-batch'}.")
    if args.max_batch:
      if args.no_compile:
        raise ConfigError("--max-batch compiles each step it tries; drop --no-compile.")
      rows = [max_batch(args.preset, layout, seq_len=seq_len, limit=args.batch_limit,
                        **timing, **options) for layout in _progress(layouts)]
    else:
      rows = [row for layout in _progress(layouts, args.no_compile)
              for row in plan(args.preset, [layout], seq_len=seq_len,
                              batch_size=fallback(args.batch_size, 8),
                              compile_step=not args.no_compile,
                              top_collectives=args.top_collectives,
                              top_kernels=args.kernels, **timing, **options)]
  except ValueError as e:  # ConfigError included
    print(f"jaxlm plan: error: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(rows))
  else:
    print(format_max_batch_table(rows) if args.max_batch else format_table(rows))
    planned = sorted({row["attention_impl"] for row in rows if "attention_impl" in row})
    if planned:
      print(f"attention planned as: {', '.join(planned)}")
    if devices:
      print(f"compiled for {len(devices)} x {devices[0].device_kind} by XLA's GPU compiler "
            f"(--target {args.target}; no GPU used)")
    if described := sorted({row["rates"] for row in rows if "rates" in row}):
      given = [flag for flag, value in (("--peak-rates", args.peak_rates),
                                        ("--link-gbs", args.link_gbs)) if value]
      print(f"time bounds at {'; '.join(described)} ("
            + (f"{' and '.join(given)} as given, the rest " if given else "")
            + "datasheet figures, not measured; MFU of the datasheet's peak)")
      best = fastest(rows)
      if sum("bound" in row for row in rows) > 1 and best:
        print(f"shortest step that fits {args.hbm_gib:g} GiB at those rates: "
              f"{milliseconds(best[0]['bound']['step_s'])} ms at least (MFU at most "
              f"{best[0]['bound']['mfu_at_most']:.0%}), by "
              + ", ".join(f"{row['layout']} ({row['peak_bytes'] / GIB:.2f} GiB)"
                          for row in best[:4]) + (f" and {len(best) - 4} more" if best[4:] else ""))
      elif not best and not args.max_batch:
        print(f"no layout timed fits {args.hbm_gib:g} GiB: more devices, remat, or a smaller "
              f"batch")
    if any(row.get("sequence_parallel") for row in rows):
      print("sequence parallel: the residual stream split over tensor (mesh.sequence_parallel)")
    if top := format_top_collectives(rows):
      print(f"\n{top}")
    if kernels := format_kernels(rows):
      print(f"\n{kernels}")
  # A layout the user named must work; in a sweep, some standard ones may not.
  asked_failed = any("error" in row for row in rows[:len(args.mesh)])
  return 2 if asked_failed or all("error" in row for row in rows) else 0


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  overrides = [a for a in argv if a.startswith("--config.")]
  parser = argparse.ArgumentParser(prog="jaxlm")
  add_plan_parser(parser.add_subparsers(dest="command", required=True))
  args = parser.parse_args(["plan", *(a for a in argv if not a.startswith("--config."))])
  return run_plan(args, overrides)


if __name__ == "__main__":
  sys.exit(main())
