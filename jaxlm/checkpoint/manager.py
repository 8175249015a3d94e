"""Async, keep-last-K Orbax checkpoints holding params, optimizer state, step, RNG, the data
iterator position and the model config, restorable onto any mesh."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
  pass


class Checkpointer:

  def __init__(self, directory: str | Path, *, every: int, keep: int, async_save: bool = True,
               best_metric: str = "", best_mode: str = "min"):
    """With best_metric, the checkpoint with the best value of that metric (as passed to
    save) is kept besides the last `keep`: early stopping must not delete its best model."""
    self.directory = Path(directory).absolute()
    common = dict(save_interval_steps=max(every, 1), create=True,
                  enable_async_checkpointing=async_save)
    if best_metric:
      def metric_of(metrics):
        return metrics[best_metric]

      keep_latest = ocp.checkpoint_managers.LatestN(n=keep)
      keep_best = ocp.checkpoint_managers.BestN(
          get_metric_fn=metric_of, reverse=best_mode == "min", n=1,
          keep_checkpoints_without_metrics=False)
      options = ocp.CheckpointManagerOptions(
          **common, best_fn=metric_of, best_mode=best_mode,
          preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(
              [keep_latest, keep_best]))
    else:
      options = ocp.CheckpointManagerOptions(**common, max_to_keep=keep)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data", "model"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_state: dict, model: dict, *, force: bool = False,
           metrics: dict | None = None) -> bool:
    """Saves if `step` is due (every N) or `force`; returns whether a save started. Older
    checkpoints are removed only after this one is committed (Orbax's keep-last-K)."""
    return self.manager.save(
        step, force=force, metrics=metrics,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                data=ocp.args.JsonSave(data_state),
                                model=ocp.args.JsonSave(model)))

  def best(self) -> tuple[int, dict] | None:
    """(step, metrics) of the best checkpoint by best_metric, or None."""
    step = self.manager.best_step()
    metrics = self.manager.metrics(step) if step is not None else None
    return (step, metrics) if metrics else None

  def read_model(self, step: int) -> dict:
    return self.manager.restore(
        step, args=ocp.args.Composite(model=ocp.args.JsonRestore()))["model"]

  def check_model(self, step: int, model: dict) -> None:
    """Refuses to resume a run whose checkpoint was written for another model shape."""
    saved = self.read_model(step)
    diffs = {k: (saved.get(k), model.get(k)) for k in set(saved) | set(model)
             if saved.get(k) != model.get(k)}
    if diffs:
      listing = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}"
                          for k, (a, b) in sorted(diffs.items()))
      raise CheckpointMismatchError(
          f"{self.directory} holds a checkpoint (step {step}) of a different model ({listing}). "
          f"Nothing was overwritten. Use a new --workdir, or run with the config that "
          f"wrote it.")

  def restore_latest_good(self, abstract_state, model: dict):
    """(step, state, data_state) from the newest checkpoint that is complete and readable,
    or None. A broken one (no commit marker, unreadable file) is moved aside to
    <step>.broken — kept for inspection, never deleted — with a warning, and the previous
    one is tried."""
    for step in sorted(self.all_steps(), reverse=True):
      step_dir = self.directory / str(step)
      try:
        if not (step_dir / "commit_success.txt").is_file():
          raise ValueError("no commit marker (the save never finished)")
        self.check_model(step, model)
        state, data_state = self.restore(step, abstract_state)
        return step, state, data_state
      except CheckpointMismatchError:
        raise
      except Exception as e:  # any failure to read means this checkpoint is unusable
        aside = step_dir.with_name(f"{step}.broken")
        log.warning("Checkpoint %s is incomplete or corrupt (%s: %s); moved to %s, trying "
                    "the previous one.", step_dir, type(e).__name__, str(e)[:300], aside)
        print(f"WARNING: checkpoint {step_dir} is incomplete or corrupt "
              f"({type(e).__name__}: {str(e)[:200]}); moved aside to {aside.name}.",
              flush=True)
        if jax.process_index() == 0:
          step_dir.rename(aside)
        self.manager.reload()
    return None

  def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
    """Restores onto the shardings carried by `abstract_state` (any mesh)."""
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
