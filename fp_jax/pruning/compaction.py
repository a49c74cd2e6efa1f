"""Step 4 of pruning: real channel removal for the fixed network (child.py, graph.py).

`compact` turns concrete masks (masks.child_masks) into a network holding only the kept
channels; `gather` builds a network holding chosen channels of every value (kept
channel indices, or -1 for an all-zero channel: compaction and the fused path's channel
padding are the same operation). The layers read every width from the parameter
shapes, so the result runs with the same `child.forward(plan, ...)`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fp_jax.models import graph
from fp_jax.pruning import groups as groups_lib
from fp_jax.pruning import masks as masks_lib


def _count(m):
  return int(np.sum(np.asarray(m) > 0.5))


def widths_of(plan, masks):
  """Kept channels of every value (flops.full_widths layout) of concrete masks."""
  g, inner = groups_lib.child_groups(plan)
  units = np.asarray(masks["units"])
  return {"values": [_count(units[g.unit_of[j]]) for j in range(len(plan.nodes))],
          "inner": {name: _count(units[g.unit_of[s]]) for name, s in inner.items()}}


def kept_layouts(plan, masks):
  """Kept channel indices of every value and sep inner space (concrete masks)."""
  g, inner = groups_lib.child_groups(plan)
  units = np.asarray(masks["units"])
  kept = lambda s: np.flatnonzero(units[g.unit_of[s]] > 0.5)
  return {"values": [kept(j) for j in range(len(plan.nodes))],
          "inner": {name: kept(s) for name, s in inner.items()}}


# ---------------------------------------------------------------- gather


def _take(a, idx, axis=-1, fill=0.0):
  """np.take along `axis` where idx -1 gives `fill`."""
  a = np.asarray(a)
  idx = np.asarray(idx, np.int64)
  out = np.take(a, np.maximum(idx, 0), axis=axis)
  if (idx < 0).any():
    shape = [1] * out.ndim
    shape[axis] = len(idx)
    out = np.where((idx < 0).reshape(shape), np.asarray(fill, a.dtype), out)
  return out


def _bn_p(p, idx):
  return {"scale": _take(p["scale"], idx), "bias": _take(p["bias"], idx)}


def _bn_s(s, idx):
  return {"mean": _take(s["mean"], idx), "var": _take(s["var"], idx, fill=1.0)}


def _gather_block(n, p, s, in_idx, out_idx, inner_idx=None):
  if n.kind == "conv":
    return ({"conv": _take(_take(p["conv"], in_idx, 2), out_idx), "bn": _bn_p(p["bn"], out_idx)},
            {"bn": _bn_s(s["bn"], out_idx)})
  if n.kind == "fr":       # BN over concat(conv1 out, conv2 out): each half keeps its own
    h = np.shape(p["conv1"])[-1]
    lo = out_idx[(out_idx >= 0) & (out_idx < h)]
    hi = np.where(out_idx[len(lo):] >= 0, out_idx[len(lo):] - h, -1)   # zero channels: conv2's
    if not np.array_equal(out_idx[:len(lo)], lo) or (hi[hi >= 0] < 0).any():
      raise ValueError(f"{n.name}: factorized reduction channels must keep conv1's first")
    return ({"conv1": _take(_take(p["conv1"], in_idx, 2), lo),
             "conv2": _take(_take(p["conv2"], in_idx, 2), hi), "bn": _bn_p(p["bn"], out_idx)},
            {"bn": _bn_s(s["bn"], out_idx)})
  q = {"dw1": _take(p["dw1"], in_idx), "pw1": _take(_take(p["pw1"], in_idx, 2), inner_idx),
       "bn1": _bn_p(p["bn1"], inner_idx), "dw2": _take(p["dw2"], inner_idx),
       "pw2": _take(_take(p["pw2"], inner_idx, 2), out_idx), "bn2": _bn_p(p["bn2"], out_idx)}
  return q, {"bn1": _bn_s(s["bn1"], inner_idx), "bn2": _bn_s(s["bn2"], out_idx)}


def gather(plan, params, stats, layouts):
  """(params, stats) holding, for every value j, the channels layouts['values'][j]
  (indices into the full network's channels; -1: a zero channel) and for every sep
  its inner channels layouts['inner'][name]. Zero channels get zero weights, BN scale
  and offset 0, statistics mean 0 / var 1, so they stay exactly zero."""
  vals = layouts["values"]
  p = {k: v for k, v in params.items() if k not in ("blocks", "aux", "fc")}
  st = {k: v for k, v in stats.items() if k not in ("blocks", "aux")}
  p["blocks"], st["blocks"] = {}, {}
  for j, n in graph.param_nodes(plan):
    p["blocks"][n.name], st["blocks"][n.name] = _gather_block(
        n, params["blocks"][n.name], stats["blocks"][n.name], vals[n.inputs[0]], vals[j],
        layouts["inner"].get(n.name))
  if "aux" in params:
    aux_in = vals[plan.cells[plan.aux_index].out]
    p["aux"] = {**params["aux"], "conv1": _take(params["aux"]["conv1"], aux_in, 2)}
    st["aux"] = stats["aux"]
  p["fc"] = {**params["fc"], "w": _take(params["fc"]["w"], vals[plan.out], 0)}
  return jax.tree.map(jnp.asarray, p), jax.tree.map(jnp.asarray, st)


def compact(plan, params, stats, masks):
  """(widths, params, stats) of the network holding only the kept channels.

  masks: concrete (host) masks as from masks.child_masks; params may be masked or not
  (kept channels are unchanged by masking). Run the result with the same
  `child.forward(plan, ...)`; `flops.count(plan, widths)` counts it.
  """
  p, s = gather(plan, params, stats, kept_layouts(plan, masks))
  return widths_of(plan, masks), p, s


def prune(plan, params, stats, ratios, criterion="l1", round_to=1):
  """masks.child_masks then compact: (widths, compact params, compact stats); round_to:
  masks.keep_count's (compress.round_to)."""
  masks = jax.device_get(jax.jit(lambda p, r: masks_lib.child_masks(
      plan, p, r, criterion, round_to=round_to))(params, jnp.asarray(ratios, jnp.float32)))
  return compact(plan, params, stats, masks)


def ratio_widths(plan, ratios, round_to=1):
  """Widths of the network masked at per-stage `ratios` [5] (counts rounded as
  masks.keep_count's `round_to`), without weights: every unit
  equally important (ties keep the lower unit ids, as masks.unit_masks). Exact whenever
  a value holds whole groups (the usual case); where a group spans several values of
  different units (a cell that skips its calibration next to a concat), the split among
  them is nominal. Host-side numpy (no compilation per network)."""
  g, _ = groups_lib.child_groups(plan)
  units = masks_lib.unit_masks(np.zeros(len(g.unit_group), np.float32), g.unit_group,
                               g.group_size, g.group_stage, g.group_fixed, ratios, xp=np,
                               round_to=round_to)
  return widths_of(plan, {"units": units})
