"""BN re-estimation (fp_jax/pruning/bn_reestimate.py): exact averages against hand computations,
masked channels, and the data-parallel (2 forced CPU devices) synchronisation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp_jax.pruning import bn_reestimate
from fp_jax.models import child
from fp_jax.pruning import compaction
from fp_jax.models import layers
from fp_jax.run import parallel
from fp_jax.models import space
from fp_jax.train import compress
from fp_jax.pruning import masks as masks_lib

ARC = space.parse_arc(space.ENAS_ARC)


@pytest.fixture(autouse=True, scope="module")
def _xla_depthwise():
  old, layers.DEPTHWISE_IMPL = layers.DEPTHWISE_IMPL, "xla"   # faster to compile, same values
  yield
  layers.DEPTHWISE_IMPL = old


def _toy_update(m):
  """A BN-like EMA update with momentum m over features x [B, C] (synchronised), plus a
  node the pass leaves alone."""
  def update(params, stats, x):
    mean, mean_sq = jax.lax.pmean((jnp.mean(x, 0), jnp.mean(jnp.square(x), 0)), parallel.AXIS)
    var = mean_sq - jnp.square(mean)
    a = stats["a"]
    return {"a": {"mean": m * a["mean"] + (1 - m) * mean, "var": m * a["var"] + (1 - m) * var},
            "untouched": stats["untouched"]}
  return update


@pytest.mark.parametrize("m", [0.9, 0.5])
def test_exact_average_of_a_toy_update(m):
  """Any momentum: the result is the pooled mean and biased variance of all rows."""
  rng = np.random.default_rng(0)
  batches = [rng.normal(3.0, 2.0, (8, 4)).astype(np.float32) * (1 + k) for k in range(3)]
  stats = {"a": {"mean": jnp.full(4, 7.0), "var": jnp.full(4, 5.0)},
           "untouched": {"mean": jnp.arange(3.0), "var": jnp.ones(3) * 2}}
  out = bn_reestimate.reestimate(_toy_update(m), {}, stats, batches)
  rows = np.concatenate(batches).astype(np.float64)
  np.testing.assert_allclose(out["a"]["mean"], rows.mean(0), rtol=1e-5)
  np.testing.assert_allclose(out["a"]["var"], rows.var(0), rtol=1e-5)
  per_batch_var = np.mean([b.astype(np.float64).var(0) for b in batches], 0)
  assert np.all(out["a"]["var"] > per_batch_var * 1.05)     # pooled, not averaged variances
  np.testing.assert_array_equal(out["untouched"]["mean"], [0.0, 1.0, 2.0])
  np.testing.assert_array_equal(out["untouched"]["var"], [2.0, 2.0, 2.0])


def test_refuses_an_eval_mode_pass_and_no_batches():
  stats = {"a": {"mean": jnp.zeros(4), "var": jnp.ones(4)}}
  with pytest.raises(ValueError, match="changed no BN statistics"):
    bn_reestimate.reestimate(lambda p, s, x: s, {}, stats, [np.ones((2, 4), np.float32)])
  with pytest.raises(ValueError, match="no batches"):
    bn_reestimate.reestimate(_toy_update(0.9), {}, stats, [])


def _masked_net():
  plan = child.make_plan(ARC, 1, 6, (8, 8, 1), 10)
  params, stats = child.init(jax.random.key(4), plan)
  masks = jax.device_get(masks_lib.child_masks(plan, params, np.float32([0.5] * 5)))
  return plan, masks_lib.apply_child_masks(plan, params, masks), stats, masks


def _bn_eval(x, p_bn, mean, var):
  return (x - mean) / np.sqrt(var + layers.BN_EPS) * p_bn["scale"] + p_bn["bias"]


def test_masked_network_statistics_equal_a_hand_computation():
  """Stem BN and the first cell's calibration BN of a masked network, 3 batches of 16 over
  2 devices: the pooled mean / variance of their pre-BN activations, computed here with
  numpy in float64 (the calibration's input normalised with each global batch's own
  statistics, as in training); masked channels are exactly zero."""
  assert jax.device_count() == 2
  plan, masked, stats, masks = _masked_net()
  rng = np.random.default_rng(1)
  batches = [rng.normal(0.0, 1.0, (16, 8, 8, 1)).astype(np.float32) for _ in range(3)]
  out = bn_reestimate.reestimate(compress.train_mode_stats(plan), masked, stats, batches)
  p = jax.device_get(masked)
  blocks, new = p["blocks"], out["blocks"]
  w_stem = blocks["stem"]["conv"]
  pre_stem = [np.asarray(jax.lax.conv_general_dilated(
      b, w_stem, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")), np.float64)
              for b in batches]
  stem_all = np.concatenate(pre_stem)
  got = new["stem"]["bn"]
  np.testing.assert_allclose(got["mean"], stem_all.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["var"], stem_all.var((0, 1, 2)), rtol=1e-5, atol=1e-6)
  pruned = np.asarray(masks_lib.value_mask(plan, masks, plan.stem)) == 0
  assert pruned.any() and not pruned.all()
  assert np.all(np.asarray(got["mean"])[pruned] == 0) and np.all(np.asarray(got["var"])[pruned] == 0)

  # cell 0 is a reduction cell; ENAS calibrates h(i-2) (the stem, 3F != 2F channels) with
  # ReLU-1x1-BN at the input resolution
  cal = blocks["cells/0/calib_x"]
  w1 = np.asarray(cal["conv"], np.float64)[0, 0]
  pre_cal = []
  for a in pre_stem:                # train mode: each global batch normalised by itself
    r = np.maximum(_bn_eval(a, blocks["stem"]["bn"], a.mean((0, 1, 2)), a.var((0, 1, 2))), 0.0)
    pre_cal.append(r @ w1)
  cal_all = np.concatenate(pre_cal)
  got = new["cells/0/calib_x"]["bn"]
  np.testing.assert_allclose(got["mean"], cal_all.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(got["var"], cal_all.var((0, 1, 2)), rtol=1e-4, atol=1e-6)
  # untouched by the pass (no aux head): the old statistics
  for a, b in zip(jax.tree.leaves(out["aux"]), jax.tree.leaves(stats["aux"])):
    np.testing.assert_array_equal(a, b)

  # eval mode with the new statistics: masked channels output exactly zero ...
  x = jnp.asarray(batches[0])
  y_stem, _ = layers.relu_conv_bn(masked["blocks"]["stem"], new["stem"], x, False, relu=False)
  assert np.all(np.asarray(y_stem)[..., pruned] == 0.0)
  assert np.all(np.abs(np.asarray(y_stem)[..., ~pruned]).max((0, 1, 2)) > 0)
  calib = [j for j, n in enumerate(plan.nodes) if n.name == "cells/0/calib_x"][0]
  cell_pruned = np.asarray(masks_lib.value_mask(plan, masks, calib)) == 0
  y_cal, _ = layers.relu_conv_bn(masked["blocks"]["cells/0/calib_x"], new["cells/0/calib_x"],
                                 y_stem, False)
  assert cell_pruned.any() and np.all(np.asarray(y_cal)[..., cell_pruned] == 0.0)
  # ... so removing them changes no logit
  _, cp, cs = compaction.compact(plan, p, jax.device_get(out), masks)
  assert compress.max_abs_diff(plan, masked, out, cp, cs, x) < 1e-5


def test_one_device_equals_two():
  plan, masked, stats, _ = _masked_net()
  rng = np.random.default_rng(2)
  batches = [rng.normal(0.0, 1.0, (8, 8, 8, 1)).astype(np.float32) for _ in range(2)]
  update = compress.train_mode_stats(plan)
  two = bn_reestimate.reestimate(update, masked, stats, batches)
  one = bn_reestimate.reestimate(update, masked, stats, batches,
                                 parallel.make_mesh(jax.devices()[:1]))
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
