"""fp_jax/infer/latency_table.py (with network_blocks.py and block_latency.py): blocks of a
network, the table's prediction, enumeration, the cache (by CPU model and jax version), the run's copy on resume, config validation.
Measurements are faked (fake_measure / fake_networks) except in one small real check."""
import collections
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from configs import smoke
from fp_jax import config as config_lib
from fp_jax.infer import block_latency as bl
from fp_jax.infer import fused
from fp_jax.infer import latency_table as lt
from fp_jax.infer import network_blocks
from fp_jax.infer.network_blocks import Block
from fp_jax.infer import machine
from fp_jax.models import graph
from fp_jax.models import space
from fp_jax.run import errors

IDENT = np.array([0, space.IDENTITY, 1, space.IDENTITY] * space.NUM_NODES * 2)  # h0 + h1
CHOICES = (0.0, 0.2, 0.4, 0.6, 0.8)
SHAPE = network_blocks.Shape(0, 8, (8, 8, 1), 10)        # two reduction cells (stages 1 and 3)


def fake_measure(blocks):
  """({name: ms}, call ms): distinct values from the blocks' work counts."""
  return {b.name: 1e-3 + 1e-7 * b.cost() for b in blocks}, 0.02


def fake_networks(items):
  """Whole-network ms consistent with the raw entries: 0.05 + 0.5 x their sum."""
  raw = fake_measure(sorted({b for plan, r in items for b in blocks_of(plan, r)}))[0]
  return [0.05 + 0.5 * sum(raw[b.name] for b in blocks_of(plan, r)) for plan, r in items]


def blocks_of(plan, ratios=None):
  return network_blocks.network_of(plan, ratios, 8)


def test_blocks_of_a_hand_built_network_and_the_prediction_is_the_sum_of_entries():
  # every node h0 + h1 by identities; num_layers 0: cell 0 reduces 8x8 -> 4x4 at F 16,
  # cell 1 4x4 -> 2x2 at F 32. Stem 3x3 1 -> 24; cell 0: both inputs calibrated 24 -> 16
  # (1x1), base 16 -> 16, every identity at stride 2 a factorized reduction, 5 adds, the
  # concat of the 5 nodes (80); cell 1: calib_x a factorized reduction of the stem
  # (24 -> 32), calib_y 80 -> 32, base, 10 factorized reductions, 5 adds, concat 160.
  plan = SHAPE.plan(IDENT)
  got = collections.Counter(b.name for b in blocks_of(plan))
  assert got == {
      "conv k3 s1 8x8 1>24": 1, "conv k1 s1 relu 8x8 24>16": 2, "conv k1 s1 relu 8x8 16>16": 1,
      "fr k1 s2 8x8 16>16": 10, "add k1 s1 4x4 16>16": 5, "concat k1 s1 4x4 80/5>80": 1,
      "fr k1 s2 relu 8x8 24>32": 1, "conv k1 s1 relu 4x4 80>32": 1,
      "conv k1 s1 relu 4x4 32>32": 1, "fr k1 s2 4x4 32>32": 10, "add k1 s1 2x2 32>32": 5,
      "concat k1 s1 2x2 160/5>160": 1, "classifier k1 s1 relu 2x2 160>10": 1}
  # pruned at 0.5 in stage 1 only: cell 0's groups keep 8 of 16; the stem (stage 0) all
  pruned = collections.Counter(b.name for b in blocks_of(plan, [0, 0.5, 0, 0, 0]))
  assert pruned["concat k1 s1 4x4 40/5>40"] == 1 and pruned["conv k1 s1 relu 8x8 24>8"] == 2
  assert all(network_blocks.parse_name(n).name == n for n in got)
  entries = {n: float(2 ** i) for i, n in enumerate(sorted(got))}   # exact binary sums
  table = lt.Table(entries, 0.125, {})
  want = 0.125 + sum(entries[n] * c for n, c in got.items())
  assert table.predict(blocks_of(plan)) == want
  pred = lt.Predictor(table, SHAPE, 8)
  assert pred(IDENT, np.zeros(5, np.float32)) == (want, want)


