"""Projections and embeddings with logical axis names and separate param/compute dtypes."""
from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.layers.dropout import dropout
from jaxlm.layers.sharding import LogicalAxes, constrain, param


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def float32_logits(equation: str, x: jax.Array, w: jax.Array) -> jax.Array:
  """einsum(equation, x, w) accumulated and returned in float32, for a float32 loss. Its
  backward multiplies in x's dtype: the float32 cotangent is rounded to it first, as every
  other projection's cotangent is, where autodiff would promote the two backward matmuls
  (over the whole vocabulary, for a language-model head) to float32."""
  return jnp.einsum(equation, x, w, preferred_element_type=jnp.float32)


def _float32_logits_forward(equation, x, w):
  return float32_logits(equation, x, w), (x, w)


def _float32_logits_backward(equation, residuals, cotangent):
  x, w = residuals
  x_axes, w_axes = equation.split("->")[0].split(",")
  out_axes = equation.split("->")[1]
  cotangent = cotangent.astype(x.dtype)
  dx = jnp.einsum(f"{out_axes},{w_axes}->{x_axes}", cotangent, w,
                  preferred_element_type=jnp.float32)
  dw = jnp.einsum(f"{x_axes},{out_axes}->{w_axes}", x, cotangent,
                  preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dw.astype(w.dtype)


float32_logits.defvjp(_float32_logits_forward, _float32_logits_backward)


class LoRAParam(nnx.Param):
  """A low-rank adapter factor: its own type so optimizers and exports can select it."""


class LoRASalt(nnx.Variable):
  """Integers that make each adapter's (and each stacked layer's) dropout mask distinct:
  scanned layers share one module, so only sliced state can tell them apart."""


_lora_dropout_key: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar(
    "jaxlm_lora_dropout_key", default=None)


@contextlib.contextmanager
def lora_dropout(key: jax.Array | None):
  """Enables LoRA dropout for the calls inside the block. The model threads no rng down to
  its projections, so training code hands one key in here instead; without one (evaluation,
  generation) the adapters see their inputs undropped."""
  token = _lora_dropout_key.set(key)
  try:
    yield
  finally:
    _lora_dropout_key.reset(token)


class Einsum(nnx.Module):
  """y = einsum(equation, x, W) (+ b) (+ scale * einsum(einsum(x, A), B) with a LoRA
  adapter, see jaxlm/finetune/lora.py). Weights stored in param_dtype, used in
  compute_dtype."""

  def __init__(self, equation: str, shape: tuple[int, ...], names: LogicalAxes, *,
               rngs: nnx.Rngs, param_dtype, compute_dtype, init_std: float,
               bias_shape: tuple[int, ...] | None = None, bias_names: LogicalAxes = ()):
    self.equation = equation
    self.compute_dtype = compute_dtype
    self.kernel = param(init_std * jax.random.normal(rngs.params(), shape, param_dtype), names)
    self.bias = (param(jnp.zeros(bias_shape, param_dtype), bias_names)
                 if bias_shape is not None else None)
    # Without an adapter these stay None: no state, and the same parameters as before.
    # Data (not static) attributes, so that apply_lora can set them later.
    self.lora_a, self.lora_b, self.lora_salt = nnx.data(None), nnx.data(None), nnx.data(None)
    self.lora_scale = self.lora_dropout_rate = 0.0

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.compute_dtype)
    y = jnp.einsum(self.equation, x, self.kernel[...].astype(self.compute_dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.compute_dtype)
    if self.lora_a is not None:
      y = y + self._low_rank(x)
    return y

  def lora_equations(self) -> tuple[str, str]:
    """(x, A -> low, low, B -> y): the kernel letters shared with x are its inputs."""
    inputs, kernel = self.equation.split("->")[0].split(",")
    out = self.equation.split("->")[1]
    rank = next(c for c in "rzyxwvuqponmlkjihgfedcba" if c not in self.equation)
    ins = "".join(c for c in kernel if c in inputs)
    outs = "".join(c for c in kernel if c not in inputs)
    if kernel != ins + outs:
      # A and B are reshaped views of the kernel's leading (input) and trailing (output) axes.
      raise ValueError(f"LoRA needs the kernel's input axes before its output axes; "
                       f"{self.equation!r} interleaves them.")
    low = "".join(c for c in inputs if c not in ins) + rank
    return f"{inputs},{ins}{rank}->{low}", f"{low},{rank}{outs}->{out}"

  def _low_rank(self, x: jax.Array) -> jax.Array:
    key = _lora_dropout_key.get()
    if key is not None and self.lora_dropout_rate > 0.0:
      key = jax.random.fold_in(key, self.lora_salt[...])
      x = dropout(x, self.lora_dropout_rate, key)
    down, up = self.lora_equations()
    low = jnp.einsum(down, x, self.lora_a[...].astype(self.compute_dtype))
    y = jnp.einsum(up, low, self.lora_b[...].astype(self.compute_dtype))
    return self.lora_scale * y


def lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
  """The rows of an embedding table [rows, embed] at ids [batch, seq].

  Each device looks up its slice of the embedding dimension, as the table is laid out, for
  its share of the batch over the mesh axes that slice leaves free; the caller's constraint
  then moves the rows into the activations' layout. The gradient takes the same way back:
  without this, on a data x fsdp mesh XLA's partitioner finds no way to scatter the
  cotangent into the table's layout but to replicate the whole batch's activations on every
  device. ("embed" comes first so that it claims its mesh axes before the batch does.)
  """
  rows = jnp.take(table, ids, axis=0)
  by_slice = constrain(jnp.moveaxis(rows, -1, 0), ("embed", "act_batch", "act_length"))
  return jnp.moveaxis(by_slice, 0, -1)


class Embedding(nnx.Module):

  def __init__(self, vocab_size: int, dim: int, *, rngs: nnx.Rngs, param_dtype,
               compute_dtype, init_std: float):
    self.compute_dtype = compute_dtype
    self.table = param(init_std * jax.random.normal(rngs.params(), (vocab_size, dim),
                                                    param_dtype), ("vocab", "embed"))

  def __call__(self, ids: jax.Array) -> jax.Array:
    return lookup(self.table[...].astype(self.compute_dtype), ids)

  def attend(self, x: jax.Array) -> jax.Array:
    """Output projection with the embedding matrix (tied embeddings); logits in float32."""
    return float32_logits("btd,vd->btv", x, self.table[...].astype(self.compute_dtype))
