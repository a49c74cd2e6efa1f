"""The supernet before ENAS parity (fp_jax at commit 0c0c863, network.py + supernet.py),
kept for bench/supernet_learning.py's comparison only: every cell input calibrated
(ReLU-1x1-BN, or a factorized reduction when larger), a reduction cell reduces both
inputs and runs its nodes at stride 1, a cell outputs all 5 nodes concatenated
(used ones zeroed) with no projection. BN uses batch statistics.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from fp_jax.models import layers
from fp_jax.models import space
from fp_jax.models import supernet



@dataclasses.dataclass(frozen=True)
class CellSpec:
  index: int
  reduce: bool
  stage: int               # 0..4, the pruning stage (DESIGN §6)
  filters: int             # F of this cell
  hw: tuple                # (H, W) of this cell
  in_channels: tuple       # channels of h(i-2), h(i-1)
  in_strides: tuple        # 1 -> ReLU-1x1-BN calibration, s > 1 -> factorized reduce
  out_channels: int


@dataclasses.dataclass(frozen=True)
class Plan:
  in_channels: int
  image_hw: tuple
  stem_channels: int
  cells: tuple
  aux_index: int           # aux head after this cell
  num_classes: int


def _ceil_hw(hw, s):
  return (-(-hw[0] // s), -(-hw[1] // s))


def make_skeleton(num_layers, out_filters, image_shape, num_classes, out_nodes):
  """out_nodes(reduce: bool) -> number of node outputs a cell concatenates."""
  h, w, c = image_shape
  r1, r2 = space.reduction_layers(num_layers)
  stages = space.stage_of_layer(num_layers)
  stem_c = 3 * out_filters
  # (channels, hw, reductions so far) of h(i-2), h(i-1)
  prev = [(stem_c, (h, w), 0), (stem_c, (h, w), 0)]
  f, n_red, cells = out_filters, 0, []
  for i in range(num_layers + 2):
    reduce = i in (r1, r2)
    if reduce:
      f, n_red = 2 * f, n_red + 1
    hw = _ceil_hw((h, w), 2 ** n_red)
    strides = tuple(2 ** (n_red - p[2]) for p in prev)
    out_c = out_nodes(reduce) * f
    cells.append(CellSpec(i, reduce, stages[i], f, hw, (prev[0][0], prev[1][0]),
                          strides, out_c))
    prev = [prev[1], (out_c, hw, n_red)]
  aux_index = min(r2 + 1, num_layers + 1)
  return Plan(c, (h, w), stem_c, tuple(cells), aux_index, num_classes)


def init_common(key, plan):
  """Parameters and BN stats of everything but the cells' nodes."""
  ks = jax.random.split(key, 3 + 2 * len(plan.cells))
  p, s = {}, {}
  p["stem"], s["stem"] = layers.conv_bn_init(ks[0], 3, plan.in_channels, plan.stem_channels)
  p["calib"], s["calib"] = [], []
  for spec in plan.cells:
    cp, cs = [], []
    for j in range(2):
      key = ks[3 + 2 * spec.index + j]
      if spec.in_strides[j] == 1:
        pj, sj = layers.conv_bn_init(key, 1, spec.in_channels[j], spec.filters)
      else:
        pj, sj = layers.factorized_reduce_init(key, spec.in_channels[j], spec.filters)
      cp.append(pj)
      cs.append(sj)
    p["calib"].append(cp)
    s["calib"].append(cs)
  aux_spec = plan.cells[plan.aux_index]
  p["aux"], s["aux"] = layers.aux_head_init(ks[1], aux_spec.out_channels, aux_spec.hw[0],
                                            plan.num_classes)
  p["fc"] = layers.classifier_init(ks[2], plan.cells[-1].out_channels, plan.num_classes)
  return p, s


def calibrate(p, s, x, stride, train, axis_name):
  if stride == 1:
    return layers.relu_conv_bn(p, s, x, train, axis_name)
  return layers.factorized_reduce(p, s, x, stride, train, axis_name)


def get(s, *keys):
  """s[k0][k1]..., or None as soon as a level is None (stats of the supernet)."""
  for k in keys:
    if s is None:
      return None
    s = s[k]
  return s


