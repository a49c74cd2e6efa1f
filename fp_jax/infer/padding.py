"""Zero-padding a folded network's channels to the SIMD width (blocked layout).

Pruning leaves widths such as 22, 43 or 86 channels. In the NHWC layout of the
fused path the channel axis is the contiguous one, so XLA:CPU vectorizes the
elementwise kernels (depthwise taps, pools, adds) along it, and a width that is
not a multiple of the vector width leaves a scalar remainder in every row: a
5x5 depthwise over 22 channels runs about 2x slower than over 24. Inference
engines answer this with blocked layouts (oneDNN's nChw8c / nChw16c);
`pad_channels` does the same to the folded pytree of fused.fold: every channel
group (the stem's output, each cell's width F, each separable conv's inner
width) grows to a multiple of `multiple` with zero weights and zero biases.

Padded channels carry exact zeros through every operator (ReLU(0) = 0, a pool
of zeros is 0, conv and add of zeros are 0), and every consumer's input rows
for them are zero, so logits are unchanged. A cell's output is the concat of
its output nodes, so its channels come in blocks [F] * n_out; a consumer's
input weights get zero rows after each block (`spread`).
"""
from __future__ import annotations

import numpy as np

from fp_jax import child
from fp_jax import space


def round_up(n, multiple):
  return -(-int(n) // multiple) * multiple


def spread(a, axis, blocks, multiple):
  """Insert zeros along `axis` after each block of sizes `blocks` so each is a multiple."""
  a = np.asarray(a)
  parts, start = [], 0
  for b in blocks:
    parts.append(np.take(a, np.arange(start, start + b), axis=axis))
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, round_up(b, multiple) - b)
    parts[-1] = np.pad(parts[-1], pad)
    start += b
  if start != a.shape[axis]:
    raise ValueError(f"blocks {blocks} do not cover axis {axis} of size {a.shape[axis]}")
  return np.concatenate(parts, axis=axis)


def _pad_out(a, extra):
  """Zero columns appended to the last axis."""
  return np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, extra)])


def _producer(p, blocks, multiple):
  """conv 'w' [1|k,k,I,F] or factorized reduce 'w1'/'w2' [1,1,I,h]: inputs spread, outputs
  padded (a factorized reduce's concat [h1 | h2] gets its zeros after h2)."""
  if "w" in p:
    f = p["w"].shape[-1]
    extra = round_up(f, multiple) - f
    w = p["w"] if blocks is None else spread(p["w"], 2, blocks, multiple)
    return {"w": _pad_out(w, extra), "b": _pad_out(p["b"], extra)}, f
  f = p["w1"].shape[-1] + p["w2"].shape[-1]
  extra = round_up(f, multiple) - f
  return {"w1": spread(p["w1"], 2, blocks, multiple), "b1": p["b1"],
          "w2": _pad_out(spread(p["w2"], 2, blocks, multiple), extra),
          "b2": _pad_out(p["b2"], extra)}, f


def _sep(s, multiple):
  """Separable conv {dw1 [k,k,1,F], pw1 [1,1,F,G], b1, dw2 [k,k,1,G], pw2 [1,1,G,F], b2}."""
  f, g = s["pw1"].shape[2], s["pw1"].shape[3]
  ef, eg = round_up(f, multiple) - f, round_up(g, multiple) - g
  pw1 = np.pad(s["pw1"], ((0, 0), (0, 0), (0, ef), (0, eg)))
  pw2 = np.pad(s["pw2"], ((0, 0), (0, 0), (0, eg), (0, ef)))
  return {"dw1": _pad_out(s["dw1"], ef), "pw1": pw1, "b1": _pad_out(s["b1"], eg),
          "dw2": _pad_out(s["dw2"], eg), "pw2": pw2, "b2": _pad_out(s["b2"], ef)}


def pad_channels(plan, arc, fp, multiple):
  """Folded pytree (fused.fold) -> the same network with every channel group padded
  to a multiple of `multiple`; logits unchanged. multiple <= 1 returns fp as is."""
  if multiple <= 1:
    return fp
  arc = np.asarray(arc)
  stem, s = _producer(fp["stem"], None, multiple)
  out = {"stem": stem, "calib": [], "cells": [], "fc": None}
  blocks = {"stem": [s]}                       # channel blocks of each producer's output
  prev = ["stem", "stem"]
  for spec in plan.cells:
    calib, widths = [], []
    for j in range(2):
      c, f = _producer(fp["calib"][spec.index][j], blocks[prev[j]], multiple)
      calib.append(c)
      widths.append(f)
    out["calib"].append(calib)
    out["cells"].append({"nodes": [[_sep(sl, multiple) if sl else {} for sl in node]
                                   for node in fp["cells"][spec.index]["nodes"]]})
    n_out = len(space.output_nodes(child.cell_arc(arc, spec).reshape(-1)))
    blocks[spec.index] = [widths[0]] * n_out
    prev = [prev[1], spec.index]
  out["fc"] = {"w": spread(fp["fc"]["w"], 0, blocks[prev[1]], multiple),
               "b": np.asarray(fp["fc"]["b"])}
  return out

