"""Shared-weight ENAS supernet (melodyguan/enas micro_child.py `_enas_layer`): the
architecture is traced data.

Macro: stem (3x3 conv to 3F + BN) -> num_layers + 2 cells -> ReLU, global pool,
[dropout], linear; aux head after the cell that follows the second reduction.
Every cell outputs F channels. A normal cell reads h(i-2), h(i-1), calibrated only
where sizes or channels differ (a factorized reduction of a larger h(i-2), else a
ReLU-1x1-BN when channels differ from F). A reduction cell (F doubles) first
factorized-reduces h(i-1) (no ReLU) and uses that as its second input, h(i-1) as
its first (calibrated by a factorized reduction); its nodes then run at stride 1.
The cell after it reads that reduction and the cell's output.

Cell: node k = op_a(in_a) + op_b(in_b); weights shared per (cell, node, slot, op,
chosen input) as in ENAS: each sep_conv leaf carries a leading axis over the node's
possible inputs, gathered by the traced index, so one compilation serves every
architecture. How a slot runs its traced op (`dispatch`, config.search.dispatch):
'switch' (`lax.switch(op, ...)`, only the sampled op runs: one conditional per slot) or
'select' (no conditional: one sep_conv whose weights the op picks, the 3x3 kernels
zero-padded to 5x5, both pools and the identity, then a select; more FLOPs, and equal to
'switch' up to float rounding: tests/dispatch_test.py). The cell ends with the
concat of the nodes and inputs no node uses, ReLU, a 1x1 conv whose input rows are
chosen per node index (weights [7, F, F], rows of used nodes zeroed), BN -> F.

Cells run one after the other, each its own compiled body: a lax.scan over runs of
same-shaped cells compiled no faster and stepped 8-10% slower with the CPU training kernels
(its stacked residuals are zero-filled, written and sliced each step; bench/results/
fashion_steps_notes.md).

BN always normalises with batch statistics (synchronised over `axis_name`) and
keeps no moving averages, as ENAS's search child. Masked forward passes (fake
pruning) use pruning/masks.py's `apply_supernet_masks`; the channel spaces pruning reads
(`space_table`, `channel_spaces`) and the channels a mask keeps in each (`Kept`) are
declared here, at the end.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from fp_jax.models import channels
from fp_jax.models import layers
from fp_jax.models import slot_ops
from fp_jax.models import space

MAX_INPUTS = 2 + space.NUM_NODES - 1   # node k chooses among k + 2 <= 6 inputs
NUM_VALUES = 2 + space.NUM_NODES       # cell inputs and nodes: rows of the final conv
INITS = ("fan_in", "enas")
FINAL_INITS = ("identity", "shared", "enas")

@dataclasses.dataclass(frozen=True)
class SupernetCell:
  index: int
  reduce: bool
  stage: int            # 0..4, the pruning stage (DESIGN §6)
  filters: int          # F of this cell (its output channels)
  hw: tuple             # (H, W) of its nodes and output
  in_channels: tuple    # channels of its two inputs before calibration
  calib: tuple          # per input: 'none' | 'conv' (ReLU-1x1-BN) | 'fr' (factorized reduce)


@dataclasses.dataclass(frozen=True)
class SupernetPlan:
  in_channels: int
  image_hw: tuple
  stem_channels: int
  cells: tuple
  aux_index: int        # aux head after this cell
  num_classes: int


def _ceil_hw(hw, s):
  return (-(-hw[0] // s), -(-hw[1] // s))


def make_plan(num_layers, out_filters, image_shape, num_classes):
  h, w, c = image_shape
  r1, r2 = space.reduction_layers(num_layers)
  stages = space.stage_of_layer(num_layers)
  stem_c = 3 * out_filters
  prev = [(stem_c, (h, w)), (stem_c, (h, w))]   # (channels, hw) of h(i-2), h(i-1)
  f, hw, cells = out_filters, (h, w), []
  for i in range(num_layers + 2):
    reduce = i in (r1, r2)
    if reduce:
      f, hw = 2 * f, _ceil_hw(prev[1][1], 2)
      ins = [prev[1], (f, hw)]                   # h(i-1), its factorized reduction
    else:
      hw, ins = prev[1][1], prev
    calib = ("fr" if ins[0][1] != ins[1][1] else "conv" if ins[0][0] != f else "none",
             "conv" if ins[1][0] != f else "none")
    cells.append(SupernetCell(i, reduce, stages[i], f, hw, (ins[0][0], ins[1][0]), calib))
    prev = [ins[1], (f, hw)]
  return SupernetPlan(c, (h, w), stem_c, tuple(cells), min(r2 + 1, num_layers + 1), num_classes)


def init(key, plan, scale="fan_in", final="identity", share_inputs=True):
  """Parameter pytree of the supernet (no BN statistics).

  Per cell: 'calib_x' / 'calib_y' (where calibrated), 'reduce' (reduction cells: the
  factorized reduction of h(i-1)), 'sep3' / 'sep5' sep_conv params with leading axes
  [node 5, slot 2, input 6] (ENAS: one weight set per chosen input; node k uses inputs
  0..k+1, the rest keeps every node one shape, so a scan runs the nodes), or [5, 2, 1]
  with share_inputs (one weight set per node and slot, whatever input it reads),
  'final' {'w' [7, F, F], 'bn'}.
  scale: 'fan_in' (He-normal on each kernel's true fan-in) or 'enas' (He-normal on
  ENAS's 2-D weight shapes [possible inputs, ...]: std sqrt(2 / (k + 2)) for node k's
  sep_conv kernels and sqrt(2 / 7) for the final conv).
  final: the final conv's rows [7, F, F] at the start: 'enas' (independent He-normal
  rows, as ENAS), 'shared' (one He-normal F x F matrix in every row) or 'identity'
  (the identity in every row). With independent rows, channel c of node j lands in a
  different direction for every j, so the cell output means something else for every
  architecture; shared or identity rows keep channels aligned across architectures
  (bench/supernet_learning.py: 3 cells on digits 0.32 -> 0.63 / 0.71).
  """
  if scale not in INITS:
    raise ValueError(f"init scale must be one of {INITS}, got {scale!r}")
  if final not in FINAL_INITS:
    raise ValueError(f"final conv init must be one of {FINAL_INITS}, got {final!r}")
  ks = jax.random.split(key, 3 + len(plan.cells))
  params = {"cells": []}
  params["stem"] = layers.conv_bn_init(ks[0], 3, plan.in_channels, plan.stem_channels)[0]
  for spec, kc in zip(plan.cells, ks[3:]):
    f, cp = spec.filters, {}
    for j, (kind, name) in enumerate(zip(spec.calib, ("calib_x", "calib_y"))):
      kj = jax.random.fold_in(kc, 10 + j)
      if kind == "conv":
        cp[name] = layers.conv_bn_init(kj, 1, spec.in_channels[j], f)[0]
      elif kind == "fr":
        cp[name] = layers.factorized_reduce_init(kj, spec.in_channels[j], f)[0]
    if spec.reduce:
      cp["reduce"] = layers.factorized_reduce_init(jax.random.fold_in(kc, 12),
                                                   spec.in_channels[0], f)[0]
    for name, size, kk in (("sep3", 3, 0), ("sep5", 5, 1)):
      p = layers.sep_conv_init(jax.random.fold_in(kc, kk), size, f,
                               lead=(space.NUM_NODES, 2, 1 if share_inputs else MAX_INPUTS))[0]
      if scale == "enas":
        std = np.sqrt(2.0 / (np.arange(space.NUM_NODES) + 2.0)).astype(np.float32)
        for w, fan in (("dw1", size * size), ("pw1", f), ("dw2", size * size), ("pw2", f)):
          p[w] = p[w] / np.float32(np.sqrt(2.0 / fan)) * std[:, None, None, None, None, None, None]
      cp[name] = p
    if final == "identity":
      w = jnp.broadcast_to(jnp.eye(f, dtype=jnp.float32), (NUM_VALUES, f, f))
    else:
      w = layers.normal(jax.random.fold_in(kc, 2), (1 if final == "shared" else NUM_VALUES, f, f))
      w = jnp.broadcast_to(w * np.float32(np.sqrt(2.0 / (NUM_VALUES if scale == "enas" else f))),
                           (NUM_VALUES, f, f))
    cp["final"] = {"w": w, "bn": layers.bn_init(f)}
    params["cells"].append(cp)
  aux = plan.cells[plan.aux_index]
  params["aux"] = layers.aux_head_init(ks[1], aux.filters, aux.hw[0], plan.num_classes)[0]
  params["fc"] = layers.classifier_init(ks[2], plan.cells[-1].filters, plan.num_classes)
  return params


def unused(cell_arc):
  """f32 [7]: 1 for the cell inputs and nodes that no node reads (traced arc [20])."""
  rows = cell_arc.reshape(space.NUM_NODES, 4)
  used = jnp.zeros((NUM_VALUES,), jnp.float32).at[rows[:, 0]].set(1.0).at[rows[:, 2]].set(1.0)
  return 1.0 - used


def cell(p, cell_arc, h0, h1, axis_name=None, with_nodes=False, dispatch="switch"):
  """One cell's nodes and final conv. cell_arc int32 [20] (traced); h0, h1 [B,H,W,F]
  -> [B,H,W,F] (and the node values [5,B,H,W,F] when with_nodes). dispatch: 'switch' |
  'select' (resolved: slot_ops.resolve_dispatch)."""
  run_op = slot_ops.slot(dispatch, axis_name)
  buf = jnp.zeros((NUM_VALUES,) + h0.shape, h0.dtype)
  buf = buf.at[0].set(h0).at[1].set(h1)
  rows = cell_arc.reshape(space.NUM_NODES, 4)
  sep_p = jax.tree.map(lambda a: layers.vary_like(a, buf), {"sep3": p["sep3"], "sep5": p["sep5"]})
  buf = _nodes(run_op, slot_ops.slot_vjp(dispatch, axis_name), sep_p, buf, rows)
  w = p["final"]["w"] * unused(cell_arc).astype(p["final"]["w"].dtype)[:, None, None]
  out = layers.relu_concat_conv_bn(p["final"]["bn"], None, buf, w, True, axis_name)[0]
  return (out, buf[2:]) if with_nodes else out


def _slots(run_op, buf, row, node_p):
  """A node's value from the two slots of its arc row [4] and its parameters [2, ...]."""
  out = 0.0
  for s in range(2):
    out = out + run_op(jax.tree.map(lambda a, s=s: a[s], node_p), row[2 * s], row[2 * s + 1],
                       buf[row[2 * s]])
  return out


