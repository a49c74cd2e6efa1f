"""3x3 stride-1 SAME pooling as separable shifted reductions, for training (layers.py) and
inference (the fused and per-op paths): XLA:CPU's reduce_window is several times slower,
forward and backward, and runs on one thread (bench/results/issue15.md). Values equal
reduce_window's (max exactly; sums in another order), and so do the gradients: a max's
goes to the first maximal input of its window, as select-and-scatter routes it."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _pool3x3(x, init, combine):
  """Separable 3x3 stride-1 SAME window reduction in the [B,H,W*C] view."""
  b, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=init)
  xp = xp.reshape(b, h + 2, (w + 2) * c)
  r = combine(combine(xp[:, 0:h], xp[:, 1:h + 1]), xp[:, 2:h + 2])
  out = combine(combine(r[:, :, 0:w * c], r[:, :, c:c + w * c]), r[:, :, 2 * c:2 * c + w * c])
  return out.reshape(b, h, w, c)


def _inverse_count(h, w, dtype):
  """[H, W, 1]: 1 / the number of real (unpadded) pixels in each 3x3 SAME window."""
  ones = np.pad(np.ones((h, w)), 1)
  count = sum(ones[i:i + h, j:j + w] for i in range(3) for j in range(3))
  return jnp.asarray(1.0 / count, dtype)[:, :, None]


@jax.custom_vjp
def avg_pool3x3(x):
  """layers.avg_pool3x3 (padding excluded from the count) as two separable sums."""
  return _pool3x3(x, 0.0, jnp.add) * _inverse_count(*x.shape[1:3], x.dtype)


def _avg_fwd(x):
  return avg_pool3x3(x), None


def _avg_bwd(_, g):
  """The transpose: the symmetric window's sum of the count-scaled cotangent."""
  return (_pool3x3(g * _inverse_count(*g.shape[1:3], g.dtype), 0.0, jnp.add),)


avg_pool3x3.defvjp(_avg_fwd, _avg_bwd)


@jax.custom_vjp
def max_pool3x3(x):
  """layers.max_pool3x3 as two separable maxima."""
  return _pool3x3(x, -jnp.inf, jnp.maximum)


def _max_fwd(x):
  return max_pool3x3(x), x


def _max_bwd(x, g):
  """Each output's cotangent goes to the first input of its window (row-major) equal
  to the maximum, as XLA's select-and-scatter routes it. The maxima are recomputed here
  from the residual x: XLA may rematerialise x in the backward with other rounding, and
  a forward maximum compared with it would then match nothing.

  Two passes: the window position (0..8) of each output's first maximal input, kept as
  int8; then each input sums the cotangents of the (up to 9) windows that chose it. (A
  running "taken" mask over the 9 positions fused into one loop, which XLA:CPU evaluated
  once per padded term: 20-45x the forward's time at 28x28.)"""
  h, w = x.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  y = max_pool3x3(x)
  first = jnp.full(y.shape, 8, jnp.int8)
  for t in range(7, -1, -1):
    i, j = divmod(t, 3)
    first = jnp.where(xp[:, i:i + h, j:j + w] == y, jnp.int8(t), first)
  # padded by one (cotangent 0, position -1): input q is position (i, j) of window
  # q + 1 - (i, j), i.e. row 2 - i, column 2 - j of the padded arrays
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  firstp, gp = lax.optimization_barrier((jnp.pad(first, pad, constant_values=-1),
                                         jnp.pad(g, pad)))
  dx = 0.0
  for t in range(9):
    i, j = divmod(t, 3)
    sl = (slice(None), slice(2 - i, 2 - i + h), slice(2 - j, 2 - j + w))
    dx = dx + jnp.where(firstp[sl] == t, gp[sl], 0.0)
  return (dx.astype(x.dtype),)


max_pool3x3.defvjp(_max_fwd, _max_bwd)
