"""The training path's shifted ops against XLA's own, values and gradients: the 3x3 pools
(fp_jax/models/pools.py) against reduce_window, the depthwise shift-sum (layers.py, custom VJP)
against a grouped convolution."""
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from fp_jax.models import layers

PAD = ((0, 0), (1, 1), (1, 1), (0, 0))


def window_max(x, stride):
  y = lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 1, 1, 1), PAD)
  return layers.subsample(y, x.shape[1:3], 3, stride)


def window_avg(x, stride):
  total = lax.reduce_window(x, 0.0, lax.add, (1, 3, 3, 1), (1, 1, 1, 1), PAD)
  count = lax.reduce_window(jnp.ones((1,) + x.shape[1:3] + (1,)), 0.0, lax.add,
                            (1, 3, 3, 1), (1, 1, 1, 1), PAD)
  return layers.subsample(total / count, x.shape[1:3], 3, stride)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", [(2, 5, 6, 3), (1, 8, 8, 4)])
def test_pools_and_their_gradients_equal_reduce_window(shape, stride):
  """Maxima exactly equal; the max's cotangent goes to the first maximal input of each
  window (ties included, as select-and-scatter); averages and their transposes equal."""
  x = layers.normal(jax.random.key(0), shape)
  x = x.at[0, 1, 1, 0].set(x[0, 1, 2, 0]).at[0, 2, 2, 1].set(0.0).at[0, 2, 3, 1].set(0.0)
  x = x.at[:, :, :, -1].set(1.0)                      # a channel of ties everywhere
  for ours, ref, tol in ((layers.max_pool3x3, window_max, 0.0),
                         (layers.avg_pool3x3, window_avg, 1e-6)):
    y, vjp = jax.vjp(lambda v: ours(v, stride), x)
    y_ref, vjp_ref = jax.vjp(lambda v: ref(v, stride), x)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=tol)
    g = layers.normal(jax.random.key(1), y.shape)
    np.testing.assert_allclose(vjp(g)[0], vjp_ref(g)[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("k,stride", [(3, 1), (5, 1), (3, 2), (5, 2)])
def test_shift_depthwise_and_its_gradients_equal_grouped_conv(k, stride):
  x = layers.normal(jax.random.key(2), (3, 7, 8, 5))
  w = layers.normal(jax.random.key(3), (k, k, 1, 5))

  def run(impl):
    old, layers.DEPTHWISE_IMPL = layers.DEPTHWISE_IMPL, impl
    try:
      y, vjp = jax.vjp(lambda a, b: layers.depthwise_conv(a, b, stride), x, w)
      return y, vjp(layers.normal(jax.random.key(4), y.shape))
    finally:
      layers.DEPTHWISE_IMPL = old

  (y, (dx, dw)), (y_ref, (dx_ref, dw_ref)) = run("shift"), run("xla")
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-4)
