"""Fixed-architecture network (final training, compression): the graph of graph.py run
with the blocks of layers.py.

params: {'blocks': {name: conv {conv, bn} | fr {conv1, conv2, bn} | sep {dw1, pw1, bn1,
dw2, pw2, bn2}}, 'aux': ..., 'fc': {w, b}}; stats (BN running statistics) has the
same nesting for its BN layers. Every width is read from the parameter shapes, so a
compact (pruned) network runs with the same plan.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fp_jax import graph
from fp_jax import layers
from fp_jax import space


def make_plan(arc, num_layers, out_filters, image_shape, num_classes):
  return graph.build(arc, num_layers, out_filters, image_shape, num_classes)


def cell_arc(arc, spec):
  normal, reduce = space.split(arc)
  return (reduce if spec.reduce else normal).reshape(space.NUM_NODES, 4)


def block_init(key, node, c_in):
  """(params, stats) of one conv / fr / sep node reading c_in channels."""
  if node.kind == "conv":
    return layers.conv_bn_init(key, node.k, c_in, node.channels)
  if node.kind == "fr":
    return layers.factorized_reduce_init(key, c_in, node.channels)
  assert c_in == node.channels, node
  return layers.sep_conv_init(key, node.k, node.channels)


def init(key, plan, arc=None):
  """(params, stats) of the fixed network `plan` (arc: unused, the plan holds it)."""
  del arc
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
_sep_conv_remat = jax.checkpoint(layers.sep_conv, static_argnums=(3, 4, 5))


def apply_block(node, p, s, x, train, axis_name=None):
  """One conv / fr / sep node: (y, new stats)."""
  if node.kind == "conv":
    return layers.relu_conv_bn(p, s, x, train, axis_name, relu=node.relu)
  if node.kind == "fr":
    return layers.factorized_reduce(p, s, x, node.stride, train, axis_name, relu=node.relu)
  return _sep_conv_remat(p, s, x, train, axis_name, node.stride)


def path_keep_prob(keep, cell_index, num_cells, progress):
  """ENAS drop-path schedule: 1 - (1 - keep) scaled by depth (cell_index + 1) / num_cells
  and by training progress in [0, 1] (may be traced)."""
  depth_keep = 1.0 - (cell_index + 1) / num_cells * (1.0 - keep)
  return 1.0 - jnp.minimum(1.0, progress) * (1.0 - depth_keep)


def run_graph(plan, x, block_fn, drop=None):
  """Values of every node of `plan` on the image x (a list, index = node).

  block_fn(j, node, x) -> y runs conv/fr/sep nodes; drop(j, node, y) -> y (optional)
  applies to nodes with node.drop.
  """
  vals = []
  for j, n in enumerate(plan.nodes):
    ins = [vals[i] for i in n.inputs]
    if n.kind == "image":
      y = x
    elif n.kind in graph.PARAM_KINDS:
      y = block_fn(j, n, ins[0])
    elif n.kind == "avg":
      y = layers.avg_pool3x3(ins[0], n.stride)
    elif n.kind == "max":
      y = layers.max_pool3x3(ins[0], n.stride)
    elif n.kind == "add":
      y = ins[0] + ins[1]
    elif n.kind == "concat":
      y = jnp.concatenate(ins, axis=-1)
    else:
      raise ValueError(f"unknown node kind {n.kind!r}")
    if drop is not None and n.drop:
      y = drop(j, n, y)
    vals.append(y)
  return vals


def forward(plan, arc, params, stats, x, train, axis_name=None, with_aux=True, reg=None):
  """(logits [B,classes], aux logits or None, new stats).

  reg (training only, optional): {'key': PRNG key, 'keep_prob': dropout keep of
  the pooled features, 'drop_path_keep_prob': keep of the last cell's ops,
  'progress': step / total steps in [0, 1]}. Draws differ per device (the key
  is folded with the `axis_name` index).
  """
  del arc
  new = {"blocks": {}}
  dropout = drop = None
  if reg is not None:
    key = reg["key"]
    if axis_name is not None:
      key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    if reg["keep_prob"] < 1.0:
      dropout = lambda f: layers.dropout(f, jax.random.fold_in(key, 1 << 30), reg["keep_prob"])
    if reg["drop_path_keep_prob"] < 1.0:
      def drop(j, n, y):
        keep = path_keep_prob(reg["drop_path_keep_prob"], n.cell, len(plan.cells),
                              reg["progress"])
        return layers.drop_path(y, jax.random.fold_in(key, j), keep)

  def block_fn(j, n, h):
    y, new["blocks"][n.name] = apply_block(n, params["blocks"][n.name],
                                           stats["blocks"][n.name], h, train, axis_name)
    return y

  vals = run_graph(plan, x, block_fn, drop)
  aux_logits = None
  if with_aux:
    aux_logits, new["aux"] = layers.aux_head(params["aux"], stats["aux"],
                                             vals[plan.cells[plan.aux_index].out], train,
                                             axis_name)
  else:
    new["aux"] = stats["aux"]
  return layers.classifier(params["fc"], vals[plan.out], dropout), aux_logits, new
