"""Per-op inference: every primitive its own compiled call, dispatched from Python.

The per-op graph baseline (DESIGN §7): the fixed network of child.py in eval
mode (running BN statistics), where each ReLU, conv, depthwise conv, BN, pool,
add, concat, strided slice and classifier piece (global pool, dense) is a
separate XLA computation, compiled once per (primitive, static arguments,
input shapes) by `Ops` and called in sequence, so timing measures dispatch and
compute, not compilation. The primitives use the fused path's kernels (its
depthwise implementations and separable pools), so per-op vs fused measures
dispatch, fusion and BN folding rather than different kernels. Works for full and compact networks (widths come
from the parameter shapes); logits equal
`child.forward(plan, arc, params, stats, x, train=False, with_aux=False)[0]`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fp_jax import child
from fp_jax import layers
from fp_jax import space
from fp_jax.infer import fused


def _bn(x, p, s):
  return layers.batch_norm(p, s, x, False)[0]


def _concat(*xs):
  return jnp.concatenate(xs, axis=-1)


PRIMITIVES = {
    "relu": jax.nn.relu,
    "conv": layers.conv,                                   # (x, w; stride, padding)
    "depthwise": fused.depthwise,                          # (x, w; impl)
    "bn": _bn,                                             # (x, p, s) eval mode
    "avg_pool": fused.avg_pool3x3,                         # the fused path's kernels
    "max_pool": fused.max_pool3x3,
    "add": jnp.add,
    "concat": _concat,
    "subsample": lambda x, stride: x[:, ::stride, ::stride],
    "shift": lambda x: jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))[:, 1:, 1:],
    "global_pool": lambda x: jnp.mean(x, axis=(1, 2)),
    "dense": lambda x, w, b: x @ w + b,
}


class Ops:
  """Compiled primitives: ops(name, *arrays, **static) -> result.

  Each (name, static kwargs, argument shapes) is lowered and compiled once, with
  `compiler_options` (fused.compiler_options: the fused path's XLA options, so
  the two paths differ only in dispatch, fusion and folding); `calls` counts
  dispatches.
  """

  def __init__(self, compiler_options=None):
    self.cache = {}
    self.calls = 0
    self.compiler_options = compiler_options

  def __call__(self, name, *args, **static):
    key = (name, tuple(sorted(static.items())),
           tuple((a.shape, a.dtype) for a in jax.tree.leaves(args)))
    c = self.cache.get(key)
    if c is None:
      fn = functools.partial(PRIMITIVES[name], **static) if static else PRIMITIVES[name]
      c = self.cache[key] = jax.jit(fn).lower(*args).compile(
          compiler_options=self.compiler_options)
    self.calls += 1
    return c(*args)

  def memory_bytes(self):
    """Max over the compiled primitives of arguments + outputs + temporaries (bytes)."""
    best = 0
    for c in self.cache.values():
      m = c.memory_analysis()
      best = max(best, m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)
    return int(best)


class PerOp:
  """Per-op executor of a fixed network: params/stats of child.py (full or compact).

  `__call__(x [B,H,W,C]) -> logits [B,classes]`. `stem(x, mark)` and
  `cell(i, x0, x1, mark)` run pieces; `mark(part, value)`, when given, is called
  after each part ('conv', 'bn' of the stem; 'calib_x', 'calib_y', 'ops_x',
  'ops_y', 'combine' of a cell, as fused.cell) so a caller can time it.
  """

  def __init__(self, plan, arc, params, stats, depthwise="auto", ops=None):
    if depthwise not in fused.DEPTHWISE_IMPLS:
      raise ValueError(f"depthwise must be one of {fused.DEPTHWISE_IMPLS}, got {depthwise!r}")
    self.plan, self.arc, self.depthwise = plan, np.asarray(arc), depthwise
    put = lambda t: jax.tree.map(jnp.asarray, t)
    self.params, self.stats = put(params), put(stats)
    self.ops = ops or Ops()

  def _conv_bn(self, p, s, x, mark=None, parts=("conv", "bn")):
    y = self.ops("conv", x, p["conv"], stride=1, padding="SAME")
    if mark:
      mark(parts[0], y)
    y = self.ops("bn", y, p["bn"], s["bn"])
    if mark:
      mark(parts[1], y)
    return y

  def stem(self, x, mark=None):
    """x [B,H,W,C] -> [B,H,W,S]: conv, BN."""
    return self._conv_bn(self.params["stem"], self.stats["stem"], x, mark)

  def calibrate(self, p, s, x, stride):
    """ReLU, 1x1 conv, BN; or ReLU, two strided 1x1 paths, concat, BN (factorized)."""
    ops = self.ops
    x = ops("relu", x)
    if stride == 1:
      return self._conv_bn(p, s, x)
    a = ops("conv", ops("subsample", x, stride=stride), p["conv1"], stride=1, padding="SAME")
    shifted = ops("subsample", ops("shift", x), stride=stride)
    b = ops("conv", shifted, p["conv2"], stride=1, padding="SAME")
    return ops("bn", ops("concat", a, b), p["bn"], s["bn"])

  def sep_conv(self, p, s, x):
    ops = self.ops
    y = ops("depthwise", ops("relu", x), p["dw1"], impl=self.depthwise)
    y = ops("bn", ops("conv", y, p["pw1"], stride=1, padding="SAME"), p["bn1"], s["bn1"])
    y = ops("depthwise", ops("relu", y), p["dw2"], impl=self.depthwise)
    return ops("bn", ops("conv", y, p["pw2"], stride=1, padding="SAME"), p["bn2"], s["bn2"])

  def apply_op(self, op, p, s, x):
    if op in (space.SEP3, space.SEP5):
      return self.sep_conv(p, s, x)
    if op == space.AVG:
      return self.ops("avg_pool", x)
    if op == space.MAX:
      return self.ops("max_pool", x)
    return x

  def cell(self, i, x0, x1, mark=None):
    """Cell i with its calibrations: h(i-2) x0, h(i-1) x1 -> [B,H,W,n_out*F]."""
    spec, p, s = self.plan.cells[i], self.params, self.stats
    nodes = []
    for j, part in enumerate(("calib_x", "calib_y")):
      h = self.calibrate(p["calib"][i][j], s["calib"][i][j], (x0, x1)[j], spec.in_strides[j])
      if mark:
        mark(part, h)
      nodes.append(h)
    cp, cs = p["cells"][i]["nodes"], s["cells"][i]["nodes"]
    rows = child.cell_arc(self.arc, spec)
    for k, row in enumerate(rows):
      ys = []
      for slot, part in ((0, "ops_x"), (1, "ops_y")):
        y = self.apply_op(int(row[2 * slot + 1]), cp[k][slot], cs[k][slot],
                          nodes[int(row[2 * slot])])
        if mark:
          mark(part, y)
        ys.append(y)
      nodes.append(self.ops("add", *ys))
      if mark:
        mark("combine", nodes[-1])
    out = self.ops("concat", *[nodes[j] for j in space.output_nodes(rows.reshape(-1))])
    if mark:
      mark("combine", out)
    return out

  def classifier(self, x):
    """ReLU, global average pool, dense: [B,H,W,C] -> [B,classes]."""
    fc = self.params["fc"]
    return self.ops("dense", self.ops("global_pool", self.ops("relu", x)), fc["w"], fc["b"])

  def __call__(self, x):
    y = self.stem(x)
    prev = [y, y]
    for spec in self.plan.cells:
      prev = [prev[1], self.cell(spec.index, prev[0], prev[1])]
    return self.classifier(prev[1])
