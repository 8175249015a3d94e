"""What a compiled step's kernels read and write in device memory, and the FLOPs of its
matmuls, read from the program XLA finished (`compiled.as_text()`), per step and by kernel
category: the static side of a profile, for a device that is not here (`jaxlm plan
--kernels`, with `--target h100` the GPU compiler's program).

A kernel is an instruction of a computation that runs on its own (the entry, loop bodies,
branches), not of a fusion's inside: a fusion is one kernel. What it moves:
- a fusion reads each operand whole, except one it only slices (then the slices), or the
  array a dynamic-update-slice writes into in place (nothing); it writes its results whole,
  except an in-place update (then the update);
- any other instruction reads its operands and writes its result whole.
Kernels in a loop count once per iteration. FLOPs are those of the dots (2 x output
elements x contracted size), in a fusion or as cuBLAS calls, and of cuDNN's fused attention
(see _cudnn_attention_flops); other attention kernels' (Pallas, in a custom call) are not
read. Categories are those of a measured profile (jaxlm.profiling): matmul (a kernel
with a dot), attention (cuDNN's fused attention, or a kernel made for an attention op),
collective, copy (copies, slices, in-place updates, transposes, concatenations: data moved
unchanged), reduction (a fusion with a reduce) and other (elementwise).

What it is not: a timing. A kernel's time is at least its bytes over the memory bandwidth
and its FLOPs over the peak rate, so the sums bound a step's time from below; caches,
overlap and kernel quality decide the rest.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

from jaxlm.hlo import KINDS, Instruction, execution_counts, parse, shape_bytes

CATEGORIES = ("matmul", "attention", "collective", "copy", "reduction", "other")

# Instructions that launch nothing: bookkeeping, or control flow whose bodies are counted.
_NO_KERNEL = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while",
              "call", "conditional", "after-all", "partition-id", "replica-id", "opt-barrier",
              "add-dependency", "domain", "async-update"}
_MOVES_DATA = {"copy", "copy-start", "slice", "dynamic-slice", "dynamic-update-slice",
               "transpose", "concatenate", "pad", "broadcast", "reshape"}
_SLICES = {"slice", "dynamic-slice"}


@dataclasses.dataclass(frozen=True)
class Kernel:
  """One kernel of the step. count: launches per step; bytes and flops: per launch."""
  name: str
  category: str
  count: int
  bytes: float
  flops: float
  op: str = ""


def kernels(hlo: str) -> list[Kernel]:
  """The kernels of an optimized HLO module (text), with what each moves and computes."""
  module, entry = parse(hlo)
  counts = execution_counts(module, entry)
  inside = {callee for computation in module.values() for inst in computation
            for callee in re.findall(r"\bcalls=%([\w.\-]+)", inst.attributes)}
  found = []
  for name, computation in module.items():
    if name in inside or not counts.get(name):
      continue
    shapes = {inst.name: inst.shape for inst in computation}
    for inst in computation:
      if inst.opcode in _NO_KERNEL or inst.opcode.endswith("-done"):
        continue
      callee = _callee(inst, module)
      flops = _flops(inst, shapes, module)
      read, written = (_fusion_bytes(inst, callee, shapes) if callee is not None
                       else _plain_bytes(inst, shapes))
      op = re.search(r'op_name="([^"]*)"', inst.attributes)
      found.append(Kernel(name=inst.name, category=_category(inst, callee, flops, op),
                          count=counts[name], bytes=read + written, flops=flops,
                          op=op.group(1) if op else ""))
  return found


def summary(found: list[Kernel]) -> dict[str, dict[str, float]]:
  """{category: {"kernels": launches per step, "bytes": read + written per step, "flops":
  per step}} over CATEGORIES, with "total"."""
  out = {category: {"kernels": 0, "bytes": 0.0, "flops": 0.0} for category in CATEGORIES}
  for kernel in found:
    entry = out[kernel.category]
    entry["kernels"] += kernel.count
    entry["bytes"] += kernel.count * kernel.bytes
    entry["flops"] += kernel.count * kernel.flops
  out["total"] = {key: sum(entry[key] for entry in list(out.values())) for key in
                  ("kernels", "bytes", "flops")}
  return out


def largest(found: list[Kernel], top: int) -> list[dict]:
  """The `top` kernels that move the most bytes per step, summed over launches of one
  kernel (as a profile's top kernels are)."""
  ranked = sorted(found, key=lambda k: -k.count * k.bytes)[:top]
  return [{"name": k.name, "category": k.category, "count": k.count,
           "bytes": k.count * k.bytes, "flops": k.count * k.flops, "op": k.op} for k in ranked]


def _callee(inst: Instruction, module) -> list[Instruction] | None:
  if inst.opcode != "fusion":
    return None
  match = re.search(r"\bcalls=%([\w.\-]+)", inst.attributes)
  return module.get(match.group(1)) if match else None


def _flops(inst: Instruction, shapes: dict[str, str], module) -> float:
  """FLOPs of a dot, a cuBLAS call or the dots inside a fusion; shapes: of the instructions
  of inst's computation."""
  if inst.opcode == "dot":
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst.attributes)
  elif inst.opcode == "custom-call" and "fmha" in _target(inst).lower():
    return _cudnn_attention_flops(inst, shapes)
  elif _is_cublas(inst):
    contracting = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', inst.attributes)
  elif callee := _callee(inst, module):
    inner = {i.name: i.shape for i in callee}
    return sum(_flops(i, inner, module) for i in callee)
  else:
    return 0.0
  if contracting is None or not inst.operands:
    return 0.0
  lhs = _dims(shapes.get(inst.operands[0], ""))
  contracted = math.prod(lhs[int(d)] for d in re.findall(r"\d+", contracting.group(1)))
  return 2.0 * math.prod(_dims(inst.shape)) * contracted


