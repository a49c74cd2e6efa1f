"""fp_jax's CPU training kernel for a conv with its output's channel sums (kernels.conv_forward /
conv_backward, conv_train.cc) equals layers' own ops and their autodiff: alone (k 1 and 3,
ReLU or not, with and without the input gradient), as relu_conv_bn and factorized_reduce
(BN from the sums, running statistics, eval mode), under 2 devices, whatever the thread
count; the stem's image gets no input gradient; layers.conv_impl resolves as documented."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fp_jax.infer import kernels
from fp_jax.models import layers
from tests import kernel_cases
from tests.kernel_cases import close
from fp_jax.run import parallel

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason="fp_jax kernels not available on this machine")


def _reference(x, a, b, w, relu):
  u = x * a + b
  y = layers.conv(jax.nn.relu(u) if relu else u, w)
  return y, jnp.stack([jnp.sum(y, (0, 1, 2)), jnp.sum(y * y, (0, 1, 2))])


def _arrays(seed, shape, k, d):
  return kernel_cases.inputs(seed, shape, d, ((k, k, shape[-1], d),))


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("k,shape,d", [(1, (2, 7, 9, 8), 16), (1, (3, 6, 5, 12), 7),
                                       (1, (2, 5, 6, 40), 33), (1, (5, 3, 2, 3), 24),
                                       (3, (2, 9, 7, 3), 24), (3, (3, 5, 6, 5), 9)])
def test_kernel_equals_autodiff(relu, k, shape, d):
  """Channel counts that are multiples of 8 (the vector paths) and not, D above one 32-wide
  column block; y, the sums and the cotangents of w and (k 1) of x, a and b."""
  args, (gy, gsums) = _arrays(k * 100 + d, shape, k, d)
  (y, sums), vjp = jax.vjp(functools.partial(_reference, relu=relu), *args)
  got_y, got_sums = jax.jit(functools.partial(kernels.conv_forward, relu=relu))(*args)
  close(got_y, y, "y")
  close(got_sums, sums, "sums")
  need_gx = k == 1
  got = jax.jit(functools.partial(kernels.conv_backward, relu=relu, need_gx=need_gx))(
      *args, y, gy, gsums)
  ref = vjp((gy, gsums))
  close(got[3], ref[3], "gw")
  if need_gx:
    for g, r, name in zip(got[:3], ref[:3], ("gx", "ga", "gb")):
      close(g, r, name)
  else:
    assert got[0] is None
    np.testing.assert_array_equal(np.asarray(got[1]), 0.0)


@pytest.mark.parametrize("j,c,d", [(7, 8, 8), (3, 5, 12)])
def test_concatenated_inputs_equal_autodiff(j, c, d):
  """x [J,B,H,W,C]: a 1x1 conv of the J inputs' concatenated channels, read in place; the
  input gradient comes back in x's layout."""
  rng = np.random.default_rng(j * c)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  x, a, b, w = f(j, 2, 5, 6, c), 1.0 + 0.3 * f(j * c), 0.3 * f(j * c), f(1, 1, j * c, d)

  def reference(x, a, b, w):
    cat = jnp.moveaxis(x, 0, 3).reshape(x.shape[1:4] + (j * c,))
    return _reference(cat, a, b, w, True)

  (y, sums), vjp = jax.vjp(reference, x, a, b, w)
  got_y, got_sums = jax.jit(kernels.conv_forward)(x, a, b, w)
  close(got_y, y, "y")
  close(got_sums, sums, "sums")
  gy, gsums = f(*y.shape), f(2, d)
  got = jax.jit(kernels.conv_backward)(x, a, b, w, y, gy, gsums)
  for g, r, name in zip(got, vjp((gy, gsums)), ("gx", "ga", "gb", "gw")):
    close(g, r, name)


def test_k3_with_the_input_gradient_is_refused():
  args, _ = _arrays(1, (1, 4, 4, 3), 3, 8)
  with pytest.raises(ValueError, match="need_gx"):
    kernels.conv_backward(*args, jnp.zeros((1, 4, 4, 8)), jnp.zeros((1, 4, 4, 8)),
                          jnp.zeros((2, 8)))


