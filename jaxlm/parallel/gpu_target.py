"""Devices of a GPU model that is not here, for ahead-of-time compiles (`jaxlm plan --target`).

XLA's GPU compiler needs no GPU to compile: given a description of the device (its
GpuTargetConfig) and a topology (hosts x GPUs per host), jax's CUDA plugin hands out
devices that a step can be lowered and compiled for, but never run on. The compiled step's
memory is then the GPU compiler's own (its fusions, cuDNN attention, its buffer
assignment) instead of the CPU backend's estimate. Needs the plugin that `pip install
"jax[cuda12]"` installs (with its CUDA libraries; a GPU and its driver are not needed).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import jax

from jaxlm.config import ConfigError
from jaxlm.parallel.links import DEVICES_PER_HOST


# GpuTargetConfig (text proto) of an H100 SXM 80GB: what the compiler reads of the device.
H100 = """\
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84929347584
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 7 }
runtime_version { major: 12 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
TARGETS = {"h100": H100}


def cuda_plugin_installed() -> bool:
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:  # no jax_plugins package at all
    return False


def use_host_backend() -> None:
  """Keeps JAX's own backend on the CPU, so that the CUDA plugin registers without probing
  for a GPU: call before JAX starts."""
  try:
    jax.config.update("jax_platforms", "cpu")
  except RuntimeError:
    pass  # JAX already started; target_devices says what is missing if it matters


def target_devices(target: str, count: int, per_host: int = DEVICES_PER_HOST) -> list:
  """`count` devices of a GPU target: a name in TARGETS or a GpuTargetConfig text-proto
  file, on hosts of up to per_host GPUs each."""
  if target in TARGETS:
    description = TARGETS[target]
  elif Path(target).is_file():
    description = Path(target).read_text()
  else:
    raise ConfigError(f"Unknown GPU target {target!r}: use one of {', '.join(TARGETS)}, or "
                      f"the path of a GpuTargetConfig text proto.")
  hosts = max(1, count // per_host)
  if count > per_host and count % per_host:
    raise ConfigError(f"{count} GPUs do not fill hosts of {per_host}; plan a multiple "
                      f"of {per_host}, or {per_host} or fewer.")
  if not cuda_plugin_installed():
    raise ConfigError(
        f"--target compiles with XLA's GPU compiler, which comes with jax's CUDA plugin: "
        f'pip install "jax[cuda12]=={jax.__version__}" (no GPU is needed).')
  from jax.experimental import topologies

  try:
    topology = topologies.get_topology_desc(platform="cuda", target_config=description,
                                            topology=f"1x{hosts}x{count // hosts}")
  except (NotImplementedError, RuntimeError) as e:
    raise ConfigError(
        f"jax's CUDA plugin could not describe {count} {target} GPUs ({e}). Run the plan in "
        f"a fresh process (the plugin registers when JAX starts), with a plugin whose version "
        f"is jax's ({jax.__version__}).") from None
  return list(topology.devices)
