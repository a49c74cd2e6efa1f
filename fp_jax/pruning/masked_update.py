"""Masks held in optimizer state and applied at every update (jaxpruner's idea).

`hold_masks(tx, masks, apply_masks)` wraps an optax transform: its state keeps
the (fixed) masks, and the updates it returns are the inner transform's where
apply_masks keeps an entry and -params where it zeroes one. After
optax.apply_updates a masked entry is exactly 0.0 (p + -p == 0 in floating
point), so compaction after fine-tuning removes only zeros, and a kept entry is
exactly params + inner update. With masks of all ones (masks.keep_all) the
transform is the unmasked one, op for op, so the final stage trains with them
and shares its compiled step with the compress stage's fine-tuning (trainer.py);
XLA fuses that step differently from an unmasked one, so its rounding differs in
the last bit of a few entries.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class MaskedState(NamedTuple):
  inner: Any        # the wrapped transform's state
  masks: Any        # pytree of 0/1 masks (masks.child_masks layout)


def hold_masks(tx, masks, apply_masks):
  """tx: optax transform; apply_masks(params, masks) -> params with masked entries zeroed
  (by multiplying with 0/1 masks).

  The returned transform's update reads the masks from its state only, so one
  compiled step serves any masks; extra keyword arguments go to `tx`.
  """
  def init(params):
    return MaskedState(tx.init(params), masks)

  def update(updates, state, params, **extra_args):
    inner_updates, inner = tx.update(updates, state.inner, params, **extra_args)
    kept = apply_masks(jax.tree.map(jnp.ones_like, params), state.masks)
    held = jax.tree.map(lambda u, p, k: jnp.where(k != 0, u, -p), inner_updates, params, kept)
    return held, MaskedState(inner, state.masks)

  return optax.GradientTransformationExtraArgs(init, update)
