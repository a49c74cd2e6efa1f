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
`child.forward(plan, params, stats, x, train=False, with_aux=False)[0]`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fp_jax.models import layers
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
    "dense": lambda x, w: x @ w,
    "same_subsample": lambda y, hw, k, stride: layers.subsample(y, hw, k, stride),
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
  after each part ('conv', 'bn' of the stem; a cell's parts as fused.part_of) so a
  caller can time it.
  """

  def __init__(self, plan, params, stats, depthwise="auto", ops=None, dtype="float32"):
    """dtype: compute dtype (config.dtype): weights, statistics and activations in it;
    images enter and logits leave as float32."""
    if depthwise not in fused.DEPTHWISE_IMPLS:
      raise ValueError(f"depthwise must be one of {fused.DEPTHWISE_IMPLS}, got {depthwise!r}")
    self.plan, self.depthwise = plan, depthwise
    self.dtype = jnp.dtype(dtype)
    put = lambda t: jax.tree.map(lambda a: jnp.asarray(a, self.dtype), t)
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
    x = x.astype(self.dtype)
    n = self.plan.nodes[self.plan.stem]
    return self._conv_bn(self.params["blocks"][n.name], self.stats["blocks"][n.name], x, mark)

  def _strided(self, y, hw, k, stride):
    if stride == 1:
      return y
    return self.ops("same_subsample", y, hw=tuple(hw), k=k, stride=stride)

  def producer(self, n, p, s, x):
    """[ReLU], 1x1/kxk conv, BN; or [ReLU], two strided 1x1 paths, concat, BN."""
    ops = self.ops
    if n.relu:
      x = ops("relu", x)
    if n.kind == "conv":
      return self._conv_bn(p, s, x)
    a = ops("conv", ops("subsample", x, stride=n.stride), p["conv1"], stride=1, padding="SAME")
    shifted = ops("subsample", ops("shift", x), stride=n.stride)
    b = ops("conv", shifted, p["conv2"], stride=1, padding="SAME")
    return ops("bn", ops("concat", a, b), p["bn"], s["bn"])

  def sep_conv(self, n, p, s, x):
    ops = self.ops
    y = ops("depthwise", ops("relu", x), p["dw1"], impl=self.depthwise)
    y = self._strided(y, x.shape[1:3], n.k, n.stride)
    y = ops("bn", ops("conv", y, p["pw1"], stride=1, padding="SAME"), p["bn1"], s["bn1"])
    y = ops("depthwise", ops("relu", y), p["dw2"], impl=self.depthwise)
    return ops("bn", ops("conv", y, p["pw2"], stride=1, padding="SAME"), p["bn2"], s["bn2"])

  def node(self, j, ins):
    """Graph node j on its input values."""
    n = self.plan.nodes[j]
    if n.kind in ("conv", "fr", "sep"):
      p, s = self.params["blocks"][n.name], self.stats["blocks"][n.name]
      return self.sep_conv(n, p, s, ins[0]) if n.kind == "sep" else self.producer(n, p, s, ins[0])
    if n.kind in ("avg", "max"):
      return self._strided(self.ops(f"{n.kind}_pool", ins[0]), ins[0].shape[1:3], 3, n.stride)
    if n.kind == "add":
      return self.ops("add", *ins)
    return self.ops("concat", *ins)

  def cell(self, i, x0, x1, mark=None):
    """Cell i with its calibrations: h(i-2) x0, h(i-1) x1 -> its output; mark(part, value)
    after each node (part: fused.part_of)."""
    spec = self.plan.cells[i]
    vals = {spec.inputs[0]: x0, spec.inputs[1]: x1}
    for j, n in enumerate(self.plan.nodes):
      if n.cell == i:
        vals[j] = self.node(j, [vals[k] for k in n.inputs])
        if mark:
          mark(fused.part_of(n), vals[j])
    return vals[spec.out]

  def classifier(self, x):
    """ReLU, global average pool, dense (no bias): [B,H,W,C] -> [B,classes]."""
    return self.ops("dense", self.ops("global_pool", self.ops("relu", x)),
                    self.params["fc"]["w"]).astype(jnp.float32)

  def __call__(self, x):
    vals = {self.plan.stem: self.stem(x)}
    for spec in self.plan.cells:
      vals[spec.out] = self.cell(spec.index, vals[spec.inputs[0]], vals[spec.inputs[1]])
    return self.classifier(vals[self.plan.out])
