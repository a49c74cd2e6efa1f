"""LiteRT and ONNX export round trips through the real runtimes; random-network BN estimation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp_jax.models import child
from fp_jax.models import space
from fp_jax.infer import export
from fp_jax.infer import fused
from fp_jax.infer import networks
from fp_jax.infer import runtimes

F, HW, CLASSES, BATCH = 4, 8, 10, 2
X = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (BATCH, HW, HW, 3)), np.float32)
_CACHE = {}


def _pruned():
  """A compact pruned ENAS net with reduction cells (num_layers 1: reduce, reduce,
  normal; stride-2 factorized calibrations), BN statistics estimated."""
  if "net" not in _CACHE:
    arc = space.parse_arc(space.ENAS_ARC)
    plan = child.make_plan(arc, 1, F, (HW, HW, 3), CLASSES)
    params, stats = networks.random_init(plan, 0)
    params, stats = networks.prune(plan, params, stats, (0.5, 0.25, 0.5, 0.5, 0.75))
    stats = networks.estimate_bn(plan, params, stats, 0, batch=8)
    _CACHE["net"] = networks.Net(plan, arc, params, stats)
  return _CACHE["net"]


def _models(tmp_path):
  """(tflite bytes, onnx bytes, fused logits on X) of _pruned() at batch BATCH."""
  if "models" not in _CACHE:
    net = _pruned()
    fn = export.network_fn(net.plan, net.params, net.stats)
    tfl, onx = export.export_runtimes(str(tmp_path), "pruned", fn, X.shape)
    assert (tmp_path / "pruned.tflite").read_bytes() == tfl
    assert (tmp_path / "pruned.onnx").read_bytes() == onx
    ref = np.asarray(fused.Fused(net.plan, net.params, net.stats)(jnp.asarray(X)))
    _CACHE["models"] = (tfl, onx, ref)
  return _CACHE["models"]


def _close(got, ref, what):
  scale = np.max(np.abs(ref))
  assert got.shape == ref.shape == (BATCH, CLASSES), what
  err = np.max(np.abs(got - ref))
  assert err <= 1e-5 * scale, f"{what}: max |diff| {err:.3g} vs largest |logit| {scale:.3g}"


def test_onnx_roundtrip(tmp_path):
  """ONNX (tf2onnx from the LiteRT model) through onnxruntime == fused logits."""
  import onnx  # pylint: disable=g-import-not-at-top
  _, onx, ref = _models(tmp_path)
  model = onnx.load_from_string(onx)
  onnx.checker.check_model(model)
  assert [i.name for i in model.graph.input] == ["images"]
  assert [o.name for o in model.graph.output] == ["logits"]
  dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
  assert dims == list(X.shape)
  # depthwise convolutions stay grouped convolutions (export.RUNTIME_OPTS)
  groups = [a.i for n in model.graph.node if n.op_type == "Conv" for a in n.attribute
            if a.name == "group"]
  assert any(g > 1 for g in groups), groups
  _close(runtimes.OnnxRuntime({BATCH: onx}, threads=1)(X), ref, "onnxruntime")


def test_litert_roundtrip(tmp_path):
  """The LiteRT flatbuffer through ai_edge_litert's interpreter == fused logits."""
  tfl, _, ref = _models(tmp_path)
  run = runtimes.LiteRT({BATCH: tfl}, threads=1)
  _close(run(X), ref, "litert")
  _close(run(X[::-1].copy())[::-1], ref, "litert, reversed batch")     # state is not reused
  with pytest.raises(ValueError, match="no model for batch 1"):
    run(X[:1])


def test_estimate_bn_makes_eval_equal_train():
  """With estimated statistics the eval-mode network reproduces the train-mode one on
  the estimation batch (so activations are O(1)); aux statistics are untouched."""
  arc = space.parse_arc(space.ENAS_ARC)
  plan = child.make_plan(arc, 1, F, (HW, HW, 3), CLASSES)
  params, stats = networks.random_init(plan, 3)
  est = networks.estimate_bn(plan, params, stats, seed=5, batch=4)
  assert jax.tree.structure(est) == jax.tree.structure(stats)
  for a, b in zip(jax.tree.leaves(est["aux"]), jax.tree.leaves(stats["aux"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  x = np.random.default_rng(5).standard_normal((4, HW, HW, 3)).astype(np.float32)
  fwd = jax.jit(lambda s, train: child.forward(plan, params, s, x, train,
                                               with_aux=False)[0], static_argnums=1)
  train, evald = np.asarray(fwd(stats, True)), np.asarray(fwd(est, False))
  assert np.max(np.abs(evald - train)) <= 1e-4 * np.max(np.abs(train))
  assert not np.allclose(np.asarray(fwd(stats, False)), train, rtol=1e-2)   # random stats differ
  variances = [v for p, v in jax.tree_util.tree_leaves_with_path(est)
               if jax.tree_util.keystr(p).endswith("['var']")]
  assert variances and all(float(jnp.min(v)) >= 0 for v in variances)


def test_use_cores_range():
  n = len(runtimes.usable_cores())
  assert runtimes.use_cores(0) == n
  with pytest.raises(ValueError, match=f"threads={n + 1}: must be in 0..{n}"):
    runtimes.use_cores(n + 1)


def test_missing_runtime_is_a_run_error(monkeypatch):
  """A runtime that is not installed stops the run with one clear error (no skipping)."""
  from fp_jax.run import errors  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)
  with pytest.raises(errors.RunError, match="onnxruntime is not installed"):
    runtimes.OnnxRuntime({1: b""}, threads=1)
