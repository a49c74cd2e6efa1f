"""The published ENAS cell counted two independent ways, beside the published 751M / 4.6M.

Counts the same architecture two ways, analytically (multiply-adds of convs and
linear layers, batch 1, aux head excluded from multiply-adds):

  ours  fp_jax.models.flops.count on fp_jax's graph of the fixed network (graph.py),
        which follows ENAS's `_fixed_layer` since the ENAS-parity change (before
        it every input was calibrated: 547.9M / 3.703M).
  enas  this file's own count under the ENAS TensorFlow child's conventions: a 1x1
        calibration only when channels differ; a reduction cell calibrates its
        inputs to the doubled width at the *input* resolution and applies its
        ops with stride 2 (identity -> factorized reduction, sep_conv's first
        depthwise strided); every cell applies one more ReLU-1x1-BN ("layer_base")
        to its calibrated h(i-1); cell inputs left unused join the concat.

  python -m bench.enas_convention [--num_layers=15 --out_filters=36]
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from fp_jax.models import child
from fp_jax.models import flops
from fp_jax.models import layers
from fp_jax.models import space


def enas_counts(arc, num_layers, f, hw=32, c_in=3, classes=10):
  """{'macs', 'params', 'params_no_aux'} under the ENAS child's conventions."""
  normal, reduce = space.split(np.asarray(arc))
  r1, r2 = space.reduction_layers(num_layers)
  macs = hw * hw * 9 * c_in * 3 * f
  params = 9 * c_in * 3 * f + 2 * 3 * f
  prev = [(3 * f, hw), (3 * f, hw)]        # (channels, spatial size) of h(i-2), h(i-1)
  aux_params = 0
  for i in range(num_layers + 2):
    stride = 2 if i in (r1, r2) else 1
    f = 2 * f if stride == 2 else f
    (c0, s0), (c1, s1) = prev
    if s0 != s1:                           # factorized reduction of h(i-2) to s1
      macs += s1 * s1 * c0 * f
      params += c0 * f + 2 * f
    elif c0 != f:
      macs += s0 * s0 * c0 * f
      params += c0 * f + 2 * f
    if c1 != f:
      macs += s1 * s1 * c1 * f
      params += c1 * f + 2 * f
    macs += s1 * s1 * f * f                # "layer_base": ReLU-1x1-BN on h(i-1), every cell
    params += f * f + 2 * f
    s_out = s1 // stride
    rows = (reduce if stride == 2 else normal).reshape(space.NUM_NODES, 4)
    used = np.zeros(space.NUM_NODES + 2, int)
    for row in rows:
      for s in range(2):
        inp, op = int(row[2 * s]), int(row[2 * s + 1])
        used[inp] += 1
        st = stride if inp < 2 else 1
        if op in (space.SEP3, space.SEP5):
          k = 3 if op == space.SEP3 else 5
          macs += s_out * s_out * (k * k * f + f * f) * 2
          params += 2 * (k * k * f + f * f + 2 * f)
        elif op == space.IDENTITY and st > 1:
          macs += s_out * s_out * f * f
          params += f * f + 2 * f
    out_c = 0
    for j in np.flatnonzero(used == 0):
      out_c += f
      if j < 2 and stride == 2:            # an unused cell input at the larger size
        macs += s_out * s_out * f * f
        params += f * f + 2 * f
    if i == min(r2 + 1, num_layers + 1):
      w1, w2 = layers.AUX_WIDTHS
      r = layers.aux_pool_size(s_out)
      aux_params = out_c * w1 + 2 * w1 + r * r * w1 * w2 + 2 * w2 + w2 * classes
    prev = [prev[1], (out_c, s_out)]
  macs += prev[1][0] * classes
  params += prev[1][0] * classes           # no bias (ENAS's fc has none)
  return {"macs": int(macs), "params": int(params + aux_params), "params_no_aux": int(params)}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--num_layers", type=int, default=15)
  ap.add_argument("--out_filters", type=int, default=36)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                "enas_convention.json"))
  a = ap.parse_args()
  arc = space.parse_arc(space.ENAS_ARC)
  plan = child.make_plan(arc, a.num_layers, a.out_filters, (32, 32, 3), 10)
  rows = {"ours": flops.count(plan), "enas": enas_counts(arc, a.num_layers, a.out_filters),
          "published": {"macs": 751_000_000, "params": 4_600_000}}
  print(f"ENAS cell, {a.num_layers} layers, F {a.out_filters}, 32x32x3")
  print("| convention | multiply-adds (M) | params (M) | params without aux (M) |")
  print("|---|---|---|---|")
  for name, c in rows.items():
    no_aux = f"{c['params_no_aux'] / 1e6:.3f}" if "params_no_aux" in c else "-"
    print(f"| {name} | {c['macs'] / 1e6:.1f} | {c['params'] / 1e6:.3f} | {no_aux} |")
  with open(a.out, "w") as fh:
    json.dump({"num_layers": a.num_layers, "out_filters": a.out_filters, **rows}, fh, indent=1)


if __name__ == "__main__":
  main()
