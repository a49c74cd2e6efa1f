"""Predicted fused batch-1 CPU latency from a table of measured per-block latencies.

`search.ratio_measure=latency` scores a sample by the latency of the network it deploys:
the final network (final.num_layers, final.out_filters, the data's image shape) of the
sample's arc, unpruned vs compacted at its stage ratios (compaction.ratio_widths with
compress.round_to: compress's widths), channel groups padded as the fused path pads them
(padding.padded_widths, latency.pad_channels). That is what deployment pays; the `macs`
measure counts the searched supernet instead.

A network is a list of network_blocks.Block's, one per graph node and the classifier
(widths rounded up to the padding multiple: the few groups the fused path cannot pad are
looked up at the next one). `measure` times each block alone as the fused executor runs it
(fused.apply_node / fused.classifier on random folded weights baked in as constants,
compiled as fused.Fused compiles), COPIES independent copies in one computation, less an
empty call: its raw ms. Isolated blocks miss what XLA does across blocks in a whole
network (adds, ReLUs and concats fused into neighbours, per-op costs amortised), so
`calibrate` times whole fused networks of CALIBRATION random arcs (unpruned and pruned)
and `fit`s, by non-negative least squares on relative error, an intercept, one factor per
group of kinds (GROUPS) and a per-block ms. A table's entry is max(0, factor x raw ms -
per-block ms) (`entry_ms`), its call_ms the intercept, and

    predicted ms = call_ms + the sum of the network's blocks' entries     (Table.predict)

network_blocks.enumerate_blocks lists the blocks of DRAWS random (arc, ratios) draws; a key no draw
reached (<1% of blocks) is estimated from the nearest entry of its kind (Table.lookup),
never measured mid-run. Tables are cached as JSON in search.latency_table_dir, one file
per CPU model, jax version and executor options (`cache_path`): raw entries for any
network, and per network shape (network_blocks.fingerprint) its block list and calibration; raw entries
are only added, never re-measured, so a second run measures nothing. `for_search` writes
the run's table to DIR/search/latency_table.json, which a resume reads back (the numbers
of the unbroken run); process 0 measures and broadcasts it, so every process computes the
same rewards.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import time

from absl import logging
import jax
import numpy as np

from fp_jax.infer import block_latency
from fp_jax.infer import fused
from fp_jax.infer import machine
from fp_jax.infer import network_blocks
from fp_jax.models import space
from fp_jax.run import errors

FORMAT = 1
CALIBRATION = 12      # random arcs whose whole networks (unpruned, pruned) fit the factors
GROUP_OF = {"sep": "sep", "conv": "conv", "fr": "conv", "classifier": "conv", "avg": "pool",
            "max": "pool", "add": "add", "concat": "add"}
GROUPS = ("sep", "conv", "pool", "add")   # block kinds sharing one in-network factor
RUN_COPY = "latency_table.json"   # in DIR/search/

# ---------------------------------------------------------------- calibration


def calibration_draws(ratio_choices, n=CALIBRATION, seed=1):
  """[(arc, ratios or None)]: n random arcs, each unpruned and at random stage ratios."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    arc = space.sample_uniform(rng)
    out += [(arc, None), (arc, rng.choice(np.asarray(ratio_choices, np.float32), 5))]
  return out


def fit(networks, measured):
  """{'intercept_ms', 'factors' {group: f}, 'per_block_ms' o}, non-negative (scipy nnls),
  minimising the relative error of intercept + sum over blocks of (f[group] x raw - o),
  o only for blocks outside the 'add' group. networks: [[(block name, raw ms)]]."""
  from scipy.optimize import nnls   # pylint: disable=g-import-not-at-top
  y = np.asarray(measured, np.float64)
  rows = []
  for net in networks:
    sums = {g: 0.0 for g in GROUPS}
    for name, ms in net:
      sums[GROUP_OF[network_blocks.parse_name(name).kind]] += ms
    rows.append([1.0] + [sums[g] for g in GROUPS] + [-_charged(net)])
  coef, _ = nnls(np.asarray(rows) / y[:, None], np.ones(len(y)))
  return {"intercept_ms": float(coef[0]), "factors": dict(zip(GROUPS, map(float, coef[1:-1]))),
          "per_block_ms": float(coef[-1])}


