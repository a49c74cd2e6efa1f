"""Fake pruning and real channel removal for the fixed network (child.py).

Channel groups are the supernet's (DESIGN §6, pruning.py): the stem's 3F
outputs (stage-0 ratio); per cell one group of F channels shared by both
calibrations' outputs and every sep_conv's output (pw2/bn2); per sep_conv its
inner channels (pw1/bn1, the cell's ratio). Masks have the supernet's layout:

  {'stem': f32 [3F], 'cells': [{'cell': f32 [F_i], 'inner': f32 [5, 2, F_i]}]}

with all-ones inner rows for non-sep slots. `child_masks` and
`apply_child_masks` are pure jit transforms (params and ratios traced; plan
and arc static). `compact` gathers the kept channels of every producer and
consumer into smaller arrays (host side, masks concrete); the layers read all
widths from the parameter shapes, so the compact network runs with the same
`child.forward(plan, arc, ...)` and `flops.count(plan, arc, widths_of(masks))`
counts it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fp_jax import child
from fp_jax import network
from fp_jax import pruning
from fp_jax import space


def _is_sep(op):
  return op in (space.SEP3, space.SEP5)


def sep_slots(arc, spec):
  """[(node k, slot s)] of the sep_conv ops in the cell of `spec` (static arc)."""
  rows = child.cell_arc(np.asarray(arc), spec)
  return [(k, s) for k in range(space.NUM_NODES) for s in range(2)
          if _is_sep(int(rows[k, 2 * s + 1]))]


# ---------------------------------------------------------------- masks


def child_masks(plan, arc, params, ratios, criterion="l1"):
  """Masks keeping each group's top round((1 - ratio) * C) channels (>= 1).

  arc int [40] (static numpy), ratios f32 [5] (one per stage, may be traced),
  criterion 'l1' (producer filters' L1 norms summed over the group) or 'bn'
  (producer BN |scale| summed).
  """
  if criterion not in pruning.CRITERIA:
    raise ValueError(f"criterion must be one of {pruning.CRITERIA}, got {criterion!r}")
  ratios = jnp.asarray(ratios, jnp.float32)
  stem_imp = pruning.producer_importance(params["stem"], criterion)
  masks = {"stem": pruning.keep_mask(stem_imp, ratios[0]), "cells": []}
  for spec in plan.cells:
    ratio, cell_p = ratios[spec.stage], params["cells"][spec.index]
    imp = sum(pruning.producer_importance(params["calib"][spec.index][j], criterion)
              for j in range(2))
    ones = jnp.ones(imp.shape, jnp.float32)
    inner = [[ones, ones] for _ in range(space.NUM_NODES)]
    for k, s in sep_slots(arc, spec):
      imp_in, imp_out = pruning.sep_importance(cell_p["nodes"][k][s], criterion)
      imp = imp + imp_out
      inner[k][s] = pruning.keep_mask(imp_in, ratio)
    masks["cells"].append({"cell": pruning.keep_mask(imp, ratio),
                           "inner": jnp.stack([jnp.stack(row) for row in inner])})
  return masks


def apply_child_masks(plan, arc, params, masks):
  """Params with masked channels' producing filters and BN scale/offset zeroed.

  BN statistics are untouched: a zero channel stays zero in train and eval mode.
  """
  out = dict(params)
  out["stem"] = pruning.mask_producer(params["stem"], masks["stem"])
  out["calib"] = [[pruning.mask_producer(params["calib"][spec.index][j],
                                         masks["cells"][spec.index]["cell"])
                   for j in range(2)] for spec in plan.cells]
  out["cells"] = []
  for spec in plan.cells:
    m, cell_p = masks["cells"][spec.index], params["cells"][spec.index]
    nodes = [list(row) for row in cell_p["nodes"]]
    for k, s in sep_slots(arc, spec):
      nodes[k][s] = pruning.mask_sep(nodes[k][s], m["inner"][k, s], m["cell"])
    out["cells"].append({**cell_p, "nodes": nodes})
  return out


def _count(m):
  return int(np.sum(np.asarray(m) > 0.5))


def widths_of(masks):
  """Kept channels per group: {'stem': int, 'cells': [{'cell': int,
  'inner': [[int, int] x 5]}]} (the `widths` of flops.count)."""
  return {"stem": _count(masks["stem"]),
          "cells": [{"cell": _count(c["cell"]),
                     "inner": [[_count(c["inner"][k][s]) for s in range(2)]
                               for k in range(space.NUM_NODES)]}
                    for c in masks["cells"]]}


# ---------------------------------------------------------------- compaction


def _kept(m):
  """Sorted kept indices of a concrete 0/1 mask [C] -> int [K]."""
  return np.flatnonzero(np.asarray(m) > 0.5)


def _take(tree, idx, axis=-1):
  """Gathers `idx` along `axis` of every leaf on the host (None passes through)."""
  return jax.tree.map(lambda a: np.take(np.asarray(a), idx, axis=axis), tree)


def _compact_producer(p, s, in_idx, out_idx):
  """Conv+BN producer (1x1/3x3 conv or factorized reduce) restricted to input
  channels in_idx (None: all) and output channels out_idx of its BN."""
  def rows(w):
    return w if in_idx is None else _take(w, in_idx, axis=2)

  if "conv" in p:
    q = {"conv": _take(rows(p["conv"]), out_idx)}
  else:          # BN runs over concat(conv1 out, conv2 out): each half keeps its own
    h = p["conv1"].shape[-1]
    q = {"conv1": _take(rows(p["conv1"]), out_idx[out_idx < h]),
         "conv2": _take(rows(p["conv2"]), out_idx[out_idx >= h] - h)}
  q["bn"] = _take(p["bn"], out_idx)
  return q, (None if s is None else {**s, "bn": _take(s["bn"], out_idx)})


def _compact_sep(p, s, cell_idx, inner_idx):
  """sep_conv with outer (cell) channels cell_idx and inner channels inner_idx."""
  q = {"dw1": _take(p["dw1"], cell_idx),
       "pw1": _take(_take(p["pw1"], cell_idx, axis=2), inner_idx),
       "bn1": _take(p["bn1"], inner_idx),
       "dw2": _take(p["dw2"], inner_idx),
       "pw2": _take(_take(p["pw2"], inner_idx, axis=2), cell_idx),
       "bn2": _take(p["bn2"], cell_idx)}
  t = None if s is None else {"bn1": _take(s["bn1"], inner_idx),
                              "bn2": _take(s["bn2"], cell_idx)}
  return q, t


def compact(plan, arc, params, stats, masks):
  """(widths, params, stats) of the network holding only the kept channels.

  masks: concrete (host) masks as from child_masks; params may be masked or
  not (kept channels are unchanged by masking); stats may be None. A cell's
  output is the concat of its output nodes, each a segment in the cell's
  channel space, so its consumers (next calibrations, aux head, classifier)
  keep each segment's kept channels in order. Run the result with the same
  `child.forward(plan, arc, ...)`.
  """
  p, st = dict(params), (None if stats is None else dict(stats))
  stem_idx = _kept(masks["stem"])
  p["stem"], stem_s = _compact_producer(params["stem"], network.get(stats, "stem"), None, stem_idx)
  calib_p, calib_s, cells_p, cells_s = [], [], [], []
  prev = [stem_idx, stem_idx]    # kept channel indices of h(i-2), h(i-1)
  for spec in plan.cells:
    i, m = spec.index, masks["cells"][spec.index]
    cell_idx = _kept(m["cell"])
    pairs = [_compact_producer(params["calib"][i][j], network.get(stats, "calib", i, j), prev[j],
                               cell_idx) for j in range(2)]
    calib_p.append([q for q, _ in pairs])
    calib_s.append([t for _, t in pairs])
    nodes_p = [list(row) for row in params["cells"][i]["nodes"]]
    nodes_s = None if stats is None else [list(row) for row in stats["cells"][i]["nodes"]]
    for k, s in sep_slots(arc, spec):
      q, t = _compact_sep(nodes_p[k][s], network.get(nodes_s, k, s), cell_idx, _kept(m["inner"][k][s]))
      nodes_p[k][s] = q
      if nodes_s is not None:
        nodes_s[k][s] = t
    cells_p.append({**params["cells"][i], "nodes": nodes_p})
    cells_s.append(None if stats is None else {**stats["cells"][i], "nodes": nodes_s})
    f = np.asarray(m["cell"]).shape[0]
    n_out = len(space.output_nodes(child.cell_arc(np.asarray(arc), spec).reshape(-1)))
    out_idx = np.concatenate([cell_idx + n * f for n in range(n_out)])
    if i == plan.aux_index and "aux" in params:
      p["aux"] = {**params["aux"], "conv1": _take(params["aux"]["conv1"], out_idx, axis=2)}
    prev = [prev[1], out_idx]
  p["calib"], p["cells"] = calib_p, cells_p
  p["fc"] = {**params["fc"], "w": _take(params["fc"]["w"], prev[1], axis=0)}
  if st is not None:
    st["stem"], st["calib"], st["cells"] = stem_s, calib_s, cells_s
  return widths_of(masks), jax.tree.map(jnp.asarray, p), jax.tree.map(jnp.asarray, st)


def prune(plan, arc, params, stats, ratios, criterion="l1"):
  """child_masks then compact: (widths, compact params, compact stats)."""
  masks = jax.device_get(child_masks(plan, arc, params, ratios, criterion))
  return compact(plan, arc, params, stats, masks)
