"""Parameter and multiply-add counts.

`count` is analytic (from the plan, the arc and each channel group's width,
so it also counts compacted networks); `jaxpr_macs` counts the multiply-adds
of the convolutions and matmuls a traced function really performs. Tests
check one against the other and against XLA's cost analysis. Multiply-adds
are those of convolutions and linear layers (pooling, BN, ReLU and adds are
not counted, as in the papers); the aux head is a training-only part.
"""
from __future__ import annotations

import math

import jax
import numpy as np

from fp_jax import layers
from fp_jax import space


def full_widths(plan):
  """Channel-group widths of the unpruned network (see compaction.widths_of)."""
  return {"stem": plan.stem_channels,
          "cells": [{"cell": s.filters, "inner": [[s.filters] * 2 for _ in range(space.NUM_NODES)]}
                    for s in plan.cells]}


def kept(channels, ratio):
  """Channels a group of `channels` keeps at `ratio` (pruning.keep_mask's count)."""
  return max(1, int(np.round((1.0 - ratio) * channels)))


def ratio_widths(plan, arc, ratios):
  """Widths of the network masked with per-stage `ratios` [5] (as compaction.widths_of)."""
  normal, reduce = space.split(np.asarray(arc))
  cells = []
  for spec in plan.cells:
    rows = (reduce if spec.reduce else normal).reshape(space.NUM_NODES, 4)
    k = kept(spec.filters, ratios[spec.stage])
    inner = [[k if int(row[2 * s + 1]) in (space.SEP3, space.SEP5) else spec.filters
              for s in range(2)] for row in rows]
    cells.append({"cell": k, "inner": inner})
  return {"stem": kept(plan.stem_channels, ratios[0]), "cells": cells}


def count(plan, arc, widths=None):
  """{'macs', 'params', 'params_no_aux', 'aux_macs'} of the fixed network, batch 1."""
  widths = widths or full_widths(plan)
  normal, reduce = space.split(np.asarray(arc))
  macs = params = 0
  stem_c = widths["stem"]
  macs += plan.image_hw[0] * plan.image_hw[1] * 9 * plan.in_channels * stem_c
  params += 9 * plan.in_channels * stem_c + 2 * stem_c
  prev = [stem_c, stem_c]
  aux = (0, 0)
  for spec in plan.cells:
    cw = widths["cells"][spec.index]
    c = cw["cell"]
    hw = spec.hw[0] * spec.hw[1]
    for j in range(2):      # 1x1 calibration or factorized reduce: both c_in x c per pixel
      macs += hw * prev[j] * c
      params += prev[j] * c + 2 * c
    cell = (reduce if spec.reduce else normal).reshape(space.NUM_NODES, 4)
    for k, row in enumerate(cell):
      for s in range(2):
        op = int(row[2 * s + 1])
        if op in (space.SEP3, space.SEP5):
          ks, inner = (3 if op == space.SEP3 else 5), cw["inner"][k][s]
          # dw k x k on c, pw c->inner, BN; dw k x k on inner, pw inner->c, BN
          macs += hw * (ks * ks * c + c * inner + ks * ks * inner + inner * c)
          params += ks * ks * c + c * inner + 2 * inner + ks * ks * inner + inner * c + 2 * c
    out_c = len(space.output_nodes(cell.reshape(-1))) * c
    if spec.index == plan.aux_index:
      aux = _aux_counts(out_c, spec.hw[0], plan.num_classes)
    prev = [prev[1], out_c]
  macs += prev[1] * plan.num_classes
  params += prev[1] * plan.num_classes + plan.num_classes
  return {"macs": int(macs), "params": int(params + aux[1]), "params_no_aux": int(params),
          "aux_macs": int(aux[0])}


def _aux_counts(c_in, hw, num_classes):
  w1, w2 = layers.AUX_WIDTHS
  r = layers.aux_pool_size(hw)
  macs = r * r * c_in * w1 + r * r * w1 * w2 + w2 * num_classes
  params = c_in * w1 + 2 * w1 + r * r * w1 * w2 + 2 * w2 + w2 * num_classes + num_classes
  return macs, params


def param_count(tree):
  return int(sum(np.prod(a.shape) for a in jax.tree.leaves(tree)))


def _eqn_macs(eqn):
  name = eqn.primitive.name
  if name == "conv_general_dilated":
    out = eqn.outvars[0].aval.shape
    rhs = eqn.invars[1].aval.shape
    dn = eqn.params["dimension_numbers"]
    # rhs spec: (out feature dim, in feature dim, spatial...)
    spatial = math.prod(rhs[d] for d in dn.rhs_spec[2:])
    return math.prod(out) * spatial * rhs[dn.rhs_spec[1]]
  if name == "dot_general":
    (lhs_c, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_c)
  return 0


def _walk(jaxpr):
  total = 0
  for eqn in jaxpr.eqns:
    total += _eqn_macs(eqn)
    for v in eqn.params.values():
      for j in (v if isinstance(v, (tuple, list)) else [v]):
        if hasattr(j, "jaxpr") and hasattr(j.jaxpr, "eqns"):
          total += _walk(j.jaxpr)
        elif hasattr(j, "eqns"):
          total += _walk(j)
  return total


def jaxpr_macs(fn, *args):
  """Multiply-adds of every conv and matmul in the traced fn(*args).

  For straight-line networks (the fixed network): a scan body counts once and
  every branch of a cond counts, so do not use it on the supernet.
  """
  return _walk(jax.make_jaxpr(fn)(*args).jaxpr)
