"""search.ratio_measure (layers | macs | latency), samples' macs / masked_macs and
latency_ms / masked_latency_ms, stages without cells."""
import jax
import numpy as np
import pytest

from fp_jax import config as config_lib
from fp_jax import data
from fp_jax.run import parallel
from fp_jax.pruning import groups as groups_lib
from fp_jax.pruning import masks as masks_lib
from fp_jax.models import space
from fp_jax.models import supernet
from fp_jax.models import supernet_flops
from fp_jax.infer import latency_table
from fp_jax.train import search
from tests.latency_table_test import fake_measure, fake_networks
from tests.search_test import RATIOS
from tests.tiny import tiny_config

IDENT = [0, space.IDENTITY, 1, space.IDENTITY] * space.NUM_NODES   # every node: h0 + h1


def test_supernet_macs_by_hand():
  # num_layers 0, F 4, 8x8x3, 10 classes: stem 3->12 at 8x8; cell 0 reduces to F 8 at 4x4
  # (h(i-1) = stem: factorized reduction 12 -> 8, calib_x a factorized reduction 12 -> 8);
  # cell 1 reduces to F 16 at 2x2 (8 -> 16 twice); classifier 16 x 10.
  plan = supernet.make_plan(0, 4, (8, 8, 3), 10)
  assert [(c.reduce, c.calib) for c in plan.cells] == [(True, ("fr", "none"))] * 2
  stem = 8 * 8 * 9 * 3 * 12
  cell0 = 16 * 12 * 8 + 16 * 12 * 8 + 16 * (5 * 8) * 8    # reduce, calib_x, final over 5 nodes
  cell1 = 4 * 8 * 16 + 4 * 8 * 16 + 4 * (5 * 16) * 16
  ident = np.asarray(IDENT + IDENT)
  assert supernet_flops.count(plan, ident) == stem + cell0 + cell1 + 16 * 10
  # node 0 slot 0: sep 5x5 of h0 in both cells (dw 25 c, pw c x c, twice); the final
  # conv's inputs stay the same
  sep = ident.copy()
  sep[1] = sep[21] = space.SEP5        # both cells are reduction cells: arc[20:]
  extra = 16 * (25 * 8 + 64 + 25 * 8 + 64) + 4 * (25 * 16 + 256 + 25 * 16 + 256)
  assert supernet_flops.count(plan, sep) == stem + cell0 + cell1 + 160 + extra
  # node 1 reads node 0 (k = 2): node 0 is no longer unused -> final conv over 4 nodes
  used = ident.copy()
  used[4] = used[24] = 2
  assert supernet_flops.count(plan, used) == (stem + cell0 + cell1 + 160 - 16 * 8 * 8
                                              - 4 * 16 * 16)
  # kept widths: the stem keeps 6 of 12 channels -> stem, both stem readers halve
  kept = supernet.full_kept(plan)._replace(stem=6)
  assert supernet_flops.count(plan, ident, kept) == (stem + cell0 + cell1 + 160) - (
      stem // 2 + 16 * 6 * 8 * 2)
  # several widths in one walk: one count each
  full = supernet.full_kept(plan)
  assert supernet_flops.count(plan, sep, supernet.stack_kept([full, kept])) == [
      supernet_flops.count(plan, sep), supernet_flops.count(plan, sep, kept)]


@pytest.fixture(scope="module")
def digits():
  return data.load("digits", 256)


@pytest.mark.parametrize("measure", supernet_flops.MEASURES)
def test_reward_rows_satisfy_the_formula_for_every_measure(digits, measure, tmp_path):
  config = tiny_config(ratio_measure=measure, num_layers=3, alpha=0.5, beta=20.0)
  config.search.latency_table_dir = str(tmp_path)
  mesh = parallel.make_mesh(jax.devices()[:1])
  srch = search.Search.build(config, digits, RATIOS, mesh)
  # the deployed network's latency table (measurements faked): every measure logs it
  srch.latency, _ = latency_table.for_search(
      config, digits.image_shape, digits.num_classes, RATIOS, str(tmp_path / "search"), False,
      measure_fn=fake_measure, networks_fn=fake_networks, draws=20)
  params = srch.init_state().supernet.params
  rng = np.random.default_rng(3)
  for i in range(4):
    arc = space.sample_uniform(rng)
    r = srch.evaluate_sample(params, arc, np.zeros(5, int), i)
    assert r["masked_macs"] == r["macs"] == supernet_flops.count(srch.plan, arc)
    assert r["masked_latency_ms"] == r["latency_ms"] > 0
    assert r["ratio"] == 0.0 and r["reward"] == r["train_acc"] == r["prune_acc"]
    r = srch.evaluate_sample(params, arc, rng.integers(1, 5, 5), i)
    assert r["masked_macs"] < r["macs"] and r["masked_latency_ms"] <= r["latency_ms"]
    assert (r["latency_ms"], r["masked_latency_ms"]) == srch.latency(arc, r["ratios"])
    assert r["reward"] == 0.5 * r["ratio"] * (1 + 20.0 * (r["prune_acc"] - r["train_acc"])) \
        + r["train_acc"]
    if measure == "layers":   # stages of cells N R N R N
      assert r["ratio"] == sum(r["ratios"][s] for s in (0, 1, 2, 3, 4))
    elif measure == "macs":
      assert r["ratio"] == 8 * (1 - r["masked_macs"] / r["macs"])
      assert 0 < r["ratio"] < 8
    else:
      assert r["ratio"] == 8 * (1 - r["masked_latency_ms"] / r["latency_ms"])
      assert 0 <= r["ratio"] < 8


def test_a_reward_row_walks_the_arc_once_for_its_multiply_adds(digits, monkeypatch):
  srch = search.Search.build(tiny_config(), digits, RATIOS,
                             parallel.make_mesh(jax.devices()[:1]))
  count, calls = supernet_flops.count, []
  monkeypatch.setattr(supernet_flops, "count", lambda *a: calls.append(a) or count(*a))
  arc = space.sample_uniform(np.random.default_rng(4))
  r = srch.evaluate_sample(srch.init_state().supernet.params, arc, np.full(5, 2), 0)
  assert len(calls) == 1
  assert set(r) == {"arc", "ratios", "train_acc", "prune_acc", "gap", "ratio", "reward", "macs",
                    "masked_macs"}
  assert r["macs"] == count(srch.plan, arc) and 0 < r["masked_macs"] < r["macs"]


def test_macs_ratio_does_not_grow_with_depth():
  """At a uniform ratio the layers measure grows with the cells; the macs measure is a
  scaled fraction of the network (depth-independent up to the stem and classifier)."""
  arc = space.parse_arc(space.ENAS_ARC)
  got = {}
  for depth in (3, 6):
    plan = supernet.make_plan(depth, 8, (8, 8, 1), 10)
    params = supernet.init(jax.random.key(0), plan)
    groups = groups_lib.supernet_groups(plan, arc)
    masks = jax.jit(lambda p, g: masks_lib.supernet_masks(plan, p, arc, np.full(5, 0.4, np.float32),
                                                        g))(params, groups)
    macs, masked = supernet_flops.count(plan, arc), supernet_flops.count(plan, arc, masks["kept"])
    got[depth] = (supernet_flops.ratio("layers", plan, [0.4] * 5),
                  supernet_flops.ratio("macs", plan, None, macs, masked))
  assert got[3][0] == pytest.approx(5 * 0.4) and got[6][0] == pytest.approx(8 * 0.4)
  assert abs(got[6][1] - got[3][1]) < 0.1 * got[3][1]
  assert 8 * 0.4 < got[6][1] < 8 * (1 - 0.6 ** 2)   # between r and 1 - (1 - r)^2 of 8


def test_stages_without_cells_have_ratio_zero(digits):
  # num_layers 0: two reduction cells (stages 1, 3); stages 0, 2 and 4 hold no cell
  srch = search.Search.build(tiny_config(), digits, RATIOS, parallel.make_mesh(jax.devices()[:1]))
  assert search.empty_stages(srch.plan) == [0, 2, 4]
  state = srch.init_state()
  rng = np.random.default_rng(0)
  rows = [srch.evaluate_sample(state.supernet.params, space.sample_uniform(rng),
                               np.array([4, 1, 4, 2, 4]), i) for i in range(3)]
  assert rows[0]["ratios"] == [0.0, float(np.float32(0.2)), 0.0, float(np.float32(0.4)), 0.0]
  arch = srch.choose(state, rows)
  assert arch["ratios"] == rows[0]["ratios"]
  assert 0 < arch["masked_macs"] < arch["macs"]
  # no samples: the controller's mode, with the same stages at 0
  arch = srch.choose(state, [])
  assert [arch["ratios"][s] for s in (0, 2, 4)] == [0.0, 0.0, 0.0]


def test_ratio_measure_is_validated():
  config = tiny_config(ratio_measure="flops", num_layers=3)
  with pytest.raises(config_lib.ConfigError, match="search.ratio_measure='flops': must be one "
                     "of layers, macs"):
    config_lib.validate(config)
