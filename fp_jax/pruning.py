"""Channel groups, importance and masks (fake pruning), as pure jit transforms.

Groups (DESIGN §6): the stem's 3F output channels (stage-0 ratio); per cell one
group of F channels shared by both calibrated inputs and every node output
(identity and pooling pass channels through, nodes add); per sep_conv its inner
channels (the first pointwise conv's output, same ratio as its cell).
A group keeps its top round((1 - ratio) * C) channels (at least one) by
importance: `l1` sums the L1 norms of the producing conv filters over the
group's producers, `bn` sums their BN |scale|. A mask multiplies the producing
convs' output channels and their BN scale and offset, so masked channels are
exactly zero everywhere. Ratios, masks and the arc are traced data: one
compilation serves every setting.

This module handles the supernet (arc traced); `compaction.py` the fixed net.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fp_jax import space

CRITERIA = ("l1", "bn")


def keep_mask(importance, ratio):
  """importance f32 [C], ratio scalar in [0, 1) -> f32 0/1 mask keeping the top."""
  c = importance.shape[0]
  keep = jnp.maximum(1, jnp.round((1.0 - ratio) * c)).astype(jnp.int32)
  rank = jnp.argsort(jnp.argsort(-importance, stable=True), stable=True)
  return (rank < keep).astype(jnp.float32)


def conv_l1(w):
  """Per-output-channel L1 norm of an HWIO kernel: [..., O] -> [O]."""
  return jnp.sum(jnp.abs(w), axis=tuple(range(w.ndim - 1)))


def producer_importance(p, criterion):
  """Importance of the output channels of a conv+BN producer {'conv'|'conv1','conv2', 'bn'}."""
  if criterion == "bn":
    return jnp.abs(p["bn"]["scale"])
  if "conv" in p:
    return conv_l1(p["conv"])
  return jnp.concatenate([conv_l1(p["conv1"]), conv_l1(p["conv2"])])


def mask_producer(p, m):
  """Zeroes masked output channels of a conv+BN producer (1x1/stem or factorized)."""
  out = {"bn": {"scale": p["bn"]["scale"] * m, "bias": p["bn"]["bias"] * m}}
  if "conv" in p:
    out["conv"] = p["conv"] * m
  else:
    h = p["conv1"].shape[-1]
    out["conv1"], out["conv2"] = p["conv1"] * m[:h], p["conv2"] * m[h:]
  return out


def sep_importance(p, criterion):
  """(inner importance [C], output importance [C]) of one sep_conv's params."""
  if criterion == "bn":
    return jnp.abs(p["bn1"]["scale"]), jnp.abs(p["bn2"]["scale"])
  return conv_l1(p["pw1"]), conv_l1(p["pw2"])


def mask_sep(p, inner, outer):
  """Masks a sep_conv: inner group on pw1/bn1 (and dw2), output group on pw2/bn2."""
  p = dict(p)
  p["pw1"], p["dw2"], p["pw2"] = p["pw1"] * inner, p["dw2"] * inner, p["pw2"] * outer
  p["bn1"] = {"scale": p["bn1"]["scale"] * inner, "bias": p["bn1"]["bias"] * inner}
  p["bn2"] = {"scale": p["bn2"]["scale"] * outer, "bias": p["bn2"]["bias"] * outer}
  return p


def _is_sep(op):
  return (op == space.SEP3) | (op == space.SEP5)


def _stacked_importance(p, criterion):
  """(inner, output) importance [5, 2, inputs, C] of a cell's stacked sep_conv params."""
  if criterion == "bn":
    return jnp.abs(p["bn1"]["scale"]), jnp.abs(p["bn2"]["scale"])
  l1 = lambda w: jnp.sum(jnp.abs(w), axis=(-4, -3, -2))   # HWIO kernels, keep O
  return l1(p["pw1"]), l1(p["pw2"])


def _slots(cell_arc):
  """(input idx [5, 2], op [5, 2]) of a traced cell arc [20]."""
  rows = cell_arc.reshape(space.NUM_NODES, 4)
  return rows[:, 0::2], rows[:, 1::2]


def supernet_masks(plan, params, arc, ratios, criterion="l1"):
  """Masks of the sampled architecture: {'stem': [3F], 'cells': [{'cell': [F],
  'inner': [5, 2, F]}]}. arc int32 [40], ratios f32 [5] (one per stage)."""
  masks = {"stem": keep_mask(producer_importance(params["stem"], criterion), ratios[0]),
           "cells": []}
  for spec in plan.cells:
    idx, op = _slots(arc[space.CELL_LEN:] if spec.reduce else arc[:space.CELL_LEN])
    ratio = ratios[spec.stage]
    onehot = jax.nn.one_hot(idx, params["cells"][spec.index]["sep3"]["bn1"]["scale"].shape[2])
    picked = [jnp.einsum("ksi,ksic->ksc", onehot, imp) for name in ("sep3", "sep5")
              for imp in _stacked_importance(params["cells"][spec.index][name], criterion)]
    is5 = (op == space.SEP5)[..., None]
    imp_in = jnp.where(is5, picked[2], picked[0])                        # [5, 2, F]
    imp_out = jnp.where(is5, picked[3], picked[1]) * _is_sep(op)[..., None]
    imp = sum(producer_importance(params["calib"][spec.index][j], criterion) for j in range(2))
    imp = imp + imp_out.sum(axis=(0, 1))
    inner = jax.vmap(jax.vmap(keep_mask, (0, None)), (0, None))(imp_in, ratio)
    masks["cells"].append({"cell": keep_mask(imp, ratio), "inner": inner})
  return masks


def apply_supernet_masks(plan, params, arc, masks):
  """Supernet params with the sampled architecture's masked channels zeroed.

  Each stacked sep_conv leaf [5, 2, inputs, ..., C] is multiplied by a mask that
  is the node's group mask at the chosen input and 1 elsewhere.
  """
  out = dict(params)
  out["stem"] = mask_producer(params["stem"], masks["stem"])
  out["calib"] = [[mask_producer(params["calib"][spec.index][j], masks["cells"][spec.index]["cell"])
                   for j in range(2)] for spec in plan.cells]
  out["cells"] = []
  for spec in plan.cells:
    idx, _ = _slots(arc[space.CELL_LEN:] if spec.reduce else arc[:space.CELL_LEN])
    m = masks["cells"][spec.index]
    cell_p = params["cells"][spec.index]
    onehot = jax.nn.one_hot(idx, cell_p["sep3"]["bn1"]["scale"].shape[2])[..., None]
    inner = 1.0 + onehot * (m["inner"][:, :, None, :] - 1.0)            # [5, 2, inputs, F]
    outer = 1.0 + onehot * (m["cell"] - 1.0)
    new = {}
    for name, p in cell_p.items():
      kernel = lambda w, mult: w * mult[:, :, :, None, None, None, :]
      new[name] = dict(p, pw1=kernel(p["pw1"], inner), dw2=kernel(p["dw2"], inner),
                       pw2=kernel(p["pw2"], outer),
                       bn1={"scale": p["bn1"]["scale"] * inner, "bias": p["bn1"]["bias"] * inner},
                       bn2={"scale": p["bn2"]["scale"] * outer, "bias": p["bn2"]["bias"] * outer})
    out["cells"].append(new)
  return out
