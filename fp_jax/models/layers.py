"""Pure building blocks shared by the supernet and the fixed network (NHWC).

Each block is `apply(p, s, x, ...) -> (y, s_new)` where `p` holds parameters
and `s` running BN statistics with the same nesting, or `s = None` for "always
use batch statistics, keep no averages" (the supernet, as in ENAS, whose
shared weights see a different architecture every step). BN statistics are
averaged over the `axis_name` devices when given (synchronised BN), so a
data-parallel step equals the single-device step on the global batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from fp_jax.infer import kernels
from fp_jax.models import kernel_vjps
from fp_jax.models import pools
from fp_jax.models.kernel_vjps import vary_like

BN_EPS = 1e-5
BN_MOMENTUM = 0.9
AUX_WIDTHS = (128, 768)


# ---------------------------------------------------------------- init


def normal(key, shape):
  """Standard normal f32 `shape`, drawn on the host from the key's bits.

  XLA:CPU compiles a threefry kernel per shape (about 1 s each, 15-30 s for a
  supernet); numpy draws them at once. Deterministic in the key. Under tracing
  (e.g. jax.eval_shape) the key has no value and jax.random draws the same shape.
  """
  if isinstance(key, jax.core.Tracer):
    return jax.random.normal(key, shape, jnp.float32)
  seed = np.asarray(jax.random.key_data(key)).ravel()
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def conv_init(key, shape, lead=()):
  """He-normal init for an HWIO kernel (depthwise kernels have I = 1); `lead` stacks
  independent kernels: [*lead, *shape]."""
  fan_in = shape[0] * shape[1] * shape[2]
  return normal(key, tuple(lead) + tuple(shape)) * np.float32(np.sqrt(2.0 / fan_in))


def bn_init(c, lead=()):
  return {"scale": jnp.ones(tuple(lead) + (c,), jnp.float32),
          "bias": jnp.zeros(tuple(lead) + (c,), jnp.float32)}


def bn_stats_init(c):
  return {"mean": jnp.zeros((c,), jnp.float32), "var": jnp.ones((c,), jnp.float32)}


# ---------------------------------------------------------------- primitives


def conv(x, w, stride=1, padding="SAME"):
  """x [B,H,W,I], w [kh,kw,I,O] -> [B,H',W',O]. 1x1 stride-1 kernels run as a matmul
  (XLA:CPU's convolution backward is several times slower than a dot's)."""
  if w.shape[:2] == (1, 1) and stride == 1:
    return jnp.einsum("bhwi,io->bhwo", x, w[0, 0])
  return lax.conv_general_dilated(x, w, (stride, stride), padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


# "shift": a sum of k*k shifted, scaled copies (3-6x faster than XLA:CPU's grouped
# convolution, forward and backward, and exactly equal); "xla": a grouped convolution
# (fast on GPU/TPU); "auto": shift on CPU, xla elsewhere. Read at trace time.
DEPTHWISE_IMPL = "auto"


def same_offset(n, k, stride):
  """Where TF/XLA's SAME window of a strided op starts relative to the stride-1 one.

  A k x k SAME op at `stride` on n pixels pads (total // 2, total - total // 2) with
  total = max((ceil(n/stride) - 1) * stride + k - n, 0); its output i is centred on
  input pixel i * stride + k // 2 - total // 2, i.e. it equals the stride-1 SAME
  output at that pixel (same window, same zero padding). Returns that first pixel.
  """
  out = -(-n // stride)
  total = max((out - 1) * stride + k - n, 0)
  return k // 2 - total // 2


def subsample(y, n_hw, k, stride):
  """The strided SAME result from the stride-1 SAME result y [B,H,W,C] of a k x k op."""
  if stride == 1:
    return y
  oh, ow = same_offset(n_hw[0], k, stride), same_offset(n_hw[1], k, stride)
  return y[:, oh::stride, ow::stride]


def depthwise_conv(x, w, stride=1):
  """x [B,H,W,C], w [k,k,1,C] -> [B,ceil(H/s),ceil(W/s),C], SAME (TF's padding)."""
  impl = DEPTHWISE_IMPL
  if impl == "auto":
    impl = "shift" if jax.default_backend() == "cpu" else "xla"
  if impl == "xla":
    return lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=x.shape[-1])
  return subsample(_depthwise_shift(x, vary_like(w, x)), x.shape[1:3], w.shape[0], stride)


def _pad_same(x, k):
  """x zero-padded by k // 2 on both sides of H and W, materialised once (a barrier keeps
  XLA from fusing the pad into each of the k*k shifted reads, which costs a bounds
  check and select per element and read)."""
  p = k // 2
  return lax.optimization_barrier(jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))))


