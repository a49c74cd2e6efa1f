"""Fixed-architecture network: the same blocks with a static arc.

Only the ops of the arc have parameters; a cell concatenates its unused nodes.
BN keeps running statistics (`stats`, same nesting as `params`) for eval.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fp_jax import layers
from fp_jax import network
from fp_jax import space


def make_plan(arc, num_layers, out_filters, image_shape, num_classes):
  normal, reduce = space.split(arc)
  n_out = (len(space.output_nodes(normal)), len(space.output_nodes(reduce)))
  return network.make_plan(num_layers, out_filters, image_shape, num_classes,
                           lambda r: n_out[int(r)])


def cell_arc(arc, spec):
  normal, reduce = space.split(arc)
  return (reduce if spec.reduce else normal).reshape(space.NUM_NODES, 4)


def init(key, plan, arc):
  """(params, stats) of the fixed network of `arc` int [40]."""
  k_common, k_cells = jax.random.split(key)
  params, stats = network.init_common(k_common, plan)
  params["cells"], stats["cells"] = [], []
  for spec, kc in zip(plan.cells, jax.random.split(k_cells, len(plan.cells))):
    nodes_p, nodes_s = [], []
    for k, kn in enumerate(jax.random.split(kc, space.NUM_NODES)):
      row = cell_arc(arc, spec)[k]
      sp, ss = [], []
      for s, ks in enumerate(jax.random.split(kn, 2)):
        op = int(row[2 * s + 1])
        if op in (space.SEP3, space.SEP5):
          p, st = layers.sep_conv_init(ks, 3 if op == space.SEP3 else 5, spec.filters)
        else:
          p, st = {}, {}
        sp.append(p)
        ss.append(st)
      nodes_p.append(sp)
      nodes_s.append(ss)
    params["cells"].append({"nodes": nodes_p})
    stats["cells"].append({"nodes": nodes_s})
  return params, stats


def apply_op(op, p, s, x, train, axis_name):
  if op in (space.SEP3, space.SEP5):
    return layers.sep_conv(p, s, x, train, axis_name)
  if op == space.AVG:
    return layers.avg_pool3x3(x), s
  if op == space.MAX:
    return layers.max_pool3x3(x), s
  return x, s


def cell(arc_rows, p, s, h0, h1, train, axis_name=None, drop_path=None):
  """arc_rows int [5, 4] (static); returns (concat of unused nodes, new stats).

  drop_path (optional): (y, node, slot) -> y, applied to every op but identity.
  """
  nodes = [h0, h1]
  new_s = []
  for k, row in enumerate(arc_rows):
    out, row_s = 0.0, []
    for slot in range(2):
      op = int(row[2 * slot + 1])
      y, st = apply_op(op, p["nodes"][k][slot], s["nodes"][k][slot], nodes[int(row[2 * slot])],
                       train, axis_name)
      if drop_path is not None and op != space.IDENTITY:
        y = drop_path(y, k, slot)
      out = out + y
      row_s.append(st)
    nodes.append(out)
    new_s.append(row_s)
  outs = [nodes[k] for k in space.output_nodes(arc_rows.reshape(-1))]
  return jax.numpy.concatenate(outs, axis=-1), {"nodes": new_s}


def path_keep_prob(keep, cell_index, num_cells, progress):
  """ENAS drop-path schedule: 1 - (1 - keep) scaled by depth (cell_index + 1) / num_cells
  and by training progress in [0, 1] (may be traced)."""
  depth_keep = 1.0 - (cell_index + 1) / num_cells * (1.0 - keep)
  return 1.0 - jnp.minimum(1.0, progress) * (1.0 - depth_keep)


def forward(plan, arc, params, stats, x, train, axis_name=None, with_aux=True, reg=None):
  """(logits [B,classes], aux logits or None, new stats); `arc` is static numpy.

  reg (training only, optional): {'key': PRNG key, 'keep_prob': dropout keep of
  the pooled features, 'drop_path_keep_prob': keep of the last cell's ops,
  'progress': step / total steps in [0, 1]}. Draws differ per device (the key
  is folded with the `axis_name` index).
  """
  dropout = None
  if reg is not None:
    key = reg["key"]
    if axis_name is not None:
      key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    if reg["keep_prob"] < 1.0:
      dropout = lambda f: layers.dropout(f, jax.random.fold_in(key, 1 << 30), reg["keep_prob"])

  def cell_fn(i, spec, h0, h1):
    if reg is not None and reg["drop_path_keep_prob"] < 1.0:
      keep = path_keep_prob(reg["drop_path_keep_prob"], i, len(plan.cells), reg["progress"])
      drop = lambda y, k, slot: layers.drop_path(
          y, jax.random.fold_in(key, (i * space.NUM_NODES + k) * 2 + slot), keep)
    else:
      drop = None
    return cell(cell_arc(arc, spec), params["cells"][i], stats["cells"][i], h0, h1, train,
                axis_name, drop)

  return network.run(plan, cell_fn, params, stats, x, train, axis_name, with_aux, dropout)
