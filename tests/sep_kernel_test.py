"""fp_jax's CPU training kernel for a sep_conv half, affine -> ReLU -> depthwise -> pointwise
and the output's channel sums (kernels.sep_forward / sep_backward, sep_train.cc), equals
layers' own ops and their autodiff: alone, as sep_conv (BN from the sums, running
statistics, eval mode), under 2 devices, whatever the thread count; and layers.SEP_IMPL
resolves as documented."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fp_jax.run import parallel
from fp_jax.infer import kernels
from fp_jax.models import layers
from tests import kernel_cases
from tests.kernel_cases import close

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason="fp_jax kernels not available on this machine")


def _reference(x, a, b, wd, wp, stride=1):
  y = layers.conv(layers.depthwise_conv(jax.nn.relu(x * a + b), wd, stride), wp)
  return y, jnp.stack([jnp.sum(y, (0, 1, 2)), jnp.sum(y * y, (0, 1, 2))])


def _arrays(seed, shape, k, d):
  return kernel_cases.inputs(seed, shape, d, ((k, k, 1, shape[-1]), (1, 1, shape[-1], d)))


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("shape,d", [((2, 7, 9, 8), 8), ((3, 6, 5, 12), 7), ((2, 5, 6, 16), 32),
                                     ((1, 4, 4, 24), 24), ((5, 3, 2, 3), 16)])
def test_kernel_equals_autodiff(k, shape, d):
  """Channel counts that are multiples of 8 (the vector paths) and not (12 -> 7, 3 -> 16),
  W below the register block; y, the sums and all five cotangents (x, a, b, wd, wp) for
  cotangents of both outputs."""
  args, (gy, gsums) = _arrays(k * 100 + d, shape, k, d)
  (y, sums), vjp = jax.vjp(_reference, *args)
  got_y, got_sums = jax.jit(kernels.sep_forward)(*args)
  close(got_y, y, "y")
  close(got_sums, sums, "sums")
  got = jax.jit(kernels.sep_backward)(*args, y, gy, gsums)
  for g, r, name in zip(got, vjp((gy, gsums)), ("gx", "ga", "gb", "gwd", "gwp")):
    close(g, r, name)


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("shape,d", [((2, 8, 8, 8), 8), ((3, 7, 9, 12), 7), ((2, 6, 5, 3), 16)])
def test_strided_kernel_equals_autodiff(k, shape, d):
  """Stride 2 (the reduction cells' first halves) at SAME's offsets for even and odd sizes:
  only the outputs kept are computed; y, the sums and all five cotangents."""
  args, _ = _arrays(k * 10 + d, shape, k, d)
  offset = tuple(layers.same_offset(n, k, 2) for n in shape[1:3])
  ref = lambda x, a, b, wd, wp: _reference(x, a, b, wd, wp, stride=2)
  (y, sums), vjp = jax.vjp(ref, *args)
  rng = np.random.default_rng(k)
  gy, gsums = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (y.shape, sums.shape))
  got_y, got_sums = jax.jit(functools.partial(kernels.sep_forward, stride=2, offset=offset))(*args)
  close(got_y, y, "y")
  close(got_sums, sums, "sums")
  got = jax.jit(functools.partial(kernels.sep_backward, stride=2, offset=offset))(
      *args, y, gy, gsums)
  for g, r, name in zip(got, vjp((gy, gsums)), ("gx", "ga", "gb", "gwd", "gwp")):
    close(g, r, name)


def test_threads_do_not_change_the_result():
  """Images spread over XLA's threads give the single thread's result bit for bit (sums
  over images add the images' terms in image order)."""
  args, (gy, gsums) = _arrays(7, (24, 12, 12, 16), 3, 16)
  y, _ = kernels.sep_forward(*args)
  for fn in (functools.partial(kernels.sep_forward, *args),
             functools.partial(kernels.sep_backward, *args, y, gy, gsums)):
    one = jax.jit(lambda fn=fn: fn(threads=1))()
    many = jax.jit(lambda fn=fn: fn(threads=2))()
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _sep_run(impl, p, s, x, train, stride):
  old, layers.SEP_IMPL = layers.SEP_IMPL, impl
  try:
    y, s_new = layers.sep_conv(p, s, x, train, stride=stride)
  finally:
    layers.SEP_IMPL = old
  return jnp.sum(jnp.sin(y)), (y, s_new)


@pytest.mark.parametrize("k,stride", [(3, 1), (5, 1), (5, 2)])
@pytest.mark.parametrize("stats,train", [(False, True), (True, True), (True, False)])
def test_sep_conv_with_the_kernel_equals_xla(k, stride, stats, train):
  """The whole sep_conv (2 x [ReLU, depthwise, pointwise, BN]): batch statistics (the
  supernet), batch statistics updating running ones (training), running ones (eval);
  output, new statistics and gradients equal, at stride 1 and 2 (both halves kernel calls)."""
  p, s = layers.sep_conv_init(jax.random.key(k), k, 8)
  p = jax.tree.map(lambda t: t + 0.1 * layers.normal(jax.random.key(5), t.shape), p)
  if stats:
    s = jax.tree.map(lambda t: t + 0.5, s)
  else:
    s = None
  x = layers.normal(jax.random.key(1), (4, 10, 10, 8))
  fns = {impl: jax.jit(jax.value_and_grad(functools.partial(_sep_run, impl), argnums=(0, 2),
                                          has_aux=True), static_argnums=(3, 4))
         for impl in ("xla", "kernel")}
  (l0, (y0, s0)), g0 = fns["xla"](p, s, x, train, stride)
  (l1, (y1, s1)), g1 = fns["kernel"](p, s, x, train, stride)
  close(l1, l0, "loss")
  close(y1, y0, "y")
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s0)):
    close(a, b, "stats")
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g0)):
    close(a, b, jax.tree_util.keystr(path), rel=1e-4)
  text = fns["kernel"].lower(p, s, x, train, stride).as_text()
  assert text.count(kernels.SEP_TARGETS["fwd"]) == 2
  assert text.count(kernels.SEP_TARGETS["bwd"]) == 2