def _charged(net):
  return sum(GROUP_OF[network_blocks.parse_name(n).kind] != "add" for n, _ in net)


def entry_ms(cal, name, raw_ms):
  """A table entry: max(0, factor x raw - per-block ms), the latter not for adds and concats
  (XLA fuses them into their neighbours)."""
  g = GROUP_OF[network_blocks.parse_name(name).kind]
  return max(0.0, cal["factors"][g] * raw_ms - (cal["per_block_ms"] if g != "add" else 0.0))


def calibrate(shape, draws, raw, opts, round_to=1, networks_fn=None):
  """`fit` of the whole fused networks of `draws` (networks_fn([(plan, ratios)]) -> [ms];
  default block_latency.measure_draws) to the raw entries of their blocks, with each
  network's measured and fitted ms."""
  items = [(shape.plan(arc), ratios) for arc, ratios in draws]
  nets = [[(b.name, raw[b.name])
           for b in network_blocks.network_of(plan, r, opts.pad_channels, round_to)]
          for plan, r in items]
  ms = (networks_fn or functools.partial(block_latency.measure_draws, opts=opts,
                                         round_to=round_to))(items)
  cal = fit(nets, ms)
  cal["networks"] = [{"arc": space.arc_to_string(a), "ratios": None if r is None else
                      [float(v) for v in r], "measured_ms": float(m),
                      "fitted_ms": cal["intercept_ms"] + sum(entry_ms(cal, n, v) for n, v in net),
                      "raw_sum_ms": sum(v for _, v in net)}
                     for (a, r), m, net in zip(draws, ms, nets)]
  return cal


# ---------------------------------------------------------------- the table


def options_key(opts, threads):
  return (f"{opts.dtype} im2col{int(opts.im2col)} pad{opts.pad_channels} dots-{opts.dots} "
          f"dw-{fused.depthwise_impl(opts.depthwise, dtype=opts.dtype, platform='cpu')} "
          f"threads{threads}")


def cache_path(cache_dir, opts, threads):
  """cache_dir/<CPU model>__jax-<version>__<options>.json."""
  slug = lambda s: re.sub(r"[^A-Za-z0-9.]+", "-", s).strip("-")
  return os.path.join(os.path.expanduser(cache_dir),
                      f"{slug(machine.cpu_info()['model'])}__jax-{jax.__version__}__"
                      f"{slug(options_key(opts, threads))}.json")



def _save_json(d, path):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(d, f, indent=0, sort_keys=True)
  os.replace(tmp, path)


@dataclasses.dataclass
class Table:
  """One network shape's table: entries (block name -> in-network ms, `entry_ms`) and
  call_ms (the calibration's intercept). Predictions are call_ms + the blocks' entries."""
  entries: dict
  call_ms: float
  meta: dict            # cpu, jax, options, network, raw_ms, calibration, builds

  def lookup(self, block):
    """entries[block.name], else an estimate: the nearest entry of the same kind (kernel,
    stride, ReLU and input size first) scaled by Block.cost."""
    ms = self.entries.get(block.name)
    if ms is not None:
      return ms
    if getattr(self, "_parsed", None) is None:
      self._parsed = [network_blocks.parse_name(n) for n in sorted(self.entries)]
    best, score = None, None
    for other in self._parsed:
      if other.kind == block.kind:
        s = ((other.k, other.stride, other.relu, other.hw) !=
             (block.k, block.stride, block.relu, block.hw),
             abs(math.log(max(other.cost(), 1) / max(block.cost(), 1))), other.name)
        if score is None or s < score:
          best, score = other, s
    return 0.0 if best is None else (self.entries[best.name] * max(block.cost(), 1)
                                     / max(best.cost(), 1))

  def missing(self, blocks_):
    return sorted({b.name for b in blocks_ if b.name not in self.entries})

  def predict(self, blocks_):
    """Predicted ms: call_ms + the sum of the blocks' entries."""
    return self.call_ms + sum(self.lookup(b) for b in blocks_)

  def to_json(self):
    return {"format": FORMAT, **self.meta, "call_ms": self.call_ms, "entries": self.entries}

  @classmethod
  def from_json(cls, d):
    if d.get("format") != FORMAT:
      raise ValueError(f"latency table format {d.get('format')!r}, expected {FORMAT}")
    meta = {k: v for k, v in d.items() if k not in ("format", "call_ms", "entries")}
    return cls(dict(d["entries"]), float(d["call_ms"]), meta)

  def save(self, path):
    _save_json(self.to_json(), path)

  @classmethod
  def load(cls, path):
    with open(path) as f:
      return cls.from_json(json.load(f))


