"""What a compiled step sends between devices: its collectives, read from XLA's program right
after SPMD partitioning, and the bytes each device sends per step along each mesh axis.

Why that point in the compile: the partitioner is the same for every backend, and it is
where the collectives of a layout come from. Later passes are the backend's own: the CPU
backend (which plans run on) widens bf16 to f32 and would double the bytes of every
gathered weight, while a GPU merges collectives and turns an all-reduce whose result each
device slices into a reduce-scatter, and sums of all-reduces into one all-reduce of the sum.
Those two steps are applied here, as GPU and TPU compilers apply them.

Bytes sent per device are those of the bandwidth-optimal (ring) algorithms, for a group of
n devices: an all-gather or reduce-scatter moves (n - 1)/n of the whole array, an all-reduce
twice that, an all-to-all (n - 1)/n of each device's array, a collective-permute all of it.
Collectives inside a loop (the scan over layers) count once per iteration.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import math
import os
import re
import tempfile
from collections import defaultdict

import jax
import numpy as np

from jaxlm.hlo import KINDS, Instruction, execution_counts, parse, shape_bytes


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective of the step. bytes: the array it works on, per device (an all-gather's
  result, a reduce-scatter's input); group: devices per replica group; axes: the mesh axes
  a group spans; count: times it runs per step; shape: its HLO result shape; op: the jax
  operation it was made for (from XLA's metadata), e.g. ".../btd,dm->btm/dot_general"."""
  name: str
  kind: str
  bytes: float
  group: int
  axes: tuple[str, ...]
  count: int
  shape: str = ""
  op: str = ""

  @property
  def sent_bytes(self) -> float:
    """Bytes one device sends per step under the ring algorithms (module docstring)."""
    n = self.group
    if n <= 1:
      return 0.0
    share = {"all-gather": (n - 1) / n, "reduce-scatter": (n - 1) / n,
             "all-reduce": 2 * (n - 1) / n, "all-to-all": (n - 1) / n,
             "collective-permute": 1.0}[self.kind]
    return share * self.bytes * self.count


def compile_with_partitioned_hlo(lowered):
  """(compiled executable, its HLO text right after SPMD partitioning, or None when nothing
  was partitioned: one device), read from XLA's dump as it compiles."""
  with tempfile.TemporaryDirectory(prefix="jaxlm-hlo-") as directory, _fresh_compile():
    compiled = lowered.compile(compiler_options={
        "xla_dump_to": directory, "xla_dump_hlo_pass_re": "spmd-partitioning",
        "xla_dump_hlo_as_text": True})
    files = sorted(glob.glob(os.path.join(directory, "*after_spmd-partitioning*.txt")))
    if not files:
      return compiled, None
    with open(files[-1]) as f:
      return compiled, f.read()


@contextlib.contextmanager
def _fresh_compile():
  """JAX's persistent compilation cache off for the block: an executable it served would
  not be compiled, so XLA would dump no program to read. (jaxlm train turns the cache on for
  the process, and JAX_COMPILATION_CACHE_DIR does for any.) reset_cache makes JAX check its
  settings again at the next compile, inside the block and after it."""
  from jax.experimental.compilation_cache import compilation_cache

  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()


def collectives(hlo: str, mesh_shape: dict[str, int]) -> list[Collective]:
  """The collectives of a partitioned HLO module (text) compiled over a mesh of mesh_shape
  ({axis: size}, in the mesh's axis order: device i of the program is the mesh's i-th device
  in row-major order)."""
  module, entry = parse(hlo)
  counts = execution_counts(module, entry)
  users = defaultdict(list)
  for computation in module.values():
    for inst in computation:
      for operand in inst.operands:
        users[operand].append(inst)
  found = []
  for computation_name, computation in module.items():
    count = counts.get(computation_name, 0)
    if count == 0:  # never runs (e.g. a reduction's combiner)
      continue
    folded = _folded_all_reduces(computation, users, mesh_shape)
    for inst in computation:
      if inst.opcode not in KINDS or inst.name in folded:
        continue
      groups = _groups(inst, mesh_shape)
      kind, group, size = inst.opcode, len(groups[0]), shape_bytes(inst.shape)
      if kind == "reduce-scatter":
        size *= group  # its result is one device's share
      elif kind == "all-reduce" and _sliced_by_every_user(inst, users[inst.name], group):
        kind = "reduce-scatter"
      op = re.search(r'op_name="([^"]*)"', inst.attributes)
      found.append(Collective(name=inst.name, kind=kind, bytes=size, group=group,
                              axes=_axes_spanned(groups, mesh_shape), count=count,
                              shape=inst.shape, op=op.group(1) if op else ""))
  return found


def sent_bytes_by_axes(found: list[Collective]) -> dict[str, float]:
  """{"fsdp": bytes, "data+fsdp": bytes, ...}: bytes one device sends per step, by the mesh
  axes its collectives' groups span (collectives within one device left out)."""
  totals = defaultdict(float)
  for collective in found:
    if collective.sent_bytes:
      totals["+".join(collective.axes)] += collective.sent_bytes
  return dict(sorted(totals.items()))


