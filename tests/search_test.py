"""Search stage: one compilation, 1 vs 2 devices, rewards, learning on digits, files."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp_jax import data
from fp_jax.run import parallel
from fp_jax.train import reward as reward_lib
from fp_jax.models import space
from fp_jax.train import search
from fp_jax.train.streams import Purpose, Stream
from tests.tiny import tiny_config

RATIOS = (0.0, 0.2, 0.4, 0.6, 0.8)


@pytest.fixture(scope="module")
def digits():
  return data.load("digits", 256)


@pytest.fixture(scope="module")
def one_device_search(digits):
  mesh = parallel.make_mesh(jax.devices()[:1])
  return search.Search.build(tiny_config(), digits, RATIOS, mesh)


def test_one_compilation_for_all_architectures(one_device_search):
  srch = one_device_search
  state = srch.init_state()
  rng = np.random.default_rng(0)
  arcs = {space.arc_to_string(space.sample_uniform(rng)) for _ in range(22)}
  assert len(arcs) == 22
  net = state.supernet
  for i, a in enumerate(sorted(arcs)):
    x, y = srch._batch(srch.ds.x_train, srch.ds.y_train, i, 32, Stream.SUPERNET, True)
    net, m = srch.supernet_step(net, jnp.asarray(space.parse_arc(a)),
                                srch.key(Purpose.SUPERNET_STEP, i), x, y, srch.schedule(i))
    assert np.isfinite(float(m["loss"]))
  assert srch.supernet_step._cache_size() == 1
  # the reward evaluation compiles once for every arc and ratio setting too
  for i in range(6):
    srch.evaluate_sample(net.params, space.sample_uniform(rng), rng.integers(0, 5, 5), i)
  assert srch.reward_eval._cache_size() == 1


def test_one_compilation_for_every_schedule(one_device_search, digits):
  """The learning rate is a step input: a Search of another schedule (lr, cycle length,
  steps per epoch) runs the same compiled step, and the step applies the lr it is given (0:
  the parameters stay bitwise; 2 lr: twice the first step's change)."""
  srch = one_device_search
  other = search.Search.build(tiny_config(lr_max=0.01, lr_t0=3, steps_per_epoch=5), digits,
                              RATIOS, srch.mesh)
  assert other.supernet_step is srch.supernet_step and other.steps_per_epoch == 5
  assert float(other.schedule(0)) == pytest.approx(0.01, rel=1e-6)
  assert float(srch.schedule(0)) == pytest.approx(srch.config.search.lr_max, rel=1e-6)
  x, y = srch._batch(srch.ds.x_train, srch.ds.y_train, 0, 32, Stream.SUPERNET, True)
  arc, key = jnp.asarray(space.parse_arc(space.ENAS_ARC)), srch.key(Purpose.SUPERNET_STEP, 0)
  before = jax.tree.map(np.asarray, srch.init_state().supernet.params)
  moved = {}
  for lr in (0.0, 0.01, 0.02):   # a fresh state each time: the step donates its input
    net, m = other.supernet_step(other.init_state().supernet, arc, key, x, y, jnp.float32(lr))
    moved[lr] = jax.tree.map(lambda a, b: np.asarray(a) - b, net.params, before)
    assert np.isfinite(float(m["loss"]))
  assert all(not np.any(d) for d in jax.tree.leaves(moved[0.0]))
  flat = lambda tree: np.concatenate([a.ravel() for a in jax.tree.leaves(tree)])
  d1, d2, p = flat(moved[0.01]), flat(moved[0.02]), flat(before)
  assert np.count_nonzero(d1) > d1.size // 2
  # the changes are differences of rounded parameters: within 3 of their ulps
  assert np.all(np.abs(d2 - 2 * d1) <= 3 * np.spacing(np.abs(p)) + 1e-3 * np.abs(d2))
  assert srch.supernet_step._cache_size() == 1


def test_one_and_two_devices_give_the_same_losses(digits):
  assert jax.device_count() >= 2, "conftest forces 2 CPU devices"
  config = tiny_config(lr_max=0.01)   # stable dynamics: reduction order is not amplified
  losses = []
  for n in (1, 2):
    srch = search.Search.build(config, digits, RATIOS, parallel.make_mesh(jax.devices()[:n]))
    net = srch.init_state().supernet
    rng = np.random.default_rng(1)
    run = []
    for i in range(4):
      x, y = srch._batch(srch.ds.x_train, srch.ds.y_train, i, 32, Stream.SUPERNET, True)
      net, m = srch.supernet_step(net, jnp.asarray(space.sample_uniform(rng)),
                                  srch.key(Purpose.SUPERNET_STEP, i), x, y, srch.schedule(i))
      run.append(float(m["loss"]))
    losses.append(run)
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
  assert losses[0][0] != losses[0][-1]


def test_reward_formula_and_zero_ratios(one_device_search):
  srch = dataclasses.replace(one_device_search, reward_fn=reward_lib.make(0.5, 20.0))
  params = srch.init_state().supernet.params
  rng = np.random.default_rng(2)
  for i in range(5):
    arc = space.sample_uniform(rng)
    r = srch.evaluate_sample(params, arc, np.zeros(5, int), i)
    assert r["prune_acc"] == r["train_acc"] and r["ratio"] == 0.0
    assert r["reward"] == r["train_acc"]
    r = srch.evaluate_sample(params, arc, rng.integers(1, 5, 5), i)
    gap = r["prune_acc"] - r["train_acc"]
    assert r["gap"] == gap
    assert r["reward"] == 0.5 * r["ratio"] * (1 + 20.0 * gap) + r["train_acc"]
    stages = space.stage_of_layer(0)
    assert r["ratio"] == pytest.approx(sum(r["ratios"][s] for s in stages))


def test_short_digits_search_learns_and_writes_results(tmp_path, digits):
  config = tiny_config(epochs=8)   # same settings as the fixture: its compilations are reused
  arch = search.run(config, str(tmp_path), digits, RATIOS)
  metrics = [json.loads(l) for l in open(tmp_path / "search" / "metrics.jsonl")]
  samples = [json.loads(l) for l in open(tmp_path / "search" / "samples.jsonl")]
  assert len(metrics) == 8 and len(samples) == 8 * 1 * 4
  for key in ("step", "child_loss", "child_acc", "lr", "reward", "train_acc", "prune_acc", "gap",
              "ratio", "baseline", "entropy", "images_per_sec"):
    assert key in metrics[-1]
  assert metrics[-1]["child_acc"] > 0.4, metrics   # 10 classes: chance is 0.1
  assert metrics[-1]["child_loss"] < metrics[0]["child_loss"]
  for r in samples:
    assert len(r["arc"]) == 40 and len(r["ratios"]) == 5
    a, b = config.search.alpha, config.search.beta
    assert r["reward"] == a * r["ratio"] * (1 + b * (r["prune_acc"] - r["train_acc"])) \
        + r["train_acc"]
    assert 0 < r["masked_macs"] <= r["macs"]
  saved = json.load(open(tmp_path / "search" / "arch.json"))
  assert saved == json.loads(json.dumps(arch))
  assert saved["normal"] + saved["reduce"] == [int(v) for v in saved["arc_string"].split()]
  space.parse_arc(saved["arc_string"])
  for key in ("ratios", "train_acc", "prune_acc", "reward"):
    assert key in saved


def test_alpha_drives_ratios_up(one_device_search):
  """a = 0.5 (b = 0: ratio term only) samples and chooses higher ratios than a = 0."""
  means, chosen = {}, {}
  for alpha in (0.0, 0.5):
    config = tiny_config(alpha=alpha, beta=0.0, controller_updates=40,
                         controller_samples=5, num_candidates=3)
    srch = dataclasses.replace(
        one_device_search, config=config, reward_fn=reward_lib.make(alpha, 0.0),
        ccfg=dataclasses.replace(one_device_search.ccfg, lr=0.05, baseline_decay=0.8,
                                 temperature=5.0))   # ENAS's 1.0 moves logits more slowly
    state, _, samples = srch.run_epoch(srch.init_state())
    means[alpha] = np.mean([r["ratio"] for r in samples[-75:]])   # Ratio: sum over cells
    chosen[alpha] = srch.choose(state, samples)["ratio"]
  assert means[0.5] > means[0.0] + 0.2, means
  # a = 0.5 chooses at least as high a Ratio, and above its samples' mean
  assert chosen[0.5] >= chosen[0.0] and chosen[0.5] > means[0.5], (chosen, means)


def test_cifar10_path_under_tfds_mock_data():
  """data.load('cifar10') under TFDS's mock data (48 random 32x32x3 images per split), then
  one search epoch of 2 steps on it over 2 devices, and a supernet that learns its batch."""
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=48):
    ds = data.load("cifar10", 16)
  assert ds.image_shape == (32, 32, 3) and ds.num_classes == 10
  assert (len(ds.x_train), len(ds.x_valid), len(ds.x_test)) == (32, 16, 48)
  assert ds.x_train.dtype == np.uint8 and len(np.unique(ds.x_train)) > 200   # random pixels
  assert all(0 <= y.min() and y.max() < 10 for y in (ds.y_train, ds.y_valid, ds.y_test))
  np.testing.assert_allclose(ds.mean, ds.x_train.mean((0, 1, 2)) / 255, rtol=1e-5)
  config = tiny_config(out_filters=4, batch_size=8, eval_batch_size=8, steps_per_epoch=2,
                       controller_updates=0)   # the reward path is tested on digits
  config.data.name, config.data.valid_size, config.data.crop_pad = "cifar10", 16, 4
  config.data.flip = True
  mesh = parallel.make_mesh(jax.devices()[:2])
  srch = search.Search.build(config, ds, RATIOS, mesh)
  assert (srch.plan.image_hw, srch.plan.in_channels, srch.steps_per_epoch) == ((32, 32), 3, 2)
  x, y = srch._batch(ds.x_train, ds.y_train, 0, 8, Stream.SUPERNET, True)
  assert x.shape == (8, 32, 32, 3) and y.shape == (8,) and len(x.sharding.device_set) == 2
  init = srch.init_state()
  before = jax.tree.map(np.asarray, init.supernet.params)   # the step donates its input
  state, metrics, samples = srch.run_epoch(init)
  assert (state.epoch, metrics["epoch"], metrics["step"], tuple(samples)) == (1, 1, 2, ())
  assert np.isfinite(metrics["child_loss"]) and metrics["images_per_sec"] > 0
  assert 0 <= metrics["child_acc"] <= 1
  moved = jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))), before,
                       state.supernet.params)
  assert any(jax.tree.leaves(moved))
  # the same mock batch and arc again and again: the supernet's loss falls
  net, arc = state.supernet, jnp.asarray(space.parse_arc(space.ENAS_ARC))
  losses = []
  for i in range(8):
    net, m = srch.supernet_step(net, arc, srch.key(Purpose.SUPERNET_STEP, i), x, y,
                                srch.schedule(2 + i))
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.5 * losses[0], losses
