"""How long a step could take at least on a cluster: which of a mesh's axes cross hosts, the
link rates within and between hosts, and the bound they put on a step with the compute."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from jaxlm.train.metrics import PEAK_MEMORY_TBPS, PEAK_TFLOPS, peak_for_kind

DEVICES_PER_HOST = 8

# GB/s one GPU sends, one direction, in the usual servers of 8 (datasheet figures): NVLink
# within a host, and between hosts one NIC per GPU (400 Gb/s InfiniBand or RoCE; 200 Gb/s
# for A100 servers). TPUs are left out: their links are the ICI torus within a slice and
# the data-center network between slices, not hosts.
HOST_LINK_GBPS = {"H100": 450.0, "H200": 450.0, "B200": 900.0, "A100": 300.0}
NETWORK_GBPS = {"H100": 50.0, "H200": 50.0, "B200": 50.0, "A100": 25.0}


@dataclass(frozen=True)
class Rates:
  """Peak rates, per second, that time a plan: bf16 FLOPs of one device, bytes one device
  sends within its host and to other hosts, its memory bandwidth (None: unknown), and the
  FLOPs MFU is counted against (the datasheet's, where flops is a measured ceiling)."""
  name: str
  flops: float
  host_link: float
  network: float
  memory: float | None
  mfu_flops: float

  def describe(self, devices_per_host: int) -> str:
    memory = f"{self.memory / 1e12:,.2f} TB/s, " if self.memory else ""
    return (f"{self.name} rates: {self.flops / 1e12:,.0f} TFLOP/s, {memory}"
            f"{self.host_link / 1e9:,.0f} GB/s within hosts of {devices_per_host}, "
            f"{self.network / 1e9:,.0f} GB/s between hosts")


def peak_compute_and_memory(kind: str, peak_rates: tuple[float, float] | None = None
                            ) -> tuple[float | None, float | None]:
  """FLOP/s and memory bytes/s of a device kind: peak_rates (TFLOP/s, TB/s) where given,
  else the datasheet's (None where the tables do not know the kind)."""
  if peak_rates:
    return peak_rates[0] * 1e12, peak_rates[1] * 1e12
  return peak_for_kind(PEAK_TFLOPS, kind), peak_for_kind(PEAK_MEMORY_TBPS, kind)


def rates_for(kind: str, link_gbs: tuple[float, float] | None = None,
              peak_rates: tuple[float, float] | None = None) -> Rates | None:
  """The Rates of a device kind (e.g. "NVIDIA H100 80GB HBM3", or "h100"), with link_gbs
  (GB/s within a host, between hosts) and peak_rates (TFLOP/s, memory TB/s) in place of the
  tables'; None where the peak FLOP/s or the links are neither known for the kind nor
  given (CPU)."""
  flops, memory = peak_compute_and_memory(kind, peak_rates)
  host_link = peak_for_kind(HOST_LINK_GBPS, kind, unit=1e9)
  network = peak_for_kind(NETWORK_GBPS, kind, unit=1e9)
  if link_gbs:
    host_link, network = (gbs * 1e9 for gbs in link_gbs)
  if not (flops and host_link and network):
    return None
  return Rates(kind, flops, host_link, network, memory,
               mfu_flops=peak_for_kind(PEAK_TFLOPS, kind) or flops)


def device_hosts(mesh, devices_per_host: int = DEVICES_PER_HOST) -> np.ndarray:
  """The host of each device of a mesh, in the mesh's shape: the device's process where the
  devices span several (a real cluster), else hosts of devices_per_host in device id order
  (simulated devices, one process)."""
  devices = mesh.devices
  processes = np.vectorize(lambda d: d.process_index)(devices)
  if len(np.unique(processes)) > 1:
    return processes
  return np.vectorize(lambda d: d.id)(devices) // devices_per_host


def crosses_hosts(hosts: np.ndarray, axis_names, axes: tuple[str, ...]) -> bool:
  """Whether the groups of devices a collective over `axes` runs in (those that differ only
  along those axes) span more than one host."""
  inner = [axis_names.index(axis) for axis in axes]
  outer = [i for i in range(hosts.ndim) if i not in inner]
  size = math.prod(hosts.shape[i] for i in inner)
  groups = hosts.transpose(outer + inner).reshape(-1, size)
  return bool((groups != groups[:, :1]).any())


def step_bound(flops_per_device: float, sent_by_link: dict[str, float], rates: Rates,
               kernels_s: float | None = None) -> dict:
  """At these rates, the least time a step takes: its model FLOPs at peak (model_flops_s),
  or where given the least time its kernels other than collectives take (kernels_s, see
  jaxlm.kernel_cost.time_bounds: memory-bound kernels and remat's recomputation count
  there), whichever is longer (compute_s); and its collectives one at a time at their
  link's rate (comm_s, split by link in comm_by_link_s). The step takes at least the longer
  of compute and communication (step_s), so the MFU it can reach, of rates.mfu_flops, is
  at most mfu_at_most."""
  by_link = {"host": sent_by_link.get("host", 0.0) / rates.host_link,
             "network": sent_by_link.get("network", 0.0) / rates.network}
  model_flops_s = flops_per_device / rates.flops
  compute_s, comm_s = max(model_flops_s, kernels_s or 0.0), sum(by_link.values())
  step_s = max(compute_s, comm_s)
  mfu = flops_per_device / rates.mfu_flops / step_s if step_s else None
  return {"model_flops_s": model_flops_s, "compute_s": compute_s, "comm_s": comm_s,
          "comm_by_link_s": by_link, "step_s": step_s, "mfu_at_most": mfu}
