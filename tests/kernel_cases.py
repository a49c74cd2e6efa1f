"""Shared by the training-kernel tests (sep_kernel_test, conv_kernel_test): a tolerance check
and random inputs of an affine -> ReLU -> kernel half, with ReLU kinks."""
import jax.numpy as jnp
import numpy as np


def close(got, ref, label, rel=2e-5):
  """|got - ref| <= rel * max(1, max |ref|), shapes equal."""
  got, ref = np.asarray(got), np.asarray(ref)
  tol = rel * max(1.0, float(np.max(np.abs(ref))))
  diff = float(np.max(np.abs(got - ref)))
  assert got.shape == ref.shape and diff <= tol, (label, diff, tol)


def inputs(seed, shape, d, weights):
  """((x [shape], a, b [C], *weights), (gy [B,H,W,d], gsums [2,d])): x has zeros at the ReLU's
  kink (a = 1, b = 0 there: gradient 0); weights: the shapes of the kernel's weights."""
  rng = np.random.default_rng(seed)
  c = shape[-1]
  x = rng.standard_normal(shape).astype(np.float32)
  x[0, 0, :2] = 0.0
  a = 1.0 + 0.5 * rng.standard_normal(c).astype(np.float32)
  b = 0.3 * rng.standard_normal(c).astype(np.float32)
  a[:2], b[:2] = 1.0, 0.0
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return ((jnp.asarray(x), jnp.asarray(a), jnp.asarray(b), *(f(*w) for w in weights)),
          (f(*shape[:3], d), f(2, d)))
