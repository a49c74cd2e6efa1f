"""Fixed-architecture network: the same blocks with a static arc.

Only the ops of the arc have parameters; a cell concatenates its unused nodes.
BN keeps running statistics (`stats`, same nesting as `params`) for eval.
"""
from __future__ import annotations

import jax

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


def cell(arc_rows, p, s, h0, h1, train, axis_name=None):
  """arc_rows int [5, 4] (static); returns (concat of unused nodes, new stats)."""
  nodes = [h0, h1]
  new_s = []
  for k, row in enumerate(arc_rows):
    out, row_s = 0.0, []
    for slot in range(2):
      y, st = apply_op(int(row[2 * slot + 1]), p["nodes"][k][slot],
                       s["nodes"][k][slot], nodes[int(row[2 * slot])], train, axis_name)
      out = out + y
      row_s.append(st)
    nodes.append(out)
    new_s.append(row_s)
  outs = [nodes[k] for k in space.output_nodes(arc_rows.reshape(-1))]
  return jax.numpy.concatenate(outs, axis=-1), {"nodes": new_s}


def forward(plan, arc, params, stats, x, train, axis_name=None, with_aux=True):
  """(logits [B,classes], aux logits or None, new stats); `arc` is static numpy."""
  def cell_fn(i, spec, h0, h1):
    return cell(cell_arc(arc, spec), params["cells"][i], stats["cells"][i], h0, h1, train,
                axis_name)

  return network.run(plan, cell_fn, params, stats, x, train, axis_name, with_aux)
