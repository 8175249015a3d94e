"""Named rematerialisation policies: what a layer keeps for the backward pass."""
from __future__ import annotations

import jax

_cp = jax.checkpoint_policies
POLICIES = {
    "none": None,  # no remat: keep every activation
    "full": _cp.nothing_saveable,  # recompute the whole layer
    "dots": _cp.checkpoint_dots,  # keep every matmul output
    "minimal": _cp.dots_with_no_batch_dims_saveable,  # keep projections, recompute attention
}


def remat(fn, policy_name: str, *, prevent_cse: bool):
  if policy_name not in POLICIES:
    raise ValueError(f"Unknown remat_policy {policy_name!r}; choose one of {', '.join(POLICIES)}")
  if policy_name == "none":
    return fn
  return jax.checkpoint(fn, policy=POLICIES[policy_name], prevent_cse=prevent_cse)
