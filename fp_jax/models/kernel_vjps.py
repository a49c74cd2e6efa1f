"""Custom VJPs of fp_jax's CPU training kernels (kernels.py): (y, y's channel sums [2, D]) of a
conv ([ReLU](x * a + b) -> conv) and of a sep_conv half ([ReLU](x * a + b) -> depthwise ->
pointwise), one custom call forward and one backward each; layers.py's blocks take their BN
statistics from the sums (layers.bn_affine) and choose them (layers.sep_impl, conv_impl).

vary_like gives a custom call's results the mesh-axis type of its input inside shard_map.
"""
from __future__ import annotations

import functools

import jax
from jax import lax
from jax.custom_derivatives import SymbolicZero
import jax.numpy as jnp

from fp_jax.infer import kernels


def vary_like(w, x):
  """w marked as varying over the mesh axes x varies over (inside shard_map), so a
  custom_vjp's per-device weight cotangent has the primal's type; the implicit psum
  of replicated weights' gradients then happens at this cast's transpose."""
  vary = lambda a: getattr(getattr(jax.typeof(a), "manual_axis_type", None), "varying", ())
  extra = tuple(sorted(set(vary(x)) - set(vary(w))))
  return lax.pcast(w, extra, to="varying") if extra else w


# (conv(u, w) with u = [ReLU](x * a + b), its channel sums [2, D]) as kernel calls. With
# symbolic zeros the backward knows whether x (hence a and b) is differentiated: for the
# stem's image it is not, and the kernel skips the input gradient (which k = 3 lacks: a
# differentiated k = 3 input takes XLA's convolution transpose for it).
@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _conv_kernel(x, a, b, w, relu):
  y, sums = kernels.conv_forward(x, a, b, w, relu)
  return vary_like(y, x), vary_like(sums, x)


def _conv_kernel_fwd(x, a, b, w, relu):
  need_gx = x.perturbed or a.perturbed or b.perturbed
  x, a, b, w = (t.value for t in (x, a, b, w))
  y, sums = _conv_kernel(x, a, b, w, relu)
  return (y, sums), (x, a, b, w, y, need_gx)


def _conv_kernel_bwd(relu, res, g):
  x, a, b, w, y, need_gx = res
  gy, gs = g
  if isinstance(gy, SymbolicZero):
    gy = jnp.zeros_like(y)
  if isinstance(gs, SymbolicZero):
    gs = jnp.zeros((2, y.shape[-1]), y.dtype)
  k = w.shape[0]
  gx, ga, gb, gw = kernels.conv_backward(x, a, b, w, y, gy, gs, relu, need_gx and k == 1)
  if need_gx and k != 1:
    gx, ga, gb = _conv_input_grad(x, a, b, w, y, gy, gs, relu)
  elif not need_gx:
    gx = jnp.zeros_like(x)
  return tuple(vary_like(t, x) for t in (gx, ga, gb, gw))


def _conv_input_grad(x, a, b, w, y, gy, gs, relu):
  """(gx, ga, gb) of _conv_kernel through XLA's convolution transpose (k > 1)."""
  def f(x, a, b):
    u = x * a + b
    return lax.conv_general_dilated(jax.nn.relu(u) if relu else u, w, (1, 1), "SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
  g = gy + gs[0] + 2 * y * gs[1]
  return jax.vjp(f, x, a, b)[1](g)


_conv_kernel.defvjp(_conv_kernel_fwd, _conv_kernel_bwd, symbolic_zeros=True)


def identity_affine(c, dtype):
  """(a, b) = (ones [c], zeros [c]): the input affine x * a + b that leaves x as it is."""
  return jnp.ones((c,), dtype), jnp.zeros((c,), dtype)


def conv_sums(x, w, relu):
  """(conv([ReLU](x), w), its channel sums [2, D]) by the conv kernel (conv_impl); x
  [B,H,W,C], or [J,B,H,W,C/J] for the conv of J inputs' concatenated channels (k 1)."""
  a, b = identity_affine(w.shape[2], x.dtype)
  return _conv_kernel(x, vary_like(a, x), vary_like(b, x), vary_like(w, x), relu)


def sep_half(x, a, b, wd, wp, stride=1, offset=(0, 0)):
  """The kernel's half: (conv(depthwise(ReLU(x * a + b), wd, stride), wp), its channel sums
  [2, D]); at stride 2 only the outputs kept (layers.subsample's) are computed."""
  v = lambda t: vary_like(t, x)
  return _sep_kernel(x, v(a), v(b), v(wd), v(wp), stride, offset)


# (a custom call's results carry no mesh-axis type: vary_like gives them x's, inside shard_map)
@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _sep_kernel(x, a, b, wd, wp, stride, offset):
  y, sums = kernels.sep_forward(x, a, b, wd, wp, stride, offset)
  return vary_like(y, x), vary_like(sums, x)


def _sep_kernel_fwd(x, a, b, wd, wp, stride, offset):
  y, sums = _sep_kernel(x, a, b, wd, wp, stride, offset)
  return (y, sums), (x, a, b, wd, wp, y)     # residuals: the inputs and y, no intermediates


def _sep_kernel_bwd(stride, offset, res, g):
  return tuple(vary_like(t, res[0]) for t in kernels.sep_backward(*res, *g, stride, offset))


_sep_kernel.defvjp(_sep_kernel_fwd, _sep_kernel_bwd)

