"""Step 3 of pruning: masks from unit importance (one keep count), applied to both networks.

Every group keeps its `keep_count` most important units (ties: the lower unit id; with
`round_to` N > 1 the count rounded up to a multiple of N, at most the group); a
mask multiplies the producing convs' output channels and their BN scale and offset, so
masked channels are exactly zero everywhere (BN statistics are untouched: a zero
channel stays zero in train and eval mode). All mask functions are pure jit
transforms: params, ratios, importance inputs and the supernet's arc and group arrays
may be traced; plans are static.

  supernet_masks(plan, params, arc, ratios, groups, ...)  -> per-space masks + Kept
  child_masks(plan, params, ratios, ...)                  -> {'units': f32 [U]}
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fp_jax.models import slot_ops
from fp_jax.models import graph
from fp_jax.models import space
from fp_jax.models import supernet
from fp_jax.pruning import groups as groups_lib
from fp_jax.pruning import importance


def keep_count(size, ratio, xp=jnp, round_to=1):
  """Units a group of `size` keeps at `ratio` (the one count of every mask and width):
  k = max(1, round((1 - ratio) * size)) in float32 with rounding half to even; with
  round_to N > 1 (a static int: compress.round_to / search.round_to) k rounded up to a
  multiple of N and capped at the group: min(size, N * ceil(k / N)) -- never fewer
  units than the ratio asks, ratio 0 still keeps all, and a group the cap stops (size
  below N or not a multiple of it) is kept whole. N 1 is k exactly. int32,
  elementwise; xp=np computes the same on the host."""
  kept = xp.round((xp.float32(1) - xp.asarray(ratio, xp.float32)) * xp.asarray(size, xp.float32))
  kept = xp.maximum(1, kept).astype(xp.int32)
  n = int(round_to)
  if n < 1:
    raise ValueError(f"round_to={round_to}: must be an integer >= 1")
  if n == 1:
    return kept
  return xp.minimum(xp.asarray(size).astype(xp.int32), (kept + (n - 1)) // n * n)


def unit_masks(unit_imp, unit_group, group_size, group_stage, group_fixed, ratios, xp=jnp,
               round_to=1):
  """0/1 f32 [U]: each group keeps its top keep_count(size, ratios[group_stage], round_to)
  units by `unit_imp` [U] (ties: the lower unit id); fixed groups keep all. All arguments
  but round_to (a static int) may be traced (shapes static); xp=np computes the same on
  the host."""
  u = unit_imp.shape[0]
  ratio = xp.asarray(ratios, xp.float32)[xp.asarray(group_stage)]
  size = xp.asarray(group_size)
  keep = xp.where(xp.asarray(group_fixed), size, keep_count(size, ratio, xp, round_to))
  unit_group = xp.asarray(unit_group)
  idx = xp.arange(u)
  order = xp.lexsort((idx, -unit_imp, unit_group))        # by group, then importance
  start = xp.cumsum(size) - size
  rank = (idx - start[unit_group[order]])[xp.argsort(order)]   # rank within the group
  return (rank < keep[unit_group]).astype(xp.float32)


def mask_producer(p, m):
  """Zeroes masked output channels of a conv+BN producer (1x1/stem or factorized)."""
  out = {"bn": {"scale": p["bn"]["scale"] * m, "bias": p["bn"]["bias"] * m}}
  if "conv" in p:
    out["conv"] = p["conv"] * m
  else:
    h = p["conv1"].shape[-1]
    out["conv1"], out["conv2"] = p["conv1"] * m[:h], p["conv2"] * m[h:]
  return out


def mask_sep(p, inner, outer):
  """Masks a sep_conv: inner group on pw1/bn1 (and dw2), output group on pw2/bn2."""
  p = dict(p)
  p["pw1"], p["dw2"], p["pw2"] = p["pw1"] * inner, p["dw2"] * inner, p["pw2"] * outer
  p["bn1"] = {"scale": p["bn1"]["scale"] * inner, "bias": p["bn1"]["bias"] * inner}
  p["bn2"] = {"scale": p["bn2"]["scale"] * outer, "bias": p["bn2"]["bias"] * outer}
  return p


# ---------------------------------------------------------------- the supernet


def supernet_masks(plan, params, arc, ratios, groups, criterion="l1", grads=None, key=None,
                   round_to=1):
  """Masks of the sampled architecture, one per space of supernet.space_table: {'stem':
  [3F], 'cells': [{'calib_x'?, 'calib_y'?, 'reduce'?: [F], 'node': [5, F], 'out',
  'inner': [5, 2, F], 'final': [F]}], 'units': [N] (the mask of every unit id),
  'kept': supernet.Kept (the channels every space keeps, f32)}. arc int32 [40], ratios
  f32 [5] (one per stage), groups: groups.supernet_groups(plan, arc); criterion: one of
  importance.CRITERIA (grads / key: what it needs); round_to: keep_count's (static;
  search.round_to)."""
  imp = importance.supernet_units(plan, params, arc, groups, criterion, grads, key)
  units = unit_masks(imp, groups["unit_group"], groups["group_size"], groups["group_stage"],
                     groups["group_fixed"], ratios, round_to=round_to)
  flat, off, of = units[groups["unit_of"]], 0, {}
  for key, width, _ in supernet.space_table(plan):       # unit_of follows the table
    of[key], off = flat[off:off + width], off + width
  nodes = range(space.NUM_NODES)
  masks = {"stem": of["stem"], "cells": [], "units": units}
  for spec in plan.cells:
    i = spec.index
    m = {name: of[(name, i)] for name in ("calib_x", "calib_y", "reduce") if (name, i) in of}
    m["node"] = jnp.stack([of[("node", i, k)] for k in nodes])
    for kind in ("out", "inner"):
      m[kind] = jnp.stack([jnp.stack([of[(kind, i, k, s)] for s in range(2)]) for k in nodes])
    m["final"] = of[("final", i)]
    masks["cells"].append(m)
  masks["kept"] = supernet.Kept(jnp.sum(masks["stem"]), tuple(
      supernet.CellKept(**{k: jnp.sum(m[k], -1) if k in m else None
                           for k in supernet.CellKept._fields}) for m in masks["cells"]))
  return masks


def apply_supernet_masks(plan, params, arc, masks):
  """Supernet params with the sampled architecture's masked channels zeroed.

  Each stacked sep_conv leaf [5, 2, inputs, ..., C] is multiplied by a mask that is
  the slot's mask at the chosen input and 1 elsewhere.
  """
  out = dict(params)
  out["stem"] = mask_producer(params["stem"], masks["stem"])
  out["cells"] = []
  for spec in plan.cells:
    idx, _ = supernet.slots(supernet.cell_arc(arc, spec))
    m, cp = masks["cells"][spec.index], params["cells"][spec.index]
    new = dict(cp)
    for name in ("calib_x", "calib_y", "reduce"):
      if name in m:
        new[name] = mask_producer(cp[name], m[name])
    sets = cp["sep3"]["bn1"]["scale"].shape[2]
    onehot = jax.nn.one_hot(slot_ops.weight_index(idx, sets), sets)[..., None]
    inner = 1.0 + onehot * (m["inner"][:, :, None, :] - 1.0)            # [5, 2, inputs, F]
    outer = 1.0 + onehot * (m["out"][:, :, None, :] - 1.0)
    for name in ("sep3", "sep5"):
      p = cp[name]
      kernel = lambda w, mult: w * mult[:, :, :, None, None, None, :]
      new[name] = dict(p, pw1=kernel(p["pw1"], inner), dw2=kernel(p["dw2"], inner),
                       pw2=kernel(p["pw2"], outer),
                       bn1={"scale": p["bn1"]["scale"] * inner, "bias": p["bn1"]["bias"] * inner},
                       bn2={"scale": p["bn2"]["scale"] * outer, "bias": p["bn2"]["bias"] * outer})
    mf = m["final"]
    new["final"] = {"w": cp["final"]["w"] * mf,
                    "bn": {"scale": cp["final"]["bn"]["scale"] * mf,
                           "bias": cp["final"]["bn"]["bias"] * mf}}
    out["cells"].append(new)
  return out


# ---------------------------------------------------------------- the fixed network


def child_masks(plan, params, ratios, criterion="l1", grads=None, key=None, round_to=1):
  """{'units': f32 [U]} of the fixed network `plan` (units of groups.child_groups):
  each group keeps its top keep_count units. ratios f32 [5] (one per stage, may be
  traced); criterion: one of importance.CRITERIA (grads / key: what it needs); round_to:
  keep_count's (static; compress.round_to)."""
  g, _ = groups_lib.child_groups(plan)
  imp = importance.child_units(plan, params, criterion, grads, key)
  return {"units": unit_masks(imp, g.unit_group, g.group_size, g.group_stage, g.group_fixed,
                              ratios, round_to=round_to)}


def keep_all(plan):
  """child_masks' layout with every unit kept: {'units': f32 [U] of ones}."""
  g, _ = groups_lib.child_groups(plan)
  return {"units": np.ones(len(g.unit_group), np.float32)}


def value_mask(plan, masks, space_index):
  """0/1 mask [C] of one space of the fixed network (node index, or a sep inner space)."""
  return masks["units"][groups_lib.child_groups(plan)[0].unit_of[space_index]]


def apply_child_masks(plan, params, masks):
  """Params with masked channels' producing filters and BN scale/offset zeroed."""
  _, inner = groups_lib.child_groups(plan)
  blocks = dict(params["blocks"])
  for j, n in graph.param_nodes(plan):
    m = value_mask(plan, masks, j)
    if n.kind == "sep":
      blocks[n.name] = mask_sep(blocks[n.name], value_mask(plan, masks, inner[n.name]), m)
    else:
      blocks[n.name] = mask_producer(blocks[n.name], m)
  return {**params, "blocks": blocks}
