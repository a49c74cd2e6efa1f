"""fp_jax's own CPU kernels as XLA FFI custom calls, built on first use.

`depthwise(x, w, relu, bias, stride, offset)` runs depthwise.cc (a register-blocked kxk
depthwise with the preceding bias, ReLU and zero padding folded in, at stride 1 or 2
computing only the outputs kept, its rows split over XLA's intra-op threads; see its
header for why XLA's loop fusion is slow here) inside a jitted computation, like any
other op. The training steps' kernels, each a forward / backward pair returning the
output's channel sums for its BN: `sep_forward` / `sep_backward` (sep_train.cc: a
sep_conv half, stride 1 or 2) and `conv_forward` / `conv_backward` (conv_train.cc: a
conv, k 1 or 3; their custom VJPs are models/kernel_vjps.py). The shared library is
compiled once per machine with the system C++ compiler ($CXX, else c++) against jaxlib's
FFI headers into $FP_JAX_KERNEL_DIR (default ~/.cache/fp_jax/kernels), named by a hash
of the source, flags and jaxlib version, and registered with XLA:CPU. `available()` is
False (and fused.depthwise's 'auto' falls back to 'shift') off x86-64, without AVX2/FMA,
without a compiler, or when the build fails; FP_JAX_KERNELS=0 turns the kernels off.
Exported artifacts never contain the custom call (export.py picks portable
implementations).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

from absl import logging
import jax
import numpy as np

from fp_jax.infer import machine

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = tuple(os.path.join(_HERE, f) for f in ("depthwise.cc", "sep_train.cc", "conv_train.cc",
                                                 "network.cc"))
HEADERS = tuple(os.path.join(_HERE, f) for f in ("kernel_common.h", "sep_products.h", "gemm.h",
                                                 "network_ops.h", "worker_pool.h"))
FLAGS = ("-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC", "-pthread", "-w")
KERNELS = (3, 5)             # kernel sizes depthwise.cc handles


def _tag():
  """Hash of the sources, flags and jax version: names the library and its targets ('' when
  a source cannot be read; available() then says False)."""
  src = b""
  try:
    for name in SOURCES + HEADERS:
      with open(name, "rb") as f:
        src += f.read()
  except OSError:
    return ""
  return hashlib.sha256(src + " ".join(FLAGS).encode() + jax.__version__.encode()).hexdigest()[:16]


TAG = _tag()
# Target names carry the tag: XLA refuses a second registration of a name from another
# library, so two builds (e.g. two revisions that bench/steps.py loads side by side) each
# register their own.
TARGET = f"fp_jax_depthwise_{TAG[:8]}"
# the training pair of sep_train.cc (layers.sep_conv's halves)
SEP_TARGETS = {"fwd": f"fp_jax_sep_forward_{TAG[:8]}", "bwd": f"fp_jax_sep_backward_{TAG[:8]}"}
# the training pair of conv_train.cc (layers.relu_conv_bn's and factorized_reduce's convs)
CONV_TARGETS = {"fwd": f"fp_jax_conv_forward_{TAG[:8]}", "bwd": f"fp_jax_conv_backward_{TAG[:8]}"}
CONV_KERNELS = (1, 3)        # kernel sizes conv_train.cc handles (3: without the input gradient)
TRAIN_TARGETS = (*SEP_TARGETS.values(), *CONV_TARGETS.values())   # what training steps call
NETWORK_TARGET = f"fp_jax_network_{TAG[:8]}"   # network.cc: a whole folded network (native.py)


def _cpu_ok():
  if platform.machine().lower() not in ("x86_64", "amd64"):
    return False
  return {"avx2", "fma"} <= machine.proc_cpuinfo()["flags"]


def _build():
  """Path of the compiled library (building it if needed), or None."""
  cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
  if not cxx:
    logging.warning("fp_jax kernels: no C++ compiler (set $CXX or install c++); fused "
                    "inference uses XLA's depthwise ('shift')")
    return None
  root = os.environ.get("FP_JAX_KERNEL_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "fp_jax", "kernels")
  path = os.path.join(root, f"fp_jax_kernels_{TAG}.so")
  if os.path.exists(path):
    return path
  os.makedirs(root, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=root)
  os.close(fd)
  cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), "-I", _HERE, *SOURCES, "-o", tmp]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    os.unlink(tmp)
    logging.warning("fp_jax kernels: build failed (%s): %s", " ".join(cmd), proc.stderr[-2000:])
    return None
  os.replace(tmp, path)              # atomic: concurrent builders each write their own tmp
  return path


_LIBRARY = []          # the loaded library, once available() has loaded it


@functools.cache
def available():
  """True when the kernels are built and registered with XLA:CPU (see the docstring)."""
  if os.environ.get("FP_JAX_KERNELS", "1") == "0" or not _cpu_ok():
    return False
  if not TAG:
    logging.warning("fp_jax kernels: their sources %s are missing", SOURCES + HEADERS)
    return False
  try:
    path = _build()
    if path is None:
      return False
    lib = ctypes.cdll.LoadLibrary(path)
    _LIBRARY.append(lib)
  except OSError as e:                 # unwritable cache directory, unloadable library
    logging.warning("fp_jax kernels: not available: %s", e)
    return False
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.FpJaxDepthwise), platform="cpu")
  jax.ffi.register_ffi_target(SEP_TARGETS["fwd"], jax.ffi.pycapsule(lib.FpJaxSepForward),
                              platform="cpu")
  jax.ffi.register_ffi_target(SEP_TARGETS["bwd"], jax.ffi.pycapsule(lib.FpJaxSepBackward),
                              platform="cpu")
  jax.ffi.register_ffi_target(CONV_TARGETS["fwd"], jax.ffi.pycapsule(lib.FpJaxConvForward),
                              platform="cpu")
  jax.ffi.register_ffi_target(CONV_TARGETS["bwd"], jax.ffi.pycapsule(lib.FpJaxConvBackward),
                              platform="cpu")
  jax.ffi.register_ffi_target(NETWORK_TARGET, jax.ffi.pycapsule(lib.FpJaxNetwork), platform="cpu")
  return True


def core_round_trip_ns(a, b, iters=20000):
  """Nanoseconds per round trip of a cache line between CPUs a and b (network.cc's
  FpJaxCoreRoundTripNs), or None when a thread cannot be pinned to one of them."""
  if a == b:
    raise ValueError(f"core_round_trip_ns: two different CPUs, not {a} and {b}")
  if not available():
    raise RuntimeError("fp_jax kernels are not available on this machine (kernels.available())")
  f = _LIBRARY[0].FpJaxCoreRoundTripNs
  f.restype, f.argtypes = ctypes.c_double, (ctypes.c_int, ctypes.c_int, ctypes.c_int64)
  ns = f(a, b, iters)
  return None if ns < 0 else float(ns)


def depthwise(x, w, relu=False, bias=None, stride=1, offset=(0, 0), threads=0):
  """x [B,H,W,C] f32, w [k,k,1,C] (k in KERNELS), bias [C] -> the SAME depthwise of x + bias
  (ReLU'd when relu) at `stride` (1 or 2): [B, ceil((H-oh)/s), ceil((W-ow)/s), C], output o
  the stride-1 result at offset + s*o (layers.subsample's offsets; only those outputs are
  computed). threads: how many of XLA's intra-op threads take part (0: all of them for
  calls of at least 4 M multiply-adds, depthwise.cc's kMinParallelMacs, else the calling
  thread alone); the result is the same for any count. Traced; needs available()."""
  if not available():
    raise RuntimeError("fp_jax kernels are not available on this machine (kernels.available())")
  k = np.shape(w)[0]
  if k not in KERNELS or np.shape(w)[:2] != (k, k):
    raise ValueError(f"depthwise kernel: k must be one of {KERNELS}, got shape {np.shape(w)}")
  oh, ow = (int(o) for o in offset)
  if stride not in (1, 2) or not (0 <= oh < stride and 0 <= ow < stride):
    raise ValueError(f"depthwise kernel: stride 1 or 2 with offsets in [0, stride), got "
                     f"stride {stride}, offset {offset}")
  wt = w[:, :, 0, :]
  wt = np.ascontiguousarray(wt, np.float32) if isinstance(wt, np.ndarray) else wt
  if bias is None:
    bias = np.zeros(x.shape[-1], np.float32)
  b, h, wd, c = x.shape
  out = (b, -(-(h - oh) // stride), -(-(wd - ow) // stride), c)
  return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(out, x.dtype))(
      x, wt, bias, relu=np.int64(bool(relu)), stride=np.int64(stride), oh=np.int64(oh),
      ow=np.int64(ow), threads=np.int64(threads))


def _sep_check(x, a, b, wd, wp):
  if not available():
    raise RuntimeError("fp_jax kernels are not available on this machine (kernels.available())")
  k, c = np.shape(wd)[0], np.shape(x)[-1]
  if (np.ndim(x) != 4 or k not in KERNELS or np.shape(wd) != (k, k, 1, c)
      or np.ndim(wp) != 4 or np.shape(wp)[:3] != (1, 1, c)
      or np.shape(a) != (c,) or np.shape(b) != (c,)):
    raise ValueError(f"sep kernel: x [B,H,W,C], a [C], b [C], wd [k,k,1,C] (k in {KERNELS}), "
                     f"wp [1,1,C,D]; got {np.shape(x)}, {np.shape(a)}, {np.shape(b)}, "
                     f"{np.shape(wd)}, {np.shape(wp)}")


def _strided(x, stride, offset):
  """(attributes, output [B, Ho, Wo]) of a sep half at `stride` from `offset`."""
  oh, ow = (int(o) for o in offset)
  if stride not in (1, 2) or not (0 <= oh < stride and 0 <= ow < stride):
    raise ValueError(f"sep kernel: stride 1 or 2 with offsets in [0, stride), got "
                     f"stride {stride}, offset {offset}")
  b, h, w, _ = x.shape
  attrs = {"stride": np.int64(stride), "oh": np.int64(oh), "ow": np.int64(ow)}
  return attrs, (b, -(-(h - oh) // stride), -(-(w - ow) // stride))


def sep_forward(x, a, b, wd, wp, stride=1, offset=(0, 0), threads=0):
  """One sep_conv half (sep_train.cc): y = conv(depthwise(ReLU(x * a + b), wd), wp), SAME, at
  `stride` (1 or 2; output o is the stride-1 output at offset + stride * o, layers.subsample's
  offsets, and only those are computed), and sums [2, D] = [sum y, sum y^2] over its
  (B, Ho, Wo). x [B,H,W,C] f32, a, b [C], wd [k,k,1,C], wp [1,1,C,D] -> (y [B,Ho,Wo,D], sums).
  threads as in `depthwise`; the result is the same for any count. Traced."""
  _sep_check(x, a, b, wd, wp)
  attrs, out = _strided(x, stride, offset)
  d = wp.shape[-1]
  outs = (jax.ShapeDtypeStruct(out + (d,), x.dtype), jax.ShapeDtypeStruct((2, d), x.dtype))
  return jax.ffi.ffi_call(SEP_TARGETS["fwd"], outs, vmap_method="sequential")(
      x, a, b, wd[:, :, 0, :], wp[0, 0], **attrs, threads=np.int64(threads))


def sep_backward(x, a, b, wd, wp, y, gy, gsums, stride=1, offset=(0, 0), threads=0):
  """The VJP of sep_forward at (x, a, b, wd, wp, stride, offset), whose y is given, for the
  cotangents gy [B,Ho,Wo,D] and gsums [2, D]: (gx [B,H,W,C], ga [C], gb [C], gwd [k,k,1,C],
  gwp [1,1,C,D]). Sums over images add the images' terms in image order, whatever the
  thread count."""
  _sep_check(x, a, b, wd, wp)
  attrs, _ = _strided(x, stride, offset)
  c = x.shape[-1]
  outs = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((2, c), x.dtype),
          jax.ShapeDtypeStruct(wd.shape, x.dtype), jax.ShapeDtypeStruct(wp.shape, x.dtype))
  gx, gab, gwd, gwp = jax.ffi.ffi_call(SEP_TARGETS["bwd"], outs, vmap_method="sequential")(
      x, a, b, wd[:, :, 0, :], wp[0, 0], y, gy, gsums, **attrs, threads=np.int64(threads))
  return gx, gab[0], gab[1], gwd, gwp


def _conv_check(x, a, b, w, need_gx=True):
  if not available():
    raise RuntimeError("fp_jax kernels are not available on this machine (kernels.available())")
  nd, k = np.ndim(x), np.shape(w)[0]
  c = np.shape(x)[-1] * (np.shape(x)[0] if nd == 5 else 1)
  if (nd not in (4, 5) or k not in CONV_KERNELS or np.ndim(w) != 4
      or np.shape(w)[1:3] != (k, c) or np.shape(a) != (c,) or np.shape(b) != (c,)
      or ((need_gx or nd == 5) and k != 1)):
    raise ValueError(f"conv kernel: x [B,H,W,C] or [J,B,H,W,C/J], a [C], b [C], w [k,k,C,D] "
                     f"(k in {CONV_KERNELS}; k 1 with J inputs or need_gx); got {np.shape(x)}, "
                     f"{np.shape(a)}, {np.shape(b)}, {np.shape(w)}, need_gx={need_gx}")


def conv_forward(x, a, b, w, relu=True, threads=0):
  """A conv with its output's channel sums (conv_train.cc): y = conv(u, w), u = ReLU(x * a + b)
  (relu False: x * a + b), stride 1, SAME, and sums [2, D] = [sum y, sum y^2] over (B, H, W).
  x [B,H,W,C] f32, a, b [C], w [k,k,C,D] (k in CONV_KERNELS) -> (y [B,H,W,D], sums); or x
  [J,B,H,W,C/J]: J inputs whose channels are concatenated (k 1). threads as in `depthwise`;
  the result is the same for any count. Traced."""
  _conv_check(x, a, b, w, need_gx=False)
  d = w.shape[-1]
  outs = (jax.ShapeDtypeStruct(x.shape[-4:-1] + (d,), x.dtype),
          jax.ShapeDtypeStruct((2, d), x.dtype))
  return jax.ffi.ffi_call(CONV_TARGETS["fwd"], outs, vmap_method="sequential")(
      x, a, b, w, relu=np.int64(bool(relu)), threads=np.int64(threads))


def conv_backward(x, a, b, w, y, gy, gsums, relu=True, need_gx=True, threads=0):
  """The VJP of conv_forward at (x, a, b, w), whose y is given, for the cotangents
  gy [B,H,W,D] and gsums [2, D]: (gx (x's shape), ga [C], gb [C], gw [k,k,C,D]). need_gx
  False (the input is data): gx, ga and gb are not computed (gx None, ga and gb zero); k 3
  needs it False. Sums over images add the images' terms in image order, whatever the
  thread count."""
  _conv_check(x, a, b, w, need_gx)
  c = w.shape[2]
  outs = (jax.ShapeDtypeStruct(x.shape if need_gx else (0,), x.dtype),
          jax.ShapeDtypeStruct((2, c), x.dtype), jax.ShapeDtypeStruct(w.shape, x.dtype))
  gx, gab, gw = jax.ffi.ffi_call(CONV_TARGETS["bwd"], outs, vmap_method="sequential")(
      x, a, b, w, y, gy, gsums, relu=np.int64(bool(relu)), need_gx=np.int64(bool(need_gx)),
      threads=np.int64(threads))
  return (gx if need_gx else None), gab[0], gab[1], gw