def test_two_devices_equal_one():
  """Data-parallel over 2 CPU devices (batch split, BN statistics and weight gradients
  reduced over the mesh axis) equals 1 device: the kernel's results carry the mesh type."""
  assert jax.device_count() >= 2, "tests/conftest.py forces 2 CPU devices"
  p, _ = layers.sep_conv_init(jax.random.key(3), 3, 8)
  x = layers.normal(jax.random.key(4), (4, 6, 6, 8))

  def loss_grad(mesh):
    def local(p, x):
      def loss(p):
        y, _ = layers.sep_conv(p, None, x, True, axis_name=parallel.AXIS)
        return jax.lax.psum(jnp.sum(jnp.sin(y)), parallel.AXIS)
      return jax.value_and_grad(loss)(p)
    fn = parallel.data_parallel(local, mesh, (P(), P(parallel.AXIS)), (P(), P()))
    return jax.jit(fn)(p, x)

  assert layers.sep_impl(x, p["dw1"]) == "kernel"
  (l1, g1), (l2, g2) = loss_grad(parallel.make_mesh(jax.devices()[:1])), loss_grad(
      parallel.make_mesh(jax.devices()[:2]))
  close(l2, l1, "loss")
  for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):
    close(a, b, "grad", rel=1e-4)


def test_sep_impl_resolution(monkeypatch):
  x = jnp.zeros((1, 4, 4, 8))
  w3, w7 = jnp.zeros((3, 3, 1, 8)), jnp.zeros((7, 7, 1, 8))
  assert layers.sep_impl(x, w3) == "kernel"                      # CPU, float32, stride 1
  assert layers.sep_impl(x, w3, stride=2) == "kernel"
  assert layers.sep_impl(x, w3, stride=3) == "xla"                # the kernel runs stride 1, 2
  assert layers.sep_impl(x.astype(jnp.bfloat16), w3) == "xla"
  assert layers.sep_impl(x, w7) == "xla"                         # k the kernel lacks
  monkeypatch.setattr(layers, "DEPTHWISE_IMPL", "shift")          # an explicit depthwise wins
  assert layers.sep_impl(x, w3) == "xla"
  monkeypatch.setattr(layers, "SEP_IMPL", "kernel")
  assert layers.sep_impl(x, w3) == "kernel"
  monkeypatch.setattr(layers, "SEP_IMPL", "fast")
  with pytest.raises(ValueError, match="SEP_IMPL"):
    layers.sep_impl(x, w3)
