"""Where metrics go: TensorBoard, metrics.jsonl and a progress bar, from process 0 only."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
from tqdm.auto import tqdm

# Peak dense bf16 FLOP/s per device, for MFU. Unknown devices report no MFU unless
# train.peak_tflops_per_device is set.
PEAK_TFLOPS = {
    "H100": 989.0, "H200": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0,
    "L4": 121.0, "A10": 125.0, "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0,
    "TPU v5p": 459.0, "TPU v5": 459.0, "TPU v6 lite": 918.0, "TPU v6e": 918.0,
}


# Peak memory bandwidth (TB/s) by device kind, for the time bounds of `jaxlm plan --kernels`.
PEAK_MEMORY_TBPS = {
    "H100": 3.35, "H200": 4.8, "GH200": 4.0, "B200": 8.0, "A100": 2.04, "L4": 0.3, "A10": 0.6,
    "TPU v4": 1.2, "TPU v5 lite": 0.82, "TPU v5e": 0.82, "TPU v5p": 2.76, "TPU v5": 2.76,
    "TPU v6 lite": 1.64, "TPU v6e": 1.64,
}


def peak_flops_per_device(override_tflops: float = 0.0) -> float | None:
  if override_tflops:
    return override_tflops * 1e12
  return peak_for_kind(PEAK_TFLOPS, jax.devices()[0].device_kind)


def peak_for_kind(table: dict[str, float], kind: str, unit: float = 1e12) -> float | None:
  """A table's entry for a device kind (PEAK_TFLOPS, PEAK_MEMORY_TBPS: tera, unit 1e12), in
  units per second; None for a kind the table does not know (CPU)."""
  for name, value in sorted(table.items(), key=lambda kv: -len(kv[0])):
    if name.lower() in kind.lower():
      return value * unit
  return None


class MetricsWriter:

  def __init__(self, workdir: Path, *, enabled: bool):
    self.enabled = enabled
    self._jsonl = self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter
      workdir.mkdir(parents=True, exist_ok=True)
      self._jsonl = open(workdir / "metrics.jsonl", "a", buffering=1)
      self._tb = SummaryWriter(str(workdir / "tensorboard"))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items() if v is not None}
    self._jsonl.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
    for key, value in clean.items():
      if math.isfinite(value):
        self._tb.add_scalar(key, value, step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


class Progress:
  """A tqdm bar with loss, tokens/s, MFU; tqdm supplies rate and ETA."""

  def __init__(self, total: int, initial: int, *, enabled: bool):
    self.bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step",
                    dynamic_ncols=True, smoothing=0.1)

  def update(self, steps: int, metrics: dict | None = None) -> None:
    if metrics:
      post = {"loss": f"{metrics['loss']:.4f}",
              "tok/s": f"{metrics['tokens_per_s']:,.0f}"}
      if metrics.get("mfu") is not None:
        post["mfu"] = f"{100 * metrics['mfu']:.1f}%"
      self.bar.set_postfix(post, refresh=False)
    self.bar.update(steps)

  def write(self, text: str) -> None:
    self.bar.write(text)

  def close(self) -> None:
    self.bar.close()
