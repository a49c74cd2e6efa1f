"""Fixed-architecture network (final training, compression): the graph of graph.py run
with the blocks of layers.py.

params: {'blocks': {name: conv {conv, bn} | fr {conv1, conv2, bn} | sep {dw1, pw1, bn1,
dw2, pw2, bn2}}, 'aux': ..., 'fc': {w, b}}; stats (BN running statistics) has the
same nesting for its BN layers. Every width is read from the parameter shapes, so a
compact (pruned) network runs with the same plan. Consecutive cells that compute the same
thing (`cell_runs`) run as one lax.scan, so compile time grows with the number of distinct
cells, not of cells.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from fp_jax.models import graph
from fp_jax.models import layers


def make_plan(arc, num_layers, out_filters, image_shape, num_classes):
  return graph.build(arc, num_layers, out_filters, image_shape, num_classes)


def block_init(key, node, c_in):
  """(params, stats) of one conv / fr / sep node reading c_in channels."""
  if node.kind == "conv":
    return layers.conv_bn_init(key, node.k, c_in, node.channels)
  if node.kind == "fr":
    return layers.factorized_reduce_init(key, c_in, node.channels)
  assert c_in == node.channels, node
  return layers.sep_conv_init(key, node.k, node.channels)


def init(key, plan):
  """(params, stats) of the fixed network `plan` (graph.GraphPlan: it holds the arc)."""
  k_blocks, k_aux, k_fc = jax.random.split(key, 3)
  params, stats = {"blocks": {}}, {"blocks": {}}
  for j, n in graph.param_nodes(plan):
    c_in = plan.nodes[n.inputs[0]].channels
    params["blocks"][n.name], stats["blocks"][n.name] = block_init(
        jax.random.fold_in(k_blocks, j), n, c_in)
  aux = plan.cells[plan.aux_index]
  params["aux"], stats["aux"] = layers.aux_head_init(k_aux, aux.out_channels, aux.hw[0],
                                                     plan.num_classes)
  params["fc"] = layers.classifier_init(k_fc, plan.nodes[plan.out].channels, plan.num_classes)
  return params, stats


# Rematerialisation policy of the training step: a sep_conv keeps only its input for the
# backward and recomputes its two [ReLU, depthwise, pointwise, BN] halves there, instead of
# saving ~10 activations of its size each (at final size, 15 layers / F 36 / batch 144, XLA's
# temp buffer falls from ~17 GiB; see bench/final_step.py). Convs and pools keep theirs.
# `impls` (layers' implementation switches, read while tracing) is part of the key of
# jax.checkpoint's trace cache, so a trace made under other switches is never reused.
@functools.partial(jax.checkpoint, static_argnums=(3, 4, 5, 6))
def _sep_conv_remat(p, s, x, train, axis_name, stride, impls):
  del impls
  return layers.sep_conv(p, s, x, train, axis_name, stride)


def apply_block(node, p, s, x, train, axis_name=None):
  """One conv / fr / sep node: (y, new stats)."""
  if node.kind == "conv":
    return layers.relu_conv_bn(p, s, x, train, axis_name, relu=node.relu)
  if node.kind == "fr":
    return layers.factorized_reduce(p, s, x, node.stride, train, axis_name, relu=node.relu)
  return _sep_conv_remat(p, s, x, train, axis_name, node.stride,
                         (layers.DEPTHWISE_IMPL, layers.SEP_IMPL))


def path_keep_prob(keep, cell_index, num_cells, progress):
  """ENAS drop-path schedule: 1 - (1 - keep) scaled by depth (cell_index + 1) / num_cells
  and by training progress in [0, 1] (may be traced)."""
  depth_keep = 1.0 - (cell_index + 1) / num_cells * (1.0 - keep)
  return 1.0 - jnp.minimum(1.0, progress) * (1.0 - depth_keep)


def _cell_nodes(plan, c):
  """[(j, node)] of cell c's own nodes (contiguous in the graph)."""
  return [(j, n) for j, n in enumerate(plan.nodes) if n.cell == c]


def _signature(plan, params, c):
  """What a cell computes, up to its index: its nodes relative to its two inputs and its
  own first node (name suffix, kind, inputs, widths, sizes, options) and its parameter
  shapes (a compact network's cells may differ in width)."""
  nodes = _cell_nodes(plan, c)
  first, ins = nodes[0][0], plan.cells[c].inputs
  where = lambda i: ("in", ins.index(i)) if i in ins else ("own", i - first)
  sig = []
  for j, n in nodes:
    if any(i < first and i not in ins for i in n.inputs):
      return None                       # reads a value from outside its inputs
    shapes = (jax.tree.map(jnp.shape, params["blocks"][n.name])
              if n.kind in graph.PARAM_KINDS else None)
    sig.append((n.name.split("/", 2)[2], n.kind, tuple(where(i) for i in n.inputs),
                n.channels, n.hw, n.k, n.stride, n.relu, n.drop, str(shapes)))
  return (tuple(plan.nodes[i].hw + (plan.nodes[i].channels,) for i in ins), tuple(sig))


def cell_runs(plan, params):
  """Consecutive cells of one signature whose inputs chain (cell i+1 reads h(i-1) and the
  output of cell i): [[cell index, ...], ...] in order; each run of several cells is
  compiled once and scanned over its stacked parameters."""
  sigs = [_signature(plan, params, spec.index) for spec in plan.cells]
  runs = []
  for spec in plan.cells:
    last = plan.cells[runs[-1][-1]] if runs else None
    if (last is not None and spec.inputs == (last.inputs[1], last.out)
        and sigs[spec.index] is not None and sigs[spec.index] == sigs[last.index]):
      runs[-1].append(spec.index)
    else:
      runs.append([spec.index])
  return runs


