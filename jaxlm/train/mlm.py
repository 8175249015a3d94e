"""Masked-language-model pretraining pieces, pure and jittable: BERT's token corruption and
the loss on the corrupted positions, and the corruption of a training batch (`MLM`,
`corrupt_batch`) that the train step applies with its own key, so every step draws a new
mask, the same one again on a resume."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from jaxlm.train.loss import cross_entropy


def mask_tokens(rng: jax.Array, input_ids: jax.Array, *, mask_token_id: int, vocab_size: int,
                special_ids: Sequence[int], rate: float = 0.15, mask_fraction: float = 0.8,
                random_fraction: float = 0.1,
                maskable: jax.Array | None = None) -> dict[str, jax.Array]:
  """BERT's corruption: each token not in special_ids ([CLS], [SEP], padding...) is chosen
  with probability `rate`; a chosen token becomes [MASK] with probability mask_fraction, a
  uniformly random token with probability random_fraction, and stays itself otherwise.

  -> {"input_ids": corrupted ids, "targets": the original ids, "loss_mask": 1 where chosen},
  the batch layout of the decoder's train step. The same rng gives the same corruption.
  maskable: bool like input_ids, False where nothing may be chosen (padding)."""
  choose_rng, kind_rng, token_rng = jax.random.split(rng, 3)
  special = jnp.isin(input_ids, jnp.asarray(special_ids, input_ids.dtype))
  if maskable is not None:
    special = special | ~maskable
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


MASK_TOKENS = ("[MASK]", "<mask>")


@dataclasses.dataclass(frozen=True)
class MLM:
  """How the train and eval steps corrupt a batch (hashable: a static jit argument)."""
  mask_token_id: int
  vocab_size: int
  special_ids: tuple[int, ...]
  rate: float = 0.15
  mask_fraction: float = 0.8
  random_fraction: float = 0.1
  eval_seed: int = 0


def corrupt_batch(rng: jax.Array, batch: dict, mlm: MLM) -> dict:
  """A data batch (input_ids, segment_ids, ...) -> the same batch with corrupted input_ids,
  the original tokens as targets and loss_mask on the chosen tokens only: special tokens
  and padding (segment 0) are never chosen."""
  corrupted = mask_tokens(rng, batch["input_ids"], mask_token_id=mlm.mask_token_id,
                          vocab_size=mlm.vocab_size, special_ids=mlm.special_ids,
                          rate=mlm.rate, mask_fraction=mlm.mask_fraction,
                          random_fraction=mlm.random_fraction,
                          maskable=batch["segment_ids"] > 0)
  return dict(batch, **corrupted)


def eval_key(mlm: MLM, input_ids: jax.Array) -> jax.Array:
  """A key fixed by the eval seed and the batch's content: every evaluation masks a batch the
  same way (eval_loss compares across steps), and different batches differently."""
  weights = jnp.arange(1, input_ids.size + 1, dtype=jnp.uint32).reshape(input_ids.shape)
  content = jnp.sum(input_ids.astype(jnp.uint32) * weights)
  return jax.random.fold_in(jax.random.PRNGKey(mlm.eval_seed), content)


def tokenizer_mlm(tokenizer, vocab_size: int, *, what: str, rate: float = 0.15,
                  mask_fraction: float = 0.8, random_fraction: float = 0.1) -> MLM:
  """The MLM settings for a `tokenizers.Tokenizer`: its mask token, and its special tokens
  ([CLS], [SEP], [PAD], [UNK], [MASK] / <s>, </s>, ...) as never chosen. what: where the
  tokenizer comes from, for the error message."""
  mask_id = next((tokenizer.token_to_id(t) for t in MASK_TOKENS
                  if tokenizer.token_to_id(t) is not None), None)
  if mask_id is None:
    raise ValueError(
        f"The tokenizer {what} has no mask token ({' or '.join(MASK_TOKENS)}), which masked-LM "
        f"training needs: set data.tokenizer to a BERT / RoBERTa tokenizer (e.g. the model "
        f"directory of model.init_from).")
  special = sorted(i for i, token in tokenizer.get_added_tokens_decoder().items()
                   if token.special)
  return mlm_settings(mask_id, special, vocab_size, rate=rate, mask_fraction=mask_fraction,
                      random_fraction=random_fraction)


def mlm_settings(mask_id: int, special_ids, vocab_size: int, *, rate: float = 0.15,
                 mask_fraction: float = 0.8, random_fraction: float = 0.1) -> MLM:
  """MLM settings from token ids, with the rates checked."""
  if not 0 < rate < 1 or mask_fraction < 0 or random_fraction < 0 or (
      mask_fraction + random_fraction > 1):
    raise ValueError(f"mlm.rate must be in (0, 1) and mlm.mask_fraction + mlm.random_fraction "
                     f"at most 1 (both >= 0); got {rate}, {mask_fraction}, {random_fraction}.")
  return MLM(int(mask_id), int(vocab_size), tuple(special_ids), float(rate),
             float(mask_fraction), float(random_fraction))
