"""fp_jax's CPU depthwise kernel (kernels.py, depthwise.cc) equals XLA's depthwise, alone and
inside the fused network (a small pruned network with reduction cells); exports stay portable."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp_jax.models import child
from fp_jax.models import layers
from fp_jax.models import space
from fp_jax.infer import export
from fp_jax.infer import fused
from fp_jax.infer import kernels
from fp_jax.infer import networks
from fp_jax.infer import perop

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason="fp_jax kernels not available on this machine")


def _close(got, ref, label, rel=1e-5):
  got, ref = np.asarray(got), np.asarray(ref)
  tol = rel * max(1.0, float(np.max(np.abs(ref))))
  diff = float(np.max(np.abs(got - ref)))
  assert got.shape == ref.shape and diff <= tol, (label, diff, tol)


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("shape", [(2, 8, 8, 16), (1, 5, 7, 22), (1, 2, 2, 40), (1, 32, 32, 24)])
def test_depthwise_kernel_equals_xla(k, shape):
  """Channel tails (22), W not a multiple of the register block (5, 7, 2), batch 2;
  bias and ReLU folded in as fused.depthwise does them."""
  rng = np.random.default_rng(k * 100 + shape[-1])
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  w = rng.standard_normal((k, k, 1, shape[-1])).astype(np.float32)
  b = rng.standard_normal(shape[-1]).astype(np.float32)
  for relu in (False, True):
    for bias in (None, b):
      ref = fused.depthwise(x, w, "xla", relu=relu, bias=bias)      # a grouped lax.conv
      got = jax.jit(lambda x: fused.depthwise(x, w, "kernel", relu=relu, bias=bias))(x)
      _close(got, ref, (k, shape, relu, bias is None))
      _close(got, fused.depthwise(x, w, "shift", 2, relu=relu, bias=bias), "vs shift")
  # traced (non-constant) weights, as the per-op path passes them
  _close(jax.jit(lambda x, w: kernels.depthwise(x, w))(x, jnp.asarray(w)),
         fused.depthwise(x, w, "xla"), "traced weights")


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("shape", [(1, 32, 32, 24), (2, 7, 9, 22), (3, 16, 16, 40),
                                   (1, 2, 2, 16)])
def test_strided_threaded_kernel_equals_single_thread_and_xla(k, shape):
  """Stride 2 computes only the kept outputs (odd and even sizes, both offsets), and the
  rows split over 2 threads give the single thread's result bit for bit; both equal XLA's
  grouped convolution at that stride."""
  rng = np.random.default_rng(k + shape[1])
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  w = rng.standard_normal((k, k, 1, shape[-1])).astype(np.float32)
  b = rng.standard_normal(shape[-1]).astype(np.float32)
  for stride in (1, 2):
    ref = jax.lax.conv_general_dilated(jax.nn.relu(x + b), w, (stride, stride), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       feature_group_count=shape[-1])
    off = (0, 0) if stride == 1 else tuple(layers.same_offset(n, k, 2) for n in shape[1:3])
    run = {t: jax.jit(lambda x, t=t: kernels.depthwise(x, w, True, b, stride, off, t))(x)
           for t in (1, 2, 0)}
    assert run[1].shape == ref.shape
    np.testing.assert_array_equal(np.asarray(run[2]), np.asarray(run[1]))
    np.testing.assert_array_equal(np.asarray(run[0]), np.asarray(run[1]))
    _close(run[1], ref, (k, shape, stride))
    _close(jax.jit(lambda x: fused.depthwise(x, w, "kernel", relu=True, bias=b,
                                             stride=stride))(x), ref, "fused.depthwise")
  with pytest.raises(ValueError, match="stride 1 or 2"):
    kernels.depthwise(x, w, stride=3)
  with pytest.raises(ValueError, match="offset"):
    kernels.depthwise(x, w, stride=2, offset=(2, 0))


def test_fused_network_with_kernel_equals_reference():
  """Compact pruned ENAS net with reduction cells (strided sep convs, 2x2 maps):
  fused with the kernel == fused with 'shift' == per-op == child.forward."""
  arc = space.parse_arc(space.ENAS_ARC)
  plan = child.make_plan(arc, 1, 4, (8, 8, 3), 10)
  params, stats = networks.random_init(plan, 3)
  params, stats = networks.prune(plan, params, stats, (0.5, 0.25, 0.5, 0.5, 0.75))
  stats = networks.estimate_bn(plan, params, stats, 0, batch=8)
  x = jax.random.normal(jax.random.PRNGKey(2), (3, 8, 8, 3))
  assert any(s.reduce for s in plan.cells)
  assert fused.depthwise_impl("auto") == "kernel"          # the CPU default
  fu = fused.Fused(plan, params, stats, fused.Options(engine="xla"))
  assert kernels.TARGET in fu.network(x).as_text()
  shift = fused.Fused(plan, params, stats, fused.Options(depthwise="shift", engine="xla"))
  assert kernels.TARGET not in shift.network(x).as_text()
  ref = jax.jit(lambda p, s, x: child.forward(plan, p, s, x, False, with_aux=False)[0])(
      params, stats, x)
  _close(fu(x), ref, "fused kernel vs child")
  _close(fu(x), shift(x), "fused kernel vs fused shift")
  _close(fu.run_cells(x), ref, "fused cells vs child")
  _close(perop.PerOp(plan, params, stats)(x), fu(x), "per-op (kernel) vs fused")
  _close(perop.PerOp(plan, params, stats, "shift")(x), fu(x), "per-op (shift) vs fused")


def test_exports_never_hold_the_kernel(monkeypatch):
  """export.portable swaps the kernel for 'shift'; FP_JAX_KERNELS=0 turns it off."""
  assert export.portable(fused.Options()).depthwise == "shift"
  assert export.portable(fused.Options(depthwise="kernel")).depthwise == "shift"
  assert export.portable(export.RUNTIME_OPTS) == export.RUNTIME_OPTS
  opts = dataclasses.replace(fused.Options(), depthwise="xla")
  assert export.portable(opts) is opts
  arc = space.parse_arc(space.ENAS_ARC)
  plan = child.make_plan(arc, 0, 4, (8, 8, 3), 10)
  params, stats = networks.random_init(plan, 0)
  fn = export.network_fn(plan, params, stats, fused.Options())
  text = jax.jit(fn).lower(jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)).as_text()
  assert kernels.TARGET not in text
  monkeypatch.setenv("FP_JAX_KERNELS", "0")
  assert kernels.available.__wrapped__() is False