def _shift_sum(xp, w, hw):
  """sum_{i,j} xp[:, i:i+h, j:j+w, :] * w[i, j, 0]: a stride-1 depthwise correlation."""
  k, (h, wd) = w.shape[0], hw
  out = 0.0
  for i in range(k):
    for j in range(k):
      out = out + xp[:, i:i + h, j:j + wd, :] * w[i, j, 0]
  return out


@jax.custom_vjp
def _depthwise_shift(x, w):
  return _shift_sum(_pad_same(x, w.shape[0]), w, x.shape[1:3])


def _depthwise_shift_fwd(x, w):
  return _depthwise_shift(x, w), (x, w)   # residuals: x and w only, no k*k shifted copies


def _depthwise_shift_bwd(res, g):
  """dx: the same shift-sum of the padded cotangent with the flipped kernel; dw: all
  k*k channel sums in one variadic reduction (one pass over x and g, not k*k)."""
  x, w = res
  k, hw = w.shape[0], x.shape[1:3]
  dx = _shift_sum(_pad_same(g, k), w[::-1, ::-1], hw)
  xp = _pad_same(x, k)
  gf = g.astype(jnp.float32)          # weight-gradient sums accumulate in float32
  prods = [xp[:, i:i + hw[0], j:j + hw[1], :].astype(jnp.float32) * gf
           for i in range(k) for j in range(k)]
  # per-example partial sums [B, C] first: XLA:CPU runs a reduction to [C] on one thread,
  # one to [B, C] on all (2.2x faster at 32x32, bench/results/issue15.md)
  sums = lax.reduce(prods, [np.zeros((), np.float32)] * len(prods),
                    lambda a, b: [u + v for u, v in zip(a, b)], (1, 2))
  dw = jnp.stack(sums).sum(1).reshape(w.shape).astype(w.dtype)
  return dx.astype(x.dtype), dw


_depthwise_shift.defvjp(_depthwise_shift_fwd, _depthwise_shift_bwd)


# The training kernels: sep_conv's halves [ReLU, depthwise, pointwise, BN] and the convs of
# relu_conv_bn, relu_concat_conv_bn and factorized_reduce [ReLU, conv, BN]. "kernel": one
# custom call each way per half or conv (kernels.sep_forward / sep_backward, sep_train.cc;
# kernels.conv_forward / conv_backward, conv_train.cc; custom VJPs in kernel_vjps.py; BN from
# the channel sums they return) where they apply (float32; sep: stride 1 or 2, k in
# kernels.KERNELS; conv: k in kernels.CONV_KERNELS; the kernels built), layers' own ops
# elsewhere; "xla": layers' own ops always; "auto": "kernel" on CPU unless DEPTHWISE_IMPL
# names a depthwise explicitly (then that depthwise runs). Read at trace time.
SEP_IMPLS = ("auto", "kernel", "xla")
SEP_IMPL = "auto"


def _kernels_wanted():
  """Whether SEP_IMPL resolves to the training kernels here (before per-op checks)."""
  impl = SEP_IMPL
  if impl not in SEP_IMPLS:
    raise ValueError(f"layers.SEP_IMPL must be one of {SEP_IMPLS}, got {impl!r}")
  if impl == "auto":
    return DEPTHWISE_IMPL == "auto" and jax.default_backend() == "cpu"
  return impl == "kernel"


def sep_impl(x, wd, stride=1):
  """'kernel' or 'xla': whether a sep_conv half at `stride` on x with depthwise kernels wd
  runs the kernel (SEP_IMPL resolved)."""
  usable = stride in (1, 2) and x.dtype == jnp.float32 and wd.shape[0] in kernels.KERNELS
  return "kernel" if _kernels_wanted() and usable and kernels.available() else "xla"


