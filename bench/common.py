"""Shared helpers of the benchmark scripts: size flags, interleaved timing, JSON, tables.

Other processes may share the CPU, so variants are timed alternately (one call
of each per repetition, the order rotating) and summarised by their medians.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time

import jax
import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def add_size_flags(parser, steps=4, warmup=1):
  """Search-size defaults (DESIGN §5: 6 layers, 20 filters, batch 160, CIFAR shape)."""
  parser.add_argument("--num_layers", type=int, default=6)
  parser.add_argument("--out_filters", type=int, default=20)
  parser.add_argument("--batch", type=int, default=160)
  parser.add_argument("--image", type=int, default=32, help="image height = width (3 channels)")
  parser.add_argument("--classes", type=int, default=10)
  parser.add_argument("--steps", type=int, default=steps, help="timed repetitions per variant")
  parser.add_argument("--warmup", type=int, default=warmup, help="untimed repetitions first")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="", help="JSON path (default bench/results/<name>.json)")
  return parser


def synthetic_batch(seed, batch, image, classes):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, image, image, 3)).astype(np.float32)
  y = rng.integers(0, classes, batch).astype(np.int32)
  return x, y


def block(tree):
  return jax.block_until_ready(tree)


def timed(fn, *args):
  """(seconds, result) of fn(*args), waiting for the result."""
  t = time.perf_counter()
  out = block(fn(*args))
  return time.perf_counter() - t, out


def compile_timed(jitted, *args, **kwargs):
  """Lowers and compiles a jitted function; returns (compiled, trace_s, compile_s).
  Static arguments go in kwargs and are not passed to the compiled function."""
  t0 = time.perf_counter()
  lowered = jitted.lower(*args, **kwargs)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  return compiled, t1 - t0, time.perf_counter() - t1


def interleave(fns, reps, warmup=1):
  """fns: {name: f(rep)} (each waits for its result). Runs one call of each per
  repetition, rotating the order. Returns ({name: [wall seconds]}, {name: {'user':
  [...], 'sys': [...]}}) of the timed reps; this process's CPU seconds are less
  disturbed by other processes than wall time, and 'sys' shows page-fault costs."""
  names = list(fns)
  wall = {n: [] for n in names}
  cpu = {n: {"user": [], "sys": []} for n in names}
  for rep in range(warmup + reps):
    shift = rep % len(names)
    for n in names[shift:] + names[:shift]:
      r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
      fns[n](rep)
      dt, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
      if rep >= warmup:
        wall[n].append(dt)
        cpu[n]["user"].append(r1.ru_utime - r0.ru_utime)
        cpu[n]["sys"].append(r1.ru_stime - r0.ru_stime)
  return wall, cpu


def log(msg):
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def summary(seconds, cpu=None):
  out = {"median_s": statistics.median(seconds), "min_s": min(seconds),
         "max_s": max(seconds), "n": len(seconds), "all_s": seconds}
  if cpu:
    out["median_user_s"] = statistics.median(cpu["user"])
    out["median_sys_s"] = statistics.median(cpu["sys"])
  return out


def environment():
  load = os.getloadavg() if hasattr(os, "getloadavg") else None
  return {"jax": jax.__version__, "backend": jax.default_backend(),
          "device": str(jax.devices()[0]), "device_count": jax.device_count(),
          "cpu_count": os.cpu_count(), "loadavg": load, "python": platform.python_version(),
          "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_json(name, path, result):
  path = path or os.path.join(RESULTS, f"{name}.json")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  return path


def write_outputs(name, result, md):
  """bench/results/<name>.json (result) and .md (md), md printed."""
  out = os.path.join(RESULTS, name)
  with open(out + ".json", "w") as fh:
    json.dump(result, fh, indent=1)
  with open(out + ".md", "w") as fh:
    fh.write(md)
  print(md)
  print(f"wrote {out}.json, {out}.md")


def table(headers, rows):
  """Markdown table; floats printed with 4 significant digits."""
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def round_trip_line(start, end):
  """The md sentence on the first two CPUs' cache-line round trip (machine.core_round_trip)
  at the start and the end of the run: where they share no cache, multi-core figures are
  slower (on a VM the vCPUs can move between the two within a run)."""
  if not start or not end:
    return ""
  return (f" Cache-line round trip between CPUs {start['cpus'][0]} and {start['cpus'][1]}: "
          f"{start['ns']:.0f} ns at the start, {end['ns']:.0f} ns at the end (tens of ns: "
          f"they share an L3; hundreds: they do not, and data handed between threads costs "
          f"more).")
