"""Tests for fp_jax.compaction: fixed-network masks, masking and compaction (CPU, tiny)."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

from fp_jax import child
from fp_jax import compaction
from fp_jax import flops
from fp_jax import layers
from fp_jax import pruning
from fp_jax import space

F, HW, CLASSES, BATCH = 4, 8, 10, 8
RATIO_CHOICES = np.round(np.arange(9) * 0.1, 1)
X = jax.random.normal(jax.random.PRNGKey(1), (BATCH, HW, HW, 3))


def _arc_with_ops(seed, ops):
  """A random arc whose every op is drawn from `ops`."""
  arc = space.sample_uniform(np.random.default_rng(seed))
  arc[1::2] = np.random.default_rng(seed + 100).choice(ops, space.ARC_LEN // 2)
  return space.validate_arc(arc)


def _ratios(seed):
  return np.random.default_rng(seed).choice(RATIO_CHOICES, 5).astype(np.float32)


# name -> (arc, num_layers, ratios)
CASES = {
    "uniform0": (space.sample_uniform(np.random.default_rng(0)), 3, _ratios(0)),
    "uniform1": (space.sample_uniform(np.random.default_rng(1)), 3, _ratios(1)),
    "uniform2_l1": (space.sample_uniform(np.random.default_rng(2)), 1, _ratios(2)),
    "enas_max_ratio": (space.parse_arc(space.ENAS_ARC), 3, np.full(5, 0.8, np.float32)),
    "pool_identity": (_arc_with_ops(3, [space.AVG, space.MAX, space.IDENTITY]), 3, _ratios(3)),
    "identity_only": (_arc_with_ops(4, [space.IDENTITY]), 2, _ratios(4)),
}
_CACHE = {}


@pytest.fixture(autouse=True, scope="module")
def _xla_depthwise():
  """Grouped-conv depthwise: eager mode compiles one op per shape instead of k*k slices."""
  old, layers.DEPTHWISE_IMPL = layers.DEPTHWISE_IMPL, "xla"
  yield
  layers.DEPTHWISE_IMPL = old


def _random_init(plan, arc, seed):
  """child.init's pytrees filled on the host (fast: no per-shape PRNG compiles):
  He-normal convs, random BN scales (0.3..1.5, so 'bn' has no ties) and biases."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: child.init(jax.random.PRNGKey(0), plan, arc))

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      a = rng.uniform(0.3, 1.5, leaf.shape)
    elif name.endswith("['bias']"):
      a = 0.2 * rng.standard_normal(leaf.shape)
    elif name.endswith(("['b']", "['mean']")):
      a = np.zeros(leaf.shape)
    elif name.endswith("['var']"):
      a = np.ones(leaf.shape)
    else:
      a = rng.standard_normal(leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
    return jnp.asarray(a, jnp.float32)

  return tuple(jax.tree_util.tree_map_with_path(fill, t) for t in shapes)


def _net(name):
  """(plan, arc, params, stats): BN stats from a few train-mode passes."""
  if name not in _CACHE:
    arc, num_layers, _ = CASES[name]
    plan = child.make_plan(arc, num_layers, F, (HW, HW, 3), CLASSES)
    params, stats = _random_init(plan, arc, len(_CACHE))
    for i in range(3):
      x = jax.random.normal(jax.random.PRNGKey(10 + i), X.shape) * (1.0 + 0.3 * i)
      _, _, stats = child.forward(plan, arc, params, stats, x, True)
    _CACHE[name] = (plan, arc, params, stats)
  return _CACHE[name]


def _pruned(name, criterion="l1"):
  key = (name, criterion)
  if key not in _CACHE:
    plan, arc, params, stats = _net(name)
    masks = jax.device_get(compaction.child_masks(plan, arc, params, CASES[name][2], criterion))
    masked = compaction.apply_child_masks(plan, arc, params, masks)
    _CACHE[key] = (masks, masked) + compaction.compact(plan, arc, params, stats, masks)
  return _CACHE[key]


def _max_diffs(plan, arc, pa, sa, pb, sb):
  """{mode: (max |a - b| over logits and aux logits, max |a|)} for eval and train mode."""
  out = {}
  for mode, train in (("eval", False), ("train", True)):
    la, aa, _ = child.forward(plan, arc, pa, sa, X, train)
    lb, ab, _ = child.forward(plan, arc, pb, sb, X, train)
    diff = max(float(jnp.max(jnp.abs(la - lb))), float(jnp.max(jnp.abs(aa - ab))))
    out[mode] = (diff, max(float(jnp.max(jnp.abs(la))), float(jnp.max(jnp.abs(aa)))))
  return out


def _check_close(diffs, label):
  for mode, (diff, scale) in diffs.items():
    print(f"{label} {mode}: max|masked - compact| = {diff:.3g} (max|logits| {scale:.3g})")
    assert diff <= 1e-5 * max(1.0, scale), (label, mode, diff, scale)


def _expected_keep(c, r):
  return max(1, int(np.round((np.float32(1) - np.float32(r)) * np.float32(c))))


@pytest.mark.parametrize("name", list(CASES))
def test_masked_logits_equal_compact(name):
  plan, arc, params, stats = _net(name)
  _, masked, _, cp, cs = _pruned(name)
  _check_close(_max_diffs(plan, arc, masked, stats, cp, cs), name)


def test_compact_with_shift_depthwise():
  """The CPU default depthwise implementation also runs compact widths."""
  plan, arc, params, stats = _net("uniform2_l1")
  _, masked, _, cp, cs = _pruned("uniform2_l1")
  old, layers.DEPTHWISE_IMPL = layers.DEPTHWISE_IMPL, "shift"
  try:
    _check_close(_max_diffs(plan, arc, masked, stats, cp, cs), "uniform2_l1/shift")
  finally:
    layers.DEPTHWISE_IMPL = old


@pytest.mark.parametrize("name", ["uniform0", "uniform2_l1", "pool_identity"])
def test_counts_match_flops(name):
  plan, arc, _, _ = _net(name)
  masks, _, widths, cp, cs = _pruned(name)
  assert widths == compaction.widths_of(masks)
  assert widths == flops.ratio_widths(plan, arc, CASES[name][2])
  expected = flops.count(plan, arc, widths)
  assert flops.param_count(cp) == expected["params"]
  old = layers.DEPTHWISE_IMPL
  layers.DEPTHWISE_IMPL = "xla"
  try:
    macs = flops.jaxpr_macs(
        lambda p, s, x: child.forward(plan, arc, p, s, x, False, with_aux=False)[0],
        cp, cs, X[:1])
  finally:
    layers.DEPTHWISE_IMPL = old
  assert macs == expected["macs"]
  assert expected["macs"] < flops.count(plan, arc)["macs"] or not np.any(CASES[name][2])


def _group_importances(plan, arc, params, criterion):
  """Independent recomputation: {'stem': [3F], 'cells': [(cell [F], {(k, s): inner [F]})]}."""
  if criterion == "l1":
    l1 = lambda w: np.abs(np.asarray(w)).reshape(-1, w.shape[-1]).sum(0)
    prod = lambda p: (l1(p["conv"]) if "conv" in p
                      else np.concatenate([l1(p["conv1"]), l1(p["conv2"])]))
    sep = lambda p: (l1(p["pw1"]), l1(p["pw2"]))
  else:
    prod = lambda p: np.abs(np.asarray(p["bn"]["scale"]))
    sep = lambda p: (np.abs(np.asarray(p["bn1"]["scale"])), np.abs(np.asarray(p["bn2"]["scale"])))
  out = {"stem": prod(params["stem"]), "cells": []}
  for spec in plan.cells:
    imp = prod(params["calib"][spec.index][0]) + prod(params["calib"][spec.index][1])
    inner = {}
    for k, s in compaction.sep_slots(arc, spec):
      imp_in, imp_out = sep(params["cells"][spec.index]["nodes"][k][s])
      imp, inner[(k, s)] = imp + imp_out, imp_in
    out["cells"].append((imp, inner))
  return out


def _check_top(mask, imp, ratio):
  mask = np.asarray(mask)
  assert set(np.unique(mask)) <= {0.0, 1.0}
  assert mask.sum() == _expected_keep(mask.size, ratio)
  if mask.sum() < mask.size:
    assert imp[mask == 1].min() >= imp[mask == 0].max() * (1 - 1e-6)


@pytest.mark.parametrize("name,criterion", [("uniform0", "l1"), ("uniform1", "bn"),
                                            ("enas_max_ratio", "l1"), ("pool_identity", "bn")])
def test_masks_keep_top_channels(name, criterion):
  plan, arc, params, _ = _net(name)
  ratios = CASES[name][2]
  masks = _pruned(name, criterion)[0]
  imps = _group_importances(plan, arc, params, criterion)
  assert masks["stem"].shape == (plan.stem_channels,)
  _check_top(masks["stem"], imps["stem"], ratios[0])
  for spec, m, (imp, inner) in zip(plan.cells, masks["cells"], imps["cells"]):
    r = ratios[spec.stage]
    assert m["cell"].shape == (spec.filters,)
    assert m["inner"].shape == (space.NUM_NODES, 2, spec.filters)
    _check_top(m["cell"], imp, r)
    for k in range(space.NUM_NODES):
      for s in range(2):
        if (k, s) in inner:
          _check_top(m["inner"][k, s], inner[(k, s)], r)
        else:
          assert np.all(m["inner"][k, s] == 1)


def test_bn_criterion_compacts_exactly():
  plan, arc, params, stats = _net("uniform1")
  masks_l1, masks_bn = _pruned("uniform1", "l1")[0], _pruned("uniform1", "bn")[0]
  assert any(not np.array_equal(a, b)
             for a, b in zip(jax.tree.leaves(masks_l1), jax.tree.leaves(masks_bn)))
  _, masked, widths, cp, cs = _pruned("uniform1", "bn")
  _check_close(_max_diffs(plan, arc, masked, stats, cp, cs), "uniform1/bn")
  assert flops.param_count(cp) == flops.count(plan, arc, widths)["params"]
  widths2, cp2, _ = compaction.prune(plan, arc, params, stats, CASES["uniform1"][2], "bn")
  assert widths2 == widths
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(cp2), jax.tree.leaves(cp)))