def _run_cell(plan, c, bp, bs, h0, h1, block, drop):
  """Cell c's output from its inputs (h0, h1), with its blocks' params bp / stats bs keyed
  by the name suffix; block(node, p, s, x) -> (y, s_new), drop(j_offset, node, y) -> y.
  Returns (output, new stats keyed by suffix)."""
  nodes = _cell_nodes(plan, c)
  first, ins = nodes[0][0], plan.cells[c].inputs
  vals, new = {ins[0]: h0, ins[1]: h1}, {}
  for j, n in nodes:
    args = [vals[i] for i in n.inputs]
    key = n.name.split("/", 2)[2]
    if n.kind in graph.PARAM_KINDS:
      y, new[key] = block(n, bp[key], bs[key], args[0])
    else:
      y = _plain(n, args)
    if drop is not None and n.drop:
      y = drop(j - first, n, y)
    vals[j] = y
  return vals[plan.cells[c].out], new


def _plain(n, ins):
  """A node without parameters."""
  if n.kind == "avg":
    return layers.avg_pool3x3(ins[0], n.stride)
  if n.kind == "max":
    return layers.max_pool3x3(ins[0], n.stride)
  if n.kind == "add":
    return ins[0] + ins[1]
  if n.kind == "concat":
    return jnp.concatenate(ins, axis=-1)
  raise ValueError(f"unknown node kind {n.kind!r}")


def apply_run(plan, run, params, stats, h0, h1, block, drop_at=None):
  """(outputs [len(run), B,H,W,C], [new BN statistics of each cell, keyed by name suffix])
  of a run of cells (`cell_runs`) from its first cell's inputs; several cells are one
  lax.scan over their stacked parameters and statistics, whose drop-path keys and depths
  are scan inputs. block(node, p, s, x) -> (y, s_new); drop_at(j, cell index, y) -> y."""
  c0 = plan.cells[run[0]]
  firsts = [_cell_nodes(plan, c)[0][0] for c in run]
  names = [n.name.split("/", 2)[2] for _, n in _cell_nodes(plan, c0.index)
           if n.kind in graph.PARAM_KINDS]
  local = lambda tree, c: {k: tree["blocks"][f"cells/{c}/{k}"] for k in names}

  def body(carry, xs):
    a, b = carry
    bp, bs, cell_index, first = xs
    drop = None
    if drop_at is not None:
      drop = lambda dj, n, y: drop_at(first + dj, cell_index, y)
    out, st = _run_cell(plan, c0.index, bp, bs, a, b, block, drop)
    return (b, out), (out, st)

  if len(run) == 1:
    _, (out, st) = body((h0, h1), (local(params, c0.index), local(stats, c0.index),
                                   c0.index, firsts[0]))
    return out[None], [st]
  stack = lambda trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)
  xs = (stack([local(params, c) for c in run]), stack([local(stats, c) for c in run]),
        jnp.asarray(run), jnp.asarray(firsts))
  _, (ys, st) = lax.scan(body, (h0, h1), xs)
  return ys, [jax.tree.map(lambda a, i=i: a[i], st) for i in range(len(run))]


def forward(plan, params, stats, x, train, axis_name=None, with_aux=True, reg=None):
  """(logits [B,classes], aux logits or None, new stats) of x [B,H,W,C].

  reg (training only, optional): {'key': PRNG key, 'keep_prob': dropout keep of
  the pooled features, 'drop_path_keep_prob': keep of the last cell's ops,
  'progress': step / total steps in [0, 1]}. Draws differ per device (the key
  is folded with the `axis_name` index).

  Runs of same-signature cells (`cell_runs`) are one `lax.scan` over their stacked
  parameters and statistics: the same values as the cell-by-cell graph, compiled once.
  """
  new = {"blocks": {}}
  dropout = drop_at = None
  if reg is not None:
    key = reg["key"]
    if axis_name is not None:
      key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    if reg["keep_prob"] < 1.0:
      dropout = lambda f: layers.dropout(f, jax.random.fold_in(key, 1 << 30), reg["keep_prob"])
    if reg["drop_path_keep_prob"] < 1.0:
      def drop_at(j, cell_index, y):    # j: the node's graph index (may be traced)
        keep = path_keep_prob(reg["drop_path_keep_prob"], cell_index, len(plan.cells),
                              reg["progress"])
        return layers.drop_path(y, jax.random.fold_in(key, j), keep)

  block = lambda n, p, s, h: apply_block(n, p, s, h, train, axis_name)
  stem = plan.nodes[plan.stem]
  vals = {}
  vals[plan.stem], new["blocks"][stem.name] = block(stem, params["blocks"][stem.name],
                                                    stats["blocks"][stem.name], x)
  outs = {}
  for run in cell_runs(plan, params):
    c0 = plan.cells[run[0]]
    ys, sts = apply_run(plan, run, params, stats, vals[c0.inputs[0]], vals[c0.inputs[1]],
                        block, drop_at)
    for i, c in enumerate(run):
      outs[c] = vals[plan.cells[c].out] = ys[i]
      for k, v in sts[i].items():
        new["blocks"][f"cells/{c}/{k}"] = v
  aux_logits = None
  if with_aux:
    aux_logits, new["aux"] = layers.aux_head(params["aux"], stats["aux"], outs[plan.aux_index],
                                             train, axis_name)
  else:
    new["aux"] = stats["aux"]
  return layers.classifier(params["fc"], vals[plan.out], dropout), aux_logits, new
