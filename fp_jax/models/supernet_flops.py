"""Multiply-adds of a sampled supernet architecture, unpruned and masked (host side).

The searched network of a sample is the supernet running architecture `arc`: the stem,
each cell's calibrations (and a reduction cell's factorized reduction of h(i-1)),
the sampled sep_convs of every node (pools and identities cost no multiply-adds)
and the final 1x1 conv over the cell inputs and nodes no node reads, then the
classifier; the aux head is a training-only part and not counted (flops.count's
convention). `kept` (supernet.Kept, the masks' 'kept') gives the channels of every
space, so the same count gives the masked network's multiply-adds.

The ratio measure `macs` (search.ratio_measure) scores the fraction of these
multiply-adds the masks remove, scaled by MACS_RATIO_SCALE: the paper's Ratio sums a
per-layer ratio over the searched network's layers, so its scale grows with depth;
the fraction does not, and MACS_RATIO_SCALE = 8 (the layers of the paper's searched
network: 6 normal cells and 2 reduction cells) keeps `a` on the paper's scale at
every depth. Removing a fraction r of every layer's channels (inputs and outputs)
removes about 1 - (1 - r)^2 of the multiply-adds, so at the paper's depth the `macs`
Ratio is 8 (2r - r^2) against the `layers` Ratio 8r.

The measure `latency` is the same scaled fraction of the deployed network's predicted
fused CPU latency (infer/latency_table.py): 8 x (1 - masked_latency_ms / latency_ms).
"""
from __future__ import annotations

import numpy as np

from fp_jax.models import space
from fp_jax.models import supernet

MACS_RATIO_SCALE = 8
MEASURES = ("layers", "macs", "latency")


def count(plan, arc, kept=None):
  """Multiply-adds (batch 1) of supernet `plan` running `arc` (int [40]); kept:
  supernet.Kept, the channels of every space (default: every channel). A Kept of n
  networks (supernet.stack_kept: each leaf with a leading axis n) counts all n in one walk
  of the arc: a list of n."""
  kept = supernet.full_kept(plan) if kept is None else kept
  if len(kept.cells) != len(plan.cells):
    raise ValueError(f"kept has {len(kept.cells)} cells, the plan {len(plan.cells)}")
  h, w = plan.image_hw
  f64 = lambda v: np.asarray(v, np.float64)
  stem = f64(kept.stem)
  macs = h * w * 9 * plan.in_channels * stem
  prev = [stem, stem]
  for spec, kc in zip(plan.cells, kept.cells):
    hw = spec.hw[0] * spec.hw[1]
    ins = list(prev)
    if spec.reduce:                      # factorized reduction of h(i-1): c_in x c_out
      macs += hw * prev[1] * f64(kc.reduce)
      ins = [prev[1], f64(kc.reduce)]
    vals = []
    for j, calib in enumerate((kc.calib_x, kc.calib_y)):
      if spec.calib[j] == "none":
        vals.append(ins[j])
      else:                              # 1x1 conv or factorized reduction, at the cell's hw
        macs += hw * ins[j] * f64(calib)
        vals.append(f64(calib))
    node = f64(kc.node)
    vals += [node[..., v] for v in range(space.NUM_NODES)]
    idx, op = supernet.slots(supernet.cell_arc(np.asarray(arc), spec))
    out, inner = f64(kc.out), f64(kc.inner)
    used = set()
    for k in range(space.NUM_NODES):
      for s in range(2):
        i, o = int(idx[k, s]), int(op[k, s])
        used.add(i)
        if o in (space.SEP3, space.SEP5):
          k2 = 9 if o == space.SEP3 else 25
          c_in, c_mid, c_out = vals[i], inner[..., k, s], out[..., k, s]
          macs += hw * (k2 * c_in + c_in * c_mid + k2 * c_mid + c_mid * c_out)
    unused = sum(vals[v] for v in range(len(vals)) if v not in used)
    final = f64(kc.final)
    macs += hw * unused * final
    prev = [ins[1], final]
  return np.rint(macs + prev[1] * plan.num_classes).astype(int).tolist()


def ratio(measure, plan, stage_ratios, macs=None, masked_macs=None, latency_ms=None,
          masked_latency_ms=None):
  """The Ratio of the reward: 'layers' sums each cell's stage ratio (the paper);
  'macs' is MACS_RATIO_SCALE * (1 - masked_macs / macs); 'latency' the same of the
  predicted latencies (Python floats: the logged values give it exactly)."""
  if measure == "layers":
    return float(sum(float(stage_ratios[spec.stage]) for spec in plan.cells))
  if measure == "macs":
    return MACS_RATIO_SCALE * (1.0 - masked_macs / macs)
  if measure == "latency":
    if latency_ms is None:
      raise ValueError("ratio measure 'latency' needs a latency table (search.latency_table_dir)")
    return MACS_RATIO_SCALE * (1.0 - masked_latency_ms / latency_ms)
  raise ValueError(f"ratio measure must be one of {MEASURES}, got {measure!r}")
