"""Stop when a validation metric has not improved for `patience` evaluations in a row."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

BEST_FILE = "best.json"  # in the workdir: the best checkpoint's step, metric and value


@dataclasses.dataclass
class EarlyStopping:
  metric: str  # e.g. "eval_loss"
  mode: str  # "min" or "max"
  patience: int  # evaluations without improvement before stopping
  min_delta: float = 0.0  # smaller gains do not count as improvement
  best: float | None = None
  best_step: int | None = None
  evals_without_improvement: int = 0

  def __post_init__(self):
    if self.mode not in ("min", "max"):
      raise ValueError(f"train.early_stopping.mode must be 'min' or 'max', not {self.mode!r}.")
    if self.patience < 1:
      raise ValueError(f"train.early_stopping.patience must be >= 1, not {self.patience}.")

  def _improves(self, value: float) -> bool:
    if self.best is None:
      return math.isfinite(value)
    gain = (self.best - value) if self.mode == "min" else (value - self.best)
    return gain > self.min_delta

  def update(self, step: int, metrics: dict) -> bool:
    """Records an evaluation; True when training should stop."""
    if self.metric not in metrics:
      raise ValueError(f"train.early_stopping.metric = {self.metric!r} is not among the "
                       f"evaluation metrics: {', '.join(sorted(metrics))}.")
    value = float(metrics[self.metric])
    if self._improves(value):
      self.best, self.best_step, self.evals_without_improvement = value, step, 0
    else:
      self.evals_without_improvement += 1
    return self.exhausted

  @property
  def exhausted(self) -> bool:
    return self.evals_without_improvement >= self.patience

  def resume(self, best_step: int | None, best_value: float | None, step: int,
             eval_every: int) -> None:
    """Continues a run: evaluations happen every eval_every steps, so the count since the
    best one follows from the steps alone."""
    if best_step is None or best_value is None:
      return
    self.best, self.best_step = best_value, best_step
    self.evals_without_improvement = (step - best_step) // eval_every

  def write_best(self, workdir: Path) -> None:
    if self.best_step is not None:
      (workdir / BEST_FILE).write_text(json.dumps(
          {"step": self.best_step, "metric": self.metric, "value": self.best}))


def read_best(workdir: Path) -> dict | None:
  path = Path(workdir) / BEST_FILE
  return json.loads(path.read_text()) if path.is_file() else None
