"""Where traced steps spend their device time, from a JAX profiler trace (`*.xplane.pb`).

Kernels are grouped by what they do (matmul, attention, collective, copy/transpose,
reduction, other: elementwise fusions and the rest) from their kernel and HLO op names, and
reported per step next to the wall time, so the gap between the two (host stalls, launch
gaps) shows too. On a GPU the kernels are read from the device's stream lines; on CPU (tests,
dry runs) from the XLA ops the host threads ran, self time only, so a while loop does not
count its body twice. Used by `jaxlm train` (train.profile_at), bench/train_throughput.py
(--profile) and `jaxlm profile TRACE_DIR --steps N`.
"""
from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from pathlib import Path

import jax
from jax.profiler import ProfileData  # jax's own xplane reader: no TensorBoard plugin needed

# First match wins; collectives before reductions, since all-reduce is both.
CATEGORIES = (
    ("collective", re.compile(
        r"nccl|all-?gather|all-?reduce|reduce-?scatter|all-?to-?all|collective-?permute")),
    ("attention", re.compile(r"sdpa|fmha|flash|cudnn")),
    ("matmul", re.compile(r"gemm|nvjet|xmma|cutlass|cublas|matmul|dot|convolution")),
    ("copy", re.compile(r"memcpy|memset|copy|transpose|dynamic.update.slice|concatenate")),
    ("reduction", re.compile(r"reduce")),
)
OTHER = "other"


def trace_options():
  """Profiler options for timing: no Python tracer, which would slow every Python call and
  so inflate the wall time the device's busy time is set against."""
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0
  return options


def category(*names: str) -> str:
  text = " ".join(names).lower()
  return next((name for name, pattern in CATEGORIES if pattern.search(text)), OTHER)


def newest_trace(directory: str | Path) -> Path:
  traces = sorted(Path(directory).rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
  if not traces:
    raise FileNotFoundError(f"No *.xplane.pb under {directory}: was it written by "
                            f"jax.profiler.trace?")
  return traces[-1]


def _self_times(events):
  """(event, self ns) for properly nested events of one line: a parent's time less its
  children's."""
  out, stack = [], []  # stack: [end_ns, index into out]
  for event in sorted(events, key=lambda e: (e[1], -e[2])):
    _, start, duration = event[:3]
    while stack and start >= stack[-1][0]:
      stack.pop()
    if stack:
      out[stack[-1][1]][1] -= duration
    out.append([event, duration])
    stack.append([start + duration, len(out) - 1])
  return out


def _busy_ns(intervals) -> float:
  """Length of the union of [start, end) intervals."""
  total, reach = 0.0, float("-inf")
  for start, end in sorted(intervals):
    if end > reach:
      total += end - max(start, reach)
      reach = end
  return total


def _kernel_lines(profile):
  """(source, device count, [(device, [(name, start, duration, hlo_op)]) per line]): the
  GPU stream lines, or the host's XLA op events where the trace has no GPU plane."""
  gpu = [p for p in profile.planes if re.match(r"/device:GPU:\d+$", p.name)]
  if gpu:
    return "gpu streams", len(gpu), [
        (device, [(e.name, e.start_ns, e.duration_ns, dict(e.stats).get("hlo_op", ""))
                  for e in line.events])
        for device, plane in enumerate(gpu) for line in plane.lines
        if line.name.lower().startswith("stream")]
  # CPU devices (several when simulated) share the host's threads: split by device ordinal.
  per_line = defaultdict(list)
  for plane in profile.planes:
    if plane.name.startswith("/host:"):
      for index, line in enumerate(plane.lines):
        for e in line.events:
          stats = dict(e.stats)
          if "hlo_op" in stats:
            per_line[(stats.get("device_ordinal", 0), plane.name, index)].append(
                (e.name, e.start_ns, e.duration_ns, stats["hlo_op"]))
  devices = {device for device, _, _ in per_line}
  return "host XLA ops", max(len(devices), 1), [
      (device, events) for (device, _, _), events in per_line.items()]


def summarize(trace: str | Path, steps: int, wall_s: float | None = None, top: int = 15) -> dict:
  """Device time per step by category and by kernel, from the trace file (or the newest one
  under a directory) of `steps` steps that took wall_s seconds. Per device: the mean over
  the devices of the trace."""
  if steps < 1:
    raise ValueError(f"steps must be at least 1 (the steps the trace holds), not {steps}")
  path = Path(trace)
  path = newest_trace(path) if path.is_dir() else path
  if not path.is_file():
    raise FileNotFoundError(f"No trace at {path}: give an .xplane.pb file or a directory "
                            f"that holds one.")
  source, devices, lines = _kernel_lines(ProfileData.from_file(str(path)))
  per_kernel = defaultdict(lambda: [0.0, 0, ""])  # name -> [self ns, calls, hlo op]
  intervals = defaultdict(list)  # device -> [(start, end)]
  for device, events in lines:
    for (name, start, duration, op), self_ns in _self_times(events):
      row = per_kernel[name]
      row[0] += self_ns
      row[1] += 1
      row[2] = row[2] or op
      intervals[device].append((start, start + duration))
  if not per_kernel:
    raise ValueError(f"{path} holds no device kernels or XLA ops; did the traced steps run "
                     f"inside jax.profiler.trace?")
  scale = 1e-6 / (steps * devices)  # ns summed over devices and steps -> ms per device-step
  by_category = defaultdict(float)
  for name, (ns, _, op) in per_kernel.items():
    by_category[category(name, op)] += ns
  kernel_ms = sum(by_category.values()) * scale
  # Time in which some kernel ran; the rest of the wall time is host work and launch gaps.
  busy_ms = sum(_busy_ns(spans) for spans in intervals.values()) * scale
  wall_ms = wall_s * 1e3 / steps if wall_s else None
  ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]
  return {
      "trace": str(path), "source": source, "steps": steps, "devices": devices,
      "wall_ms_per_step": wall_ms, "kernel_ms_per_step": kernel_ms,
      "busy_ms_per_step": busy_ms, "busy_share": busy_ms / wall_ms if wall_ms else None,
      "categories": {name: {"ms_per_step": ns * scale, "share": ns * scale / kernel_ms}
                     for name, ns in sorted(by_category.items(), key=lambda kv: -kv[1])},
      "top": [{"name": name, "hlo_op": op, "category": category(name, op),
               "ms_per_step": ns * scale, "calls_per_step": calls / (steps * devices)}
              for name, (ns, calls, op) in ranked],
  }


