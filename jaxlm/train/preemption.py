"""SIGTERM / SIGINT (preemption, Ctrl-C): finish the current step, agree across processes on
where to stop, save, and exit with PREEMPTED_EXIT_CODE so schedulers can requeue."""
from __future__ import annotations

import signal
import threading

import jax
import numpy as np

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: try again later


class Preempted(Exception):

  def __init__(self, step: int, checkpoint_dir):
    super().__init__(f"Stopped by a signal after step {step}; checkpoint saved in "
                     f"{checkpoint_dir}. Run the same command to resume.")
    self.step = step


class PreemptionWatch:

  def __init__(self, check_every: int):
    # Multi-process runs must agree on the step, which costs a collective: check every N.
    self.check_every = max(check_every, 1)
    self.requested = False
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._on_signal)

  def _on_signal(self, signum, frame):
    self.requested = True
    # A second Ctrl-C / SIGTERM acts immediately.
    signal.signal(signum, self._previous.get(signum) or signal.SIG_DFL)

  def should_stop(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.requested
    if step % self.check_every:
      return False
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
    return bool(np.max(flags))

  def close(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