def test_built_entries_are_the_calibrated_raw_measurements(tmp_path):
  opts = fused.Options()
  table, _, path = lt.build(str(tmp_path), SHAPE, CHOICES, opts, draws=20,
                            measure_fn=fake_measure, networks_fn=fake_networks)
  cal = table.meta["calibration"]
  # the fake networks are 0.05 + 0.5 x their raw sum: the fit finds it
  assert cal["intercept_ms"] == pytest.approx(0.05, abs=1e-9)
  assert all(f == pytest.approx(0.5) for f in cal["factors"].values())
  assert cal["per_block_ms"] == pytest.approx(0.0, abs=1e-9)
  assert table.call_ms == cal["intercept_ms"] and table.meta["call_ms_raw"] == 0.02
  for n, ms in table.entries.items():
    assert ms == lt.entry_ms(cal, n, table.meta["raw_ms"][n])
  # an entry: factor x raw less the per-block ms (not for adds and concats), at least 0
  c = {"factors": {"sep": 0.5, "conv": 1.0, "pool": 1.0, "add": 0.25}, "per_block_ms": 0.01}
  assert lt.entry_ms(c, "sep k3 s1 relu 8x8 8>8>8", 0.1) == 0.5 * 0.1 - 0.01
  assert lt.entry_ms(c, "add k1 s1 4x4 16>16", 0.1) == 0.25 * 0.1
  assert lt.entry_ms(c, "max k3 s1 4x4 16>16", 0.005) == 0.0
  plan = SHAPE.plan(IDENT)
  bl = blocks_of(plan, [0.2] * 5)
  assert not table.missing(bl)
  assert table.predict(bl) == table.call_ms + sum(table.entries[b.name] for b in bl)
  on_disk = json.load(open(path))
  assert set(table.entries) <= set(on_disk["raw_ms"])


def test_the_fit_recovers_factors_per_block_ms_and_intercept():
  rng = np.random.default_rng(0)
  kinds = ["sep k3 s1 relu 8x8 8>8>8", "conv k1 s1 relu 8x8 8>8", "max k3 s1 8x8 8>8",
           "add k1 s1 8x8 8>8"]
  want = {"intercept_ms": 0.2, "factors": {"sep": 0.7, "conv": 0.5, "pool": 0.3, "add": 0.1},
          "per_block_ms": 0.004}
  nets = [[(kinds[k], float(rng.uniform(0.02, 0.1))) for k in rng.integers(0, 4, 30)]
          for _ in range(12)]
  ms = [want["intercept_ms"] + sum(lt.entry_ms(want, n, v) for n, v in net) for net in nets]
  got = lt.fit(nets, ms)
  assert got["intercept_ms"] == pytest.approx(0.2) and got["per_block_ms"] == pytest.approx(0.004)
  assert got["factors"] == pytest.approx(want["factors"])


def test_enumeration_covers_random_pruned_networks_and_estimates_the_rest():
  names = {b.name for b in network_blocks.enumerate_blocks(SHAPE, CHOICES, draws=150)}
  rng = np.random.default_rng(7)
  table = lt.Table(fake_measure([network_blocks.parse_name(n) for n in names])[0], 0.0, {})
  total = missing = 0
  for _ in range(40):
    plan = SHAPE.plan(space.sample_uniform(rng))
    bl = blocks_of(plan, rng.choice(np.asarray(CHOICES, np.float32), 5)) + blocks_of(plan)
    total, missing = total + len(bl), missing + len(table.missing(bl))
    for b in bl:
      assert table.lookup(b) > 0     # in the table, or estimated from its kind
  assert missing <= 0.01 * total
  # an estimate scales the nearest entry of the same kind and input size by the work count
  b = Block("sep", (8, 8), 16, 16, 5, 2, True, 16)
  near = Block("sep", (8, 8), 8, 8, 5, 2, True, 8)
  t = lt.Table({near.name: 2.0}, 0.0, {})
  assert t.lookup(b) == pytest.approx(2.0 * b.cost() / near.cost())


