"""A supernet node slot's five ops (sep 3x3, sep 5x5, avg pool, max pool, identity), run on
the traced op index by `lax.switch` (one branch runs) or branch-free (`select`: one sep_conv
with the op's weights, sep3's kernels zero-padded to 5x5, both pools, then a select):
config.search.dispatch. Sep weights carry a leading axis over the slot's possible inputs,
picked by `weight_index`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from fp_jax.models import layers
from fp_jax.models import space

# config.search.dispatch: how a cell runs each node slot's traced op. switch: lax.switch,
# only the sampled op (one conditional per slot, forward and backward: XLA:GPU copies each
# predicate to the host and waits; TPU runs them on the device); select: every op's value
# without a branch, then a select (a 5x5 sep_conv and two pools per slot). auto: select on
# GPUs, switch elsewhere (CPU: select's step takes 2x as long, bench/results/dispatch_cpu.md).
DISPATCHES = ("auto", "switch", "select")
AUTO_DISPATCH = {"gpu": "select", "cuda": "select", "rocm": "select"}


def weight_index(idx, num_sets):
  """The weight set a slot reading input `idx` uses: idx (one set per input, as ENAS),
  or 0 when the weights are shared across inputs (num_sets == 1)."""
  return jnp.minimum(idx, num_sets - 1)


def resolve_dispatch(name, platform):
  """config.search.dispatch for `platform` (jax.default_backend(), or a platform lowered
  for: cuda, rocm, tpu, cpu): auto -> AUTO_DISPATCH ('select' on GPUs), else switch."""
  if name not in DISPATCHES:
    raise ValueError(f"dispatch must be one of {DISPATCHES}, got {name!r}")
  return AUTO_DISPATCH.get(platform, "switch") if name == "auto" else name


def branches(axis_name):
  def sep(name):
    def f(p, idx, x):
      pick = lambda a: a[weight_index(idx, a.shape[0])]
      return layers.sep_conv(jax.tree.map(pick, p[name]), None, x, True, axis_name)[0]
    return f
  # Checkpointed branches keep only their inputs as residuals: without it the backward
  # of every switch materialises (zero) residuals of all branches.
  return (jax.checkpoint(sep("sep3")), jax.checkpoint(sep("sep5")),
          jax.checkpoint(lambda p, idx, x: layers.avg_pool3x3(x)),
          jax.checkpoint(lambda p, idx, x: layers.max_pool3x3(x)),
          lambda p, idx, x: x)


def switch_slot(axis_name):
  """(slot params, input idx, op, x) -> lax.switch(op, ...) of the checkpointed branches."""
  ops = branches(axis_name)
  return lambda p, idx, op, x: lax.switch(op, ops, p, idx, x)


def pad_kernel(w, k):
  """Depthwise kernels [..., j, j, 1, C] zero-padded (centred) to [..., k, k, 1, C]: a
  SAME stride-1 correlation with the padded kernel equals the one with the original
  (the extra taps multiply zeros; the window and padding stay centred)."""
  p = (k - w.shape[-4]) // 2
  return jnp.pad(w, [(0, 0)] * (w.ndim - 4) + [(p, p), (p, p), (0, 0), (0, 0)])


def select_slot(axis_name):
  """(slot params {'sep3', 'sep5'}, input idx, op, x [B,H,W,F]) -> [B,H,W,F] without a
  conditional: one sep_conv with the weights the op picks (sep3's kernels zero-padded to
  5x5, selected leaf by leaf), avg and max pools, identity, then a select of op's value.
  The unselected values get zero cotangents, so gradients reach only the op's weights,
  as with switch. Checkpointed as switch's branches (residuals: the inputs only)."""
  def f(p, idx, op, x):
    op = jnp.clip(op, 0, space.NUM_OPS - 1)          # lax.switch's clamping
    pick = lambda a: a[weight_index(idx, a.shape[0])]
    p3, p5 = jax.tree.map(pick, p["sep3"]), jax.tree.map(pick, p["sep5"])
    size = p5["dw1"].shape[0]
    p3 = dict(p3, dw1=pad_kernel(p3["dw1"], size), dw2=pad_kernel(p3["dw2"], size))
    sep_p = jax.tree.map(lambda a, b: jnp.where(op == space.SEP3, a, b), p3, p5)
    sep = layers.sep_conv(sep_p, None, x, True, axis_name)[0]
    values = (sep, layers.avg_pool3x3(x), layers.max_pool3x3(x), x)   # SEP*, AVG, MAX, IDENTITY
    return lax.select_n(jnp.maximum(op - space.SEP5, 0), *values)
  return jax.checkpoint(f)


def slot(dispatch, axis_name=None):
  """(slot params, input idx, op, x [B,H,W,F]) -> [B,H,W,F] for a resolved dispatch."""
  if dispatch not in DISPATCHES[1:]:
    raise ValueError(f"dispatch must be one of {DISPATCHES[1:]} (resolved), got {dispatch!r}")
  return (switch_slot if dispatch == "switch" else select_slot)(axis_name)


def slot_vjp(dispatch, axis_name=None):
  """(slot params, input idx, op, x, g) -> (g params, g x): the VJP of `slot`'s op at x for the
  output cotangent g, computed from the inputs alone (as the checkpointed ops' backward
  does): one conditional for 'switch' (each branch recomputes its op's forward), none for
  'select'."""
  if dispatch not in DISPATCHES[1:]:
    raise ValueError(f"dispatch must be one of {DISPATCHES[1:]} (resolved), got {dispatch!r}")
  if dispatch == "switch":
    def branch_vjp(f):
      return lambda p, idx, x, g: jax.vjp(lambda p, x: f(p, idx, x), p, x)[1](g)
    vjps = [branch_vjp(f) for f in branches(axis_name)]
    return lambda p, idx, op, x, g: lax.switch(op, vjps, p, idx, x, g)
  run = select_slot(axis_name)
  return lambda p, idx, op, x, g: jax.vjp(lambda p, x: run(p, idx, op, x), p, x)[1](g)