def _nodes(run_op, op_vjp, sep_p, buf, rows):
  """The cell's value buffer [7,B,H,W,F] after its 5 nodes (a scan over the nodes), from the
  buffer holding its inputs; rows int32 [5, 4] (traced), sep_p the nodes' slot weights
  [5, 2, ...]; run_op / op_vjp: a slot's op and its VJP (slot_ops.slot, slot_vjp). The VJP
  runs the nodes in reverse and reads each slot's input back from the final buffer (a node
  reads only earlier values, which no later node overwrites), so the forward saves no
  per-node inputs: a scan's stacked residuals cost a zero fill, a write and a read each
  step."""

  @jax.custom_vjp
  def nodes(sep_p, buf, rows):
    def node(buf, inputs):
      k, row, node_p = inputs
      return buf.at[k + 2].set(_slots(run_op, buf, row, node_p)), None
    return lax.scan(node, buf, (jnp.arange(space.NUM_NODES), rows, sep_p))[0]

  def fwd(sep_p, buf, rows):
    out = nodes(sep_p, buf, rows)
    return out, (sep_p, out, rows)

  def bwd(res, g_buf):
    sep_p, buf, rows = res

    def back(g_buf, inputs):
      k, row, node_p = inputs
      g_node = g_buf[k + 2]
      g_p = []
      for s in range(2):
        idx, op = row[2 * s], row[2 * s + 1]
        slot_p = jax.tree.map(lambda a, s=s: a[s], node_p)
        gp, gx = op_vjp(slot_p, idx, op, buf[idx], g_node)
        g_p.append(gp)
        g_buf = g_buf.at[idx].add(gx)
      return g_buf, jax.tree.map(lambda a, b: jnp.stack([a, b]), *g_p)

    g_buf, g_sep = lax.scan(back, g_buf, (jnp.arange(space.NUM_NODES), rows, sep_p),
                            reverse=True)
    return g_sep, g_buf, np.zeros(rows.shape, jax.dtypes.float0)

  nodes.defvjp(fwd, bwd)
  return nodes(sep_p, buf, rows)