class Predictor:
  """Latency of a sample's deployed network: `(arc, ratios) -> (latency_ms, masked_ms)`."""

  def __init__(self, table, shape, pad=8, round_to=1, path=None):
    self.table, self.shape, self.pad, self.round_to, self.path = table, shape, pad, round_to, path
    self._unpruned = functools.lru_cache(maxsize=4096)(
        lambda arc: float(table.predict(self.blocks(arc))))

  def blocks(self, arc, ratios=None):
    plan = self.shape.plan(arc)
    return network_blocks.network_of(plan, ratios, self.pad, self.round_to)

  def __call__(self, arc, ratios):
    return (self._unpruned(tuple(int(a) for a in np.asarray(arc))),
            float(self.table.predict(self.blocks(arc, ratios))))


def build(cache_dir, shape, ratio_choices, opts, threads=0, round_to=1, draws=None,
          measure_fn=None, networks_fn=None, log=logging.info):
  """(Table for `shape`, seconds spent, cache file). The cache (cache_path) holds raw
  entries for any network shape and, per `fingerprint`, the enumerated block names and
  the calibration; what is missing is measured (measure_fn(blocks) -> ({name: ms}, call
  ms), default `measure`; networks_fn: `calibrate`'s) and the
  cache rewritten."""
  t0, draws = time.perf_counter(), network_blocks.DRAWS if draws is None else draws
  path = cache_path(cache_dir, opts, threads)
  key = {"cpu": machine.cpu_info()["model"], "jax": jax.__version__,
         "options": options_key(opts, threads)}
  cache = dict(key, format=FORMAT, raw_ms={}, call_ms=None, builds=[], networks={})
  if os.path.exists(path):
    try:
      with open(path) as f:
        old = json.load(f)
      if old.get("format") == FORMAT:
        cache = old
    except (OSError, ValueError) as e:
      log(f"latency table: cannot read {path} ({e}); measuring afresh")
  fp = network_blocks.fingerprint(shape, ratio_choices, opts.pad_channels, round_to, draws)
  net = cache["networks"].get(fp)
  if net is not None and not _complete(net, cache["raw_ms"]):
    log(f"latency table: the cached entry for {fp} in {path} is incomplete (written by "
        "another fp_jax version?); measuring afresh")
    net = None
  if net is None:
    t = time.perf_counter()
    load = os.getloadavg()[0]
    cal = calibration_draws(ratio_choices)
    names = {b.name for b in network_blocks.enumerate_blocks(
        shape, ratio_choices, opts.pad_channels, round_to, draws)}
    for arc, ratios in cal:
      names.update(b.name for b in network_blocks.network_of(
          shape.plan(arc), ratios, opts.pad_channels, round_to))
    todo = [network_blocks.parse_name(n) for n in sorted(names) if n not in cache["raw_ms"]]
    log(f"latency table: measuring {len(todo)} blocks and {len(cal)} whole networks on "
        f"{key['cpu']} ({path})")
    with block_latency.cores(threads):
      raw, call = (measure_fn or functools.partial(block_latency.measure, opts=opts, log=log))(todo)
      cache["raw_ms"].update({n: float(v) for n, v in raw.items()})
      if cache["call_ms"] is None:
        cache["call_ms"] = float(call)
      net = {"blocks": sorted(names), "calibration": calibrate(
          shape, cal, cache["raw_ms"], opts, round_to, networks_fn)}
    cache["networks"][fp] = net
    cache["builds"].append({"network": fp, "measured": len(todo), "networks": len(cal),
                            "seconds": time.perf_counter() - t, "load_before": load,
                            "load_after": os.getloadavg()[0], "reps": block_latency.REPS,
                            "date": time.strftime("%Y-%m-%d %H:%M:%S")})
    _save_json(cache, path)
  cal = net["calibration"]
  entries = {n: entry_ms(cal, n, cache["raw_ms"][n]) for n in net["blocks"]}
  meta = dict(key, network=fp, call_ms_raw=cache["call_ms"], calibration=cal,
              raw_ms={n: cache["raw_ms"][n] for n in net["blocks"]},
              builds=[b for b in cache["builds"] if b.get("network") == fp])
  return Table(entries, cal["intercept_ms"], meta), time.perf_counter() - t0, path


