"""Build the device mesh from config: axes data / fsdp / tensor, one of them may be -1."""
from __future__ import annotations

import math
from typing import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  shape = {axis: int(sizes.get(axis, 1)) for axis in MESH_AXES}
  fill = [axis for axis, size in shape.items() if size == -1]
  if len(fill) > 1:
    raise ValueError(f"Only one mesh axis may be -1 (fill), got {fill} in {shape}.")
  bad = [axis for axis, size in shape.items() if size == 0 or size < -1]
  if bad:
    raise ValueError(f"Mesh axis sizes must be positive or -1, got {shape}.")
  known = math.prod(size for size in shape.values() if size != -1)
  if fill:
    if num_devices % known:
      raise ValueError(
          f"Cannot fill mesh axis {fill[0]!r}: the other axes use {known} devices, which does "
          f"not divide the {num_devices} available. Choose sizes whose product divides "
          f"{num_devices}.")
    shape[fill[0]] = num_devices // known
  elif known != num_devices:
    raise ValueError(
        f"Mesh {shape} uses {known} devices but {num_devices} are available. Make "
        f"data x fsdp x tensor = {num_devices}, or set one axis to -1 to fill, e.g. "
        f"--config.mesh.fsdp=-1.")
  return shape


def build_mesh(sizes: Mapping[str, int], devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(sizes, len(devices))
  dims = tuple(shape[axis] for axis in MESH_AXES)
  # Auto axes: with_sharding_constraint guides GSPMD propagation instead of asserting.
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(dims, MESH_AXES, axis_types=axis_types, devices=devices)
  return Mesh(np.asarray(devices).reshape(dims), MESH_AXES, axis_types=axis_types)