@pytest.mark.parametrize("name", ["uniform0", "pool_identity", "identity_only"])
def test_zero_ratios_keep_everything(name):
  plan, arc, params, stats = _net(name)
  masks = compaction.child_masks(plan, arc, params, jnp.zeros(5))
  assert all(np.all(np.asarray(m) == 1) for m in jax.tree.leaves(masks))
  masked = compaction.apply_child_masks(plan, arc, params, masks)
  widths, cp, cs = compaction.compact(plan, arc, params, stats, jax.device_get(masks))
  assert widths == flops.full_widths(plan)
  for tree in (masked, cp):
    assert jax.tree.structure(tree) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(params)))
  assert jax.tree.structure(cs) == jax.tree.structure(stats)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(cs), jax.tree.leaves(stats)))


def test_hand_masks_with_empty_factorized_half():
  """Arbitrary masks, incl. reduction cells keeping only one factorized-reduce half."""
  plan, arc, params, stats = _net("uniform0")
  rng = np.random.default_rng(5)

  def rand_mask(shape):
    m = (rng.random(shape) < 0.5).astype(np.float32)
    m.reshape(-1, shape[-1])[:, 0] = 1.0
    return m

  masks = {"stem": rand_mask((plan.stem_channels,)), "cells": []}
  for spec in plan.cells:
    cell = rand_mask((spec.filters,))
    if spec.reduce:   # first reduction: conv1 half only; second: conv2 half only
      h, cell[:] = spec.filters // 2, 0.0
      if spec.index == space.reduction_layers(3)[0]:
        cell[:h - 1] = 1.0
      else:
        cell[h + 1:] = 1.0
    masks["cells"].append({"cell": cell, "inner": rand_mask((space.NUM_NODES, 2, spec.filters))})
  masked = compaction.apply_child_masks(plan, arc, params, masks)
  widths, cp, cs = compaction.compact(plan, arc, params, stats, masks)
  assert any(p.get("conv1", np.ones(1)).shape[-1] == 0 for row in cp["calib"] for p in row)
  assert any(p.get("conv2", np.ones(1)).shape[-1] == 0 for row in cp["calib"] for p in row)
  _check_close(_max_diffs(plan, arc, masked, stats, cp, cs), "hand masks")
  assert flops.param_count(cp) == flops.count(plan, arc, widths)["params"]


def test_ratio_changes_do_not_recompile():
  plan, arc, params, _ = _net("uniform0")
  traces = []

  @jax.jit
  def mask_fn(p, ratios):
    traces.append(1)
    return compaction.apply_child_masks(plan, arc, p, compaction.child_masks(plan, arc, p, ratios))

  for seed in range(4):
    ratios = jnp.asarray(_ratios(10 + seed))
    out = mask_fn(params, ratios)
    if seed == 0:
      ref = compaction.apply_child_masks(
          plan, arc, params, compaction.child_masks(plan, arc, params, ratios))
      assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))
  assert len(traces) == 1


def test_bad_criterion():
  plan, arc, params, _ = _net("uniform0")
  with pytest.raises(ValueError, match="criterion"):
    compaction.child_masks(plan, arc, params, jnp.zeros(5), "l2")
