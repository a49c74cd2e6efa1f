"""Masks held in optimizer state and applied after every update (jaxpruner's idea).

`hold_masks(tx, masks, apply_masks)` wraps an optax transform: its state keeps
the (fixed) masks, and the updates it returns take params to
apply_masks(params + inner updates, masks). A masked entry therefore ends every
step at exactly 0.0 (p + (0 - p) == 0 in floating point), so compaction after
fine-tuning removes only zeros.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax


class MaskedState(NamedTuple):
  inner: Any        # the wrapped transform's state
  masks: Any        # pytree of 0/1 masks (masks.child_masks layout)


def hold_masks(tx, masks, apply_masks):
  """tx: optax transform; apply_masks(params, masks) -> params with masked channels zero.

  The returned transform's update reads the masks from its state only, so one
  compiled step serves any masks; extra keyword arguments go to `tx`.
  """
  def init(params):
    return MaskedState(tx.init(params), masks)

  def update(updates, state, params, **extra_args):
    inner_updates, inner = tx.update(updates, state.inner, params, **extra_args)
    new = apply_masks(optax.apply_updates(params, inner_updates), state.masks)
    return jax.tree.map(lambda n, p: n - p, new, params), MaskedState(inner, state.masks)

  return optax.GradientTransformationExtraArgs(init, update)