def test_threads_do_not_change_the_result():
  """Images spread over XLA's threads give the single thread's result bit for bit."""
  args, (gy, gsums) = _arrays(7, (24, 12, 12, 16), 1, 24)
  y, _ = kernels.conv_forward(*args)
  for fn in (functools.partial(kernels.conv_forward, *args),
             functools.partial(kernels.conv_backward, *args, y, gy, gsums)):
    one = jax.jit(lambda fn=fn: fn(threads=1))()
    many = jax.jit(lambda fn=fn: fn(threads=2))()
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _with_impl(impl, fn):
  """fn traced under layers.SEP_IMPL = impl (a fresh function: jit caches per function)."""
  def run(*args):
    old, layers.SEP_IMPL = layers.SEP_IMPL, impl
    try:
      return fn(*args)
    finally:
      layers.SEP_IMPL = old
  return run


def _compare(loss, args, argnums, static=()):
  """loss's value, aux and gradients (argnums) under the kernels equal them under XLA's ops;
  returns the kernel run's lowered text."""
  fns = {impl: jax.jit(jax.value_and_grad(_with_impl(impl, loss), argnums=argnums,
                                          has_aux=True), static_argnums=static)
         for impl in ("xla", "kernel")}
  (l0, aux0), g0 = fns["xla"](*args)
  (l1, aux1), g1 = fns["kernel"](*args)
  close(l1, l0, "loss")
  for a, b in zip(jax.tree.leaves(aux1), jax.tree.leaves(aux0)):
    close(a, b, "aux")
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g0)):
    close(a, b, jax.tree_util.keystr(path), rel=1e-4)
  return fns["kernel"].lower(*args).as_text()


def _perturbed(p, s, scale=0.1):
  p = jax.tree.map(lambda t: t + scale * layers.normal(jax.random.key(5), t.shape), p)
  return p, (None if s is None else jax.tree.map(lambda t: t + 0.5, s))


@pytest.mark.parametrize("k,relu,c,d", [(1, True, 24, 8), (1, True, 12, 20), (3, False, 3, 24)])
@pytest.mark.parametrize("stats,train", [(False, True), (True, True), (True, False)])
def test_relu_conv_bn_with_the_kernel_equals_xla(k, relu, c, d, stats, train):
  """relu_conv_bn (calibrations 1x1, the stem 3x3): batch statistics (the supernet), batch
  statistics updating running ones (training), running ones (eval); output, new statistics
  and gradients of the parameters and the input equal. k 3's input gradient comes from XLA's
  convolution transpose: the kernel's backward runs without it."""
  p, s = _perturbed(*layers.conv_bn_init(jax.random.key(k), k, c, d))
  s = s if stats else None
  x = layers.normal(jax.random.key(1), (4, 7, 6, c))

  def loss(p, x, s):
    y, s_new = layers.relu_conv_bn(p, s, x, train, relu=relu)
    return jnp.sum(jnp.sin(y)), (y, s_new)

  text = _compare(loss, (p, x, s), (0, 1))
  assert text.count(kernels.CONV_TARGETS["fwd"]) == 1
  assert text.count(kernels.CONV_TARGETS["bwd"]) == 1


def test_the_stem_image_gets_no_input_gradient():
  """The image is not differentiated: the kernel's backward skips the input gradient (its
  need_gx attribute is 0), while a differentiated input's 1x1 conv has it (1)."""
  for k, c, argnums, need in ((3, 3, 0, 0), (1, 8, 0, 0), (1, 8, (0, 1), 1)):
    p, _ = layers.conv_bn_init(jax.random.key(2), k, c, 16)
    x = jnp.ones((2, 5, 5, c))
    loss = lambda p, x: jnp.sum(jnp.sin(layers.relu_conv_bn(p, None, x, True, relu=False)[0]))
    text = jax.jit(jax.grad(loss, argnums)).lower(p, x).as_text()
    assert f"need_gx = {need} : i64" in text, (k, argnums)


