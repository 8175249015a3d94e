"""Memory plans: how much each device holds for a model under a mesh layout, before any
hardware is involved.

For every layout the real train step is built (`Run.build`), lowered on abstract shapes and
compiled ahead of time, so the numbers come from the same program `jaxlm train` would run.
Nothing is allocated: an 8B model plans on a laptop. The layouts must use exactly the
devices JAX sees; on CPU, simulate them before JAX starts (`jax_num_cpu_devices` or
XLA_FLAGS=--xla_force_host_platform_device_count=N; `jaxlm plan --devices N` does this).
"""
from __future__ import annotations

import math
import re
import time

import jax

from jaxlm import config as config_lib
from jaxlm import kernel_cost
from jaxlm.layers.attention import resolve_attention_impl
from jaxlm.layers.flash_kernels import config_problem as kernel_config_problem
from jaxlm.models.factory import is_encoder
from jaxlm.parallel.collectives import (collectives, compile_with_partitioned_hlo,
                                        sent_bytes_by_axes)
from jaxlm.parallel.links import (DEVICES_PER_HOST, crosses_hosts, device_hosts,
                                  peak_compute_and_memory, rates_for, step_bound)
from jaxlm.parallel.mesh import MESH_AXES, resolve_mesh_shape
from jaxlm.train.loop import Run
from jaxlm.train.trainer import BATCH_KEYS  # what every data batch holds, as jaxlm train feeds it

GIB = 2**30
# The time-bound columns of a table, filled by _bound_cells.
BOUND_COLUMNS = ("compute ms", "comm ms", "MFU at most")


def layout_label(layout: dict) -> str:
  """{"fsdp": 4, "tensor": 2} -> "fsdp=4 tensor=2"; axes of size 1 are left out."""
  order = {axis: i for i, axis in enumerate(MESH_AXES)}
  axes = sorted(layout, key=lambda axis: order.get(axis, len(order)))
  return " ".join(f"{axis}={layout[axis]}" for axis in axes if layout[axis] != 1) or "1 device"