def conv_impl(x, w):
  """'kernel' or 'xla': whether a stride-1 SAME conv of x with w [k,k,I,O] runs as
  kernels.conv_forward / conv_backward with its BN's sums (SEP_IMPL resolved as for
  sep_conv's halves; float32, k in kernels.CONV_KERNELS)."""
  usable = (x.dtype == jnp.float32 and w.shape[0] == w.shape[1]
            and w.shape[0] in kernels.CONV_KERNELS)
  return "kernel" if _kernels_wanted() and usable and kernels.available() else "xla"


def _count(y):
  """Values per channel of y [B,H,W,C] (a BN's statistics' denominator)."""
  return y.shape[0] * y.shape[1] * y.shape[2]


def avg_pool3x3(x, stride=1):
  """3x3 SAME average at `stride`, padding excluded from the count (as TF)."""
  return subsample(pools.avg_pool3x3(x), x.shape[1:3], 3, stride)


def max_pool3x3(x, stride=1):
  """3x3 SAME maximum at `stride` (padding never wins)."""
  return subsample(pools.max_pool3x3(x), x.shape[1:3], 3, stride)


def _bn_statistics(s, mean, mean_sq, axis_name):
  """(mean, var, s_new) from a batch's float32 moments [C] (averaged over axis_name's
  devices); s_new: the running statistics updated (None when s is None)."""
  if axis_name is not None:
    mean, mean_sq = lax.pmean((mean, mean_sq), axis_name)
  var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
  if s is None:
    return mean, var, None
  return mean, var, {"mean": BN_MOMENTUM * s["mean"] + (1 - BN_MOMENTUM) * mean,
                     "var": BN_MOMENTUM * s["var"] + (1 - BN_MOMENTUM) * var}


def batch_norm(p, s, x, train, axis_name=None):
  """BN over (B, H, W). s None -> batch statistics always, returns s_new None."""
  if s is None or train:
    xf = x.astype(jnp.float32)        # statistics in float32 whatever the compute dtype
    mean, var, s_new = _bn_statistics(s, jnp.mean(xf, axis=(0, 1, 2)),
                                      jnp.mean(jnp.square(xf), axis=(0, 1, 2)), axis_name)
  else:
    mean, var, s_new = s["mean"], s["var"], s
  if x.dtype == jnp.float32:
    y = (x - mean) * lax.rsqrt(var + BN_EPS) * p["scale"] + p["bias"]
  else:   # low precision: one multiply-add in x's dtype, the affine folded in float32
    inv = lax.rsqrt(var + BN_EPS) * p["scale"].astype(jnp.float32)
    shift = p["bias"].astype(jnp.float32) - mean * inv
    y = x * inv.astype(x.dtype) + shift.astype(x.dtype)
  return y, s_new


def bn_affine(p, s, sums, count, train, axis_name=None):
  """(a, b, s_new) with batch_norm(p, s, y, train, axis_name) = y * a + b (to rounding), from
  y's channel sums [2, C] = [sum y, sum y^2] over its `count` values per channel."""
  if s is None or train:
    mean, var, s_new = _bn_statistics(s, sums[0] / count, sums[1] / count, axis_name)
  else:
    mean, var, s_new = s["mean"], s["var"], s
  a = lax.rsqrt(var + BN_EPS) * p["scale"]
  return a, p["bias"] - mean * a, s_new


def _sub(s, key):
  return None if s is None else s[key]


# ---------------------------------------------------------------- blocks


def sep_conv_init(key, k, c, lead=()):
  """2 x [ReLU, depthwise kxk, pointwise 1x1, BN]; inner width = c. `lead` stacks
  independent copies (the supernet's [node, slot, input] axes) in one draw per leaf."""
  ks = jax.random.split(key, 4)
  p = {"dw1": conv_init(ks[0], (k, k, 1, c), lead), "pw1": conv_init(ks[1], (1, 1, c, c), lead),
       "bn1": bn_init(c, lead), "dw2": conv_init(ks[2], (k, k, 1, c), lead),
       "pw2": conv_init(ks[3], (1, 1, c, c), lead), "bn2": bn_init(c, lead)}
  s = {"bn1": bn_stats_init(c), "bn2": bn_stats_init(c)}
  return p, s


