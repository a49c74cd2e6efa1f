"""fp_jax's own CPU kernels as XLA FFI custom calls, built on first use.

`depthwise(x, w, relu, bias, stride, offset)` runs depthwise.cc (a register-blocked kxk
depthwise with the preceding bias, ReLU and zero padding folded in, at stride 1 or 2
computing only the outputs kept, its rows split over XLA's intra-op threads; see its
header for why XLA's loop fusion is slow here) inside a jitted computation, like any
other op. The shared library is
compiled once per machine with the system C++ compiler ($CXX, else c++) against
jaxlib's FFI headers into $FP_JAX_KERNEL_DIR (default ~/.cache/fp_jax/kernels),
named by a hash of the source, flags and jaxlib version, and registered with
XLA:CPU. `available()` is False (and fused.depthwise's 'auto' falls back to
'shift') off x86-64, without AVX2/FMA, without a compiler, or when the build
fails; FP_JAX_KERNELS=0 turns the kernels off. Exported artifacts never contain
the custom call (export.py picks portable implementations).
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

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = tuple(os.path.join(_HERE, f) for f in ("depthwise.cc", "sep_train.cc"))
HEADERS = (os.path.join(_HERE, "kernel_common.h"),)
TARGET = "fp_jax_depthwise"
# the training pair of sep_train.cc (layers.sep_conv's ReLU -> depthwise -> pointwise)
SEP_TARGETS = {"fwd": "fp_jax_sep_forward", "bwd": "fp_jax_sep_backward"}
FLAGS = ("-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC", "-w")
KERNELS = (3, 5)             # kernel sizes depthwise.cc handles


def _cpu_ok():
  if platform.machine().lower() not in ("x86_64", "amd64"):
    return False
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((l for l in f if l.startswith("flags")), "").split()
  except OSError:
    return False
  return "avx2" in flags and "fma" in flags


def _build():
  """Path of the compiled library (building it if needed), or None."""
  cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
  if not cxx:
    logging.warning("fp_jax kernels: no C++ compiler (set $CXX or install c++); fused "
                    "inference uses XLA's depthwise ('shift')")
    return None
  src = b""
  for name in SOURCES + HEADERS:
    with open(name, "rb") as f:
      src += f.read()
  tag = hashlib.sha256(src + " ".join(FLAGS).encode() + jax.__version__.encode()).hexdigest()[:16]
  root = os.environ.get("FP_JAX_KERNEL_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "fp_jax", "kernels")
  path = os.path.join(root, f"fp_jax_kernels_{tag}.so")
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


@functools.cache
def available():
  """True when the kernels are built and registered with XLA:CPU (see the docstring)."""
  if os.environ.get("FP_JAX_KERNELS", "1") == "0" or not _cpu_ok():
    return False
  try:
    path = _build()
    if path is None:
      return False
    lib = ctypes.cdll.LoadLibrary(path)
  except OSError as e:                 # unwritable cache directory, unloadable library
    logging.warning("fp_jax kernels: not available: %s", e)
    return False
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.FpJaxDepthwise), platform="cpu")
  jax.ffi.register_ffi_target(SEP_TARGETS["fwd"], jax.ffi.pycapsule(lib.FpJaxSepForward),
                              platform="cpu")
  jax.ffi.register_ffi_target(SEP_TARGETS["bwd"], jax.ffi.pycapsule(lib.FpJaxSepBackward),
                              platform="cpu")
  return True


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


def _sep_check(x, wd, wp):
  if not available():
    raise RuntimeError("fp_jax kernels are not available on this machine (kernels.available())")
  k = np.shape(wd)[0]
  if (np.ndim(x) != 4 or k not in KERNELS or np.shape(wd) != (k, k, 1, x.shape[-1])
      or np.shape(wp)[:3] != (1, 1, x.shape[-1]) or np.ndim(wp) != 4):
    raise ValueError(f"sep kernel: x [B,H,W,C], wd [k,k,1,C] (k in {KERNELS}), wp [1,1,C,D]; "
                     f"got {np.shape(x)}, {np.shape(wd)}, {np.shape(wp)}")


def sep_forward(x, wd, wp, threads=0):
  """conv(depthwise(ReLU(x), wd), wp) at stride 1, SAME (sep_train.cc): x [B,H,W,C] f32,
  wd [k,k,1,C], wp [1,1,C,D] -> [B,H,W,D]. threads as in `depthwise`. Traced."""
  _sep_check(x, wd, wp)
  out = jax.ShapeDtypeStruct(x.shape[:3] + (wp.shape[-1],), x.dtype)
  return jax.ffi.ffi_call(SEP_TARGETS["fwd"], out, vmap_method="sequential")(
      x, wd[:, :, 0, :], wp[0, 0], threads=np.int64(threads))


def sep_backward(x, wd, wp, gy, threads=0):
  """The VJP of sep_forward at (x, wd, wp) for the cotangent gy [B,H,W,D]: (gx [B,H,W,C],
  gwd [k,k,1,C], gwp [1,1,C,D]); the weight gradients sum the images' terms in image
  order, whatever the thread count."""
  _sep_check(x, wd, wp)
  k, c, d = wd.shape[0], x.shape[-1], wp.shape[-1]
  outs = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(wd.shape, x.dtype),
          jax.ShapeDtypeStruct(wp.shape, x.dtype))
  return jax.ffi.ffi_call(SEP_TARGETS["bwd"], outs, vmap_method="sequential")(
      x, wd[:, :, 0, :], wp[0, 0], gy, threads=np.int64(threads))
