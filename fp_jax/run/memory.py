"""Host memory: hand the compiler's freed heap back to the OS, and measure peaks.

XLA:CPU compiling a training step (LLVM) allocates about 1 GB that it frees again,
but glibc keeps freed heap pages mapped, so the process's peak RSS becomes that
compile-time high-water mark plus the step's temp buffer (allocated afresh at every
call on CPU). `install()` registers a listener on JAX's backend-compile event that
calls `malloc_trim(0)` after every compilation, i.e. before the new executable first
runs: at search size the peak RSS drops by about 0.5 GB (bench/search_step.py).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys

import jax

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_installed = False


def _libc():
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return libc if hasattr(libc, "malloc_trim") else None
  except OSError:
    return None


def trim():
  """Returns freed heap memory to the OS (glibc); True when it released any."""
  libc = _libc()
  return bool(libc.malloc_trim(0)) if libc is not None else False


def install():
  """Trims the heap after every backend compilation (idempotent; no-op off glibc)."""
  global _installed
  if _installed or _libc() is None:
    return
  def listener(event, duration_secs, **kwargs):
    del duration_secs, kwargs
    if event == _COMPILE_EVENT:
      trim()
  jax.monitoring.register_event_duration_secs_listener(listener)
  _installed = True


def peak_rss_bytes():
  """This process's peak resident set size so far: VmHWM on Linux (ru_maxrss survives
  exec, so a child started by a large process would report its parent's peak), else
  ru_maxrss."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss if sys.platform == "darwin" else rss * 1024


def rss_bytes():
  """Current resident set size (Linux /proc), or the peak where that is unavailable."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * resource.getpagesize()
  except OSError:
    return peak_rss_bytes()


def xla_memory(compiled):
  """{temp, argument, output, generated_code} bytes of a compiled executable (None
  where the backend does not report them)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  return {"temp_bytes": int(m.temp_size_in_bytes), "argument_bytes": int(m.argument_size_in_bytes),
          "output_bytes": int(m.output_size_in_bytes),
          "generated_code_bytes": int(m.generated_code_size_in_bytes)}


def device_peak_bytes(device=None):
  """Peak bytes in use on an accelerator (memory_stats), or None (CPU reports none)."""
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return None if not stats else int(stats.get("peak_bytes_in_use", 0)) or None