@pytest.mark.parametrize("stats", [False, True])
def test_relu_concat_conv_bn_with_the_kernel_equals_xla(stats):
  """The supernet cell's final conv: ReLU, 1x1 conv of 7 values' concatenated channels, BN
  (batch statistics, and updating running ones): equal to XLA's einsum and batch_norm."""
  p, s = _perturbed(layers.bn_init(8), layers.bn_stats_init(8) if stats else None)
  xs = layers.normal(jax.random.key(6), (7, 3, 5, 5, 8))
  w = layers.normal(jax.random.key(7), (7, 8, 8)) * jnp.arange(7.0)[:, None, None]

  def loss(p, xs, w, s):
    y, s_new = layers.relu_concat_conv_bn(p, s, xs, w, True)
    return jnp.sum(jnp.sin(y)), (y, s_new)

  text = _compare(loss, (p, xs, w, s), (0, 1, 2))
  assert text.count(kernels.CONV_TARGETS["fwd"]) == 1


@pytest.mark.parametrize("hw", [(8, 8), (7, 9)])
@pytest.mark.parametrize("relu", [True, False])
def test_factorized_reduce_with_the_kernel_equals_xla(hw, relu):
  """Two strided 1x1 paths (the second offset by one pixel, zero past an odd border),
  concatenated, BN: equal to XLA's ops, running statistics included."""
  p, s = _perturbed(*layers.factorized_reduce_init(jax.random.key(3), 6, 10))
  x = layers.normal(jax.random.key(4), (3, *hw, 6))

  def loss(p, x, s):
    y, s_new = layers.factorized_reduce(p, s, x, 2, True, relu=relu)
    return jnp.sum(jnp.sin(y)), (y, s_new)

  text = _compare(loss, (p, x, s), (0, 1))
  assert text.count(kernels.CONV_TARGETS["fwd"]) == 2


def test_two_devices_equal_one():
  """Data-parallel over 2 CPU devices (BN statistics and weight gradients reduced over the
  mesh axis) equals 1 device: the kernel's results carry the mesh type."""
  assert jax.device_count() >= 2, "tests/conftest.py forces 2 CPU devices"
  p, _ = layers.conv_bn_init(jax.random.key(3), 1, 8, 16)
  x = layers.normal(jax.random.key(4), (4, 6, 6, 8))

  def loss_grad(mesh):
    def local(p, x):
      def loss(p, x):
        y, _ = layers.relu_conv_bn(p, None, x, True, axis_name=parallel.AXIS)
        return jax.lax.psum(jnp.sum(jnp.sin(y)), parallel.AXIS)
      return jax.value_and_grad(loss, argnums=(0, 1))(p, x)
    fn = parallel.data_parallel(local, mesh, (P(), P(parallel.AXIS)),
                                (P(), (P(), P(parallel.AXIS))))
    return jax.jit(fn)(p, x)

  assert layers.conv_impl(x, p["conv"]) == "kernel"
  (l1, g1), (l2, g2) = loss_grad(parallel.make_mesh(jax.devices()[:1])), loss_grad(
      parallel.make_mesh(jax.devices()[:2]))
  close(l2, l1, "loss")
  for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):
    close(a, b, "grad", rel=1e-4)


def test_conv_impl_resolution(monkeypatch):
  x = jnp.zeros((1, 4, 4, 8))
  w1, w3, w5 = (jnp.zeros((k, k, 8, 8)) for k in (1, 3, 5))
  assert layers.conv_impl(x, w1) == "kernel"                      # CPU, float32
  assert layers.conv_impl(x, w3) == "kernel"
  assert layers.conv_impl(x, w5) == "xla"                         # k the kernel lacks
  assert layers.conv_impl(x.astype(jnp.bfloat16), w1) == "xla"
  monkeypatch.setattr(layers, "DEPTHWISE_IMPL", "shift")          # an explicit depthwise
  assert layers.conv_impl(x, w1) == "xla"
  monkeypatch.setattr(layers, "SEP_IMPL", "kernel")
  assert layers.conv_impl(x, w1) == "kernel"
  monkeypatch.setattr(layers, "SEP_IMPL", "xla")
  assert layers.conv_impl(x, w1) == "xla"