def sep_conv(p, s, x, train, axis_name=None, stride=1):
  """2 x [ReLU, depthwise kxk, pointwise 1x1, BN]; the first depthwise at `stride`."""
  if sep_impl(x, p["dw1"], stride) == "kernel":
    return _sep_conv_kernel(p, s, x, train, axis_name, stride)
  y = conv(depthwise_conv(jax.nn.relu(x), p["dw1"], stride), p["pw1"])
  y, s1 = batch_norm(p["bn1"], _sub(s, "bn1"), y, train, axis_name)
  y = conv(depthwise_conv(jax.nn.relu(y), p["dw2"]), p["pw2"])
  y, s2 = batch_norm(p["bn2"], _sub(s, "bn2"), y, train, axis_name)
  return y, (None if s is None else {"bn1": s1, "bn2": s2})


def _sep_conv_kernel(p, s, x, train, axis_name, stride):
  """sep_conv as kernel calls (SEP_IMPL): each returns its output's channel sums, from which
  its BN is an affine (bn_affine); the second applies BN1's as it reads its input, so BN1
  takes no pass of its own; BN2's is applied here."""
  offset = tuple(same_offset(n, p["dw1"].shape[0], stride) for n in x.shape[1:3])
  a, b = kernel_vjps.identity_affine(x.shape[-1], x.dtype)
  y, sums = kernel_vjps.sep_half(x, a, b, p["dw1"], p["pw1"], stride, offset)
  a, b, s1 = bn_affine(p["bn1"], _sub(s, "bn1"), sums, _count(y), train, axis_name)
  y, sums = kernel_vjps.sep_half(y, a, b, p["dw2"], p["pw2"])
  a, b, s2 = bn_affine(p["bn2"], _sub(s, "bn2"), sums, _count(y), train, axis_name)
  return y * a + b, (None if s is None else {"bn1": s1, "bn2": s2})


def conv_bn_init(key, k, c_in, c_out):
  return ({"conv": conv_init(key, (k, k, c_in, c_out)), "bn": bn_init(c_out)},
          {"bn": bn_stats_init(c_out)})


def relu_conv_bn(p, s, x, train, axis_name=None, relu=True):
  """[ReLU], conv (stride 1, SAME), BN: the stem, 1x1 calibrations, layer_base."""
  if conv_impl(x, p["conv"]) == "kernel":
    y, sums = kernel_vjps.conv_sums(x, p["conv"], relu)
    a, b, sb = bn_affine(p["bn"], _sub(s, "bn"), sums, _count(y), train, axis_name)
    return y * a + b, (None if s is None else {"bn": sb})
  y = conv(jax.nn.relu(x) if relu else x, p["conv"])
  y, sb = batch_norm(p["bn"], _sub(s, "bn"), y, train, axis_name)
  return y, (None if s is None else {"bn": sb})


def relu_concat_conv_bn(p, s, xs, w, train, axis_name=None):
  """ReLU, a 1x1 conv of the J inputs xs [J,B,H,W,C] with their channels concatenated
  (weights w [J, C, D]: input j's rows), BN p / s: [B,H,W,D] (the supernet cell's final
  conv over its values). The kernel reads the J inputs in place (no concatenation)."""
  w2 = w.reshape(1, 1, -1, w.shape[-1])          # [1, 1, J*C, D]
  if conv_impl(xs[0], w2) == "kernel":
    y, sums = kernel_vjps.conv_sums(xs, w2, True)
    a, b, s_new = bn_affine(p, s, sums, _count(y), train, axis_name)
    return y * a + b, s_new
  y = jnp.einsum("jbhwc,jcd->bhwd", jax.nn.relu(xs), w)
  return batch_norm(p, s, y, train, axis_name)


def factorized_reduce_init(key, c_in, c_out):
  """Two 1x1 paths (offset by one pixel) to c_out // 2 and c_out - c_out // 2."""
  k1, k2 = jax.random.split(key)
  h = c_out // 2
  return ({"conv1": conv_init(k1, (1, 1, c_in, h)),
           "conv2": conv_init(k2, (1, 1, c_in, c_out - h)), "bn": bn_init(c_out)},
          {"bn": bn_stats_init(c_out)})


def factorized_reduce(p, s, x, stride, train, axis_name=None, relu=True):
  """[ReLU], two strided 1x1 paths (the second offset by one pixel) concatenated, BN:
  [B,H,W,I] -> [B,ceil(H/s),.,O] (ENAS `_factorized_reduction`)."""
  if conv_impl(x, p["conv1"]) == "kernel":
    return _factorized_reduce_kernel(p, s, x, stride, train, axis_name, relu)
  if relu:
    x = jax.nn.relu(x)
  a = conv(x[:, ::stride, ::stride], p["conv1"])
  shifted = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))[:, 1:, 1:]
  b = conv(shifted[:, ::stride, ::stride], p["conv2"])
  y, sb = batch_norm(p["bn"], _sub(s, "bn"), jnp.concatenate([a, b], -1), train, axis_name)
  return y, (None if s is None else {"bn": sb})


