"""Tests for fp_jax.pruning.compaction: fixed-network masks, masking and compaction (CPU, tiny)."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

from fp_jax.models import child
from fp_jax.pruning import compaction
from fp_jax.models import flops
from fp_jax.models import layers
from fp_jax.pruning import groups as groups_lib
from fp_jax.pruning import masks as masks_lib
from fp_jax.models import space
from tests import host_init

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


# At num_layers 6 (cells N N R N N R N N): a normal cell with two outputs (nodes 5, 6)
# gives the first reduction an h(i-2) of 2F = its F channels, and a reduction cell with
# one output (node 6) gives the cell after next an h(i-2) of F channels: ENAS skips
# both calibrations (which ties cells where h(i-2) passes through unchanged; see
# test_skipped_calibrations_tie_cells).
TWO_OUT_NORMAL = "0 0 1 1 2 4 0 2 3 3 1 0 4 4 1 3 4 0 2 1"
ONE_OUT_REDUCE = "0 0 1 1 2 3 0 4 3 1 1 2 4 0 3 0 5 1 2 4"


# name -> (arc, num_layers, ratios)
CASES = {
    "skip_calib": (space.parse_arc(TWO_OUT_NORMAL + " " + ONE_OUT_REDUCE), 6, _ratios(7)),
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


def _net(name):
  """(plan, arc, params, stats): BN stats from a few train-mode passes."""
  if name not in _CACHE:
    arc, num_layers, _ = CASES[name]
    plan = child.make_plan(arc, num_layers, F, (HW, HW, 3), CLASSES)
    params, stats = host_init.random_net(plan, len(_CACHE))
    for i in range(3):
      x = jax.random.normal(jax.random.PRNGKey(10 + i), X.shape) * (1.0 + 0.3 * i)
      _, _, stats = child.forward(plan, params, stats, x, True)
    _CACHE[name] = (plan, arc, params, stats)
  return _CACHE[name]


def _pruned(name, criterion="l1"):
  key = (name, criterion)
  if key not in _CACHE:
    plan, arc, params, stats = _net(name)
    masks = jax.device_get(masks_lib.child_masks(plan, params, CASES[name][2], criterion))
    masked = masks_lib.apply_child_masks(plan, params, masks)
    _CACHE[key] = (masks, masked) + compaction.compact(plan, params, stats, masks)
  return _CACHE[key]


def _max_diffs(plan, pa, sa, pb, sb):
  """{mode: (max |a - b| over logits and aux logits, max |a|)} for eval and train mode."""
  out = {}
  for mode, train in (("eval", False), ("train", True)):
    la, aa, _ = child.forward(plan, pa, sa, X, train)
    lb, ab, _ = child.forward(plan, pb, sb, X, train)
    diff = max(float(jnp.max(jnp.abs(la - lb))), float(jnp.max(jnp.abs(aa - ab))))
    out[mode] = (diff, max(float(jnp.max(jnp.abs(la))), float(jnp.max(jnp.abs(aa)))))
  return out


def _check_close(diffs, label):
  # train mode: batch statistics of 8 images at 1x1 in the last cells of 8-cell nets
  # amplify float rounding (the summation order differs with zero channels present)
  for mode, (diff, scale) in diffs.items():
    print(f"{label} {mode}: max|masked - compact| = {diff:.3g} (max|logits| {scale:.3g})")
    tol = 1e-5 if mode == "eval" else 1e-4
    assert diff <= tol * max(1.0, scale), (label, mode, diff, scale)


def _expected_keep(c, r):
  return max(1, int(np.round((np.float32(1) - np.float32(r)) * np.float32(c))))


@pytest.mark.parametrize("name", list(CASES))
def test_masked_logits_equal_compact(name):
  plan, arc, params, stats = _net(name)
  _, masked, _, cp, cs = _pruned(name)
  _check_close(_max_diffs(plan, masked, stats, cp, cs), name)


def test_compact_with_shift_depthwise():
  """The CPU default depthwise implementation also runs compact widths."""
  plan, arc, params, stats = _net("uniform2_l1")
  _, masked, _, cp, cs = _pruned("uniform2_l1")
  old, layers.DEPTHWISE_IMPL = layers.DEPTHWISE_IMPL, "shift"
  try:
    _check_close(_max_diffs(plan, masked, stats, cp, cs), "uniform2_l1/shift")
  finally:
    layers.DEPTHWISE_IMPL = old


@pytest.mark.parametrize("name", ["uniform0", "uniform2_l1", "pool_identity", "skip_calib"])
def test_counts_match_flops(name):
  plan, arc, _, _ = _net(name)
  masks, _, widths, cp, cs = _pruned(name)
  assert widths == compaction.widths_of(plan, masks)
  if name != "skip_calib":
    assert widths == compaction.ratio_widths(plan, CASES[name][2])
  expected = flops.count(plan, widths)
  assert flops.param_count(cp) == expected["params"]
  assert flops.widths_of_params(plan, cp) == widths
  old = layers.DEPTHWISE_IMPL
  layers.DEPTHWISE_IMPL = "xla"
  try:
    macs = flops.jaxpr_macs(
        lambda p, s, x: child.forward(plan, p, s, x, False, with_aux=False)[0],
        cp, cs, X[:1])
  finally:
    layers.DEPTHWISE_IMPL = old
  assert macs == expected["macs"]
  assert expected["macs"] < flops.count(plan)["macs"] or not np.any(CASES[name][2])


def _unit_importance(plan, params, criterion):
  """Independent recomputation of every unit's importance: for each producer (conv, fr,
  sep output and inner), its per-channel importance added to the units of its channels."""
  g, inner = groups_lib.child_groups(plan)
  if criterion == "l1":
    l1 = lambda w: np.abs(np.asarray(w)).reshape(-1, np.shape(w)[-1]).sum(0)
    prod = lambda p: (l1(p["conv"]) if "conv" in p
                      else np.concatenate([l1(p["conv1"]), l1(p["conv2"])]))
    sep = lambda p: (l1(p["pw1"]), l1(p["pw2"]))
  else:
    prod = lambda p: np.abs(np.asarray(p["bn"]["scale"]))
    sep = lambda p: (np.abs(np.asarray(p["bn1"]["scale"])), np.abs(np.asarray(p["bn2"]["scale"])))
  imp = np.zeros(len(g.unit_group))
  for j, n in enumerate(plan.nodes):
    p = params["blocks"].get(n.name)
    if n.kind == "sep":
      a, b = sep(p)
      np.add.at(imp, g.unit_of[inner[n.name]], a)
      np.add.at(imp, g.unit_of[j], b)
    elif n.kind in ("conv", "fr"):
      np.add.at(imp, g.unit_of[j], prod(p))
  return imp


@pytest.mark.parametrize("name,criterion", [("uniform0", "l1"), ("uniform1", "bn"),
                                            ("enas_max_ratio", "l1"), ("pool_identity", "bn"),
                                            ("skip_calib", "l1")])
def test_masks_keep_top_units_of_each_group(name, criterion):
  plan, arc, params, _ = _net(name)
  ratios = CASES[name][2]
  units = np.asarray(_pruned(name, criterion)[0]["units"])
  g, _ = groups_lib.child_groups(plan)
  imp = _unit_importance(plan, params, criterion)
  assert set(np.unique(units)) <= {0.0, 1.0}
  for grp in range(len(g.group_size)):
    sel = g.unit_group == grp
    m = units[sel]
    if g.group_fixed[grp]:
      assert np.all(m == 1)
      continue
    assert m.sum() == _expected_keep(m.size, ratios[g.group_stage[grp]]), grp
    if m.sum() < m.size:
      assert imp[sel][m == 1].min() >= imp[sel][m == 0].max() * (1 - 1e-6)


def _cells_of_groups(plan, g):
  """{group: the cells whose (non-concat) tensors hold its units}."""
  out = {}
  for j, n in enumerate(plan.nodes):
    if n.kind not in ("image", "concat"):
      for grp in np.unique(g.unit_group[g.unit_of[j]]):
        out.setdefault(int(grp), set()).add(n.cell)
  return out


def test_groups_of_the_published_arc():
  """No calibration is skipped: the stem is one group and every group lies in one cell.
  Nodes tied to h(i-2) by an identity or pooling share its calibrated space (normal cell:
  nodes 2, 3, 4, 6; reduction cell: 3, 6); a node of sep_convs or of a strided identity
  (a factorized reduction) is a group alone."""
  plan, arc, _, _ = _net("enas_max_ratio")
  g, inner = groups_lib.child_groups(plan)
  cells_of_group = _cells_of_groups(plan, g)
  assert all(len(c) == 1 for c in cells_of_group.values())
  stem = np.unique(g.unit_group[g.unit_of[plan.stem]])
  assert len(stem) == 1 and g.group_size[stem[0]] == plan.stem_channels
  node = {n.name: j for j, n in enumerate(plan.nodes)}
  group = lambda name: tuple(np.unique(g.unit_group[g.unit_of[node[name]]]))
  for spec in plan.cells:
    pre = f"cells/{spec.index}/"
    tied, alone = ((3, 6), (2, 4, 5)) if spec.reduce else ((2, 3, 4, 6), (5,))
    groups = {group(pre + f"node{k}") for k in tied} | {group(pre + "calib_x")}
    assert len(groups) == 1 and g.group_size[groups.pop()[0]] == spec.filters
    for k in alone:
      grp = group(pre + f"node{k}")
      assert len(grp) == 1 and g.group_size[grp[0]] == spec.filters
      assert grp != group(pre + "calib_x")
  for name, s in inner.items():      # inner spaces: groups of their own
    grp = np.unique(g.unit_group[g.unit_of[s]])
    assert len(grp) == 1 and np.sum(g.unit_group == grp[0]) == len(g.unit_of[s])


def test_skipped_calibrations_tie_cells():
  """Where ENAS skips a calibration, two cells' channel spaces are one group. All four
  skips below read h(i-2) raw; in the reduction cells 2 and 5 it (the concat of cells 0
  and 3) reaches the nodes only through a sep_conv and a strided identity (a factorized
  reduction), so nothing ties; cells 4 and 7 read the one-output reduction cells 2 and 5
  through an average pool (node 3), which ties each pair: one group of the reduction's F
  units at its (earlier) stage, holding the reduction's output and the later cell's base."""
  plan, arc, _, _ = _net("skip_calib")
  names = {n.name for n in plan.nodes}
  skipped = [s.index for s in plan.cells if f"cells/{s.index}/calib_x" not in names]
  assert skipped == [2, 4, 5, 7], skipped
  g, _ = groups_lib.child_groups(plan)
  tied = {grp: cells for grp, cells in _cells_of_groups(plan, g).items() if len(cells) > 1}
  assert sorted(sorted(cells) for cells in tied.values()) == [[2, 4], [5, 7]]
  node = {n.name: j for j, n in enumerate(plan.nodes)}
  for grp, cells in tied.items():
    first, later = plan.cells[min(cells)], plan.cells[max(cells)]
    assert later.inputs[0] == first.out
    assert g.group_size[grp] == first.filters and g.group_stage[grp] == first.stage
    for j in (first.out, node[f"cells/{later.index}/base"], node[f"cells/{later.index}/node3"]):
      assert set(g.unit_group[g.unit_of[j]].tolist()) == {grp}, plan.nodes[j].name


def test_bn_criterion_compacts_exactly():
  plan, arc, params, stats = _net("uniform1")
  masks_l1, masks_bn = _pruned("uniform1", "l1")[0], _pruned("uniform1", "bn")[0]
  assert not np.array_equal(masks_l1["units"], masks_bn["units"])
  _, masked, widths, cp, cs = _pruned("uniform1", "bn")
  _check_close(_max_diffs(plan, masked, stats, cp, cs), "uniform1/bn")
  assert flops.param_count(cp) == flops.count(plan, widths)["params"]
  widths2, cp2, _ = compaction.prune(plan, params, stats, CASES["uniform1"][2], "bn")
  assert widths2 == widths
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(cp2), jax.tree.leaves(cp)))


@pytest.mark.parametrize("name", ["uniform0", "pool_identity", "identity_only"])
def test_zero_ratios_keep_everything(name):
  plan, arc, params, stats = _net(name)
  masks = masks_lib.child_masks(plan, params, jnp.zeros(5))
  assert all(np.all(np.asarray(m) == 1) for m in jax.tree.leaves(masks))
  masked = masks_lib.apply_child_masks(plan, params, masks)
  widths, cp, cs = compaction.compact(plan, params, stats, jax.device_get(masks))
  assert widths == flops.full_widths(plan)
  for tree in (masked, cp):
    assert jax.tree.structure(tree) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(params)))
  assert jax.tree.structure(cs) == jax.tree.structure(stats)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(cs), jax.tree.leaves(stats)))


def test_hand_masks_with_empty_factorized_half():
  """Arbitrary unit masks, incl. factorized reductions keeping only one half."""
  plan, arc, params, stats = _net("uniform0")
  g, _ = groups_lib.child_groups(plan)
  rng = np.random.default_rng(5)
  units = (rng.random(len(g.unit_group)) < 0.5).astype(np.float32)
  units[g.group_fixed[g.unit_group]] = 1.0          # the image's channels are never pruned
  for j, n in enumerate(plan.nodes):   # keep a channel of every value
    units[g.unit_of[j][[0, -1]]] = 1.0
  frs = [(j, n) for j, n in enumerate(plan.nodes) if n.kind == "fr"]
  for (j, n), half in zip(frs[:2], ("conv1", "conv2")):
    h = n.channels // 2
    drop = g.unit_of[j][:h] if half == "conv1" else g.unit_of[j][h:]
    units[drop] = 0.0
  masks = {"units": units}
  masked = masks_lib.apply_child_masks(plan, params, masks)
  widths, cp, cs = compaction.compact(plan, params, stats, masks)
  assert any(p["conv1"].shape[-1] == 0 for k, p in cp["blocks"].items() if "conv1" in p)
  assert any(p["conv2"].shape[-1] == 0 for k, p in cp["blocks"].items() if "conv2" in p)
  _check_close(_max_diffs(plan, masked, stats, cp, cs), "hand masks")
  assert flops.param_count(cp) == flops.count(plan, widths)["params"]


def test_ratio_changes_do_not_recompile():
  plan, arc, params, _ = _net("uniform0")
  traces = []

  @jax.jit
  def mask_fn(p, ratios):
    traces.append(1)
    return masks_lib.apply_child_masks(plan, p, masks_lib.child_masks(plan, p, ratios))

  for seed in range(4):
    ratios = jnp.asarray(_ratios(10 + seed))
    out = mask_fn(params, ratios)
    if seed == 0:
      ref = masks_lib.apply_child_masks(plan, params, masks_lib.child_masks(plan, params, ratios))
      assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))
  assert len(traces) == 1


def test_bad_criterion():
  plan, arc, params, _ = _net("uniform0")
  with pytest.raises(ValueError, match="criterion"):
    masks_lib.child_masks(plan, params, jnp.zeros(5), "l2")