def _cudnn_attention_flops(inst: Instruction, shapes: dict[str, str]) -> float:
  """The matmul FLOPs a cuDNN fused attention call must do: with B, N, T, S the batch, heads,
  queries and keys of its [B, N, T, S] scores and H the head size (q's last dimension),
  the forward's two matmuls (QK^T, PV) are 4 BNTSH, the backward's five (QK^T again, dP,
  dV, dQ, dK) 10 BNTSH; a causal mask halves them (tiles above the diagonal are skipped).
  0 where a sliding window or FP8 makes that count too high for a bound."""
  config = inst.attributes
  scores = re.search(r'"intermediate_tensor_shape":\s*\{.*?"dimensions":\s*\[([^\]]*)\]',
                     config)
  window = re.search(r'"sliding_window_length":\s*"?(\d+)', config)
  if (scores is None or not inst.operands or (window and int(window.group(1)) > 0)
      or "f8" in _target(inst).lower()):
    return 0.0
  head = _dims(shapes.get(inst.operands[0], ""))[-1:]
  if not head:
    return 0.0
  matmuls = 10 if "backward" in _target(inst).lower() else 4
  causal = re.search(r'"mask_type":\s*"(PADDING_)?CAUSAL"', config) is not None
  size = math.prod(int(d) for d in re.findall(r"\d+", scores.group(1))) * head[0]
  return matmuls * size * (0.5 if causal else 1.0)


def _first_array(shape: str) -> str:
  """An array shape, or a tuple's first array (a cuBLAS call's result, before its
  workspace); "" for none."""
  match = re.search(r"[a-z][a-z0-9]*\[[\d,]*\]", shape)
  return match.group(0) if match else ""


def _dims(shape: str) -> list[int]:
  """Dimensions of _first_array(shape)."""
  inside = _first_array(shape).partition("[")[2].rstrip("]")
  return [int(d) for d in inside.split(",") if d]


def _is_cublas(inst: Instruction) -> bool:
  """A cuBLAS matmul (__cublas$gemm, __cublas$lt$matmul): what autotuning picks for many
  GEMMs on a GPU, where a compile without one makes them Triton fusions."""
  return inst.opcode == "custom-call" and "cublas" in _target(inst).lower()