def _producer(p, x, kind, train_axis, relu=True):
  if kind == "conv":
    return layers.relu_conv_bn(p, None, x, True, train_axis)[0]
  return layers.factorized_reduce(p, None, x, 2, True, train_axis, relu=relu)[0]


def cell_inputs(spec, p, prev, axis_name=None):
  """The calibrated inputs (h0, h1) of a cell from prev = [h(i-2), h(i-1)], and the
  pair the next cell starts from (its h(i-2) is `ins[1]` before calibration)."""
  ins = list(prev)
  if spec.reduce:
    ins = [prev[1], _producer(p["reduce"], prev[1], "fr", axis_name, relu=False)]
  hs = [ins[j] if spec.calib[j] == "none" else
        _producer(p[("calib_x", "calib_y")[j]], ins[j], spec.calib[j], axis_name)
        for j in range(2)]
  return hs, ins[1]


def forward(plan, params, arc, x, axis_name=None, with_aux=True, reg=None, dispatch="switch"):
  """(logits [B,classes], aux logits or None) of architecture `arc` int32 [40].

  reg (training, optional): {'key': PRNG key, 'keep_prob': dropout keep of the pooled
  features}. The mask is drawn for the global batch and each device takes its rows, so
  1 and n devices drop the same features. dispatch: how cells run their slots' ops,
  'switch' | 'select' (resolve_dispatch).
  """
  y = layers.relu_conv_bn(params["stem"], None, x, True, axis_name, relu=False)[0]
  prev, aux = [y, y], None
  for spec in plan.cells:
    p = params["cells"][spec.index]
    (h0, h1), carry = cell_inputs(spec, p, prev, axis_name)
    out = cell(p, cell_arc(arc, spec), h0, h1, axis_name, dispatch=dispatch)
    prev = [carry, out]
    if with_aux and spec.index == plan.aux_index:
      aux = layers.aux_head(params["aux"], None, out, True, axis_name)[0]
  dropout = None
  if reg is not None and reg["keep_prob"] < 1.0:
    dropout = lambda f: _global_dropout(f, reg["key"], reg["keep_prob"], axis_name)
  return layers.classifier(params["fc"], prev[1], dropout), aux


