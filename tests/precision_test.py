"""Mixed precision (config.dtype): bfloat16 tracks float32, float32 state, exactness within
a dtype (masked == compact, resume), and the config error line. Tiny shapes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke
from fp_jax.models import child
from fp_jax.pruning import compaction
from fp_jax import config as config_lib
from fp_jax.models import layers
from fp_jax.run import parallel
from fp_jax.run import precision
from fp_jax.models import space
from fp_jax.models import supernet
from fp_jax.train import search_steps
from fp_jax.train import trainer as trainer_lib
from fp_jax.pruning import masks as masks_lib

BATCH, HW, CLASSES = 16, 8, 10
STEPS = 4
# bfloat16 keeps 8 significant bits (relative rounding 2^-9 per op): over STEPS SGD steps
# (fresh random arcs, lr 0.05) the per-step losses stay within 3% of float32's (measured:
# at most 1.6% for the supernet).
LOSS_RTOL = 0.03


def _batch(seed):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((BATCH, HW, HW, 3)).astype(np.float32)
  return x, rng.integers(0, CLASSES, BATCH).astype(np.int32)


def test_bad_dtype_is_a_config_error():
  config = smoke.get_config()
  config.dtype = "float16"
  with pytest.raises(config_lib.ConfigError, match=r"^dtype='float16': must be one of "
                     r"float32, bfloat16$"):
    config_lib.validate(config)
  config.dtype = "bfloat16"
  config_lib.validate(config)


def test_cast_keeps_ints_and_float32_identity():
  tree = {"w": jnp.ones(3), "i": jnp.arange(3)}
  out = precision.cast(tree, jnp.bfloat16)
  assert out["w"].dtype == jnp.bfloat16 and out["i"].dtype == tree["i"].dtype
  assert precision.cast(tree, jnp.float32)["w"] is tree["w"]
  with pytest.raises(ValueError):
    precision.dtype_of("float16")


def test_bn_statistics_stay_float32_and_output_follows_x():
  p, s = layers.bn_init(4), layers.bn_stats_init(4)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3, 3, 4)), jnp.bfloat16)
  y, s_new = layers.batch_norm(precision.cast(p, jnp.bfloat16), s, x, True)
  assert y.dtype == jnp.bfloat16 and s_new["mean"].dtype == jnp.float32
  y32, s32 = layers.batch_norm(p, s, x.astype(jnp.float32), True)
  np.testing.assert_allclose(np.asarray(s_new["var"]), np.asarray(s32["var"]), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y32), atol=0.05)


def _supernet_losses(dtype):
  cfg = smoke.get_config().search
  plan = supernet.make_plan(0, 4, (HW, HW, 3), CLASSES)
  tx, _ = search_steps.supernet_optimizer(cfg, 10)
  mesh = parallel.make_mesh(jax.devices()[:1])
  params = supernet.init(jax.random.key(0), plan)
  state = parallel.replicate(mesh, search_steps.SupernetState(params, tx.init(params)))
  step = search_steps.make_supernet_step(plan, tx, cfg.aux_weight, 1.0, mesh, dtype)
  rng, losses = np.random.default_rng(1), []
  for i in range(STEPS):
    x, y = parallel.shard(mesh, _batch(i))
    state, m = step(state, jnp.asarray(space.sample_uniform(rng)), jax.random.key(i), x, y,
                    jnp.float32(cfg.lr_max))
    losses.append(float(m["loss"]))
  return losses, state


def test_supernet_bfloat16_tracks_float32_with_float32_state():
  l32, _ = _supernet_losses("float32")
  l16, state = _supernet_losses("bfloat16")
  print("supernet losses f32", np.round(l32, 4), "bf16", np.round(l16, 4))
  assert max(abs(a - b) / a for a, b in zip(l32, l16)) < LOSS_RTOL, (l32, l16)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(state)
             if jnp.issubdtype(a.dtype, jnp.floating))


def test_supernet_forward_computes_in_bfloat16():
  plan = supernet.make_plan(0, 4, (HW, HW, 3), CLASSES)
  params = precision.cast(supernet.init(jax.random.key(0), plan), jnp.bfloat16)
  x = jnp.asarray(_batch(0)[0], jnp.bfloat16)
  logits, aux = jax.eval_shape(lambda p, a, x: supernet.forward(plan, p, a, x), params,
                               jnp.asarray(space.parse_arc(space.ENAS_ARC)), x)
  assert logits.dtype == jnp.bfloat16 and aux.dtype == jnp.bfloat16   # no silent float32


def test_fixed_forward_with_drop_path_computes_in_bfloat16():
  arc = space.parse_arc(space.ENAS_ARC)
  plan = child.make_plan(arc, 0, 4, (HW, HW, 3), CLASSES)
  params, stats = child.init(jax.random.key(0), plan)
  reg = {"key": jax.random.key(1), "keep_prob": 0.8, "drop_path_keep_prob": 0.6,
         "progress": jnp.float32(0.5)}     # traced float32 keep probabilities
  x = jnp.asarray(_batch(0)[0], jnp.bfloat16)
  logits, aux, new = jax.eval_shape(
      lambda p, x: child.forward(plan, precision.cast(p, jnp.bfloat16), stats, x, True,
                                 reg=reg), params, x)
  assert logits.dtype == jnp.bfloat16 and aux.dtype == jnp.bfloat16
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(new))   # BN statistics


def _recipe(dtype):
  return trainer_lib.Recipe(epochs=2, steps_per_epoch=STEPS // 2, batch_size=BATCH,
                            eval_batch_size=BATCH, lr_max=0.05, lr_min=0.001, lr_t0=1,
                            lr_tmul=1, momentum=0.9, l2=1e-4, grad_clip=5.0, aux_weight=0.4,
                            keep_prob=0.8, drop_path_keep_prob=0.7, cutout=0, crop_pad=0,
                            flip=False, dtype=dtype)


@pytest.fixture(scope="module")
def fixed():
  """The fixed network (grouped-conv depthwise for these tests: faster to compile; the
  supernet test above runs the CPU default, the shift convolution)."""
  old, layers.DEPTHWISE_IMPL = layers.DEPTHWISE_IMPL, "xla"
  arc = space.parse_arc(space.ENAS_ARC)
  plan = child.make_plan(arc, 0, 4, (HW, HW, 3), CLASSES)
  params, stats = child.init(jax.random.key(0), plan)
  rng = np.random.default_rng(3)
  x = rng.integers(0, 256, (4 * BATCH, HW, HW, 3), dtype=np.uint8)
  yield plan, arc, params, stats, x, rng.integers(0, CLASSES, 4 * BATCH).astype(np.int32)
  layers.DEPTHWISE_IMPL = old


def _train(fixed, dtype, stop_after=None):
  plan, arc, params, stats, x, y = fixed
  mesh = parallel.make_mesh(jax.devices()[:1])
  tr = trainer_lib.FixedTrainer.build(plan, _recipe(dtype), 0, 10, np.zeros(3, np.float32),
                                      np.full(3, 64.0, np.float32), mesh)
  state, out = tr.init_state(params, stats), []
  while state["epoch"] < tr.recipe.epochs:
    calls = [0]
    def stop():
      calls[0] += 1
      return stop_after is not None and calls[0] == stop_after
    state, m = tr.run_epoch(state, x, y, stop=stop)
    if m is not None:
      out.append(m["loss"])
    else:   # "resume": the partial state goes through the host as a checkpoint would
      state = jax.device_get(state)
      state["net"] = parallel.replicate(mesh, state["net"])
  return out, jax.device_get(state["net"])


def test_fixed_network_bfloat16_tracks_float32_and_resume_is_exact(fixed):
  l32, net32 = _train(fixed, "float32")
  l16, net16 = _train(fixed, "bfloat16")
  l16b, net16b = _train(fixed, "bfloat16", stop_after=1)
  print("fixed losses f32", np.round(l32, 4), "bf16", np.round(l16, 4))
  assert max(abs(a - b) / a for a, b in zip(l32, l16)) < LOSS_RTOL, (l32, l16)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(net16)
             if jnp.issubdtype(a.dtype, jnp.floating))
  assert l16 == l16b                           # resumed == unbroken within bfloat16
  for a, b in zip(jax.tree.leaves(net16), jax.tree.leaves(net16b)):
    np.testing.assert_array_equal(a, b)


def test_masked_equals_compact_in_bfloat16(fixed):
  plan, arc, params, stats, _, _ = fixed
  ratios = np.asarray([0.5, 0.3, 0.5, 0.3, 0.5], np.float32)
  masks = jax.device_get(masks_lib.child_masks(plan, params, ratios, "l1"))
  masked = masks_lib.apply_child_masks(plan, params, masks)
  _, cp, cs = compaction.compact(plan, params, stats, masks)
  x = jnp.asarray(_batch(5)[0], jnp.bfloat16)
  run = jax.jit(lambda p, s, train: child.forward(plan, precision.cast(p, jnp.bfloat16), s,
                                                  x, train)[0], static_argnums=2)
  for train in (False, True):
    a = np.asarray(run(masked, stats, train), np.float32)
    b = np.asarray(run(cp, cs, train), np.float32)
    scale = max(1.0, float(np.max(np.abs(a))))
    print(f"train={train}: max|masked - compact| {np.max(np.abs(a - b)):.3g} (scale {scale:.3g})")
    # the same network in bfloat16: removed channels add exact zeros. Eval mode: measured
    # 0; allow one bfloat16 rounding (2^-7 relative). Train mode normalises with batch
    # statistics of 16 images at 2x2 in the last cells, which amplify one-ulp bfloat16
    # differences of differently fused sums (as compaction_test's float32 train-mode bound
    # is 10x its eval bound): measured 0.031 at scale 2.3, allowed 2^-5 relative.
    tol = (2 ** -5 if train else 2 ** -7) * scale
    assert np.max(np.abs(a - b)) <= tol


def test_inference_executors_compute_in_bfloat16():
  """latency honours config.dtype: the fused and per-op executors run the network in
  bfloat16 (weights folded in float32, then cast; XLA's depthwise, the kernel is float32
  only), take float32 images, return float32 logits close to float32's."""
  from fp_jax.infer import fused   # pylint: disable=g-import-not-at-top
  from fp_jax.infer import perop   # pylint: disable=g-import-not-at-top
  arc = space.parse_arc(space.ENAS_ARC)
  plan = child.make_plan(arc, 1, 8, (8, 8, 3), 10)
  params, stats = child.init(jax.random.key(0), plan)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 8, 8, 3)), jnp.float32)
  ref = np.asarray(fused.Fused(plan, params, stats)(x))
  opts = fused.Options(dtype="bfloat16")
  fb = fused.Fused(plan, params, stats, opts)
  got = fb(x)
  assert got.dtype == jnp.float32 and {a.dtype for a in jax.tree.leaves(fb.fp)} == {
      jnp.dtype(jnp.bfloat16)}
  scale = float(np.max(np.abs(ref)))
  assert float(np.max(np.abs(np.asarray(got) - ref))) <= 0.05 * scale
  assert float(np.max(np.abs(np.asarray(got) - ref))) > 0     # it really ran in bfloat16
  po = perop.PerOp(plan, params, stats, dtype="bfloat16")(x)
  assert po.dtype == jnp.float32
  assert float(np.max(np.abs(np.asarray(po) - ref))) <= 0.05 * scale
  assert fused.depthwise_impl("auto", 5, "bfloat16") in ("shift", "xla")
  np.testing.assert_allclose(np.asarray(fb.run_cells(x)), np.asarray(got),
                             atol=0.02 * scale)


def test_matmul_precision_resolution_and_config_copy():
  assert [precision.resolve_matmul_precision("auto", b) for b in ("cpu", "gpu", "tpu")] == [
      "float32", "float32", "bfloat16"]
  assert precision.resolve_matmul_precision("tensorfloat32", "tpu") == "tensorfloat32"
  with pytest.raises(ValueError):
    precision.resolve_matmul_precision("fast", "cpu")
  config = smoke.get_config()
  old = jax.config.jax_default_matmul_precision
  try:
    resolved = precision.set_matmul_precision(config)
    assert (config.matmul_precision, resolved.matmul_precision) == ("auto", "float32")
    assert precision.matmul_precision() == "float32"
  finally:
    jax.config.update("jax_default_matmul_precision", old)
