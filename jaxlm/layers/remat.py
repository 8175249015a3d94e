"""Named rematerialisation policies: what a layer keeps for the backward pass."""
from __future__ import annotations

import functools

import jax

_cp = jax.checkpoint_policies

# jax's cuDNN fused attention forward: its outputs (the attention output and the softmax
# statistics) are all its backward reads. The Pallas kernels keep theirs inside a
# custom_vjp, out of a policy's reach, and XLA's attention has no single output to keep.
_CUDNN_ATTENTION_FORWARD = ("dot_product_attention_fwd_wrapper", "dot_product_attention_fwd")


def _cudnn_attention_saveable(prim, *_, **__) -> bool:
  return prim.name in _CUDNN_ATTENTION_FORWARD


POLICIES = {
    "none": None,  # no remat: keep every activation
    "full": _cp.nothing_saveable,  # recompute the whole layer
    "dots": _cp.checkpoint_dots,  # keep every matmul output
    "minimal": _cp.dots_with_no_batch_dims_saveable,  # keep projections, recompute attention
    # minimal, and cuDNN's attention forward is not run again in the backward
    "minimal_with_attention": _cp.save_from_both_policies(
        _cp.dots_with_no_batch_dims_saveable, _cudnn_attention_saveable),
}


@functools.cache
def recomputed(fn, static_argnums: tuple[int, ...] = ()):
  """fn under jax.checkpoint: recomputed in the backward from its inputs instead of keeping
  its intermediates. One wrapper per fn: modules keep it as a static attribute, and a new
  one per module would make two builds of the same model unequal graph definitions (and
  recompile what is jitted on them)."""
  return jax.checkpoint(fn, static_argnums=static_argnums)


def remat(fn, policy_name: str, *, prevent_cse: bool):
  if policy_name not in POLICIES:
    raise ValueError(f"Unknown remat_policy {policy_name!r}; choose one of {', '.join(POLICIES)}")
  if policy_name == "none":
    return fn
  return jax.checkpoint(fn, policy=POLICIES[policy_name], prevent_cse=prevent_cse)
