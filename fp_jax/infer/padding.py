"""Zero-padding a network's channel groups to the SIMD width (blocked layout).

Pruning leaves widths such as 22, 43 or 86 channels. In the NHWC layout of the
fused path the channel axis is the contiguous one, so XLA:CPU vectorizes the
elementwise kernels (depthwise taps, pools, adds) along it, and a width that is
not a multiple of the vector width leaves a scalar remainder in every row: a
5x5 depthwise over 22 channels runs about 2x slower than over 24. Inference
engines answer this with blocked layouts (oneDNN's nChw8c / nChw16c);
`pad_channels` does the same to a (full or compact) child.py network: every
channel group (pruning/groups.py, derived on the network's own widths) grows to a
multiple of `multiple` with zero weights, zero BN scale and offset, and
statistics mean 0 / var 1 (compaction.gather with -1 entries), so BN folding
gives zero weights and biases for them.

Padded channels carry exact zeros through every operator (ReLU(0) = 0, a pool
of zeros is 0, conv and add of zeros are 0), and every consumer's input rows
for them are zero, so logits are unchanged. A concat's layout is its parts'
layouts one after the other, so a cell output's padding sits after each block.
A group is padded only when each of its member tensors holds all its units
once (true unless a cell skips its calibration and reads a concat directly;
such a group keeps its width).
"""
from __future__ import annotations

import numpy as np

from fp_jax.models import flops
from fp_jax.models import graph
from fp_jax.pruning import compaction
from fp_jax.pruning import groups as groups_lib


def round_up(n, multiple):
  return -(-int(n) // multiple) * multiple


def layouts(plan, params, multiple):
  """compaction.gather layouts padding every simple group of the network `params`
  (widths read from its shapes) to a multiple of `multiple`."""
  return width_layouts(plan, flops.widths_of_params(plan, params), multiple)


def width_layouts(plan, w, multiple):
  """`layouts` of a network of widths `w` (flops.full_widths layout; no weights needed)."""
  spaces, inner = graph.channel_spaces(plan, w)
  g, widths = groups_lib.derive(spaces), spaces.widths
  simple = ~g.group_fixed.copy()
  for s, width in enumerate(widths):
    if spaces.member[s] and width:
      grp = np.unique(g.unit_group[g.unit_of[s]])
      if len(grp) != 1 or width != g.group_size[grp[0]]:
        simple[grp] = False
  extra = np.where(simple, [round_up(n, multiple) - n for n in g.group_size], 0)

  def own(s):
    grp = g.unit_group[g.unit_of[s]]
    pad = int(extra[grp[0]]) if len(grp) and simple[grp[0]] else 0
    return np.concatenate([np.arange(widths[s]), -np.ones(pad, np.int64)])

  vals = []
  for j, n in enumerate(plan.nodes):
    if n.kind == "concat":
      parts, off = [], 0
      for i in n.inputs:
        lay = vals[i]
        parts.append(np.where(lay >= 0, lay + off, -1))
        off += widths[i]
      vals.append(np.concatenate(parts))
    else:
      vals.append(own(j))
  return {"values": vals, "inner": {name: own(s) for name, s in inner.items()}}


def padded_widths(plan, widths, multiple):
  """The widths (flops.full_widths layout) the fused path runs for a network of `widths`:
  every simple group padded to a multiple of `multiple` (the lengths of width_layouts)."""
  if multiple == 1:
    return widths
  lay = width_layouts(plan, widths, multiple)
  return {"values": [len(v) for v in lay["values"]],
          "inner": {k: len(v) for k, v in lay["inner"].items()}}


def pad_channels(plan, params, stats, multiple):
  """(params, stats) with every simple channel group zero-padded to `multiple`."""
  if multiple == 1:
    return params, stats
  return compaction.gather(plan, params, stats, layouts(plan, params, multiple))