def test_the_cache_is_keyed_by_cpu_model_and_jax_version(tmp_path, monkeypatch):
  calls = []
  measure = lambda blocks: calls.append(len(blocks)) or fake_measure(blocks)
  opts = fused.Options()
  build = lambda: lt.build(str(tmp_path), SHAPE, CHOICES, opts, draws=10, measure_fn=measure,
                           networks_fn=fake_networks)
  t1, _, p1 = build()
  assert calls and calls[-1] == len(t1.entries)
  t2, _, p2 = build()                   # same machine, same jax: read, nothing measured
  assert len(calls) == 1 and p2 == p1 and t2.entries == t1.entries
  assert t2.call_ms == t1.call_ms
  info = machine.cpu_info()
  monkeypatch.setattr(machine, "cpu_info", lambda: dict(info, model="Other CPU 9000"))
  _, _, p3 = build()
  assert len(calls) == 2 and p3 != p1 and "Other-CPU-9000" in os.path.basename(p3)
  monkeypatch.setattr(jax, "__version__", "9.9.9")
  t4, _, p4 = build()
  assert len(calls) == 3 and "jax-9.9.9" in os.path.basename(p4)
  assert len(set(os.listdir(tmp_path))) == 3
  # more draws for the same shape: one more enumeration, only new blocks measured
  lt.build(str(tmp_path), SHAPE, CHOICES, opts, draws=40, measure_fn=measure,
           networks_fn=fake_networks)
  assert len(calls) == 4 and calls[-1] < len(t1.entries) + 100
  open(p4, "w").write("{not json")      # a damaged cache file is measured afresh
  t5, _, _ = build()
  assert len(calls) == 5 and t5.entries == t4.entries
  # an entry another version wrote without a field build reads (here the calibration's
  # per-block term): measured afresh with a log line, not a KeyError
  with open(p4) as f:
    cache = json.load(f)
  (fp, net), = cache["networks"].items()
  del net["calibration"]["per_block_ms"]
  with open(p4, "w") as f:
    json.dump(cache, f)
  logs = []
  t6, _, _ = lt.build(str(tmp_path), SHAPE, CHOICES, opts, draws=10, measure_fn=measure,
                      networks_fn=fake_networks, log=logs.append)
  assert t6.entries == t4.entries and any("incomplete" in l and fp in l for l in logs)
  with open(p4) as f:
    assert "per_block_ms" in json.load(f)["networks"][fp]["calibration"]   # rewritten


def _config(tmp_path, measure="latency"):
  config = smoke.get_config()
  config.search.ratio_measure = measure
  config.search.latency_table_dir = str(tmp_path / "cache")
  config.final.num_layers = 1
  return config


def test_a_resumed_run_reads_its_own_copy(tmp_path, monkeypatch):
  monkeypatch.setattr(network_blocks, "DRAWS", 10)
  config, out = _config(tmp_path), str(tmp_path / "search")
  fns = dict(measure_fn=fake_measure, networks_fn=fake_networks)
  pred, info = lt.for_search(config, (8, 8, 1), 10, CHOICES, out, resume=False, **fns)
  copy = os.path.join(out, lt.RUN_COPY)
  assert info["path"] == copy and os.path.exists(copy) and info["entries"] > 0
  assert info["cpu"] == machine.cpu_info()["model"] and info["jax"] == jax.__version__
  before = pred(IDENT, np.full(5, 0.4, np.float32))
  d = json.load(open(copy))           # the copy is what a resume reads: change it
  d["call_ms"] += 1.0
  json.dump(d, open(copy, "w"))
  explode = lambda *a: pytest.fail("a resume must not measure")
  again, info = lt.for_search(config, (8, 8, 1), 10, CHOICES, out, resume=True,
                              measure_fn=explode, networks_fn=explode)
  assert info["source"] == copy
  assert again(IDENT, np.full(5, 0.4, np.float32)) == pytest.approx(
      (before[0] + 1.0, before[1] + 1.0))
  # a fresh start (no checkpoint) builds again from the cache and rewrites the copy
  fresh, _ = lt.for_search(config, (8, 8, 1), 10, CHOICES, out, resume=False,
                           measure_fn=explode, networks_fn=explode)
  assert fresh(IDENT, np.full(5, 0.4, np.float32)) == before
  open(copy, "w").write("{")           # a damaged copy: one clear error, nothing rebuilt
  with pytest.raises(errors.RunError, match="cannot read the run's latency table"):
    lt.for_search(config, (8, 8, 1), 10, CHOICES, out, resume=True, measure_fn=explode)
  config.search.latency_table_dir = ""
  assert lt.for_search(config, (8, 8, 1), 10, CHOICES, out, resume=False) == (None, None)


def test_latency_table_dir_is_validated(tmp_path):
  config = ml_collections.ConfigDict(_config(tmp_path, "macs").to_dict(), type_safe=False)
  config_lib.validate(config)
  config.search.latency_table_dir = 3
  with pytest.raises(config_lib.ConfigError, match="search.latency_table_dir=3: must be a "
                     "folder path"):
    config_lib.validate(config)
  (tmp_path / "file").write_text("x")
  config.search.latency_table_dir = str(tmp_path / "file")
  with pytest.raises(config_lib.ConfigError, match="must be a folder, not a file"):
    config_lib.validate(config)
  config.search.latency_table_dir = ""
  config_lib.validate(config)          # no table: fine for layers / macs
  config.search.ratio_measure = "latency"
  with pytest.raises(config_lib.ConfigError, match="ratio_measure=latency needs a latency "
                     "table"):
    config_lib.validate(config)


