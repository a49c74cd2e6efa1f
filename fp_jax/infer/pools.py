"""3x3 stride-1 SAME pooling as separable shifted reductions (the fused and per-op paths'
pools; XLA:CPU's reduce_window is several times slower)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def _pool3x3(x, init, combine):
  """Separable 3x3 stride-1 SAME window reduction in the [B,H,W*C] view."""
  b, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=init)
  xp = xp.reshape(b, h + 2, (w + 2) * c)
  r = combine(combine(xp[:, 0:h], xp[:, 1:h + 1]), xp[:, 2:h + 2])
  out = combine(combine(r[:, :, 0:w * c], r[:, :, c:c + w * c]), r[:, :, 2 * c:2 * c + w * c])
  return out.reshape(b, h, w, c)


def avg_pool3x3(x):
  """layers.avg_pool3x3 (padding excluded from the count) as two separable sums."""
  h, w = x.shape[1:3]
  ones = np.pad(np.ones((h, w)), 1)
  count = sum(ones[i:i + h, j:j + w] for i in range(3) for j in range(3))
  return _pool3x3(x, 0.0, jnp.add) * jnp.asarray(1.0 / count, x.dtype)[:, :, None]


def max_pool3x3(x):
  """layers.max_pool3x3 as two separable maxima."""
  return _pool3x3(x, -jnp.inf, jnp.maximum)
