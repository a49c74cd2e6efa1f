"""Supernet fake pruning: masks zero exactly the kept-fraction complement of every group."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp_jax.models import layers
from fp_jax.pruning import groups as groups_lib
from fp_jax.pruning import masks as masks_lib
from fp_jax.models import space
from fp_jax.models import supernet


def _keep(c, r):
  return max(1, round((1 - float(r)) * c))


@pytest.mark.parametrize("criterion,share", [("l1", True), ("l1", False), ("bn", True)])
def test_supernet_masks_zero_masked_channels_exactly(criterion, share):
  """share False: ENAS's weight set per chosen input (masks apply at the chosen one)."""
  plan = supernet.make_plan(1, 8, (8, 8, 1), 10)
  params = supernet.init(jax.random.key(0), plan, final="enas", share_inputs=share)
  assert params["cells"][0]["sep3"]["pw1"].shape[2] == (1 if share else supernet.MAX_INPUTS)
  if criterion == "bn":   # distinct BN scales so the ranking is not all ties
    params = jax.tree.map(lambda a: a, params)
    params["stem"]["bn"]["scale"] = jnp.linspace(0.5, 1.5, plan.stem_channels)
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
  ratios = jnp.array([0.5, 0.25, 0.75, 0.25, 0.5])
  rng = np.random.default_rng(0)
  arcs = [space.sample_uniform(rng), np.array([0, 4, 1, 2] * 5 + [1, 3, 0, 4] * 5)]
  masks_fn = jax.jit(masks_lib.supernet_masks, static_argnums=(0, 5))
  for arc in arcs if criterion == "l1" else arcs[:1]:   # the second: pooling / identity only
    groups = groups_lib.supernet_groups(plan, arc)
    arc = jnp.asarray(arc)
    masks = masks_fn(plan, params, arc, ratios, groups, criterion)
    masked = jax.jit(masks_lib.apply_supernet_masks, static_argnums=0)(plan, params, arc, masks)
    stem, _ = layers.relu_conv_bn(masked["stem"], None, x, True, relu=False)
    m = np.asarray(masks["stem"])
    assert m.sum() == round(0.5 * plan.stem_channels)
    assert np.all(np.asarray(stem)[..., m == 0] == 0) and np.any(np.asarray(stem)[..., m == 1])
    cells = collect(plan, masked, arc, x)
    assert len(cells) == len(plan.cells)
    for spec, (h0, h1, nodes, out) in zip(plan.cells, cells):
      mc = masks["cells"][spec.index]
      m = np.asarray(mc["final"])
      assert m.sum() == _keep(spec.filters, ratios[spec.stage])
      assert np.all(np.asarray(out)[..., m == 0] == 0) and np.any(np.asarray(out)[..., m == 1])
      for name, h in (("calib_x", h0), ("calib_y", h1)):
        if name in mc:
          assert np.all(np.asarray(h)[..., np.asarray(mc[name]) == 0] == 0)
      # every node: the channels its space's group dropped are exactly zero
      for k in range(space.NUM_NODES):
        node_mask = _node_mask(plan, groups, masks, spec.index, k)
        assert np.all(np.asarray(nodes[k])[..., node_mask == 0] == 0)
        assert node_mask.sum() >= 1


def _node_mask(plan, groups, masks, cell, k):
  """The mask of node k's space: the unit masks at its channels' units."""
  sp = supernet.space_table(plan)
  off = sum(w for _, w, _ in sp[:[key for key, _, _ in sp].index(("node", cell, k))])
  f = plan.cells[cell].filters
  return np.asarray(masks["units"])[groups["unit_of"][off:off + f]]


