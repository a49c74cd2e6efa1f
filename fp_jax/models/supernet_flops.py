"""Multiply-adds of a sampled supernet architecture, unpruned and masked (host side).

The searched network of a sample is the supernet running architecture `arc`: the stem,
each cell's calibrations (and a reduction cell's factorized reduction of h(i-1)),
the sampled sep_convs of every node (pools and identities cost no multiply-adds)
and the final 1x1 conv over the cell inputs and nodes no node reads, then the
classifier; the aux head is a training-only part and not counted (flops.count's
convention). `kept` gives the channels of every space of pruning.supernet_spaces
(the masks' 'kept'), so the same count gives the masked network's multiply-adds.

The ratio measure `macs` (search.ratio_measure) scores the fraction of these
multiply-adds the masks remove, scaled by MACS_RATIO_SCALE: the paper's Ratio sums a
per-layer ratio over the searched network's layers, so its scale grows with depth;
the fraction does not, and MACS_RATIO_SCALE = 8 (the layers of the paper's searched
network: 6 normal cells and 2 reduction cells) keeps `a` on the paper's scale at
every depth. Removing a fraction r of every layer's channels (inputs and outputs)
removes about 1 - (1 - r)^2 of the multiply-adds, so at the paper's depth the `macs`
Ratio is 8 (2r - r^2) against the `layers` Ratio 8r.
"""
from __future__ import annotations

import numpy as np

from fp_jax.pruning import supernet_masks as pruning
from fp_jax.models import space

MACS_RATIO_SCALE = 8
MEASURES = ("layers", "macs")


def _cell_rows(arc, spec):
  cell = np.asarray(arc)[space.CELL_LEN:] if spec.reduce else np.asarray(arc)[:space.CELL_LEN]
  return cell.reshape(space.NUM_NODES, 4)


def count(plan, arc, kept=None):
  """Multiply-adds (batch 1) of supernet `plan` running `arc` (int [40]); kept [spaces]:
  the channels of every space of pruning.supernet_spaces(plan), in its order (default:
  every channel). kept [n, spaces] counts n networks in one walk of the arc (a list of n)."""
  sp = pruning.supernet_spaces(plan)
  kept = np.asarray([w for _, w, _ in sp] if kept is None else kept, np.float64)
  if kept.ndim not in (1, 2) or kept.shape[-1] != len(sp):
    raise ValueError(f"kept has shape {kept.shape}, the plan {len(sp)} spaces")
  width = list(kept.T)
  of = {key: width[n] for n, (key, _, _) in enumerate(sp)}
  h, w = plan.image_hw
  macs = h * w * 9 * plan.in_channels * of["stem"]
  prev = [of["stem"], of["stem"]]
  for spec in plan.cells:
    i, hw = spec.index, spec.hw[0] * spec.hw[1]
    ins = list(prev)
    if spec.reduce:                      # factorized reduction of h(i-1): c_in x c_out
      macs += hw * prev[1] * of[("reduce", i)]
      ins = [prev[1], of[("reduce", i)]]
    vals = []
    for j, name in enumerate(("calib_x", "calib_y")):
      if spec.calib[j] == "none":
        vals.append(ins[j])
      else:                              # 1x1 conv or factorized reduction, at the cell's hw
        macs += hw * ins[j] * of[(name, i)]
        vals.append(of[(name, i)])
    vals += [of[("node", i, k)] for k in range(space.NUM_NODES)]
    rows = _cell_rows(arc, spec)
    used = set()
    for k in range(space.NUM_NODES):
      for s in range(2):
        idx, op = int(rows[k, 2 * s]), int(rows[k, 2 * s + 1])
        used.add(idx)
        if op in (space.SEP3, space.SEP5):
          k2 = 9 if op == space.SEP3 else 25
          c_in, inner, c_out = vals[idx], of[("inner", i, k, s)], of[("out", i, k, s)]
          macs += hw * (k2 * c_in + c_in * inner + k2 * inner + inner * c_out)
    unused = sum(vals[v] for v in range(len(vals)) if v not in used)
    macs += hw * unused * of[("final", i)]
    prev = [ins[1], of[("final", i)]]
  return np.rint(macs + prev[1] * plan.num_classes).astype(int).tolist()


def ratio(measure, plan, stage_ratios, macs=None, masked_macs=None):
  """The Ratio of the reward: 'layers' sums each cell's stage ratio (the paper);
  'macs' is MACS_RATIO_SCALE * (1 - masked_macs / macs)."""
  if measure == "layers":
    return float(sum(float(stage_ratios[spec.stage]) for spec in plan.cells))
  if measure == "macs":
    return MACS_RATIO_SCALE * (1.0 - masked_macs / macs)
  raise ValueError(f"ratio measure must be one of {MEASURES}, got {measure!r}")
