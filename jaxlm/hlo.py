"""Reading XLA's HLO text: a module's computations and instructions, the bytes of a
shape, and how many times each computation runs per call of the module (loops by their trip
counts). Shared by the readers of a compiled step: its collectives
(jaxlm.parallel.collectives) and its kernels (jaxlm.kernels)."""
from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
         "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
         "s4": 0.5, "u4": 0.5, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1,
         "f8e4m3b11fnuz": 1, "f8e8m0fnu": 1, "token": 0}


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str
  opcode: str
  operands: list[str]
  operand_text: str
  attributes: str
  is_root: bool = False


_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLEES = re.compile(r"\b(body|condition|to_apply|calls|true_computation|false_computation)="
                      r"%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


def parse(hlo: str) -> tuple[dict[str, list[Instruction]], str]:
  """({computation name: instructions}, the entry computation's name)."""
  module: dict[str, list[Instruction]] = {}
  current, entry = None, None
  for line in hlo.splitlines():
    if current is None:
      if (match := _HEADER.match(line)) and not line.startswith(("HloModule", " ")):
        current = module[match.group(1)] = []
        if line.startswith("ENTRY"):
          entry = match.group(1)
      continue
    if line.startswith("}"):
      current = None
      continue
    if inst := _parse_instruction(line):
      current.append(inst)
  return module, entry


def _parse_instruction(line: str) -> Instruction | None:
  line = re.sub(r"/\*.*?\*/", "", line).strip()
  is_root = line.startswith("ROOT ")
  line = line.removeprefix("ROOT ").strip()
  if not line.startswith("%") or " = " not in line:
    return None
  name, rest = line[1:].split(" = ", 1)
  shape, rest = _take_shape(rest)
  opcode, _, rest = rest.strip().partition("(")
  operands_text, attributes = _split_balanced(rest)
  operands = re.findall(r"%([\w.\-]+)", operands_text)
  return Instruction(name, shape, opcode.strip(), operands, operands_text, attributes, is_root)


def _take_shape(text: str) -> tuple[str, str]:
  if text.startswith("("):
    inside, rest = _split_balanced(text[1:])
    return "(" + inside + ")", rest
  shape, _, rest = text.partition(" ")
  return shape, rest


def _split_balanced(text: str) -> tuple[str, str]:
  """text after an opening parenthesis -> (what is inside, what follows the closing one)."""
  depth = 1
  for i, char in enumerate(text):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if depth == 0:
      return text[:i], text[i + 1:]
  return text, ""


def shape_bytes(shape: str) -> float:
  """Bytes of an HLO shape (a tuple's: the sum of its arrays')."""
  total = 0.0
  for dtype, dims in re.findall(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]", shape):
    if dtype not in BYTES:
      raise ValueError(f"Unknown element type {dtype!r} in HLO shape {shape!r}.")
    total += BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def execution_counts(module, entry: str) -> dict[str, int]:
  """Times each computation runs per call of the entry: loop bodies times their trip count
  (the compiler's, where an optimized program states it; else the constant a jax loop counts
  up to from 0), everything else as often as its caller (a fusion's computation included)."""
  counts: dict[str, int] = defaultdict(int)

  def visit(name: str, times: int):
    counts[name] += times
    for inst in module.get(name, []):
      callees = _CALLEES.findall(inst.attributes)
      trips = _trip_count(module, inst, dict(callees).get("condition")) if (
          inst.opcode == "while") else 1
      for role, callee in callees:
        if inst.opcode in KINDS or role == "to_apply" and inst.opcode != "call":
          continue  # a reduction's combiner, not a computation that runs on its own
        visit(callee, times * (trips if role == "body" else 1))
      for branches in _BRANCHES.findall(inst.attributes):
        for callee in re.findall(r"%([\w.\-]+)", branches):
          visit(callee, times)

  visit(entry, 1)
  return counts


def _trip_count(module, loop: Instruction, condition: str | None) -> int:
  """A while loop's trip count: the compiler's known_trip_count, else the constant a jax
  loop's counter is compared below in its condition; 1 if unknown."""
  if known := re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attributes):
    return int(known.group(1))
  instructions = {inst.name: inst for inst in module.get(condition, [])}
  for inst in instructions.values():
    if inst.opcode == "compare" and "direction=LT" in inst.attributes:
      for operand in inst.operands:
        bound = instructions.get(operand)
        if bound is not None and bound.opcode == "constant":
          return int(bound.operand_text)
  return 1
