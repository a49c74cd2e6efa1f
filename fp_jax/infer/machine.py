"""What machine a latency figure was measured on, and its fp32 matmul rate."""
from __future__ import annotations

import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np


def _timed(fn):
  t = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t


def matmul_peak_gflops(n=2048, reps=5):
  """This machine's fp32 matmul rate: best of `reps` n x n x n jnp.dot calls (GFLOP/s)."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  dot = jax.jit(jnp.dot).lower(a, a).compile()
  jax.block_until_ready(dot(a, a))
  best = min(_timed(lambda: dot(a, a)) for _ in range(reps))
  return 2.0 * n ** 3 / best / 1e9


ISA_FLAGS = {"avx2": "AVX2", "fma": "FMA", "avx512f": "AVX-512", "avx512_vnni": "AVX512-VNNI",
             "avx512_bf16": "AVX512-BF16", "amx_tile": "AMX", "amx_bf16": "AMX-BF16"}


def proc_cpuinfo():
  """/proc/cpuinfo's first processor: {field: value} ('vendor_id', 'cpu family', 'model
  name', ...), with 'flags' a set; {'flags': set()} where it cannot be read."""
  info = {"flags": set()}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "flags":
          info["flags"] = set(value.split())
          break
        info.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  return info


def cpu_info():
  """{'model': the CPU's model name, 'isa': the vector extensions it reports (ISA_FLAGS,
  from /proc/cpuinfo), 'cores_usable', 'cores'}: recorded beside every latency figure."""
  info = proc_cpuinfo()
  model = info.get("model name") or platform.processor() or platform.machine()
  return {"model": model, "isa": [v for k, v in ISA_FLAGS.items() if k in info["flags"]],
          "cores_usable": len(os.sched_getaffinity(0)), "cores": os.cpu_count()}


def core_round_trip():
  """{'cpus': [a, b], 'ns': median of 3} for the first two usable CPUs: a cache line's round
  trip between them, ~50 ns where they share an L3 and ~300 ns where they do not (a VM's
  vCPUs can move between the two within a run), or None with fewer than two usable CPUs or
  without fp_jax's kernels. Recorded beside multi-core latency figures."""
  from fp_jax.infer import kernels  # pylint: disable=g-import-not-at-top  (imports this module)
  cpus = sorted(os.sched_getaffinity(0))[:2]
  if len(cpus) < 2 or not kernels.available():
    return None
  ns = [kernels.core_round_trip_ns(*cpus) for _ in range(3)]
  if None in ns:
    return None
  return {"cpus": cpus, "ns": round(float(np.median(ns)), 1)}


def device_description():
  """e.g. 'cpu: AMD EPYC (AVX2, FMA), 2 of 2 cores usable, 1 local device(s)': the CPU
  model and its ISA (DESIGN §3's latency.json `device`)."""
  d = jax.devices()[0]
  kind = getattr(d, "device_kind", str(d))
  if d.platform == "cpu":
    info = cpu_info()
    isa = f" ({', '.join(info['isa'])})" if info["isa"] else ""
    kind = f"{info['model']}{isa}, {info['cores_usable']} of {info['cores']} cores usable"
  return f"{d.platform}: {kind}, {jax.local_device_count()} local device(s)"