def format_table(summary: dict) -> str:
  """The summary as a few lines of text: busy vs wall, categories, top kernels."""
  wall = summary["wall_ms_per_step"]
  head = (f"profile ({summary['source']}, {summary['steps']} steps): kernels "
          f"{summary['kernel_ms_per_step']:.2f} ms/step, busy {summary['busy_ms_per_step']:.2f}")
  if wall:
    head += f" of {wall:.2f} wall ({summary['busy_share']:.0%})"
  rows = [head, "  " + "  ".join(f"{name} {c['ms_per_step']:.2f} ms ({c['share']:.0%})"
                                   for name, c in summary["categories"].items())]
  rows += [f"  {k['ms_per_step']:9.3f} ms  {k['calls_per_step']:6.1f}x  {k['category']:<10} "
           f"{k['name'][:70]}" + (f"  [{k['hlo_op']}]" if k["hlo_op"] not in ("", k["name"])
                                  else "")
           for k in summary["top"]]
  return "\n".join(rows)


class StepProfiler:
  """Traces steps `first` .. first + count - 1 of a run (numbered from 1, as logged) into
  `directory`, then summarises them there (summary.json). The window is synchronised at both
  ends, so its wall time is the steps' own; steps outside it are untouched. A profiler that
  fails (no CUPTI, a trace it cannot read) ends in {"error": ...}, never in a stopped run."""

  def __init__(self, directory: str | Path, first: int, count: int):
    self.directory, self.first, self.last = Path(directory), first, first + count - 1
    self._begin = None
    self._error = None

  def before(self, step: int, state) -> None:
    """Call before running step number `step`, with the state it starts from."""
    if step != self.first:
      return
    jax.block_until_ready(state)
    try:
      jax.profiler.start_trace(str(self.directory), profiler_options=trace_options())
    except Exception as e:  # the run matters more than its profile
      self._error = f"could not start the trace: {type(e).__name__}: {e}"
      return
    self._begin = time.perf_counter()

  def after(self, step: int, outputs) -> dict | None:
    """Call after dispatching step number `step`: once the window closes, its summary (or
    {"error": why there is none}), else None."""
    if step != self.last or (self._begin is None and self._error is None):
      return None
    if self._error is not None:
      return {"error": self._error}
    jax.block_until_ready(outputs)
    wall_s = time.perf_counter() - self._begin
    try:
      self.close()
      summary = summarize(self.directory, self.last - self.first + 1, wall_s)
    except Exception as e:
      return {"error": f"could not summarise the trace in {self.directory}: "
                       f"{type(e).__name__}: {e}"}
    (self.directory / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary

  def close(self) -> None:
    """Ends a trace still running (a run that stopped inside the window)."""
    if self._begin is not None:
      self._begin = None
      jax.profiler.stop_trace()
