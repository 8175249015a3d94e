"""Start JAX's distributed runtime from flags or the environment, before any JAX work.

Precedence: explicit --coordinator/--num-processes/--process-id; the JAXLM_COORDINATOR,
JAXLM_NUM_PROCESSES, JAXLM_PROCESS_ID variables (launch/local.sh sets them); SLURM with more
than one task, or `--distributed auto` (TPU pods, other clusters), where JAX detects the
cluster itself; otherwise a single process.
"""
from __future__ import annotations

import os

import jax


def configure_cpu_devices(count: int | None) -> None:
  """Simulated CPU devices per process (testing layouts without accelerators)."""
  if count:
    jax.config.update("jax_num_cpu_devices", count)


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False) -> str:
  """Returns how the runtime was set up, for the log."""
  env = os.environ
  coordinator = coordinator or env.get("JAXLM_COORDINATOR")
  if num_processes is None and env.get("JAXLM_NUM_PROCESSES"):
    num_processes = int(env["JAXLM_NUM_PROCESSES"])
  if process_id is None and env.get("JAXLM_PROCESS_ID"):
    process_id = int(env["JAXLM_PROCESS_ID"])
  explicit = [coordinator, num_processes, process_id]
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError("Multi-process runs need all of --coordinator, --num-processes and "
                       f"--process-id (got {coordinator!r}, {num_processes!r}, {process_id!r}).")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    return f"process {process_id} of {num_processes} (coordinator {coordinator})"
  if auto or int(env.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()  # JAX reads SLURM / TPU pod / MPI settings itself
    return f"process {jax.process_index()} of {jax.process_count()} (auto-detected cluster)"
  return "single process"
