"""Issue 24 items 2 and 3: kept channel counts rounded to multiples of N (compress.round_to,
search.round_to: one rule, masks.keep_count) and fine-tuning distilled from the unpruned
network (compress.distill: losses.distillation_loss inside the trainer's step)."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from fp_jax import config as config_lib
from fp_jax import data
from fp_jax.infer import networks
from fp_jax.models import child
from fp_jax.models import flops
from fp_jax.models import layers
from fp_jax.models import space
from fp_jax.models import supernet
from fp_jax.pruning import compaction
from fp_jax.pruning import groups as groups_lib
from fp_jax.pruning import masks as masks_lib
from fp_jax.run import weights
from fp_jax.train import compress
from fp_jax.train import final
from fp_jax.train import losses as loss_lib
from fp_jax.train import trainer as trainer_lib
from fp_jax.train.streams import Stream
from tests import host_init

ARC = space.parse_arc(space.ENAS_ARC)
N = 8
RATIOS = np.float32([0.5, 0.3, 0.7, 0.2, 0.6])


@pytest.fixture(autouse=True, scope="module")
def _xla_depthwise():
  old, layers.DEPTHWISE_IMPL = layers.DEPTHWISE_IMPL, "xla"
  yield
  layers.DEPTHWISE_IMPL = old


def _multiple_or_whole(count, size, n=N):
  return count % n == 0 or count == size


# ---------------------------------------------------------------- the rule


def test_keep_count_rounds_up_to_multiples_capped_at_the_group():
  sizes = np.arange(1, 300)
  for r in np.float32(np.round(np.arange(10) * 0.1, 1)):
    exact = np.maximum(1, np.round((np.float32(1) - r) * sizes.astype(np.float32)))
    one = masks_lib.keep_count(sizes, r, np, round_to=1)
    np.testing.assert_array_equal(one, exact)                      # N 1: today's count
    np.testing.assert_array_equal(one, masks_lib.keep_count(sizes, r, np))
    for n in (2, 8, 16):
      got = masks_lib.keep_count(sizes, r, np, round_to=n)
      np.testing.assert_array_equal(got, masks_lib.keep_count(sizes, r, jnp, round_to=n))
      np.testing.assert_array_equal(got, np.minimum(sizes, np.ceil(exact / n) * n))
      assert np.all((got % n == 0) | (got == sizes)) and np.all(got >= exact)
      assert np.all(got <= sizes) and np.all(got - exact < n)
  kc = lambda size, r: int(masks_lib.keep_count(size, np.float32(r), np, round_to=8))
  assert kc(20, 0.5) == 16 and kc(20, 0.6) == 8 and kc(20, 0.8) == 8   # 10 -> 16, 8, 4 -> 8
  assert kc(20, 0.1) == 20 and kc(19, 0.0) == 19         # capped: the group kept whole
  assert kc(5, 0.5) == 5 and kc(48, 0.1) == 48 and kc(64, 0.8) == 16  # 43 -> 48, 13 -> 16
  traced = jax.jit(lambda s, r: masks_lib.keep_count(s, r, round_to=8))(
      jnp.int32([20, 5, 64]), jnp.float32([0.5, 0.5, 0.8]))
  np.testing.assert_array_equal(traced, [16, 5, 16])
  with pytest.raises(ValueError, match="round_to=0"):
    masks_lib.keep_count(8, 0.5, np, round_to=0)


def test_supernet_masks_keep_multiples_of_n():
  """The search's masks (supernet_masks, jit, as the reward evaluation runs them): every
  group keeps keep_count(size, ratio, 8) units; every space's kept channels (Kept) are
  multiples of 8 (F 16: every group's size is); N 1 is the default exactly."""
  plan = supernet.make_plan(1, 16, (8, 8, 1), 10)
  params = supernet.init(jax.random.key(0), plan)
  arc = space.sample_uniform(np.random.default_rng(4))
  groups = groups_lib.supernet_groups(plan, arc)
  run = jax.jit(lambda p, r, g, n: masks_lib.supernet_masks(plan, p, jnp.asarray(arc), r, g,
                                                             round_to=n), static_argnums=3)
  rounded, exact = (jax.device_get(run(params, RATIOS, groups, n)) for n in (N, 1))
  default_ = jax.device_get(jax.jit(lambda p, r, g: masks_lib.supernet_masks(
      plan, p, jnp.asarray(arc), r, g))(params, RATIOS, groups))
  np.testing.assert_array_equal(default_["units"], exact["units"])
  unit_group = np.asarray(groups["unit_group"])
  counted = 0
  for g, (size, stage, fixed) in enumerate(zip(groups["group_size"], groups["group_stage"],
                                               groups["group_fixed"])):
    if fixed or size == 0:
      continue
    kept = int(np.sum(rounded["units"][unit_group == g]))
    assert kept == masks_lib.keep_count(int(size), RATIOS[stage], np, round_to=N)
    assert kept % N == 0 and kept >= int(np.sum(exact["units"][unit_group == g]))
    counted += 1
  assert counted > 5
  full = jax.tree.leaves(supernet.full_kept(plan))
  leaves = jax.tree.leaves(rounded["kept"])
  assert len(leaves) == len(full)
  for k, f in zip(leaves, full):
    k, f = np.asarray(k), np.asarray(f)
    assert np.all(k % N == 0) and np.all(k <= f)
  assert any(np.any(np.asarray(a) != np.asarray(b))
             for a, b in zip(leaves, jax.tree.leaves(exact["kept"])))   # rounding did change


def test_child_masks_compaction_and_latency_network_round_to_8():
  """The fixed network at F 16 (round_to 8): every value's kept width is a multiple of 8
  or the value whole (the image); compaction's widths, ratio_widths and the latency
  stage's pruned network (networks.prune) agree; masked == compact logits, eval and train
  mode; N 1 gives the default masks bitwise."""
  plan = child.make_plan(ARC, 1, 16, (8, 8, 3), 10)
  params, stats = host_init.random_net(plan, 0, random_var=True)
  # jitted (one compilation each, not one per eager op)
  child_masks = lambda *n: jax.device_get(jax.jit(
      lambda p: masks_lib.child_masks(plan, p, RATIOS, "l1", None, None, *n))(params))
  masks = child_masks(N)
  default_masks = child_masks()
  np.testing.assert_array_equal(child_masks(1)["units"], default_masks["units"])
  exact = compaction.widths_of(plan, default_masks)
  full = flops.full_widths(plan)
  widths, cp, cs = compaction.compact(plan, params, stats, masks)
  for w, f, e in zip(widths["values"], full["values"], exact["values"]):
    assert _multiple_or_whole(w, f) and e <= w <= f, (w, f, e)
  for name, w in widths["inner"].items():
    assert w % N == 0 and exact["inner"][name] <= w, (name, w)
  assert widths != exact and widths != full                 # rounding changed, still prunes
  assert widths == compaction.ratio_widths(plan, RATIOS, N)
  assert exact == compaction.ratio_widths(plan, RATIOS)
  assert flops.widths_of_params(plan, cp) == widths
  lat_p, _ = networks.prune(plan, params, stats, RATIOS, "l1", N)
  assert flops.widths_of_params(plan, lat_p) == widths
  masked = masks_lib.apply_child_masks(plan, params, masks)
  x = jax.random.normal(jax.random.key(1), (8, 8, 8, 3))
  for train, tol in ((False, 1e-5), (True, 1e-4)):
    fwd = jax.jit(lambda p, s, x: child.forward(plan, p, s, x, train))
    la, aa, _ = fwd(masked, stats, x)
    lb, ab, _ = fwd(cp, cs, x)
    scale = max(1.0, float(jnp.max(jnp.abs(la))))
    diff = max(float(jnp.max(jnp.abs(la - lb))), float(jnp.max(jnp.abs(aa - ab))))
    assert diff <= tol * scale, (train, diff)


# ---------------------------------------------------------------- distillation


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _hand_kl(student, teacher, t):
  """KL(softmax(teacher / t) || softmax(student / t)), batch mean, in float64 numpy."""
  lp = _np_log_softmax(np.asarray(teacher, np.float64) / t)
  lq = _np_log_softmax(np.asarray(student, np.float64) / t)
  return float(np.mean(np.sum(np.exp(lp) * (lp - lq), -1)))


def test_distillation_loss_against_a_hand_computation():
  rng = np.random.default_rng(0)
  s, t = rng.normal(0, 3, (6, 10)).astype(np.float32), rng.normal(0, 3, (6, 10)).astype(np.float32)
  for temp in (1.0, 2.0, 4.0):
    kl = float(loss_lib.distill_kl(s, t, temp))
    # by hand, the textbook way: p = softmax(t / T), q = softmax(s / T), sum p log(p / q)
    p = np.exp(t / temp) / np.exp(t / temp).sum(-1, keepdims=True)
    q = np.exp(s / temp) / np.exp(s / temp).sum(-1, keepdims=True)
    hand = float(np.mean(np.sum(p * np.log(p / q), -1)))
    assert kl == pytest.approx(hand, rel=1e-5) and kl > 0
    total, kl2 = loss_lib.distillation_loss(jnp.float32(1.25), s, t, 0.3, temp, None)
    assert float(kl2) == pytest.approx(hand, rel=1e-5)
    assert float(total) == pytest.approx(1.25 + 0.3 * temp ** 2 * hand, rel=1e-5)
  assert float(loss_lib.distill_kl(s, s, 3.0)) == pytest.approx(0.0, abs=1e-6)
  # the teacher side carries no gradient; the student's is (q - p) / T per example / B
  g_t = jax.grad(lambda t: loss_lib.distill_kl(s, t, 2.0))(jnp.asarray(t))
  assert np.all(np.asarray(g_t) == 0)
  g_s = np.asarray(jax.grad(lambda z: loss_lib.distill_kl(z, t, 2.0))(jnp.asarray(s)))
  p, q = (np.exp(_np_log_softmax(np.asarray(z, np.float64) / 2.0)) for z in (t, s))
  np.testing.assert_allclose(g_s, (q - p) / 2.0 / len(s), rtol=1e-4, atol=1e-7)


def _recipe(**kw):
  base = dict(epochs=1, steps_per_epoch=1, batch_size=16, eval_batch_size=16, lr_max=0.05,
              lr_min=0.05, lr_t0=1, lr_tmul=1, momentum=0.9, l2=0.0, grad_clip=1e9,
              aux_weight=0.4, keep_prob=1.0, drop_path_keep_prob=1.0, cutout=0, crop_pad=2,
              flip=True)
  return trainer_lib.Recipe(**{**base, **kw})


def test_distilling_step_adds_the_kl_term_on_the_same_batch():
  """One data-parallel step (2 devices) with a teacher: its distill_kl is the hand KL of the
  teacher's eval-mode logits and the student's train-mode logits on the step's augmented
  batch, and the update is the gradient of CE + aux + w T^2 KL (first Nesterov step, no
  L2 or clipping: -lr (1 + momentum) grad); data.input=device gives the same."""
  ds = data.load("digits", 64)
  plan = child.make_plan(ARC, 0, 6, (8, 8, 1), 10)
  student, s_stats = child.init(jax.random.key(0), plan)
  teacher, t_stats = host_init.random_net(plan, 1, random_var=True)
  w, temp = 0.7, 3.0
  x, y = ds.x_train, ds.y_train
  out = {}
  for mode in ("host", "device"):
    r = _recipe(distill=(w, temp), input=mode)
    tr = trainer_lib.FixedTrainer.build(plan, r, 0, Stream.COMPRESS, ds.mean, ds.std,
                                        teacher=(teacher, t_stats))
    assert tr.mesh.devices.size == 2
    state, m = tr.run_epoch(tr.init_state(student, s_stats), x, y)
    out[mode] = (m, jax.device_get(state["net"]["params"]))
  xb, yb = data.train_batch(x, y, step=0, batch_size=16, seed=0, stream=Stream.COMPRESS,
                            mean=ds.mean, std=ds.std, crop_pad=2, flip=True)
  t_logits = jax.jit(lambda p, s, x: child.forward(plan, p, s, x, False, with_aux=False)[0])(
      teacher, t_stats, xb)   # jitted: one compilation, not one per eager op

  def hand_loss(p):
    logits, aux, _ = child.forward(plan, p, s_stats, xb, True)
    loss, (ce, _) = loss_lib.classification_loss(logits, aux, yb, 0.4, None)
    return loss + w * temp ** 2 * loss_lib.distill_kl(logits, t_logits, temp), (logits, ce)

  grads, (logits, ce) = jax.jit(jax.grad(hand_loss, has_aux=True))(student)
  kl = _hand_kl(logits, t_logits, temp)
  assert kl > 1e-3
  for mode, (m, params) in out.items():
    assert m["distill_kl"] == pytest.approx(kl, rel=1e-4), mode
    assert m["loss"] == pytest.approx(float(ce), rel=1e-4), mode       # 'loss' stays the CE
    expect = jax.tree.map(lambda p, g: p - 0.05 * 1.9 * g, student, grads)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expect)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(out["host"][1]), jax.tree.leaves(out["device"][1])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="teacher"):
    trainer_lib.FixedTrainer.build(plan, _recipe(distill=(w, temp)), 0, Stream.COMPRESS,
                                   ds.mean, ds.std)