def _factorized_reduce_kernel(p, s, x, stride, train, axis_name, relu):
  """factorized_reduce by two conv kernel calls on the strided pixels of each path; the
  second path's pixels past the border (odd H or W) are zeros after the ReLU, so its output
  there is zero: padded on. BN from the two calls' sums."""
  ya, sa = kernel_vjps.conv_sums(x[:, ::stride, ::stride], p["conv1"], relu)
  yb, sb = kernel_vjps.conv_sums(x[:, 1::stride, 1::stride], p["conv2"], relu)
  yb = jnp.pad(yb, ((0, 0), (0, ya.shape[1] - yb.shape[1]), (0, ya.shape[2] - yb.shape[2]),
                    (0, 0)))
  y, sums = jnp.concatenate([ya, yb], -1), jnp.concatenate([sa, sb], -1)
  a, b, s_new = bn_affine(p["bn"], _sub(s, "bn"), sums, _count(y), train, axis_name)
  return y * a + b, (None if s is None else {"bn": s_new})


def aux_head_init(key, c_in, hw, num_classes):
  """ENAS aux head: ReLU, avgpool 5x5/3 VALID, 1x1 conv 128 + BN + ReLU,
  conv 768 over the remaining map + BN + ReLU, linear (no bias)."""
  k1, k2, k3 = jax.random.split(key, 3)
  w1, w2 = AUX_WIDTHS
  r = aux_pool_size(hw)
  p = {"conv1": conv_init(k1, (1, 1, c_in, w1)), "bn1": bn_init(w1),
       "conv2": conv_init(k2, (r, r, w1, w2)), "bn2": bn_init(w2),
       "fc": {"w": normal(k3, (w2, num_classes)) / np.float32(np.sqrt(w2))}}
  s = {"bn1": bn_stats_init(w1), "bn2": bn_stats_init(w2)}
  return p, s


def aux_pool_window(hw):
  return min(5, hw)


def aux_pool_size(hw):
  """Spatial size after the aux head's VALID avg pool (window <= 5, stride 3)."""
  return (hw - aux_pool_window(hw)) // 3 + 1


def aux_head(p, s, x, train, axis_name=None):
  win = aux_pool_window(x.shape[1])
  y = lax.reduce_window(jax.nn.relu(x), 0.0, lax.add, (1, win, win, 1), (1, 3, 3, 1),
                        "VALID") / (win * win)
  y, s1 = batch_norm(p["bn1"], _sub(s, "bn1"), conv(y, p["conv1"]), train, axis_name)
  y = conv(jax.nn.relu(y), p["conv2"], padding="VALID")
  y, s2 = batch_norm(p["bn2"], _sub(s, "bn2"), y, train, axis_name)
  y = jax.nn.relu(y).reshape(y.shape[0], -1)
  return y @ p["fc"]["w"], (None if s is None else {"bn1": s1, "bn2": s2})


def classifier_init(key, c_in, num_classes):
  """The linear classifier, no bias (as ENAS)."""
  return {"w": normal(key, (c_in, num_classes)) / np.float32(np.sqrt(c_in))}


def classifier(p, x, dropout=None):
  """ReLU, global average pool, [dropout(features)], linear: [B,H,W,C] -> [B,classes]."""
  feats = jnp.mean(jax.nn.relu(x), axis=(1, 2))
  if dropout is not None:
    feats = dropout(feats)
  return feats @ p["w"]


def dropout(x, key, keep):
  """Inverted dropout: each element kept with probability `keep` and scaled by 1/keep."""
  keep_x = jnp.asarray(keep, x.dtype)   # a traced float32 keep must not promote x
  return jnp.where(jax.random.bernoulli(key, keep, x.shape), x / keep_x, 0.0)


def drop_path(x, key, keep):
  """Drops whole examples of x [B, ...] with probability 1 - keep, scales the rest by 1/keep."""
  m = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(m, x / jnp.asarray(keep, x.dtype), 0.0)   # traced keep: no promotion