def _scalar(shape: str) -> bool:
  return re.fullmatch(r"[a-z][a-z0-9]*\[\]", shape) is not None


def _target(inst: Instruction) -> str:
  match = re.search(r'custom_call_target="([^"]*)"', inst.attributes)
  return match.group(1) if match else ""


def _plain_bytes(inst: Instruction, shapes: dict[str, str]) -> tuple[float, float]:
  operands = [shape_bytes(shapes.get(operand, "")) for operand in inst.operands]
  if inst.opcode == "dynamic-update-slice":  # in place: reads and writes the update
    return operands[1], operands[1]
  if inst.opcode == "dynamic-slice":
    return shape_bytes(inst.shape), shape_bytes(inst.shape)
  if inst.opcode.endswith("-start") and inst.shape.startswith("(("):
    # An asynchronous collective's result holds its operands, then what it writes.
    return sum(operands), max(shape_bytes(inst.shape) - sum(operands), 0.0)
  if _is_cublas(inst):  # its result, not the scratch workspace that follows it in the tuple
    return sum(operands), shape_bytes(_first_array(inst.shape))
  return sum(operands), shape_bytes(inst.shape)


def _fusion_bytes(inst: Instruction, callee: list[Instruction],
                  shapes: dict[str, str]) -> tuple[float, float]:
  inner = {i.name: i for i in callee}
  users = defaultdict(list)
  for i in callee:
    for operand in i.operands:
      users[operand].append(i)

  def uses(name):  # users, looking through bitcasts
    for user in users[name]:
      yield from (uses(user.name) if user.opcode == "bitcast" else [(name, user)])

  read = 0.0
  for param in (i for i in callee if i.opcode == "parameter"):
    index = int(param.operand_text)
    whole = shape_bytes(shapes.get(inst.operands[index], param.shape))
    found = list(uses(param.name))
    if found and all(user.opcode in _SLICES and user.operands[0] == source
                     for source, user in found):
      read += min(whole, sum(shape_bytes(user.shape) for _, user in found))
    elif found and all(user.opcode == "dynamic-update-slice" and user.operands[0] == source
                       for source, user in found):
      pass  # the array updated in place
    else:
      read += whole
  root = next((i for i in callee if i.is_root), callee[-1])
  results = [inner[name] for name in root.operands] if root.opcode == "tuple" else [root]
  written = 0.0
  for result in results:
    while result.opcode == "bitcast" and result.operands[0] in inner:
      result = inner[result.operands[0]]
    written += (shape_bytes(inner[result.operands[1]].shape)
                if result.opcode == "dynamic-update-slice" else shape_bytes(result.shape))
  return read, written


def _category(inst: Instruction, callee, flops: float, op) -> str:
  op_name = op.group(1).lower() if op else ""
  base = inst.opcode.removesuffix("-start")
  if base in KINDS:
    return "collective"
  if inst.opcode == "custom-call" and (
      re.search(r"fmha|cudnn", _target(inst).lower()) or "attention" in op_name):
    return "attention"
  if flops:
    return "matmul"
  if callee is None:
    return "copy" if base in _MOVES_DATA else "other"
  if any(i.opcode == "reduce" for i in callee):
    return "reduction"
  if all(i.opcode in _MOVES_DATA | {"parameter", "bitcast", "tuple", "constant"}
         for i in callee if not _scalar(i.shape)):  # scalars: a slice's index arithmetic
    return "copy"
  return "other"


def time_bounds(found: list[Kernel], bytes_per_s: float, flops_per_s: float) -> dict:
  """{category: seconds per step, "total": ...}: each kernel's time is at least its bytes
  over bytes_per_s and its FLOPs over flops_per_s, whichever is longer."""
  out = {category: 0.0 for category in CATEGORIES}
  for kernel in found:
    out[kernel.category] += kernel.count * max(kernel.bytes / bytes_per_s,
                                               kernel.flops / flops_per_s)
  out["total"] = sum(out.values())
  return out
