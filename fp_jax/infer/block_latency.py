"""Timing blocks and whole networks of the fused executor at batch 1 (latency_table.py's
measurements): one block alone as fused.Fused would run it, whole random networks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import statistics
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from fp_jax.infer import fused
from fp_jax.models import graph

REPS = 25             # interleaved timed rounds per block (after WARMUP untimed calls)
WARMUP = 3
COPIES = 8            # a block's copies in the computation that times it
NET_REPS = 60         # batch-1 calls timed per whole network


def _random(rng, *shape):
  return (rng.standard_normal(shape) / math.sqrt(max(1, int(np.prod(shape[:-1]))))).astype(
      np.float32)


def block_fn(block, opts, seed=0):
  """(fn(*xs) -> y, xs): `block` as the fused executor runs it, on random folded weights
  (constants) and random inputs in opts.dtype."""
  rng = np.random.default_rng(seed)
  b, dt = block, jnp.dtype(opts.dtype)
  xs = [_random(rng, 1, *b.hw, b.cin)]
  if b.kind == "classifier":
    w = _random(rng, b.cin, b.cout).astype(dt)
    return (lambda x: fused.classifier({"w": w}, x)), [x.astype(dt) for x in xs]
  out_hw = graph.ceil_hw(b.hw, b.stride)
  node = graph.Node("block", b.kind, (0,), b.cout, out_hw, k=b.k, stride=b.stride, relu=b.relu)
  if b.kind == "conv":
    fb = {"w": _random(rng, b.k, b.k, b.cin, b.cout), "b": _random(rng, b.cout)}
  elif b.kind == "fr":
    c1 = b.cout // 2
    fb = {"w1": _random(rng, 1, 1, b.cin, c1), "b1": _random(rng, c1),
          "w2": _random(rng, 1, 1, b.cin, b.cout - c1), "b2": _random(rng, b.cout - c1)}
  elif b.kind == "sep":
    fb = {"dw1": _random(rng, b.k, b.k, 1, b.cin), "pw1": _random(rng, 1, 1, b.cin, b.inner),
          "b1": _random(rng, b.inner), "dw2": _random(rng, b.k, b.k, 1, b.inner),
          "pw2": _random(rng, 1, 1, b.inner, b.cout), "b2": _random(rng, b.cout)}
  else:
    fb = None
  if b.kind == "add":
    xs.append(_random(rng, 1, *b.hw, b.cin))
  elif b.kind == "concat":
    n = b.inner
    xs = [_random(rng, 1, *b.hw, b.cin // n + (p < b.cin % n)) for p in range(n)]
  fb = None if fb is None else jax.tree.map(lambda a: a.astype(dt), fb)
  return (lambda *x: fused.apply_node(fb, node, list(x), opts)), [x.astype(dt) for x in xs]


def _call_fn(opts):
  """The empty call: one small input, a one-element result."""
  return (lambda x: x[0, 0, 0, :1]), [np.zeros((1, 8, 8, 8), jnp.dtype(opts.dtype))]


def timed(fn):
  t = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t


def _copies(fn, xs, n, seed):
  """fn run on n independent input sets inside one computation: (g(*args), args)."""
  rng = np.random.default_rng(seed)
  k = len(xs)
  args = [x + np.asarray(0.01 * rng.standard_normal(x.shape), x.dtype) for _ in range(n)
          for x in xs]
  return (lambda *a: [fn(*a[i * k:(i + 1) * k]) for i in range(n)]), args


def measure(blocks_, opts, reps=REPS, warmup=WARMUP, copies=COPIES, timer=timed,
            log=logging.info):
  """({block name: ms}, call ms). Each block is compiled as fused.Fused compiles (weights
  as constants, fused.compiler_options) `copies` times over in one computation on
  independent inputs; its entry is (median time - call ms) / copies, the empty call's
  median being call ms: per-call costs (dispatch, argument and result handling) that a
  whole-network call pays once, spread over the copies. Timed in `reps` rounds, each
  timing every computation once (the order rotating), so load hits all alike."""
  options = fused.compiler_options(opts)
  fns = [_call_fn(opts)] + [_copies(*block_fn(b, opts), copies, i) for i, b in enumerate(blocks_)]
  runs, t0 = [], time.perf_counter()
  for i, (fn, xs) in enumerate(fns):
    xs = [jnp.asarray(x) for x in xs]
    runs.append(functools.partial(jax.jit(fn).lower(*xs).compile(compiler_options=options), *xs))
    for _ in range(warmup):
      jax.block_until_ready(runs[-1]())
    if i % 250 == 0 and i:
      log(f"latency table: {i}/{len(fns) - 1} blocks compiled ({time.perf_counter() - t0:.0f}s)")
  times = [[] for _ in runs]
  for r in range(reps):
    shift = r * 7919 % len(runs)
    for i in list(range(shift, len(runs))) + list(range(shift)):
      times[i].append(timer(runs[i]))
  med = [1e3 * statistics.median(t) for t in times]
  return ({b.name: max(0.0, (m - med[0]) / copies) for b, m in zip(blocks_, med[1:])},
          med[0])


def random_network(plan, ratios=None, round_to=1, seed=0):
  """(params, stats) of `plan` with random weights (networks.random_init), pruned at stage
  `ratios` as compress prunes (networks.prune, L1) unless None."""
  from fp_jax.infer import networks   # pylint: disable=g-import-not-at-top (cycle-free import)
  params, stats = networks.random_init(plan, seed)
  if ratios is None:
    return params, stats
  return networks.prune(plan, params, stats, np.asarray(ratios, np.float32), "l1", round_to)


def measure_networks(nets, opts, reps=NET_REPS, timer=timed):
  """Median ms of each whole fused network [(plan, params, stats)] at batch 1: fused.Fused,
  the networks interleaved in blocks of 5 calls (latency.interleave's way)."""
  from fp_jax.infer import latency   # pylint: disable=g-import-not-at-top
  x = jnp.asarray(np.random.default_rng(0).standard_normal(
      (1,) + nets[0][0].image_hw + (nets[0][0].in_channels,)).astype(np.float32))
  runs = []
  opts = dataclasses.replace(opts, engine="xla")    # what the blocks are timed as
  for plan, params, stats in nets:
    f = fused.Fused(plan, params, stats, opts)
    jax.block_until_ready(f(x))
    runs.append(f)
  out = latency.interleave({i: (lambda f: lambda r: timer(lambda: f(x)))(f)
                            for i, f in enumerate(runs)}, reps, block=5)
  return [1e3 * statistics.median(out[i]) for i in range(len(runs))]


def measure_draws(items, opts, round_to=1, reps=NET_REPS):
  """Median ms of the whole fused networks [(plan, stage ratios or None)] (random weights,
  `random_network`), timed by measure_networks."""
  return measure_networks([(plan,) + tuple(random_network(plan, r, round_to, seed=i))
                           for i, (plan, r) in enumerate(items)], opts, reps)


@contextlib.contextmanager
def cores(threads):
  """This process on the first `threads` usable cores (latency.threads; 0: as it is) while
  measuring; every thread's affinity restored after."""
  if not threads:
    yield
    return
  from fp_jax.infer import runtimes   # pylint: disable=g-import-not-at-top (onnx imports)
  before = os.sched_getaffinity(0)
  runtimes.use_cores(threads)
  try:
    yield
  finally:
    for tid in os.listdir("/proc/self/task"):
      with contextlib.suppress(ProcessLookupError, PermissionError):
        os.sched_setaffinity(int(tid), before)


