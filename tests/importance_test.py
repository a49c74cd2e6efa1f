"""Importance criteria taylor (|w * dL/dw|) and random, checked against hand computations;
a criterion registered in one place reaches both networks' masks and config validation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke
from fp_jax.models import child
from fp_jax.pruning import compaction
from fp_jax import data
from fp_jax.models import flops
from fp_jax.run import parallel
from fp_jax.pruning import groups as groups_lib
from fp_jax.pruning import importance
from fp_jax.pruning import masks as masks_lib
from fp_jax.models import space
from fp_jax.models import supernet
from fp_jax.train import compress
from fp_jax.train import search_steps

ARC = space.parse_arc(space.ENAS_ARC)
RATIOS = np.float32([0.5, 0.25, 0.5, 0.25, 0.5])


def xent(logits, y):
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


def top(scores, ratio):
  """Hand computation: 0/1 mask keeping the max(1, round((1 - ratio) * C)) highest scores."""
  scores = np.asarray(scores, np.float64)
  keep = max(1, int(np.round((1 - ratio) * len(scores))))
  out = np.zeros(len(scores))
  out[np.argsort(-scores, kind="stable")[:keep]] = 1
  return out


def per_out_channel(w):
  return np.abs(np.asarray(w, np.float64)).sum(axis=tuple(range(np.ndim(w) - 1)))


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.standard_normal((16, 8, 8, 3)), jnp.float32),
          jnp.asarray(rng.integers(0, 10, 16), jnp.int32))


@pytest.fixture(scope="module")
def fixed(batch):
  plan = child.make_plan(ARC, 1, 4, (8, 8, 3), 10)
  params, stats = child.init(jax.random.key(0), plan)
  x, y = batch
  grads = jax.jit(jax.grad(lambda p: xent(child.forward(plan, p, stats, x, False,
                                                        with_aux=False)[0], y)))(params)
  return plan, params, grads, stats


def _own_group(g, space_index):
  """The stem's (or an inner space's) units form a group of their own."""
  units = g.unit_of[space_index]
  group = g.unit_group[units[0]]
  assert np.all(g.unit_group[units] == group) and g.group_size[group] == len(set(units))
  return units


def test_fixed_taylor_scores_are_w_times_grad(fixed):
  plan, params, grads, _ = fixed
  masks = jax.device_get(masks_lib.child_masks(plan, params, RATIOS, "taylor", grads=grads))
  g, inner = groups_lib.child_groups(plan)
  _own_group(g, plan.stem)
  stem = lambda t: t["blocks"]["stem"]["conv"]
  want = top(per_out_channel(np.asarray(stem(params)) * np.asarray(stem(grads))), RATIOS[0])
  np.testing.assert_array_equal(masks_lib.value_mask(plan, masks, plan.stem), want)
  # and it is not the L1 criterion's choice on this network (the test can tell them apart)
  l1 = jax.device_get(masks_lib.child_masks(plan, params, RATIOS, "l1"))
  assert not np.array_equal(l1["units"], masks["units"])
  # every sep_conv's inner channels: sum |pw1 * dL/dpw1| over the filter
  checked = 0
  for j, n in enumerate(plan.nodes):
    if n.kind != "sep":
      continue
    _own_group(g, inner[n.name])
    pw1 = lambda t: np.asarray(t["blocks"][n.name]["pw1"])
    ratio = RATIOS[plan.cells[n.cell].stage]
    np.testing.assert_array_equal(masks_lib.value_mask(plan, masks, inner[n.name]),
                                  top(per_out_channel(pw1(params) * pw1(grads)), ratio))
    checked += 1
  assert checked >= 4


def test_fixed_random_ranks(fixed):
  plan, params, _, _ = fixed
  key = jax.random.key(7)
  masks = jax.device_get(masks_lib.child_masks(plan, params, RATIOS, "random", key=key))
  g, _ = groups_lib.child_groups(plan)
  scores = np.asarray(jax.random.uniform(key, (len(g.unit_group),)))
  units = _own_group(g, plan.stem)
  np.testing.assert_array_equal(masks_lib.value_mask(plan, masks, plan.stem),
                                top(scores[units], RATIOS[0]))
  # every group keeps its count, as with any criterion
  l1 = jax.device_get(masks_lib.child_masks(plan, params, RATIOS, "l1"))
  assert flops.count(plan, compaction.widths_of(plan, masks)) == \
      flops.count(plan, compaction.widths_of(plan, l1))
  other = jax.device_get(masks_lib.child_masks(plan, params, RATIOS, "random",
                                                key=jax.random.key(8)))
  assert not np.array_equal(other["units"], masks["units"])
  with pytest.raises(ValueError, match="needs a PRNG key"):
    masks_lib.child_masks(plan, params, RATIOS, "random")


def test_supernet_taylor_and_random(batch):
  plan = supernet.make_plan(1, 4, (8, 8, 3), 10)    # R R N; the stem feeds cell 0 only
  params = supernet.init(jax.random.key(1), plan)
  arc = ARC.copy()
  arc[1] = space.SEP3                                # normal cell, node 0, slot 0: sep 3x3
  assert not plan.cells[2].reduce and plan.cells[2].stage == 4
  x, y = batch
  grads = jax.jit(jax.grad(lambda p: xent(supernet.forward(plan, p, jnp.asarray(arc), x,
                                                           with_aux=False)[0], y)))(params)
  groups = groups_lib.supernet_groups(plan, arc)
  masks_of = jax.jit(lambda p, g, k, criterion: masks_lib.supernet_masks(
      plan, p, jnp.asarray(arc), RATIOS, groups, criterion, g, k), static_argnums=3)
  masks = masks_of(params, grads, None, "taylor")
  stem = lambda t: np.asarray(t["stem"]["conv"])
  np.testing.assert_array_equal(masks["stem"], top(per_out_channel(stem(params) * stem(grads)),
                                                   RATIOS[0]))
  # cell 2, node 0, slot 0's inner channels (its own group): the sep3 pw1 of that slot
  pw1 = lambda t: np.asarray(t["cells"][2]["sep3"]["pw1"][0, 0, 0])
  np.testing.assert_array_equal(masks["cells"][2]["inner"][0, 0],
                                top(per_out_channel(pw1(params) * pw1(grads)), RATIOS[4]))
  key = jax.random.key(3)
  rnd = masks_of(params, None, key, "random")
  n = sum(w for _, w, _ in supernet.space_table(plan))
  scores = np.asarray(jax.random.uniform(key, (n,)))
  np.testing.assert_array_equal(rnd["stem"], top(scores[:plan.stem_channels], RATIOS[0]))
  jax.tree.map(np.testing.assert_array_equal, rnd["kept"], masks["kept"])   # same counts, other channels
  assert not np.array_equal(rnd["units"], masks["units"])


def test_reward_eval_taylor_same_on_one_and_two_devices():
  """taylor's gradient is the global batch's."""
  ds = data.load("digits", 256)
  plan = supernet.make_plan(0, 4, ds.image_shape, ds.num_classes)   # two reduction cells
  params = supernet.init(jax.random.key(2), plan)
  arc = space.sample_uniform(np.random.default_rng(4))
  x, y, _ = next(data.eval_batches(ds.x_valid, ds.y_valid, batch_size=64, mean=ds.mean,
                                   std=ds.std))
  outs = []
  for n in (1, 2):
    mesh = parallel.make_mesh(jax.devices()[:n])
    evaluate = search_steps.make_reward_eval(plan, "taylor", mesh)
    outs.append(jax.device_get(evaluate(params, jnp.asarray(arc), jnp.float32(RATIOS),
                                        groups_lib.supernet_groups(plan, arc), jax.random.key(5),
                                        *parallel.shard(mesh, (x, y)))))
  assert outs[0][0] == outs[1][0] and outs[0][1] == outs[1][1]
  jax.tree.map(np.testing.assert_array_equal, outs[0][2], outs[1][2])


def test_compress_taylor_grads_average_batches(fixed, batch):
  """The mean of the per-batch gradients of equal batches is the gradient over their union
  (eval mode: BN uses running statistics), on 2 devices."""
  plan, params, want, stats = fixed
  x, y = batch
  got = compress.taylor_grads(plan, params, stats,
                              zip(np.split(np.asarray(x), 2), np.split(np.asarray(y), 2)),
                              parallel.make_mesh(jax.devices()[:2]))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_compress_importance_is_validated():
  from fp_jax import config as config_lib
  config = smoke.get_config()
  config.compress.importance = "magnitude"
  with pytest.raises(config_lib.ConfigError, match="compress.importance='magnitude': must be "
                     "one of l1, bn, taylor, random"):
    config_lib.validate(config)


def _l2_score(kernels, scale, lead=0):
  """A criterion defined only here: the L2 norm of the producing filters."""
  del scale
  return jnp.concatenate([jnp.sqrt(jnp.sum(w * w, axis=tuple(range(lead, w.ndim - 1))))
                          for w in kernels], -1)


def test_a_registered_criterion_reaches_both_networks_and_the_config(fixed, monkeypatch):
  """Adding a criterion is one registry entry: the fixed network's and the supernet's
  masks rank by it, and config validation accepts its name (and no longer once removed)."""
  from fp_jax import config as config_lib
  monkeypatch.setitem(importance.REGISTRY, "l2", importance.Criterion(score=_l2_score))
  assert importance.CRITERIA[-1] == "l2"
  l2 = lambda w: np.sqrt(np.sum(np.asarray(w, np.float64) ** 2,
                                axis=tuple(range(np.ndim(w) - 1))))
  plan, params, _, _ = fixed
  masks = jax.device_get(masks_lib.child_masks(plan, params, RATIOS, "l2"))
  stem = lambda t: t["blocks"]["stem"]["conv"]
  np.testing.assert_array_equal(masks_lib.value_mask(plan, masks, plan.stem),
                                top(l2(stem(params)), RATIOS[0]))
  l1 = jax.device_get(masks_lib.child_masks(plan, params, RATIOS, "l1"))
  assert not np.array_equal(l1["units"], masks["units"])   # the test can tell them apart
  splan = supernet.make_plan(1, 4, (8, 8, 3), 10)    # R R N; the stem feeds cell 0 only
  sparams = supernet.init(jax.random.key(1), splan)
  arc = ARC.copy()
  arc[1] = space.SEP3                                # normal cell, node 0, slot 0: sep 3x3
  smasks = jax.jit(lambda p: masks_lib.supernet_masks(
      splan, p, jnp.asarray(arc), RATIOS, groups_lib.supernet_groups(splan, arc), "l2"))(sparams)
  np.testing.assert_array_equal(smasks["stem"], top(l2(sparams["stem"]["conv"]), RATIOS[0]))
  pw1 = np.asarray(sparams["cells"][2]["sep3"]["pw1"][0, 0, 0])
  np.testing.assert_array_equal(smasks["cells"][2]["inner"][0, 0], top(l2(pw1), RATIOS[4]))
  config = smoke.get_config()
  config.search.importance = config.compress.importance = "l2"
  config_lib.validate(config)
  monkeypatch.undo()
  with pytest.raises(config_lib.ConfigError, match="must be one of l1, bn, taylor, random$"):
    config_lib.validate(config)