@functools.partial(jax.jit, static_argnums=0)
def collect(plan, params, arc, x):
  """(calibrated h0, h1, node values [5], output) of every cell of the supernet."""
  y = layers.relu_conv_bn(params["stem"], None, x, True, relu=False)[0]
  prev, cells = [y, y], []
  for spec in plan.cells:
    cp = params["cells"][spec.index]
    (h0, h1), carry = supernet.cell_inputs(spec, cp, prev)
    part = arc[space.CELL_LEN:] if spec.reduce else arc[:space.CELL_LEN]
    out, nodes = supernet.cell(cp, part, h0, h1, with_nodes=True)
    cells.append((h0, h1, nodes, out))
    prev = [carry, out]
  return cells


def test_supernet_groups_follow_the_arc():
  """Identity/pooling ties a cell's nodes to its inputs: with an identity-only normal
  cell the nodes of the first cells and their (uncalibrated) inputs are one group; with
  sep_convs only, every node is a group of its own."""
  plan = supernet.make_plan(6, 4, (8, 8, 1), 10)      # cells N N R N N R N N
  sp = supernet.space_table(plan)
  index = {key: n for n, (key, _, _) in enumerate(sp)}
  offs = np.concatenate([[0], np.cumsum([w for _, w, _ in sp])])

  def group(groups, key):
    s = index[key]
    return set(groups["unit_group"][groups["unit_of"][offs[s]:offs[s + 1]]].tolist())

  ident = np.array([0, 4, 1, 4] * 5 + [0, 0, 1, 0] * 5)
  g = groups_lib.supernet_groups(plan, ident)
  # cell 1's nodes = id(calib_x) + id(cell 0's output): tied with cell 0's final
  assert group(g, ("node", 1, 0)) == group(g, ("final", 0)) == group(g, ("calib_x", 1))
  assert group(g, ("node", 1, 4)) == group(g, ("node", 1, 0))
  # cell 3 (after the reduction) reads the reduction's FR and output unchanged
  assert group(g, ("node", 3, 0)) == group(g, ("reduce", 2)) == group(g, ("final", 2))
  assert len(group(g, ("final", 0))) == 1
  seps = np.array([0, 0, 1, 1] * 5 + [0, 1, 1, 0] * 5)
  g = groups_lib.supernet_groups(plan, seps)
  nodes = [group(g, ("node", 1, k)) for k in range(space.NUM_NODES)]
  assert all(len(n) == 1 for n in nodes) and len(set.union(*nodes)) == space.NUM_NODES
  assert group(g, ("node", 1, 0)) == group(g, ("out", 1, 0, 0)) == group(g, ("out", 1, 0, 1))
  # shapes do not depend on the arc (one compilation)
  assert {k: v.shape for k, v in g.items()} == {
      k: v.shape for k, v in groups_lib.supernet_groups(plan, ident).items()}


def test_keep_mask_counts_and_ties():
  """The live keep count (masks.keep_count, as masks.unit_masks applies it): a group of
  n units keeps max(1, round((1 - ratio) * n)) (float32, half to even), the most
  important first, equal importance going to the lower unit id; each group at its own
  stage's ratio, a fixed group keeps all; the host count equals the traced one."""
  imp = jnp.array([3.0, 1.0, 2.0, 2.0, 0.5])
  one = lambda ratio: np.asarray(masks_lib.unit_masks(
      imp, np.zeros(5, np.int32), np.int32([5]), np.int32([0]), np.array([False]),
      jnp.full(5, ratio, jnp.float32)))
  np.testing.assert_array_equal(one(0.4), [1, 0, 1, 1, 0])
  np.testing.assert_array_equal(one(0.0), [1, 1, 1, 1, 1])
  np.testing.assert_array_equal(one(0.99), [1, 0, 0, 0, 0])       # at least one unit
  np.testing.assert_array_equal(one(0.5), [1, 0, 1, 0, 0])        # round(2.5) = 2; tie: unit 2
  # groups {0, 1} (stage 0), {2, 3, 4} (stage 2) and the fixed {5}
  got = masks_lib.unit_masks(jnp.array([1.0, 2.0, 5.0, 5.0, 4.0, 0.0]),
                             np.int32([0, 0, 1, 1, 1, 2]), np.int32([2, 3, 1]),
                             np.int32([0, 2, 0]), np.array([False, False, True]),
                             jnp.float32([0.5, 0.0, 0.4, 0.0, 0.0]))
  np.testing.assert_array_equal(got, [0, 1, 1, 1, 0, 1])
  sizes = np.arange(1, 300)
  for r in np.float32(np.round(np.arange(10) * 0.1, 1)):
    host = masks_lib.keep_count(sizes, r, np)
    np.testing.assert_array_equal(host, masks_lib.keep_count(sizes, r))
    np.testing.assert_array_equal(host, np.maximum(1, np.round((np.float32(1) - r)
                                                               * sizes.astype(np.float32))))
  assert int(masks_lib.keep_count(5, np.float32(0.3), np)) == 4   # 0.7 * 5 is 3.5 in float32