def standard_layouts(num_devices: int) -> list[dict]:
  """DP, FSDP, TP, then the 2-D mixes (FSDP x TP, DP x TP, DP x FSDP) for each split of the
  devices into two factors, then DP x FSDP x TP for each split into three."""
  n = num_devices
  layouts = [{"data": n}, {"fsdp": n}, {"tensor": n}] if n > 1 else [{"data": 1}]
  splits = [k for k in range(2, n) if n % k == 0]
  layouts += [{"fsdp": n // t, "tensor": t} for t in splits]
  layouts += [{"data": n // t, "tensor": t} for t in splits]
  layouts += [{"data": d, "fsdp": n // d} for d in splits]
  layouts += [{"data": d, "fsdp": n // d // t, "tensor": t} for d in splits for t in splits
              if n // d % t == 0 and n // d // t > 1]
  return layouts


def fastest(rows: list[dict]) -> list[dict]:
  """Of the rows that fit and were timed (see plan's bound), those whose step bound is the
  shortest (within 1 %: compute-bound layouts tie, since the bound lets their communication
  hide), the least memory first."""
  timed = [row for row in rows if row.get("fits") and "bound" in row]
  if not timed:
    return []
  shortest = min(row["bound"]["step_s"] for row in timed)
  return sorted((row for row in timed if row["bound"]["step_s"] <= 1.01 * shortest),
                key=lambda row: row["peak_bytes"])


def experiment_config(preset: str | None, layout: dict | None = None, *,
                      seq_len: int | None, batch_size: int | None,
                      optimizer: str | None = "adamw", remat: str | None = None,
                      param_dtype: str | None = None, compute_dtype: str | None = None,
                      grad_accum: int | None = 1, overrides=None, recipe: str | None = None):
  """A locked training config for a preset at a given shape. Returns (config, overrides)
  where overrides is the flat {key: value} dict applied, for the record. The starting point
  is base_config(), or with `recipe` that recipe (a configs/ name or path, as `jaxlm train
  --config`). None keeps the recipe's (or preset's, or base config's) value; layout None
  keeps its mesh."""
  applied = {key: value for key, value in (
      ("model.preset", preset), ("data.seq_len", seq_len), ("data.batch_size", batch_size),
      ("optim.name", optimizer), ("train.grad_accum_steps", grad_accum),
      ("model.remat_policy", remat), ("model.param_dtype", param_dtype),
      ("model.compute_dtype", compute_dtype)) if value is not None}
  if layout is not None:
    unknown = sorted(set(layout) - set(MESH_AXES))
    if unknown:
      raise config_lib.ConfigError(f"Unknown mesh axes {unknown} in layout {layout}; the "
                                   f"axes are {', '.join(MESH_AXES)}.")
    applied.update({f"mesh.{axis}": int(layout.get(axis, 1)) for axis in MESH_AXES})
  if recipe is None:
    config = config_lib.base_config()
  else:
    config = config_lib.load_config(recipe)
    config.unlock()
  config_lib.apply_overrides(config, applied)
  config_lib.apply_overrides(config, overrides or {})
  config.lock()
  keys = [*applied, *_override_keys(overrides or {})]
  return config, {key: _lookup(config, key) for key in keys}


def _override_keys(overrides) -> list[str]:
  if isinstance(overrides, dict):
    return list(overrides)
  return [arg.removeprefix("--").removeprefix("config.").split("=", 1)[0]
          for arg in overrides]


def _lookup(config, key: str):
  for part in key.split("."):
    config = config[part]
  return config


def state_bytes(abstract_state) -> dict:
  """Per-device and global bytes of a sharded abstract train state, from each leaf's shard
  shape: what the layout puts on one device before any step runs."""

  def per_device(tree):
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
               for leaf in jax.tree.leaves(tree))

  total = sum(math.prod(leaf.shape) * leaf.dtype.itemsize
              for leaf in jax.tree.leaves(abstract_state))
  return {"param_bytes": per_device(abstract_state["params"]),
          "opt_state_bytes": per_device(abstract_state["opt_state"]),
          "state_bytes": per_device(abstract_state), "state_total_bytes": total}


def compiled_memory(compiled) -> dict:
  """Per-device bytes of a compiled step from XLA's buffer assignment.

  peak = arguments + outputs - aliased + temporaries + generated code, where
  - arguments are the live inputs (train state and batch shard) at entry;
  - outputs alias the donated state: `alias` counts output bytes written into argument
    buffers, so they are subtracted once instead of being counted as inputs and outputs;
  - temporaries are XLA's scratch for everything in between (saved activations, gradients,
    gathered weights, collectives' buffers), already packed by liveness;
  - generated code is the executable itself (0 on CPU).
  That is what the executable holds while it runs, since XLA reserves the temporaries for
  the whole step. Not included: the runtime's own reserves (CUDA context, cuDNN and NCCL
  workspaces, allocator fragmentation), so leave a few GiB of headroom. XLA's own
  `peak_memory_in_bytes` is not used: on CPU it reports only the arguments. Compiled on CPU,
  the result estimates an accelerator's: the CPU backend fuses differently and may widen
  bf16 work to f32 (see `plan` for attention).
  """
  stats = compiled.memory_analysis()
  out = {"argument_bytes": stats.argument_size_in_bytes,
         "output_bytes": stats.output_size_in_bytes,
         "alias_bytes": stats.alias_size_in_bytes,
         "temp_bytes": stats.temp_size_in_bytes,
         "code_bytes": stats.generated_code_size_in_bytes}
  out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                       + out["temp_bytes"] + out["code_bytes"])
  return out


def plan_run(run, *, hbm_gib: float, compile_step: bool = True, top_collectives: int = 0,
             top_kernels: int | None = None, devices_per_host: int = DEVICES_PER_HOST,
             rates_of: str | None = None, link_gbs: tuple[float, float] | None = None,
             peak_rates: tuple[float, float] | None = None) -> dict:
  """One row of a plan for a built Run (see plan for the fields and options)."""
  mesh = {axis: int(run.mesh.shape[axis]) for axis in MESH_AXES}
  row = {"layout": layout_label(mesh), "mesh": mesh, "devices": run.mesh.size,
         "hbm_gib": hbm_gib, "attention_impl": resolve_attention_impl(
             run.model_cfg.attention_impl, run.model_cfg.compute_dtype),
         "sequence_parallel": bool(run.config.mesh.sequence_parallel),
         "compiled_for": run.mesh.devices.flat[0].device_kind,
         **state_bytes(run.trainer.abstract_state())}
  row["state_ratio"] = row["state_bytes"] * row["devices"] / row["state_total_bytes"]
  row["fits"] = None
  if compile_step:
    shape = (run.config.data.batch_size, run.config.data.seq_len)
    start = time.perf_counter()
    compiled, partitioned = compile_with_partitioned_hlo(
        run.trainer.lower_train_step({k: shape for k in BATCH_KEYS}))
    row["compile_s"] = time.perf_counter() - start
    row.update(compiled_memory(compiled))
    row["fits"] = row["peak_bytes"] <= hbm_gib * GIB
    row.update(traffic(run, partitioned, top_collectives, devices_per_host))
    if top_kernels is not None:
      row.update(kernel_traffic(compiled.as_text(), row["compiled_for"], top_kernels,
                                peak_rates))
    rates = rates_for(rates_of or row["compiled_for"], link_gbs, peak_rates)
    if rates and "sent_by_link" in row:
      kernels = row.get("kernel_bound_s")  # collectives: timed at their links' rates instead
      row["rates"] = rates.describe(devices_per_host)
      row["bound"] = step_bound(row["flops_per_device"], row["sent_by_link"], rates,
                                kernels["total"] - kernels["collective"] if kernels else None)
  return row


def kernel_traffic(optimized_hlo: str, device_kind: str, top: int,
                   peak_rates: tuple[float, float] | None = None) -> dict:
  """What the compiled step's kernels move and compute (jaxlm.kernel_cost): kernels
  {category: {kernels, bytes, flops} per step}, top_kernels (the `top` that move the most)
  and, where the device kind's peak rates are known or given (peak_rates: TFLOP/s, TB/s;
  jaxlm.parallel.links.peak_compute_and_memory), kernel_bound_s {category: seconds per
  step, at least}."""
  found = kernel_cost.kernels(optimized_hlo)
  out = {"kernels": kernel_cost.summary(found), "top_kernels": kernel_cost.largest(found, top)}
  flops, bandwidth = peak_compute_and_memory(device_kind, peak_rates)
  if bandwidth and flops:
    out["kernel_bound_s"] = kernel_cost.time_bounds(found, bandwidth, flops)
  return out


def traffic(run, partitioned_hlo: str | None, top: int = 0,
            devices_per_host: int = DEVICES_PER_HOST) -> dict:
  """What a device sends per step (jaxlm.parallel.collectives): sent_bytes in all,
  sent_by_axes {mesh axes a collective spans: bytes} and sent_by_link {"host": bytes within
  its host, "network": to other hosts; hosts of devices_per_host, see
  jaxlm.parallel.links.device_hosts}, with the model's FLOPs per device per step
  (flops_per_device) and their ratio (flops_per_sent_byte: communication can hide
  behind compute where it exceeds the hardware's FLOP/s over its link bytes/s), and with
  top > 0 the `top` collectives that send the most (top_collectives: kind, shape, axes,
  count, sent_bytes and the jax op they serve); or traffic_error where the program could
  not be read."""
  mesh = {axis: int(run.mesh.shape[axis]) for axis in run.mesh.axis_names}
  if partitioned_hlo is None and run.mesh.size > 1:
    return {"traffic_error": "XLA wrote no partitioned program for this step to read"}
  try:
    found = collectives(partitioned_hlo, mesh) if partitioned_hlo else []
  except ValueError as e:  # a form of HLO this reader does not know: memory still counts
    return {"traffic_error": str(e)}
  by_axes = sent_bytes_by_axes(found)
  tokens = run.config.data.batch_size * run.config.data.seq_len
  flops = run.model_cfg.flops_per_token(run.config.data.seq_len) * tokens / run.mesh.size
  sent = sum(by_axes.values())
  hosts = device_hosts(run.mesh, devices_per_host)
  by_link = {"host": 0.0, "network": 0.0}
  for axes, sent_bytes in by_axes.items():
    crossing = crosses_hosts(hosts, run.mesh.axis_names, tuple(axes.split("+")))
    by_link["network" if crossing else "host"] += sent_bytes
  largest = sorted((c for c in found if c.sent_bytes), key=lambda c: -c.sent_bytes)[:top]
  return {"sent_bytes": sent, "sent_by_axes": by_axes, "sent_by_link": by_link,
          "flops_per_device": flops,
          "flops_per_sent_byte": flops / sent if sent else None,
          **({"top_collectives": [
              {"kind": c.kind, "shape": re.sub(r"\{[\d,]*\}", "", c.shape),
               "axes": "+".join(c.axes), "count": c.count, "sent_bytes": c.sent_bytes,
               "op": c.op} for c in largest]} if top else {})}


def plan(preset: str | None, layouts: list[dict], *, seq_len: int | None,
         batch_size: int | None, hbm_gib: float, optimizer: str | None = "adamw",
         remat: str | None = None, param_dtype: str | None = None,
         compute_dtype: str | None = None, grad_accum: int | None = 1, overrides=None,
         recipe: str | None = None, compile_step: bool = True, flash_attention: bool = True,
         top_collectives: int = 0, top_kernels: int | None = None,
         devices: list | None = None, devices_per_host: int = DEVICES_PER_HOST,
         rates_of: str | None = None, link_gbs: tuple[float, float] | None = None,
         peak_rates: tuple[float, float] | None = None) -> list[dict]:
  """Plans each layout (e.g. {"fsdp": 8}, {"fsdp": 4, "tensor": 2}; missing axes are 1) for
  the preset (or the recipe, see experiment_config) at seq_len x batch_size (global batch)
  and returns one row per layout. Each layout must use exactly the devices JAX has (one
  axis may be -1: fill).

  Row fields, all per device unless named total: sequence_parallel (the config's
  mesh.sequence_parallel), compiled_for (the device kind), param_bytes, opt_state_bytes, state_bytes
  (the whole train state), state_total_bytes (unsharded), state_ratio (state_bytes over
  state_total_bytes / devices: 1.0 is perfect sharding, devices is full replication) and,
  when compiled, argument/output/alias/temp/code/peak bytes (see compiled_memory),
  compile_s, fits (peak <= hbm_gib; None with compile_step=False, which skips the
  compile and is instant) and the step's communication (see traffic; top_collectives
  lists that many of its largest collectives); with top_kernels (a count, 0 included) what
  the step's kernels move and compute (see kernel_traffic). A layout that cannot work
  gives a row with `error` (the message of Run.build, naming the fix) instead of failing
  the others; dtype and remat None keep the preset's.

  flash_attention: unless the config sets model.attention_impl, a decoder's step is planned
  with the splash flash-attention kernel (run interpreted on CPU) where the sequence length
  tiles (a multiple of 128), so that temp counts the memory of attention as GPUs and TPUs
  run it (flash kernels) and not XLA's whole [seq, seq] scores; each row says which
  (`attention_impl`).

  devices: compile for these (a GPU target's, jaxlm.parallel.gpu_target) instead of this
  machine's; a decoder's attention is then cuDNN's, as GPUs run it (16-bit compute).

  Time bounds: where the peak rates of rates_of (a device kind, e.g. "h100"; default the
  kind compiled for) are known (jaxlm.parallel.links.rates_for; link_gbs, GB/s within a
  host and between hosts, replaces its link rates; peak_rates, TFLOP/s and memory TB/s, its
  peak FLOP/s and, for top_kernels' bounds, its bandwidth), a compiled row also has `rates`
  (what they are) and `bound` (jaxlm.parallel.links.step_bound: model_flops_s, compute_s,
  comm_s, comm_by_link_s, mfu_at_most), with devices on hosts of devices_per_host.
  """
  rows = []
  for layout in layouts:
    try:
      config, _ = experiment_config(
          preset, layout, seq_len=seq_len, batch_size=batch_size, optimizer=optimizer,
          remat=remat, param_dtype=param_dtype, compute_dtype=compute_dtype,
          grad_accum=grad_accum, overrides=overrides, recipe=recipe)
      if flash_attention and (kernel := _planned_attention(config, devices)):
        config_lib.apply_overrides(config, {"model.attention_impl": kernel})
      run = Run.build(config, planning=True, devices=devices)
    except ValueError as e:  # ConfigError and ShardingError included: they name the fix
      rows.append({"layout": layout_label(layout), "mesh": dict(layout), "hbm_gib": hbm_gib,
                   "devices": _layout_devices(layout), "fits": False, "error": str(e)})
      continue
    rows.append(plan_run(run, hbm_gib=hbm_gib, compile_step=compile_step,
                         top_collectives=top_collectives, top_kernels=top_kernels,
                         devices_per_host=devices_per_host, rates_of=rates_of,
                         link_gbs=link_gbs, peak_rates=peak_rates))
  return rows


def max_batch(preset: str | None, layout: dict, *, seq_len: int | None, hbm_gib: float,
              limit: int = 4096, grad_accum: int | None = 1, **options) -> dict:
  """The largest global batch of seq_len-token rows whose compiled step fits hbm_gib per
  device under layout, up to limit rows. Batches step by the rows the layout splits the
  batch over (data x fsdp, times grad_accum); the search doubles from one such step while
  the step fits, then bisects, on the assumption that memory grows with the batch. options:
  as `plan` (optimizer, remat, dtypes, overrides, recipe, flash_attention, devices); seq_len and
  grad_accum None keep the recipe's.

  Returns {"layout", "devices", "max_batch" (0: not even the smallest batch fits),
  "rows_per_device", "tokens_per_step", "peak_bytes" (at max_batch), "capped" (the limit
  still fit), "attention_impl", "sequence_parallel", "probes": [[batch, peak bytes], ...],
  "compile_s" (all probes)} and, with known rates, the step's "rates" and "bound" at
  max_batch (see plan); or a row with "error" when the layout cannot work."""
  devices = options.get("devices")
  shape = resolve_mesh_shape(layout, len(devices) if devices else jax.device_count())
  if grad_accum is None or seq_len is None:  # the recipe's
    config, _ = experiment_config(preset, layout, seq_len=seq_len, batch_size=None,
                                  grad_accum=grad_accum, recipe=options.get("recipe"),
                                  overrides=options.get("overrides"))
    grad_accum, seq_len = config.train.grad_accum_steps, config.data.seq_len
  unit = shape["data"] * shape["fsdp"] * grad_accum
  probes, rows = [], {}

  def fits(batch: int) -> bool:
    row = plan(preset, [layout], seq_len=seq_len, batch_size=batch, hbm_gib=hbm_gib,
               grad_accum=grad_accum, **options)[0]
    if "error" in row:
      raise _LayoutError(row)
    rows[batch] = row
    probes.append([batch, row["peak_bytes"]])
    return row["fits"]

  most = limit // unit  # in steps of unit rows
  if most < 1:
    raise ValueError(f"The batch limit {limit} is below the {unit} rows the layout splits "
                     f"a batch over; raise it.")
  try:
    fit, no_fit, steps = 0, most + 1, 1  # the most steps known to fit, the fewest known not to
    while steps <= most:
      if not fits(steps * unit):
        no_fit = steps
        break
      fit, steps = steps, steps * 2
    while no_fit - fit > 1:
      middle = (fit + no_fit) // 2
      if fits(middle * unit):
        fit = middle
      else:
        no_fit = middle
  except _LayoutError as e:
    return e.row
  best, capped = fit * unit, fit == most
  return {"layout": layout_label(shape), "mesh": shape, "devices": math.prod(shape.values()),
          "hbm_gib": hbm_gib, "max_batch": best, "rows_per_device": best // unit * grad_accum,
          "tokens_per_step": best * seq_len,
          "peak_bytes": rows[best]["peak_bytes"] if best else None, "capped": capped,
          "attention_impl": rows[unit]["attention_impl"],
          "sequence_parallel": rows[unit]["sequence_parallel"], "probes": probes,
          "compile_s": sum(row["compile_s"] for row in rows.values()),
          **{key: rows[best][key] for key in ("rates", "bound") if best and key in rows[best]}}


class _LayoutError(Exception):

  def __init__(self, row: dict):
    super().__init__(row["error"])
    self.row = row


def format_max_batch_table(rows: list[dict]) -> str:
  """A fixed-width table of max_batch results; a layout that cannot work shows its error."""
  header = ("devices", "layout", "max batch", "rows/device", "tokens/step", "peak GiB",
            "probes", "compile s")
  timed = any("bound" in row for row in rows)
  header += BOUND_COLUMNS if timed else ()

  def cells(row):
    batch = f"{row['max_batch']}{'+' if row['capped'] else ''}"
    return (batch, str(row["rows_per_device"]), f"{row['tokens_per_step']:,}",
            _gib(row["peak_bytes"]), str(len(row["probes"])), f"{row['compile_s']:.1f}",
            *(_bound_cells(row) if timed else ()))

  return _table(header, rows, cells)


def _planned_attention(config, devices) -> str | None:
  """The flash attention a decoder whose attention the config leaves to the backend is
  planned with: cuDNN's on a GPU target (16-bit compute, as resolve_attention_impl picks
  it on GPUs), else splash at a length it tiles; None: as configured."""
  if config.model.attention_impl is not None:
    return None
  model_cfg = config_lib.model_config(config)
  if is_encoder(model_cfg):
    return None
  if devices and devices[0].platform == "gpu":
    return resolve_attention_impl(None, model_cfg.compute_dtype, backend="gpu")
  if kernel_config_problem("splash", config.data.seq_len, sliding_window=None):
    return None
  return "splash"


def _layout_devices(layout: dict) -> int | None:
  sizes = list(layout.values())
  return math.prod(sizes) if all(size > 0 for size in sizes) else None  # -1: fills


def _gib(value) -> str:
  return "-" if value is None else f"{value / GIB:.2f}"


def _fits(row: dict) -> str:
  if row["fits"] is None:
    return "-"
  return f"{'yes' if row['fits'] else 'NO'} (<= {row['hbm_gib']:g})"


def format_table(rows: list[dict]) -> str:
  """A fixed-width table of plan rows; a layout that cannot work shows its error."""
  header = ("devices", "layout", "params+opt GiB/dev", "x ideal", "temp GiB", "peak GiB",
            "fits", "sent GiB/step", "over axes", "FLOP/B", "compile s")
  timed = any("bound" in row for row in rows)
  header += BOUND_COLUMNS if timed else ()

  def cells(row):
    compile_s = row.get("compile_s")
    return (_gib(row["state_bytes"]), f"{row['state_ratio']:.3f}", _gib(row.get("temp_bytes")),
            _gib(row.get("peak_bytes")), _fits(row), *_traffic_cells(row),
            "-" if compile_s is None else f"{compile_s:.1f}", *(_bound_cells(row) if timed else ()))

  return _table(header, rows, cells)


def _bound_cells(row: dict) -> tuple[str, str, str]:
  if "bound" not in row:
    return "-", "-", "-"
  bound, mfu = row["bound"], row["bound"]["mfu_at_most"]
  comm = milliseconds(bound["comm_s"])
  if bound["comm_by_link_s"]["network"]:
    comm += f" ({' + '.join(map(milliseconds, bound['comm_by_link_s'].values()))})"
  return milliseconds(bound["compute_s"]), comm, "-" if mfu is None else f"{mfu:.0%}"


def milliseconds(seconds: float) -> str:
  """Milliseconds to 0.1, or 3 significant digits below 10 (a tiny model's steps)."""
  ms = seconds * 1e3
  return f"{ms:.1f}" if ms >= 10 or ms == 0 else f"{ms:.3g}"


def _traffic_cells(row: dict) -> tuple[str, str, str]:
  if "traffic_error" in row:
    return "?", "unread", "-"
  if "sent_bytes" not in row:
    return "-", "-", "-"
  by_axes = " ".join(f"{axes} {value / GIB:.2f}" for axes, value in sorted(
      row["sent_by_axes"].items(), key=lambda item: -item[1]) if value >= 0.005 * GIB)
  ratio = row["flops_per_sent_byte"]
  return (_gib(row["sent_bytes"]), by_axes or "-",
          "-" if ratio is None else f"{ratio:,.0f}")


def _table(header: tuple, rows: list[dict], cells) -> str:
  """Fixed-width columns: devices, layout, then cells(row); an error row runs on past them."""
  lines = [(str(row["devices"] or "?"), row["layout"], "error: " + row["error"])
           if "error" in row else (str(row["devices"]), row["layout"], *cells(row))
           for row in rows]
  full = [line for line in lines if len(line) == len(header)]
  widths = [max(len(cell) for cell in column) for column in zip(header, *full)]

  def render(cells):
    if len(cells) < len(header):  # an error row runs on past the columns
      return f"{cells[0]:>{widths[0]}}  {cells[1]:<{widths[1]}}  {cells[2]}"
    return "  ".join(c.rjust(w) if i != 1 else c.ljust(w)
                     for i, (c, w) in enumerate(zip(cells, widths)))

  rule = "  ".join("-" * w for w in widths)
  return "\n".join([render(header), rule, *map(render, lines)])


def format_top_collectives(rows: list[dict]) -> str:
  """Per layout, its top_collectives: bytes sent per step, kind, mesh axes, count per step,
  shape and the jax operation each serves."""
  blocks = []
  for row in rows:
    if not row.get("top_collectives"):
      continue
    lines = [(f"{c['sent_bytes'] / GIB:.2f}", c["kind"], c["axes"], str(c["count"]), c["shape"],
              c["op"]) for c in row["top_collectives"]]
    header = ("GiB/step", "kind", "axes", "runs", "shape", "op")
    widths = [max(len(cells[i]) for cells in (header, *lines)) for i in range(5)]
    rendered = ["  ".join(cell.rjust(w) if i in (0, 3) else cell.ljust(w)
                          for i, (cell, w) in enumerate(zip(cells, widths))) + "  " + cells[5]
                for cells in (header, *lines)]
    blocks.append(f"{row['layout']}: the collectives that send the most\n" +
                  "\n".join("  " + line for line in rendered))
  return "\n\n".join(blocks)


def format_kernels(rows: list[dict]) -> str:
  """Per layout, its kernels by category (launches, bytes read + written and FLOPs per step,
  in GB and TFLOP, or MB and GFLOP for a small model; with the device's peak rates the time
  they take at least) and its largest kernels."""
  blocks = []
  for row in rows:
    if "kernels" not in row:
      continue
    total = row["kernels"]["total"]
    bytes_unit, byte_scale = ("GB", 1e9) if total["bytes"] >= 1e9 else ("MB", 1e6)
    flops_unit, flop_scale = ("TFLOP", 1e12) if total["flops"] >= 1e12 else ("GFLOP", 1e9)
    bounds = row.get("kernel_bound_s")
    header = (("category", "kernels", f"{bytes_unit} moved", flops_unit)
              + (("ms at least",) if bounds else ()))
    lines = [(category, f"{c['kernels']:,}", f"{c['bytes'] / byte_scale:.2f}",
              f"{c['flops'] / flop_scale:.2f}")
             + ((f"{bounds[category] * 1e3:.1f}",) if bounds else ())
             for category, c in row["kernels"].items() if c["kernels"]]
    widths = [max(len(cells[i]) for cells in (header, *lines)) for i in range(len(header))]
    rendered = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                          for i, (cell, w) in enumerate(zip(cells, widths)))
                for cells in (header, *lines)]
    block = [f"{row['layout']}: the step's kernels, read from the program XLA compiled"]
    block += ["  " + line for line in rendered]
    if row.get("top_kernels"):
      block.append("  moving the most:")
      block += [f"    {k['bytes'] / byte_scale:7.2f} {bytes_unit} {k['count']:4}x "
                f"{k['category']:<10} {k['name']}  {k['op']}" for k in row["top_kernels"]]
    blocks.append("\n".join(block))
  return "\n\n".join(blocks)
