"""Shared-weight ENAS supernet: the architecture is traced data.

Weights are shared per (cell, node, input slot, op, chosen input) as in ENAS:
each sep_conv parameter carries a leading axis over the node's k + 2 possible
inputs and is gathered by the traced input index. Each node input runs
`lax.switch(op, ...)`, so only the sampled op executes and one compilation
serves every architecture. A cell outputs all 5 nodes concatenated with the
nodes that feed other nodes zeroed ([B,H,W,5F]); the next cell's calibration
therefore sees exactly the fixed network's concat, padded with zeros.

BN always normalises with batch statistics (synchronised over `axis_name`) and
keeps no moving averages: with a different architecture every step, moving
averages would describe no network (ENAS evaluates the shared child the same
way). Masked forward passes (fake pruning) use `pruning.apply_supernet_masks`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from fp_jax import layers
from fp_jax import network
from fp_jax import space


def make_plan(num_layers, out_filters, image_shape, num_classes):
  return network.make_plan(num_layers, out_filters, image_shape, num_classes,
                           lambda reduce: space.NUM_NODES)


MAX_INPUTS = 2 + space.NUM_NODES - 1   # node k chooses among k + 2 <= 6 inputs


def init(key, plan):
  """Parameter pytree of the supernet described by `plan` (no BN statistics).

  Per cell, 'sep3' and 'sep5' hold sep_conv params with leading axes
  [node 5, slot 2, input 6] (node k uses inputs 0..k+1; the rest is padding
  that keeps every node's params one shape, so a scan runs the nodes).
  """
  k_common, k_cells = jax.random.split(key)
  params, _ = network.init_common(k_common, plan)
  params["cells"] = []
  shape = (space.NUM_NODES, 2, MAX_INPUTS)
  for spec, kc in zip(plan.cells, jax.random.split(k_cells, len(plan.cells))):
    cell_p = {}
    for name, size, kk in (("sep3", 3, 0), ("sep5", 5, 1)):
      cell_p[name] = layers.sep_conv_init(jax.random.fold_in(kc, kk), size, spec.filters,
                                          lead=shape)[0]
    params["cells"].append(cell_p)
  return params


def _branches(axis_name):
  def sep(name):
    def f(p, idx, x):
      return layers.sep_conv(jax.tree.map(lambda a: a[idx], p[name]), None, x, True,
                             axis_name)[0]
    return f
  # Checkpointed branches keep only their inputs as residuals: without it the backward
  # of every switch materialises (zero) residuals of all branches.
  return (jax.checkpoint(sep("sep3")), jax.checkpoint(sep("sep5")),
          lambda p, idx, x: layers.avg_pool3x3(x),
          lambda p, idx, x: layers.max_pool3x3(x),
          lambda p, idx, x: x)


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

  logits, aux, _ = network.run(plan, cell_fn, params, None, x, True, axis_name, with_aux)
  return logits, aux