def _finished_final(tmp_path, f=16):
  plan = child.make_plan(ARC, 1, f, (8, 8, 1), 10)
  params, stats = host_init.random_net(plan, 2, random_var=True)
  workdir = tmp_path / "run"
  os.makedirs(workdir / "final")
  weights.save(str(workdir / "final" / "weights.npz"), {"params": params, "stats": stats},
               final.meta_of(plan, ARC, 1, f))
  return plan, params, stats, workdir


def _config(**compress_fields):
  from configs import smoke
  config = smoke.get_config()
  config.stages = "compress"
  config.final.arc, config.final.num_layers, config.final.out_filters = space.ENAS_ARC, 1, 16
  k = config.compress
  k.ratios, k.finetune_epochs, k.steps_per_epoch, k.batch_size, k.bn_batches = (
      "0.5 0.3 0.7 0.2 0.6", 1, 2, 32, 2)
  for key, v in compress_fields.items():
    k[key] = v
  return config


@pytest.mark.parametrize("mode", ["finetune", "scratch"])
def test_compress_stage_with_round_to_and_distillation(tmp_path, mode):
  """The stage end to end (digits, F 16): result.json reports round_to and the distillation
  fields, its widths are the rounded ones (ratio_widths at 8, multiples of 8 but the image),
  masked == compact, and metrics.jsonl carries the KL term (positive, finite)."""
  plan, params, stats, workdir = _finished_final(tmp_path)
  config = _config(mode=mode, round_to=N, distill=True, distill_weight=0.5,
                   distill_temperature=2.0)
  config_lib.validate(config)
  ds = data.load("digits", 64)
  result = compress.run(config, str(workdir), ds)
  assert result == json.loads((workdir / "compress" / "result.json").read_text())
  assert result["round_to"] == N and result["distill"] is True
  assert (result["distill_weight"], result["distill_temperature"]) == (0.5, 2.0)
  widths = result["widths"]
  assert widths == compaction.ratio_widths(plan, RATIOS, N)
  full = flops.full_widths(plan)
  assert all(_multiple_or_whole(w, f) for w, f in zip(widths["values"], full["values"]))
  assert result["pruned_macs"] == flops.count(plan, widths)["macs"] < result["macs"]
  assert result["max_abs_diff_masked_vs_compact"] < 1e-4
  tree, meta = weights.load(str(workdir / "compress" / "weights.npz"))
  assert flops.widths_of_params(plan, tree["params"]) == widths and meta["widths"] == widths
  lines = [json.loads(l) for l in (workdir / "compress" / "metrics.jsonl").read_text().splitlines()]
  assert len(lines) == 1 and 0 < lines[0]["distill_kl"] < 1e3


def test_defaults_keep_todays_behaviour_and_bad_values_are_refused():
  config = default.get_config()
  assert (config.search.round_to, config.compress.round_to, config.compress.distill) == (1, 1,
                                                                                         False)
  assert compress.compress_recipe(config, 1000).distill is None
  for path, value, message in (
      ("search.round_to", 0, "search.round_to=0: must be an integer in 1..1024"),
      ("compress.round_to", 0, "compress.round_to=0: must be an integer in 1..1024"),
      ("compress.round_to", 2.0, "compress.round_to=2.0: must be an integer"),
      ("compress.distill", 1, "compress.distill=1: must be True or False"),
      ("compress.distill_weight", -0.5, "compress.distill_weight=-0.5: must be >= 0.0"),
      ("compress.distill_temperature", 0.0, "compress.distill_temperature=0.0: must be > 0.0"),
      ("compress.distill_temperature", -1.0, "compress.distill_temperature=-1.0: must be > 0.0")):
    bad = ml_collections.ConfigDict(default.get_config().to_dict(), type_safe=False)
    section, _, key = path.rpartition(".")
    bad[section][key] = value
    with pytest.raises(config_lib.ConfigError) as e:
      config_lib.validate(bad)
    assert str(e.value) == message
