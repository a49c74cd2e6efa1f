"""Supernet fake pruning: masks zero exactly the kept-fraction complement of every group."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp_jax import layers
from fp_jax import network
from fp_jax import pruning
from fp_jax import space
from fp_jax import supernet


@pytest.mark.parametrize("criterion", ["l1", "bn"])
def test_supernet_masks_zero_masked_channels_exactly(criterion):
  plan = supernet.make_plan(1, 8, (8, 8, 1), 10)
  params = supernet.init(jax.random.key(0), plan)
  if criterion == "bn":   # distinct BN scales so the ranking is not all ties
    params = jax.tree.map(lambda a: a, params)
    params["stem"]["bn"]["scale"] = jnp.linspace(0.5, 1.5, plan.stem_channels)
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
  ratios = jnp.array([0.5, 0.25, 0.75, 0.25, 0.5])
  rng = np.random.default_rng(0)
  arcs = [space.sample_uniform(rng), np.array([0, 4, 1, 2] * 5 + [1, 3, 0, 4] * 5)]
  for arc in arcs if criterion == "l1" else arcs[:1]:   # the second: pooling / identity only
    arc = jnp.asarray(arc)
    masks = jax.jit(pruning.supernet_masks, static_argnums=(0, 4))(plan, params, arc, ratios,
                                                                  criterion)
    masked = jax.jit(pruning.apply_supernet_masks, static_argnums=0)(plan, params, arc, masks)
    stem, _ = layers.relu_conv_bn(masked["stem"], None, x, True, relu=False)
    m = np.asarray(masks["stem"])
    assert m.sum() == round(0.5 * plan.stem_channels)
    assert np.all(np.asarray(stem)[..., m == 0] == 0) and np.any(np.asarray(stem)[..., m == 1])

    cells = collect(plan, masked, arc, x)
    assert len(cells) == len(plan.cells)
    for spec, (h0, h1, out) in zip(plan.cells, cells):
      m = np.asarray(masks["cells"][spec.index]["cell"])
      assert m.sum() == max(1, round((1 - float(ratios[spec.stage])) * spec.filters))
      for h in (h0, h1):
        assert np.all(np.asarray(h)[..., m == 0] == 0)
      segments = np.asarray(out).reshape(out.shape[:3] + (space.NUM_NODES, spec.filters))
      assert np.all(segments[..., m == 0] == 0)
      assert np.any(segments[..., m == 1])


@functools.partial(jax.jit, static_argnums=0)
def collect(plan, params, arc, x):
  """(calibrated h0, h1, output) of every cell of the supernet."""
  cells = []

  def cell_fn(i, spec, h0, h1):
    part = arc[space.CELL_LEN:] if spec.reduce else arc[:space.CELL_LEN]
    out = supernet.cell(params["cells"][i], part, h0, h1)
    cells.append((h0, h1, out))
    return out, None

  network.run(plan, cell_fn, params, None, x, True)
  return cells


def test_keep_mask_counts_and_ties():
  imp = jnp.array([3.0, 1.0, 2.0, 2.0, 0.5])
  np.testing.assert_array_equal(pruning.keep_mask(imp, 0.4), [1, 0, 1, 1, 0])
  np.testing.assert_array_equal(pruning.keep_mask(imp, 0.0), [1, 1, 1, 1, 1])
  assert float(pruning.keep_mask(imp, 0.99).sum()) == 1.0


def test_mask_transform_compiles_once_for_all_ratios():
  plan = supernet.make_plan(0, 4, (8, 8, 1), 10)
  params = supernet.init(jax.random.key(0), plan)
  traces = []

  @jax.jit
  def transform(params, arc, ratios):
    traces.append(1)
    masks = pruning.supernet_masks(plan, params, arc, ratios)
    return pruning.apply_supernet_masks(plan, params, arc, masks)

  rng = np.random.default_rng(0)
  kept = set()
  for _ in range(6):
    ratios = jnp.asarray(rng.choice([0.0, 0.3, 0.5, 0.8], 5), jnp.float32)
    out = transform(params, jnp.asarray(space.sample_uniform(rng)), ratios)
    kept.add(float(jnp.sum(out["calib"][0][0]["bn"]["scale"] != 0)))
  assert len(traces) == 1
  assert len(kept) > 1
