"""Parameter and multiply-add counts.

`count` is analytic (from the plan's graph and the width of every value,
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

from fp_jax.models import layers


def full_widths(plan):
  """Widths of the unpruned network: {'values': [channels of node j], 'inner': {sep
  name: inner width}} (the layout of every `widths` argument here)."""
  return {"values": [n.channels for n in plan.nodes],
          "inner": {n.name: n.channels for n in plan.nodes if n.kind == "sep"}}


def widths_of_params(plan, params):
  """Widths read from the parameter shapes (full, compact or channel-padded networks)."""
  vals, inner = [], {}
  for n in plan.nodes:
    if n.kind == "image":
      vals.append(plan.in_channels)
    elif n.kind in ("conv", "fr"):
      vals.append(int(np.shape(params["blocks"][n.name]["bn"]["scale"])[-1]))
    elif n.kind == "sep":
      p = params["blocks"][n.name]
      vals.append(int(np.shape(p["bn2"]["scale"])[-1]))
      inner[n.name] = int(np.shape(p["bn1"]["scale"])[-1])
    elif n.kind == "concat":
      vals.append(sum(vals[i] for i in n.inputs))
    else:
      vals.append(vals[n.inputs[0]])
  return {"values": vals, "inner": inner}


def block_counts(node, c_in, c_out, inner=None):
  """(multiply-adds at batch 1, params) of one node of the graph."""
  hw = node.hw[0] * node.hw[1]
  if node.kind == "conv":
    k2 = node.k * node.k
    return hw * k2 * c_in * c_out, k2 * c_in * c_out + 2 * c_out
  if node.kind == "fr":        # two 1x1 halves, c_in x c_out together, one BN
    return hw * c_in * c_out, c_in * c_out + 2 * c_out
  if node.kind == "sep":       # dw k x k (strided) on c_in, pw to inner, BN; dw, pw to c_out, BN
    k2 = node.k * node.k
    macs = hw * (k2 * c_in + c_in * inner + k2 * inner + inner * c_out)
    return macs, k2 * c_in + c_in * inner + 2 * inner + k2 * inner + inner * c_out + 2 * c_out
  return 0, 0


def count(plan, widths=None):
  """{'macs', 'params', 'params_no_aux', 'aux_macs'} of the fixed network, batch 1.

  widths (full_widths layout): the kept channels of every value (pruned networks)."""
  widths = widths or full_widths(plan)
  vals = widths["values"]
  macs = params = 0
  for j, n in enumerate(plan.nodes):
    if n.kind in ("conv", "fr", "sep"):
      m, p = block_counts(n, vals[n.inputs[0]], vals[j], widths["inner"].get(n.name))
      macs, params = macs + m, params + p
  c_last = vals[plan.out]
  macs += c_last * plan.num_classes
  params += c_last * plan.num_classes                 # no bias, as ENAS
  aux = plan.cells[plan.aux_index]
  aux_macs, aux_params = _aux_counts(vals[aux.out], aux.hw[0], plan.num_classes)
  return {"macs": int(macs), "params": int(params + aux_params), "params_no_aux": int(params),
          "aux_macs": int(aux_macs)}


def _aux_counts(c_in, hw, num_classes):
  w1, w2 = layers.AUX_WIDTHS
  r = layers.aux_pool_size(hw)
  macs = r * r * c_in * w1 + r * r * w1 * w2 + w2 * num_classes
  params = c_in * w1 + 2 * w1 + r * r * w1 * w2 + 2 * w2 + w2 * num_classes
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