def _global_dropout(f, key, keep, axis_name):
  """Inverted dropout of this device's rows f [b, C] of a global batch, with the mask of
  the global batch (device-count invariant)."""
  if axis_name is None:
    return layers.dropout(f, key, keep)
  n, i = lax.axis_size(axis_name), lax.axis_index(axis_name)
  m = jax.random.bernoulli(key, keep, (n * f.shape[0],) + f.shape[1:])
  m = lax.dynamic_slice_in_dim(m, i * f.shape[0], f.shape[0])
  return jnp.where(m, f / jnp.asarray(keep, f.dtype), 0.0)


# ---------------------------------------------------------------- channel spaces (pruning)


def cell_arc(arc, spec):
  """The cell's half of `arc` [40] (numpy or traced): int [20]."""
  return arc[space.CELL_LEN:] if spec.reduce else arc[:space.CELL_LEN]


def slots(part):
  """(input index [5, 2], op [5, 2]) of every node slot of a cell arc [20]."""
  rows = part.reshape(space.NUM_NODES, 4)
  return rows[:, 0::2], rows[:, 1::2]


def space_table(plan):
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


def channel_spaces(plan, arc):
  """channels.Spaces of the supernet running `arc` (concrete int [40]), space_table's
  order. Every cell ends with its own final conv, so a cell's nodes are tied only to
  what reaches them unchanged: its (possibly uncalibrated, i.e. earlier cells') inputs
  through identity or pooling, and its sep_convs' outputs."""
  table = space_table(plan)
  index = {key: n for n, (key, _, _) in enumerate(table)}
  arc = np.asarray(arc)
  ties, prev = [], [index["stem"], index["stem"]]
  for spec in plan.cells:
    i, f = spec.index, spec.filters
    ins = [prev[1], index[("reduce", i)]] if spec.reduce else list(prev)
    h = [index[(name, i)] if spec.calib[j] != "none" else ins[j]
         for j, name in enumerate(("calib_x", "calib_y"))]
    idx, op = slots(cell_arc(arc, spec))
    vals = h + [index[("node", i, k)] for k in range(space.NUM_NODES)]
    for k in range(space.NUM_NODES):
      for s in range(2):
        src = (index[("out", i, k, s)] if int(op[k, s]) in (space.SEP3, space.SEP5)
               else vals[int(idx[k, s])])
        ties.append((vals[k + 2], 0, src, 0, f))
    prev = [ins[1], index[("final", i)]]
  n = len(table)
  return channels.Spaces(tuple(w for _, w, _ in table), tuple(st for _, _, st in table),
                         (True,) * n, (False,) * n, tuple(ties))


class CellKept(NamedTuple):
  """Channels kept in one cell's spaces (space_table's keys of cell i); calib_x,
  calib_y, reduce: None where the cell has no such producer."""
  calib_x: Any
  calib_y: Any
  reduce: Any
  node: Any            # [5]
  out: Any             # [5, 2]: each sep_conv slot's output
  inner: Any           # [5, 2]: each sep_conv slot's inner width
  final: Any           # the final conv's output


class Kept(NamedTuple):
  """Channels kept in every channel space of the supernet running one arc: made by the
  masks step (pruning/masks.py), read by the multiply-add count (supernet_flops.count)."""
  stem: Any
  cells: tuple         # CellKept per cell


def full_kept(plan):
  """Kept of the unmasked supernet: every space's width (ints)."""
  cells = []
  for spec in plan.cells:
    f = spec.filters
    calib = [f if c != "none" else None for c in spec.calib]
    cells.append(CellKept(calib[0], calib[1], f if spec.reduce else None,
                          np.full(space.NUM_NODES, f), np.full((space.NUM_NODES, 2), f),
                          np.full((space.NUM_NODES, 2), f), f))
  return Kept(plan.stem_channels, tuple(cells))


def stack_kept(kepts):
  """n Kepts as one whose leaves have a leading axis n (supernet_flops.count counts all n
  in one walk of the arc)."""
  return jax.tree.map(lambda *v: np.stack([np.asarray(x) for x in v]), *kepts)