def run(plan, cell_fn, params, stats, x, train, axis_name=None, with_aux=True, dropout=None):
  """Applies the network; cell_fn(i, spec, h0, h1) -> (out, cell_stats_new).

  h0, h1 are the calibrated inputs [B,H,W,F]; dropout (optional) maps the
  pooled features [B,C] before the classifier. Returns (logits, aux_logits or
  None, new_stats) where new_stats is None when stats is None.
  """
  new = None if stats is None else {"calib": [], "cells": []}
  y, st = layers.relu_conv_bn(params["stem"], get(stats, "stem"), x, train, axis_name,
                              relu=False)
  if new is not None:
    new["stem"] = st
  prev = [y, y]
  aux_logits = None
  for spec in plan.cells:
    hs, cal_new = [], []
    for j in range(2):
      h, sj = calibrate(params["calib"][spec.index][j], get(stats, "calib", spec.index, j),
                        prev[j], spec.in_strides[j], train, axis_name)
      hs.append(h)
      cal_new.append(sj)
    out, cell_new = cell_fn(spec.index, spec, hs[0], hs[1])
    if new is not None:
      new["calib"].append(cal_new)
      new["cells"].append(cell_new)
    if with_aux and spec.index == plan.aux_index:
      aux_logits, sa = layers.aux_head(params["aux"], get(stats, "aux"), out, train, axis_name)
      if new is not None:
        new["aux"] = sa
    elif new is not None and spec.index == plan.aux_index:
      new["aux"] = stats["aux"]
    prev = [prev[1], out]
  return layers.classifier(params["fc"], prev[1], dropout), aux_logits, new
def make_plan(num_layers, out_filters, image_shape, num_classes):
  return make_skeleton(num_layers, out_filters, image_shape, num_classes,
                       lambda reduce: space.NUM_NODES)


MAX_INPUTS = 2 + space.NUM_NODES - 1   # node k chooses among k + 2 <= 6 inputs


def init(key, plan):
  """Parameter pytree of the supernet described by `plan` (no BN statistics).

  Per cell, 'sep3' and 'sep5' hold sep_conv params with leading axes
  [node 5, slot 2, input 6] (node k uses inputs 0..k+1; the rest is padding
  that keeps every node's params one shape, so a scan runs the nodes).
  """
  k_common, k_cells = jax.random.split(key)
  params, _ = init_common(k_common, plan)
  params["cells"] = []
  shape = (space.NUM_NODES, 2, MAX_INPUTS)
  for spec, kc in zip(plan.cells, jax.random.split(k_cells, len(plan.cells))):
    cell_p = {}
    for name, size, kk in (("sep3", 3, 0), ("sep5", 5, 1)):
      cell_p[name] = layers.sep_conv_init(jax.random.fold_in(kc, kk), size, spec.filters,
                                          lead=shape)[0]
    params["cells"].append(cell_p)
  return params


_branches = supernet._branches   # the per-op branches did not change


def cell(p, cell_arc, h0, h1, axis_name=None):
  """One cell. cell_arc int32 [20] (traced); h0, h1 [B,H,W,F] -> [B,H,W,5F]."""
  branches = _branches(axis_name)
  buf = jnp.zeros((2 + space.NUM_NODES,) + h0.shape, h0.dtype)
  buf = buf.at[0].set(h0).at[1].set(h1)
  rows = cell_arc.reshape(space.NUM_NODES, 4)

  def node(buf, inputs):
    k, row, node_p = inputs
    out = 0.0
    for s in range(2):
      idx, op = row[2 * s], row[2 * s + 1]
      slot_p = jax.tree.map(lambda a: a[s], node_p)
      out = out + lax.switch(op, branches, slot_p, idx, buf[idx])
    return buf.at[k + 2].set(out), None

  buf, _ = lax.scan(node, buf, (jnp.arange(space.NUM_NODES), rows, p))
  used = jnp.zeros((2 + space.NUM_NODES,), h0.dtype).at[rows[:, 0]].set(1.0)
  used = used.at[rows[:, 2]].set(1.0)
  nodes = buf[2:] * (1.0 - used[2:])[:, None, None, None, None]   # [5,B,H,W,F]
  return jnp.concatenate(list(nodes), axis=-1)


def forward(plan, params, arc, x, axis_name=None, with_aux=True):
  """Logits [B,classes] and aux logits (or None) of architecture `arc` int32 [40]."""
  normal, reduce = arc[:space.CELL_LEN], arc[space.CELL_LEN:]

  def cell_fn(i, spec, h0, h1):
    return cell(params["cells"][i], reduce if spec.reduce else normal, h0, h1,
                axis_name), None

  logits, aux, _ = run(plan, cell_fn, params, None, x, True, axis_name, with_aux)
  return logits, aux
