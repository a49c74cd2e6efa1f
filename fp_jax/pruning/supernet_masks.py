"""Importance, masks and the supernet's channel groups (fake pruning), as pure jit transforms.

Groups follow from the network's structure (groups.py; the same definition as the
fixed network's in compaction.py). In the supernet every cell ends with its own
final conv, so a cell's nodes are tied to the spaces that reach them unchanged
(cell inputs passed on by identity or pooling, which are earlier cells' outputs
where ENAS skips a calibration) and to the sep_convs' outputs feeding them; each
sep_conv's inner channels are a group of their own. The grouping depends on the
sampled architecture: `supernet_groups(plan, arc)` derives it on the host and
returns arrays of static shapes, passed to the jitted reward evaluation as data,
so one compilation still serves every architecture.
A group keeps its top round((1 - ratio) * C) units (at least one) by importance
(CRITERIA), summed over the group's producers: `l1` the L1 norms of the producing
conv filters, `bn` their BN |scale|, `taylor` the first-order Taylor score
sum |w * dL/dw| over the same filters (Molchanov et al. 2019; `grads` are the loss
gradients of the same params), `random` uniform random scores (a baseline; `key`).
A mask multiplies the producing convs' output channels
and their BN scale and offset, so masked channels are exactly zero everywhere.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fp_jax.pruning import groups as groups_lib
from fp_jax.models import space
from fp_jax.models import supernet

CRITERIA = ("l1", "bn", "taylor", "random")


def scored(params, criterion, grads=None):
  """(tree, rule) the importance functions read: taylor scores the products w * dL/dw
  with the L1 rule (so a channel's score is sum |w * g| over its producing filters)."""
  if criterion not in CRITERIA:
    raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
  if criterion == "taylor":
    if grads is None:
      raise ValueError("criterion 'taylor' needs the loss gradients of the params")
    return jax.tree.map(jnp.multiply, params, grads), "l1"
  return params, criterion


def random_scores(key, n):
  """Uniform random scores f32 [n] (criterion 'random'); key: a PRNG key."""
  if key is None:
    raise ValueError("criterion 'random' needs a PRNG key")
  return jax.random.uniform(key, (n,), jnp.float32)


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
  """(input idx [5, 2], op [5, 2]) of a cell arc [20]."""
  rows = cell_arc.reshape(space.NUM_NODES, 4)
  return rows[:, 0::2], rows[:, 1::2]


def _input_onehot(idx, cp):
  """one-hot [5, 2, sets] of the weight set each slot uses (supernet.weight_index)."""
  n = cp["sep3"]["bn1"]["scale"].shape[2]
  return jax.nn.one_hot(supernet.weight_index(idx, n), n)


def _cell_arc(arc, spec):
  return arc[space.CELL_LEN:] if spec.reduce else arc[:space.CELL_LEN]


# ---------------------------------------------------------------- groups (host side)


def supernet_spaces(plan):
  """Static [(key, width, stage)] of the supernet's channel spaces, in a fixed order:
  'stem'; per cell i: ('calib_x'|'calib_y'|'reduce', i) where present, ('node', i, k),
  ('out', i, k, s) and ('inner', i, k, s) of each sep_conv slot, ('final', i)."""
  out = [("stem", plan.stem_channels, 0)]
  for spec in plan.cells:
    i, f, st = spec.index, spec.filters, spec.stage
    out += [((name, i), f, st) for j, name in enumerate(("calib_x", "calib_y"))
            if spec.calib[j] != "none"]
    if spec.reduce:
      out.append((("reduce", i), f, st))
    out += [(("node", i, k), f, st) for k in range(space.NUM_NODES)]
    for kind in ("out", "inner"):
      out += [((kind, i, k, s), f, st) for k in range(space.NUM_NODES) for s in range(2)]
    out.append((("final", i), f, st))
  return out


def supernet_groups(plan, arc):
  """Cached supernet_group_arrays(plan, arc) (the search evaluates an arc on many batches)."""
  return _cached_groups(plan, tuple(int(v) for v in np.asarray(arc)))


@functools.lru_cache(maxsize=4096)
def _cached_groups(plan, arc):
  return supernet_group_arrays(plan, np.asarray(arc))


def supernet_group_arrays(plan, arc):
  """Group arrays of architecture `arc` (concrete int [40]) with static shapes (N =
  channels of all spaces): {'unit_of' [N], 'unit_group' [N], 'group_size' [N+1],
  'group_stage' [N+1], 'group_fixed' [N+1]} (int32 / bool numpy); unused unit ids
  form one fixed dummy group."""
  sp = supernet_spaces(plan)
  index = {key: n for n, (key, _, _) in enumerate(sp)}
  arc = np.asarray(arc)
  ties, prev = [], [index["stem"], index["stem"]]
  for spec in plan.cells:
    i, f = spec.index, spec.filters
    ins = [prev[1], index[("reduce", i)]] if spec.reduce else list(prev)
    h = [index[(name, i)] if spec.calib[j] != "none" else ins[j]
         for j, name in enumerate(("calib_x", "calib_y"))]
    idx, op = _slots(_cell_arc(arc, spec))
    vals = h + [index[("node", i, k)] for k in range(space.NUM_NODES)]
    for k in range(space.NUM_NODES):
      for s in range(2):
        src = (index[("out", i, k, s)] if int(op[k, s]) in (space.SEP3, space.SEP5)
               else vals[int(idx[k, s])])
        ties.append((vals[k + 2], 0, src, 0, f))
    prev = [ins[1], index[("final", i)]]
  g = groups_lib.derive([w for _, w, _ in sp], ties, [True] * len(sp),
                        [st for _, _, st in sp], [False] * len(sp))
  unit_of = np.concatenate(g.unit_of).astype(np.int32)
  n, u, ng = len(unit_of), len(g.unit_group), len(g.group_size)
  pad = lambda a, size, fill: np.concatenate([a, np.full(size - len(a), fill, a.dtype)])
  size = pad(g.group_size, n + 1, 0)
  size[ng] = n - u
  return {"unit_of": unit_of, "unit_group": pad(g.unit_group, n, ng).astype(np.int32),
          "group_size": size.astype(np.int32),
          "group_stage": pad(g.group_stage, n + 1, 0).astype(np.int32),
          "group_fixed": pad(g.group_fixed, n + 1, True)}


# ---------------------------------------------------------------- masks (traced)


def _space_importance(plan, params, arc, criterion):
  """Importance [width] of every space of supernet_spaces (0 for node spaces)."""
  out = [producer_importance(params["stem"], criterion)]
  for spec in plan.cells:
    cp, f = params["cells"][spec.index], spec.filters
    out += [producer_importance(cp[name], criterion)
            for j, name in enumerate(("calib_x", "calib_y")) if spec.calib[j] != "none"]
    if spec.reduce:
      out.append(producer_importance(cp["reduce"], criterion))
    out += [jnp.zeros((f,), jnp.float32)] * space.NUM_NODES
    idx, op = _slots(_cell_arc(arc, spec))
    onehot = _input_onehot(idx, cp)
    picked = [jnp.einsum("ksi,ksic->ksc", onehot, imp) for name in ("sep3", "sep5")
              for imp in _stacked_importance(cp[name], criterion)]
    is5 = (op == space.SEP5)[..., None]
    inner = jnp.where(is5, picked[2], picked[0])                          # [5, 2, F]
    outer = jnp.where(is5, picked[3], picked[1])
    out += [outer[k, s] for k in range(space.NUM_NODES) for s in range(2)]
    out += [inner[k, s] for k in range(space.NUM_NODES) for s in range(2)]
    if criterion == "bn":
      out.append(jnp.abs(cp["final"]["bn"]["scale"]))
    else:
      rows = supernet.unused(_cell_arc(arc, spec))[:, None, None]
      out.append(jnp.sum(jnp.abs(cp["final"]["w"]) * rows, axis=(0, 1)))
  return out


def supernet_masks(plan, params, arc, ratios, groups, criterion="l1", grads=None, key=None):
  """Masks of the sampled architecture, one per producer space of supernet_spaces:
  {'stem': [3F], 'cells': [{'calib_x'?, 'calib_y'?, 'reduce'?: [F], 'out', 'inner':
  [5, 2, F], 'final': [F]}], 'units': [N] (the mask of every unit: space s's mask is
  units[unit_of[s's channels]]), 'kept': [spaces] (kept channels of every space of
  supernet_spaces, f32)}. arc int32 [40], ratios f32 [5] (one per stage), groups: the
  arrays of supernet_groups(plan, arc); grads (taylor) / key (random): see CRITERIA;
  all may be traced."""
  tree, rule = scored(params, criterion, grads)
  if rule == "random":
    imp = random_scores(key, sum(w for _, w, _ in supernet_spaces(plan)))
  else:
    imp = jnp.concatenate(_space_importance(plan, tree, arc, rule))
  n = imp.shape[0]
  unit_imp = jnp.zeros(n, jnp.float32).at[groups["unit_of"]].add(imp)
  units = groups_lib.unit_masks(unit_imp, groups["unit_group"], groups["group_size"],
                                groups["group_stage"], groups["group_fixed"], ratios)
  flat = units[groups["unit_of"]]
  masks, off = {"cells": [], "units": units}, 0
  bounds = np.cumsum([0] + [w for _, w, _ in supernet_spaces(plan)])
  masks["kept"] = jnp.stack([jnp.sum(flat[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])
  def take(w):
    nonlocal off
    off += w
    return flat[off - w:off]
  masks["stem"] = take(plan.stem_channels)
  for spec in plan.cells:
    f, m = spec.filters, {}
    for j, name in enumerate(("calib_x", "calib_y")):
      if spec.calib[j] != "none":
        m[name] = take(f)
    if spec.reduce:
      m["reduce"] = take(f)
    take(f * space.NUM_NODES)
    m["out"] = take(f * 2 * space.NUM_NODES).reshape(space.NUM_NODES, 2, f)
    m["inner"] = take(f * 2 * space.NUM_NODES).reshape(space.NUM_NODES, 2, f)
    m["final"] = take(f)
    masks["cells"].append(m)
  return masks


def apply_supernet_masks(plan, params, arc, masks):
  """Supernet params with the sampled architecture's masked channels zeroed.

  Each stacked sep_conv leaf [5, 2, inputs, ..., C] is multiplied by a mask that
  is the slot's mask at the chosen input and 1 elsewhere.
  """
  out = dict(params)
  out["stem"] = mask_producer(params["stem"], masks["stem"])
  out["cells"] = []
  for spec in plan.cells:
    idx, _ = _slots(_cell_arc(arc, spec))
    m, cp = masks["cells"][spec.index], params["cells"][spec.index]
    new = dict(cp)
    for name in ("calib_x", "calib_y", "reduce"):
      if name in m:
        new[name] = mask_producer(cp[name], m[name])
    onehot = _input_onehot(idx, cp)[..., None]
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
