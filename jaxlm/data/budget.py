"""Malformed rows: counted with where they are, tolerated up to data.error_budget."""
from __future__ import annotations

import logging

from jaxlm.data.sources import DataError

log = logging.getLogger(__name__)

SHOWN = 10  # problems listed in messages and kept in the cache's metadata


def check_budget_value(budget) -> None:
  if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 0 or (
      isinstance(budget, float) and budget > 1):
    raise DataError(f"data.error_budget must be a count (int >= 0) or a fraction (float in "
                    f"[0, 1]) of malformed rows, not {budget!r}.")


class Problems:
  """Rows read and the malformed ones among them (the first few with file:line and reason)."""

  def __init__(self):
    self.rows = 0
    self.malformed = 0
    self.first: list[str] = []

  def add(self, where: str, reason: str) -> None:
    self.malformed += 1
    if len(self.first) < SHOWN:
      self.first.append(f"{where}: {reason}")

  def report(self) -> dict:
    return {"rows": self.rows, "malformed": self.malformed, "first": self.first}


def enforce(report: dict, budget) -> None:
  """Raises if the malformed rows exceed the budget (an int: how many rows; a float: which
  fraction of rows); logs the skipped ones otherwise. Also run on a reused cache, so a
  tightened budget applies to data tokenized before."""
  check_budget_value(budget)
  rows, bad = report["rows"], report["malformed"]
  if not bad:
    return
  allowed = budget if isinstance(budget, int) else int(budget * rows)
  listing = "\n  ".join(report["first"]) + ("\n  ..." if bad > len(report["first"]) else "")
  summary = f"{bad} of {rows} rows ({bad / max(rows, 1):.2%}) are malformed"
  if bad > allowed:
    raise DataError(f"{summary}, more than data.error_budget = {budget!r} allows. First "
                    f"problems:\n  {listing}\nFix the data, or raise data.error_budget (a count, "
                    f"or a fraction such as 0.01) to skip them.")
  log.warning("%s and are skipped (data.error_budget = %r):\n  %s", summary, budget, listing)