def test_one_block_measured_for_real():
  """The real timer on two tiny blocks: positive entries, an empty call below a block."""
  blocks = [Block("sep", (8, 8), 8, 8, 3, 1, True, 8), Block("add", (8, 8), 8, 8)]
  raw, call = bl.measure(blocks, fused.Options(), reps=3, warmup=1, copies=2)
  assert set(raw) == {b.name for b in blocks} and call > 0
  assert all(v >= 0 for v in raw.values())
  fn, xs = bl.block_fn(blocks[0], fused.Options())
  assert jax.jit(fn)(*xs).shape == (1, 8, 8, 8)
  fn, xs = bl.block_fn(Block("concat", (4, 4), 40, 40, inner=3), fused.Options())
  assert [x.shape[-1] for x in xs] == [14, 13, 13] and jax.jit(fn)(*xs).shape == (1, 4, 4, 40)
  fn, xs = bl.block_fn(Block("fr", (8, 8), 16, 24, stride=2, relu=True), fused.Options())
  assert jax.jit(fn)(*xs).shape == (1, 4, 4, 24)
  fn, xs = bl.block_fn(Block("classifier", (2, 2), 16, 10, relu=True), fused.Options())
  assert jax.jit(fn)(*xs).shape == (1, 10)
  assert isinstance(graph.ceil_hw((7, 7), 2), tuple)


def test_a_search_logs_latencies_and_a_resume_measures_nothing(tmp_path, monkeypatch):
  from fp_jax import data                        # pylint: disable=g-import-not-at-top
  from fp_jax.train import search                # pylint: disable=g-import-not-at-top
  from tests.tiny import tiny_config             # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(network_blocks, "DRAWS", 10)
  monkeypatch.setattr(bl, "measure", lambda blocks, **kw: fake_measure(blocks))
  monkeypatch.setattr(bl, "measure_draws", lambda items, **kw: fake_networks(items))
  digits = data.load("digits", 256)
  config = tiny_config(epochs=1, steps_per_epoch=2, ratio_measure="latency", alpha=0.5,
                       policy="random")     # no controller to compile
  config.search.latency_table_dir = str(tmp_path / "cache")
  arch = search.run(config, str(tmp_path), digits, CHOICES)
  rows = [json.loads(l) for l in open(tmp_path / "search" / "samples.jsonl")]
  assert rows
  for r in rows:
    assert r["ratio"] == 8 * (1 - r["masked_latency_ms"] / r["latency_ms"])
    assert r["reward"] == 0.5 * r["ratio"] * (1 + config.search.beta * r["gap"]) + r["train_acc"]
  info = json.load(open(tmp_path / "search" / "arch.json"))["latency_table"]
  assert info == json.loads(json.dumps(arch["latency_table"]))
  assert info["path"] == str(tmp_path / "search" / lt.RUN_COPY) and os.path.exists(info["path"])
  assert "latency_ms" in arch and "masked_latency_ms" in arch
  explode = lambda *a, **kw: pytest.fail("a resume must not measure")
  monkeypatch.setattr(bl, "measure", explode)
  monkeypatch.setattr(bl, "measure_draws", explode)
  config.search.epochs = 2                       # resumes after epoch 1's checkpoint
  search.run(config, str(tmp_path), digits, CHOICES)
  again = [json.loads(l) for l in open(tmp_path / "search" / "samples.jsonl")]
  assert again[:len(rows)] == rows and len(again) > len(rows)


def test_widths_are_those_compress_produces_padded_as_the_fused_path_pads():
  from fp_jax.infer import networks             # pylint: disable=g-import-not-at-top
  from fp_jax.infer import padding              # pylint: disable=g-import-not-at-top
  from fp_jax.models import flops               # pylint: disable=g-import-not-at-top
  plan = SHAPE.plan(IDENT)
  params, stats = networks.random_init(plan, 0)
  ratios = np.array([0.0, 0.6, 0.0, 0.2, 0.0], np.float32)
  for r, (p, s) in ((None, (params, stats)),
                    (ratios, networks.prune(plan, params, stats, ratios))):
    padded, _ = padding.pad_channels(plan, p, s, 8)
    assert network_blocks.network_widths(plan, r, 8) == flops.widths_of_params(plan, padded)
