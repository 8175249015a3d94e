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


def float32_logits(equation: str, x: jax.Array, w: jax.Array) -> jax.Array:
  """einsum(equation, x, w in x's dtype) accumulated and returned in float32, for a float32
  loss. Its backward multiplies in x's dtype: the float32 cotangent is rounded to it first,
  as every other projection's cotangent is, where autodiff would promote the two backward
  matmuls (over the whole vocabulary, for a language-model head) to float32.

  w's gradient, accumulated in float32, is returned in w's own dtype, and the backward
  keeps w's cast copy, so devices gather w in x's dtype either way. Embedding.attend passes
  the float32 master table: its gradient then meets the lookup's float32 one before the two
  are summed across devices, and the table's gradient crosses them once, not twice
  (planned: Llama 3.2 1B, data=8, 6.60 -> 4.88 GiB per step). An untied head is passed in
  the compute dtype: in float32 its gradient held 1 GiB more temp on Llama 3 8B, data=8,
  for no saving."""
  return _einsum(equation, jnp.dtype(jnp.float32), jnp.dtype(w.dtype), x, w)


def einsum_float32_weight_grad(equation: str, x: jax.Array, kernel: jax.Array) -> jax.Array:
  """einsum(equation, x, kernel cast to x's dtype), as autodiff would compute it, except
  that the kernel's gradient leaves its matmul in float32 (then the kernel's own dtype),
  not in x's dtype. The sum over the batch that the matmul does is split across the
  devices that share the batch, and XLA adds the pieces where the matmul returns them, so
  this is what makes that cross-device sum run in float32."""
  return _einsum(equation, jnp.dtype(x.dtype), jnp.dtype(kernel.dtype), x, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _einsum(equation, out_dtype, w_dtype, x, w):
  """einsum(equation, x, w cast to x's dtype) in out_dtype; in the backward, x's gradient
  in x's dtype and w's accumulated in float32, returned in w_dtype (w's own)."""
  return jnp.einsum(equation, x, w.astype(x.dtype), preferred_element_type=out_dtype)


def _einsum_forward(equation, out_dtype, w_dtype, x, w):
  cast = w.astype(x.dtype)
  return jnp.einsum(equation, x, cast, preferred_element_type=out_dtype), (x, cast)


def _einsum_backward(equation, out_dtype, w_dtype, residuals, cotangent):
  x, w = residuals
  x_equation, w_equation = _gradient_equations(equation)
  cotangent = cotangent.astype(x.dtype)
  dx = jnp.einsum(x_equation, cotangent, w, preferred_element_type=out_dtype)
  dw = jnp.einsum(w_equation, x, cotangent, preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dw.astype(w_dtype)


_einsum.defvjp(_einsum_forward, _einsum_backward)


def _gradient_equations(equation: str) -> tuple[str, str]:
  """For y = einsum(equation, x, w): the einsums of x's and w's gradients from y's."""
  inputs, out = equation.split("->")
  x_axes, w_axes = inputs.split(",")
  return f"{out},{w_axes}->{x_axes}", f"{x_axes},{out}->{w_axes}"


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
  compute_dtype; with float32_weight_grads their gradients leave the matmuls in float32
  (einsum_float32_weight_grad)."""

  def __init__(self, equation: str, shape: tuple[int, ...], names: LogicalAxes, *,
               rngs: nnx.Rngs, param_dtype, compute_dtype, init_std: float,
               bias_shape: tuple[int, ...] | None = None, bias_names: LogicalAxes = (),
               float32_weight_grads: bool = False):
    self.equation = equation
    self.compute_dtype = compute_dtype
    self.float32_weight_grads = float32_weight_grads
    self.kernel = param(init_std * jax.random.normal(rngs.params(), shape, param_dtype), names)
    self.bias = (param(jnp.zeros(bias_shape, param_dtype), bias_names)
                 if bias_shape is not None else None)
    # Without an adapter these stay None: no state, and the same parameters as before.
    # Data (not static) attributes, so that apply_lora can set them later.
    self.lora_a, self.lora_b, self.lora_salt = nnx.data(None), nnx.data(None), nnx.data(None)
    self.lora_scale = self.lora_dropout_rate = 0.0

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.compute_dtype)
    y = self._project(self.equation, x, self.kernel[...])
    if self.bias is not None:
      y = add_bias(y, self.bias[...])
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
    low = self._project(down, x, self.lora_a[...])
    return self.lora_scale * self._project(up, low, self.lora_b[...])

  def _project(self, equation: str, x: jax.Array, kernel: jax.Array) -> jax.Array:
    if not self.float32_weight_grads:
      return jnp.einsum(equation, x, kernel.astype(self.compute_dtype))
    return einsum_float32_weight_grad(equation, x, kernel)


def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """y + bias in y's dtype, added in float32: the bias's gradient is a sum over every token
  of the batch, and summed in bfloat16 that is 0.7% off at 16k tokens
  (tests/test_precision.py)."""
  return (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(y.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _take_rows(table: jax.Array, ids: jax.Array, dtype) -> jax.Array:
  """table[ids] in dtype, whose gradient is scatter-added into the table in the table's own
  dtype (float32 master weights), not in dtype: a frequent token's row sums thousands of
  contributions, and summed in bfloat16 they are off by several percent
  (tests/test_precision.py). The rows are gathered in dtype, so what moves between devices
  in the forward (the rows of a table split over vocab) stays as small as before."""
  return jnp.take(table.astype(dtype), ids, axis=0)


def _take_rows_forward(table, ids, dtype):
  return _take_rows(table, ids, dtype), (table, ids)


def _take_rows_backward(dtype, residuals, cotangent):
  table, ids = residuals
  return jnp.zeros_like(table).at[ids].add(cotangent.astype(table.dtype)), None


_take_rows.defvjp(_take_rows_forward, _take_rows_backward)


def lookup(table: jax.Array, ids: jax.Array, dtype) -> jax.Array:
  """The rows of an embedding table [rows, embed] at ids [batch, seq], in dtype, with the
  table's gradient summed in its own dtype (_take_rows).

  Each device looks up its slice of the embedding dimension, as the table is laid out, for
  its share of the batch over the mesh axes that slice leaves free; the caller's constraint
  then moves the rows into the activations' layout. The gradient takes the same way back:
  without this, on a data x fsdp mesh XLA's partitioner finds no way to scatter the
  cotangent into the table's layout but to replicate the whole batch's activations on every
  device. ("embed" comes first so that it claims its mesh axes before the batch does.)
  """
  rows = _take_rows(table, ids, dtype)
  by_slice = constrain(jnp.moveaxis(rows, -1, 0), ("embed", "act_batch", "act_length"))
  return jnp.moveaxis(by_slice, 0, -1)


class Embedding(nnx.Module):

  def __init__(self, vocab_size: int, dim: int, *, rngs: nnx.Rngs, param_dtype,
               compute_dtype, init_std: float):
    self.compute_dtype = compute_dtype
    self.table = param(init_std * jax.random.normal(rngs.params(), (vocab_size, dim),
                                                    param_dtype), ("vocab", "embed"))

  def __call__(self, ids: jax.Array) -> jax.Array:
    return lookup(self.table[...], ids, self.compute_dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """Output projection with the embedding matrix (tied embeddings); logits in float32,
    the table's gradient in float32 (see float32_logits)."""
    return float32_logits("btd,vd->btv", x, self.table[...])