def _folded_all_reduces(computation: list[Instruction], users, mesh_shape) -> set[str]:
  """The all-reduces that GPU and TPU compilers fold into another (all-reduce and
  reduce-scatter reassociation): add(all-reduce(x), all-reduce(y)) over the same groups,
  each used only by the add, becomes all-reduce(add(x, y)); so does the sum of two
  reduce-scatters, in the partitioner's form of each (an all-reduce whose one user slices
  it) when they slice the same share. Chains of such adds fold into one. Tensor
  parallelism's backward sums q, k and v's (or gate and up's) partial input gradients so;
  under sequence parallelism, reduce-scattered."""
  # an add, all-reduce or slice of one -> (the all-reduce it keeps, the slice's offsets)
  kept_for: dict[str, tuple[Instruction, tuple | None]] = {}
  for inst in computation:
    if inst.opcode in ("all-reduce", "reduce-scatter"):
      kept_for[inst.name] = (inst, None if inst.opcode == "all-reduce" else "scattered")
    elif inst.opcode == "dynamic-slice" and inst.operands[0] in kept_for and (
        kept_for[inst.operands[0]][1] is None
        and [user.name for user in users[inst.operands[0]]] == [inst.name]):
      kept_for[inst.name] = (kept_for[inst.operands[0]][0], tuple(inst.operands[1:]))
  folded = set()
  for inst in computation:
    if inst.opcode != "add" or len(inst.operands) != 2:
      continue
    sums = [kept_for.get(operand) for operand in inst.operands]
    if any(total is None for total in sums) or any(
        [user.name for user in users[operand]] != [inst.name] for operand in inst.operands):
      continue
    (first, first_slice), (second, second_slice) = sums
    if (first is not second and first_slice == second_slice
        and _groups(first, mesh_shape) == _groups(second, mesh_shape)):
      folded.add(second.name)
      kept_for[inst.name] = (first, first_slice)
  return folded


def _sliced_by_every_user(inst: Instruction, users: list[Instruction], group: int) -> bool:
  """An all-reduce each device slices its 1/group share of: the partitioner's form of a
  reduce-scatter, which GPU and TPU compilers turn into one."""
  if group <= 1 or not users:
    return False
  size = shape_bytes(inst.shape)
  return all(user.opcode == "dynamic-slice" and shape_bytes(user.shape) * group == size
             for user in users)


# --- replica groups ----------------------------------------------------------------------

def _groups(inst: Instruction, mesh_shape: dict[str, int]) -> list[list[int]]:
  """The replica groups of a collective as lists of device ids (partition ids)."""
  devices = math.prod(mesh_shape.values())
  attributes = inst.attributes
  if inst.opcode == "collective-permute":
    pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", attributes)
    return ([[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)", pairs.group(1) + "}")]
            if pairs else [[0]])
  if match := re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\((\[[\d,]+\]"
                        r"(?:T\([\d,]+\))?)\))? \{([^}]*)\}", attributes):
    return _mesh_groups(match.group(1), match.group(2), match.group(3), devices)
  if match := re.search(r"replica_groups=(\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)",
                        attributes):
    shape, _, rest = match.group(1).partition("<=")
    groups = _iota(rest).reshape([int(d) for d in shape.strip("[]").split(",")])
    return groups.reshape(groups.shape[0], -1).tolist()
  if match := re.search(r"replica_groups=\{(.*?)\}(?:,|$)", attributes + ","):
    groups = [[int(d) for d in group.split(",") if d]
              for group in re.findall(r"\{([\d,]*)\}", match.group(1) + "}")]
    groups = [group for group in groups if group]
    return groups or [list(range(devices))]
  raise ValueError(f"Cannot read the replica groups of {inst.opcode} %{inst.name}: "
                   f"{attributes[:200]}")


def _iota(text: str) -> np.ndarray:
  """"[4,2]T(1,0)" -> arange(8).reshape(4, 2).transpose(1, 0), flattened."""
  dims = [int(d) for d in re.match(r"\[([\d,]+)\]", text).group(1).split(",")]
  ids = np.arange(math.prod(dims)).reshape(dims)
  if perm := re.search(r"T\(([\d,]+)\)", text):
    ids = ids.transpose([int(p) for p in perm.group(1).split(",")])
  return ids.reshape(-1)


def _mesh_groups(axes_text: str, device_ids: str | None, grouped: str, devices: int):
  """XLA's mesh form: the devices (device_ids, an iota such as [2,4]T(1,0); default 0..n-1)
  laid out as a mesh of named axes; each group varies along the grouped axes."""
  names = re.findall(r"'([^']+)'=(\d+)", axes_text)
  sizes = [int(size) for _, size in names]
  ids = _iota(device_ids) if device_ids else np.arange(devices)
  ids = ids.reshape(sizes)
  varying = [i for i, (name, _) in enumerate(names) if f"'{name}'" in grouped]
  fixed = [i for i in range(len(names)) if i not in varying]
  group = math.prod(sizes[i] for i in varying)
  return ids.transpose(fixed + varying).reshape(-1, group).tolist()


def _axes_spanned(groups: list[list[int]], mesh_shape: dict[str, int]) -> tuple[str, ...]:
  """The mesh axes along which the devices of some group differ."""
  coordinates = np.array(np.unravel_index(np.arange(math.prod(mesh_shape.values())),
                                          list(mesh_shape.values()))).T
  varying = set()
  for group in groups:
    spread = coordinates[group].max(axis=0) != coordinates[group].min(axis=0)
    varying.update(np.flatnonzero(spread).tolist())
  return tuple(name for i, name in enumerate(mesh_shape) if i in varying)