def _complete(net, raw_ms):
  """Whether a cached network entry has what `build` reads: every block's raw time and a
  calibration with every field `entry_ms` and the intercept use."""
  cal = net.get("calibration")
  return (isinstance(cal, dict) and {"intercept_ms", "factors", "per_block_ms"} <= set(cal)
          and set(GROUPS) <= set(cal["factors"]) and isinstance(net.get("blocks"), list)
          and all(n in raw_ms for n in net["blocks"]))


def _broadcast(table):
  """Process 0's table on every process (JSON bytes through broadcast_one_to_all)."""
  if jax.process_count() == 1:
    return table
  from jax.experimental import multihost_utils   # pylint: disable=g-import-not-at-top
  data = (np.frombuffer(json.dumps(table.to_json()).encode(), np.uint8)
          if jax.process_index() == 0 else np.zeros(0, np.uint8))
  n = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
  buf = np.zeros(n, np.uint8)
  buf[:len(data)] = data
  buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  return Table.from_json(json.loads(buf.tobytes().decode()))


def search_options(config):
  """fused.Options of the latency stage (latency.*, config.dtype), 'auto' resolved for CPU;
  engine 'xla': the table's blocks are XLA computations, so it predicts that engine."""
  from fp_jax.infer import placement   # pylint: disable=g-import-not-at-top
  lat = config.latency
  return placement.for_platform(fused.Options(im2col=bool(lat.im2col),
                                              pad_channels=int(lat.pad_channels),
                                              dots=lat.dots, dtype=config.dtype, engine="xla"),
                                "cpu")


def for_search(config, image_shape, num_classes, ratio_choices, out_dir, resume, **fns):
  """(Predictor, info for arch.json) of a search run, or (None, None) when
  search.latency_table_dir is empty. A fresh start builds the table (`build`, its cache in
  search.latency_table_dir; fns: build's measure_fn / networks_fn) and writes it to
  out_dir/latency_table.json; a resume (a checkpoint exists) reads that copy back."""
  from fp_jax.infer import placement   # pylint: disable=g-import-not-at-top
  s = config.search
  if not s.latency_table_dir:
    return None, None
  shape = network_blocks.Shape(config.final.num_layers, config.final.out_filters,
                               tuple(image_shape), int(num_classes))
  opts = search_options(config)
  copy = os.path.join(out_dir, RUN_COPY)
  t0, source, table = time.perf_counter(), copy, None
  if jax.process_index() == 0:
    if resume and os.path.exists(copy):
      try:
        table = Table.load(copy)
      except (OSError, ValueError, KeyError) as e:
        raise errors.RunError(f"search: cannot read the run's latency table {copy} ({e}); "
                              "rerun with --config.overwrite=True to start afresh") from None
    else:
      with jax.default_device(placement.cpu_device()):
        table, _, source = build(s.latency_table_dir, shape, ratio_choices, opts,
                                 int(config.latency.threads), int(config.compress.round_to),
                                 **fns)
      table.save(copy)
  table = _broadcast(table)
  builds = table.meta.get("builds", [])
  info = {"path": copy, "source": source, "entries": len(table.entries),
          "seconds": time.perf_counter() - t0,
          "build_seconds": sum(b["seconds"] for b in builds), "built": [
              {k: b[k] for k in ("date", "seconds", "measured", "networks")} for b in builds],
          "cpu": table.meta.get("cpu"), "jax": table.meta.get("jax"),
          "options": table.meta.get("options"), "network": table.meta.get("network")}
  logging.info("search: latency table %s (%d entries, from %s; %.1fs here, %.1fs measuring "
               "when it was built): latency_ms of the deployed network %s", copy,
               len(table.entries), source, info["seconds"], info["build_seconds"],
               table.meta.get("network"))
  return Predictor(table, shape, opts.pad_channels, int(config.compress.round_to), copy), info
