"""BN folded into the convolutions (host side, numpy): the weights the fused path and the
ONNX export run.

Eval-mode BN y = (z - mean) * scale / sqrt(var + eps) + bias after a conv
z = conv(x, w) (+ b0) is folded into the conv (`fold_bn`):

  w' = w * g,  b' = bias + (b0 - mean) * g,  g = scale / sqrt(var + eps)   (per output channel)

so every conv+BN of child.py becomes one conv with a bias: the stem, the 1x1
calibrations and layer_base convs, both halves of a factorized reduction (each
half takes its slice of the BN), and each sep_conv's pointwise convs (bn1 into
pw1, bn2 into pw2).
"""
from __future__ import annotations

import numpy as np

from fp_jax.models import graph
from fp_jax.models import layers
from fp_jax.infer import padding


def fold_bn(w, bn_p, bn_s, b0=None):
  """w [..., O] kernel (+ bias b0 [O]) and eval BN params/stats [O] -> (w' [..., O], b' [O]).

  conv(x, w') + b' == BN(conv(x, w) + b0) with running statistics; computed in
  float64 on the host, returned as float32 numpy arrays.
  """
  w = np.asarray(w, np.float64)
  g = np.asarray(bn_p["scale"], np.float64) / np.sqrt(np.asarray(bn_s["var"], np.float64)
                                                       + layers.BN_EPS)
  b0 = 0.0 if b0 is None else np.asarray(b0, np.float64)
  b = np.asarray(bn_p["bias"], np.float64) + (b0 - np.asarray(bn_s["mean"], np.float64)) * g
  return (w * g).astype(np.float32), b.astype(np.float32)


def _fold_producer(p, s):
  """conv+BN -> {'w', 'b'}; factorized reduce -> {'w1', 'b1', 'w2', 'b2'} (BN split)."""
  if "conv" in p:
    w, b = fold_bn(p["conv"], p["bn"], s["bn"])
    return {"w": w, "b": b}
  h = np.shape(p["conv1"])[-1]
  half = lambda t, sl: {k: np.asarray(v)[sl] for k, v in t.items()}
  w1, b1 = fold_bn(p["conv1"], half(p["bn"], slice(None, h)), half(s["bn"], slice(None, h)))
  w2, b2 = fold_bn(p["conv2"], half(p["bn"], slice(h, None)), half(s["bn"], slice(h, None)))
  return {"w1": w1, "b1": b1, "w2": w2, "b2": b2}


def _fold_sep(p, s):
  pw1, b1 = fold_bn(p["pw1"], p["bn1"], s["bn1"])
  pw2, b2 = fold_bn(p["pw2"], p["bn2"], s["bn2"])
  f32 = lambda a: np.asarray(a, np.float32)
  return {"dw1": f32(p["dw1"]), "pw1": pw1, "b1": b1, "dw2": f32(p["dw2"]), "pw2": pw2, "b2": b2}


def fold(plan, params, stats):
  """child.py (params, stats) of a full, compact or padded network -> folded pytree
  (numpy): {'blocks': {name: conv {w, b} | fr {w1, b1, w2, b2} | sep {dw1, pw1, b1,
  dw2, pw2, b2}}, 'fc': {'w' [C_last, classes]}}."""
  blocks = {}
  for _, n in graph.param_nodes(plan):
    p, s = params["blocks"][n.name], stats["blocks"][n.name]
    blocks[n.name] = _fold_sep(p, s) if n.kind == "sep" else _fold_producer(p, s)
  return {"blocks": blocks, "fc": {"w": np.asarray(params["fc"]["w"], np.float32)}}


def folded(plan, params, stats, pad_channels=8):
  """padding.pad_channels to `pad_channels`, then fold: the weights fused.forward and
  the ONNX export run."""
  params, stats = padding.pad_channels(plan, params, stats, pad_channels)
  return fold(plan, params, stats)