def test_mask_transform_compiles_once_for_all_ratios():
  plan = supernet.make_plan(0, 4, (8, 8, 1), 10)
  params = supernet.init(jax.random.key(0), plan)
  traces = []

  @jax.jit
  def transform(params, arc, ratios, groups):
    traces.append(1)
    masks = masks_lib.supernet_masks(plan, params, arc, ratios, groups)
    return masks_lib.apply_supernet_masks(plan, params, arc, masks)

  rng = np.random.default_rng(0)
  kept = set()
  for _ in range(6):
    ratios = jnp.asarray(rng.choice([0.0, 0.3, 0.5, 0.8], 5), jnp.float32)
    arc = space.sample_uniform(rng)
    out = transform(params, jnp.asarray(arc), ratios, groups_lib.supernet_groups(plan, arc))
    kept.add(float(jnp.sum(out["cells"][0]["final"]["bn"]["scale"] != 0)))
  assert len(traces) == 1
  assert len(kept) > 1


def test_held_masks_zero_masked_entries_and_leave_kept_ones_bitwise_unmasked():
  """masked_update.hold_masks: after optax.apply_updates a masked entry is +0.0 exactly and a
  kept one is exactly the inner transform's p + u; with masks of all ones (what the final
  stage trains with, masks.keep_all) the transform gives the unmasked run bit for bit."""
  import optax  # pylint: disable=g-import-not-at-top
  from fp_jax.pruning import masked_update  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  # magnitudes over 12 decades: p + ((p + u) - p) would differ from p + u in some entries
  scale = 10.0 ** rng.integers(-8, 4, size=(2, 64))
  p0 = {"w": (rng.standard_normal((2, 64)) * scale).astype(np.float32),
        "b": rng.standard_normal(64).astype(np.float32)}
  grads = [jax.tree.map(lambda a: (rng.standard_normal(a.shape) * 10.0 ** rng.integers(
      -6, 3, size=a.shape)).astype(np.float32), p0) for _ in range(4)]
  apply = lambda p, m: {"w": p["w"] * m["units"][:64], "b": p["b"] * m["units"][64:]}
  inner = optax.sgd(0.3, momentum=0.9, nesterov=True)

  def run(tx):
    p, state = p0, tx.init(p0)
    for g in grads:
      u, state = jax.jit(tx.update)(g, state, p)
      p = jax.jit(optax.apply_updates)(p, u)
    return jax.device_get(p)

  plain = run(inner)
  ones = {"units": np.ones(128, np.float32)}
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(run(
      masked_update.hold_masks(inner, ones, apply)))):
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))
  units = (rng.random(128) < 0.5).astype(np.float32)
  held = run(masked_update.hold_masks(inner, {"units": units}, apply))
  for name, m in (("w", units[:64]), ("b", units[64:])):
    kept = np.broadcast_to(m, held[name].shape) == 1
    np.testing.assert_array_equal(held[name][kept].view(np.uint32),
                                  plain[name][kept].view(np.uint32))
    assert np.all(held[name][~kept].view(np.uint32) == 0)   # +0.0, not -0.0
