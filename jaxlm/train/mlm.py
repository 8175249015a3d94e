"""Masked-language-model pretraining pieces, pure and jittable: BERT's token corruption and
the loss on the corrupted positions."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from jaxlm.train.loss import cross_entropy


def mask_tokens(rng: jax.Array, input_ids: jax.Array, *, mask_token_id: int, vocab_size: int,
                special_ids: Sequence[int], rate: float = 0.15, mask_fraction: float = 0.8,
                random_fraction: float = 0.1) -> dict[str, jax.Array]:
  """BERT's corruption: each token not in special_ids ([CLS], [SEP], padding...) is chosen
  with probability `rate`; a chosen token becomes [MASK] with probability mask_fraction, a
  uniformly random token with probability random_fraction, and stays itself otherwise.

  -> {"input_ids": corrupted ids, "targets": the original ids, "loss_mask": 1 where chosen},
  the batch layout of the decoder's train step. The same rng gives the same corruption."""
  choose_rng, kind_rng, token_rng = jax.random.split(rng, 3)
  special = jnp.isin(input_ids, jnp.asarray(special_ids, input_ids.dtype))
  chosen = jax.random.bernoulli(choose_rng, rate, input_ids.shape) & ~special
  # One uniform draw per token makes [MASK], random and unchanged mutually exclusive.
  kind = jax.random.uniform(kind_rng, input_ids.shape)
  to_mask = chosen & (kind < mask_fraction)
  to_random = chosen & (kind >= mask_fraction) & (kind < mask_fraction + random_fraction)
  random_ids = jax.random.randint(token_rng, input_ids.shape, 0, vocab_size, input_ids.dtype)
  corrupted = jnp.where(to_mask, jnp.asarray(mask_token_id, input_ids.dtype),
                        jnp.where(to_random, random_ids, input_ids))
  return {"input_ids": corrupted, "targets": input_ids, "loss_mask": chosen.astype(jnp.int32)}


def mlm_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
  """Mean cross-entropy over the chosen positions only (transformers' loss with labels -100
  elsewhere); 0 when nothing is chosen."""
  sums = cross_entropy(logits, targets, loss_mask)
  return sums["loss_sum"] / jnp.maximum(sums["tokens"], 1.0)
