"""LiteRT and ONNX export round trips through the real runtimes; random-network BN estimation."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp_jax.models import child
from fp_jax.models import space
from fp_jax.infer import export
from fp_jax.infer import fused
from fp_jax.infer import networks
from fp_jax.infer import onnx_export
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
  """(tflite bytes, fused logits on X) of _pruned() at batch BATCH."""
  if "models" not in _CACHE:
    net = _pruned()
    fn = export.network_fn(net.plan, net.params, net.stats)
    tfl = export.to_tflite(fn, X.shape)
    ref = np.asarray(fused.Fused(net.plan, net.params, net.stats)(jnp.asarray(X)))
    _CACHE["models"] = (tfl, ref)
  return _CACHE["models"]


def _close(got, ref, what):
  scale = np.max(np.abs(ref))
  assert got.shape == ref.shape, what
  err = np.max(np.abs(got - ref))
  assert err <= 1e-5 * scale, f"{what}: max |diff| {err:.3g} vs largest |logit| {scale:.3g}"


def _published():
  """The published ENAS arc, unpruned (num_layers 1: reduce, reduce, normal)."""
  arc = space.parse_arc(space.ENAS_ARC)
  plan = child.make_plan(arc, 1, F, (HW, HW, 3), CLASSES)
  params, stats = networks.random_init(plan, 2)
  return networks.Net(plan, arc, params, stats)


def _odd():
  """A random arc pruned, on 9x9 one-channel images: odd sizes at every stride (9, 5, 3)."""
  arc = space.sample_uniform(np.random.default_rng(7))
  plan = child.make_plan(arc, 1, F, (9, 9, 1), CLASSES)
  params, stats = networks.random_init(plan, 4)
  params, stats = networks.prune(plan, params, stats, (0.5, 0.25, 0.5, 0.5, 0.75))
  return networks.Net(plan, arc, params, stats)


@pytest.mark.parametrize("case", ["published", "pruned", "odd"])
def test_onnx_export_equals_fused(case):
  """The ONNX model built from the graph (NCHW, grouped depthwise, BN folded, opset 17, a
  symbolic batch) through ONNX Runtime == the fused network's logits at batch 1 and 3, for
  the published arc, a pruned arc with reduction cells and odd spatial sizes."""
  import onnx  # pylint: disable=g-import-not-at-top
  net = {"published": _published, "pruned": _pruned, "odd": _odd}[case]()
  onx = onnx_export.to_onnx(net.plan, net.params, net.stats)
  model = onnx.load_from_string(onx)
  onnx.checker.check_model(model, full_check=True)
  assert model.opset_import[0].version >= 17
  assert [i.name for i in model.graph.input] == ["images"]
  assert [o.name for o in model.graph.output] == ["logits"]
  h, w = net.plan.image_hw
  dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
  assert dims == ["batch", h, w, net.plan.in_channels]          # NHWC images, any batch
  ops = collections.Counter(n.op_type for n in model.graph.node)
  assert model.graph.node[0].op_type == "Transpose" and ops["Transpose"] == 1   # NCHW after
  assert not ops.keys() - {"Transpose", "Conv", "Relu", "Slice", "Concat", "Add", "AveragePool",
                           "MaxPool", "GlobalAveragePool", "Flatten", "MatMul"}
  seps = sum(n.kind == "sep" for n in net.plan.nodes)
  groups = [a.i for n in model.graph.node if n.op_type == "Conv" for a in n.attribute
            if a.name == "group" and a.i > 1]
  assert len(groups) == 2 * seps and seps > 0                  # every depthwise grouped
  assert all(g % 8 == 0 for g in groups)                       # padded as the fused path
  run = runtimes.OnnxRuntime(onx, threads=1)
  fu = fused.Fused(net.plan, net.params, net.stats)
  x = np.random.default_rng(3).standard_normal((3, h, w, net.plan.in_channels)).astype(
      np.float32)
  for b in (1, 3):
    _close(run(x[:b]), np.asarray(fu(jnp.asarray(x[:b]))), f"{case}, batch {b}")


def test_onnx_export_unpadded_widths():
  """pad_channels=1 keeps the pruned widths (not multiples of 8) and the same logits."""
  net = _pruned()
  onx = onnx_export.to_onnx(net.plan, net.params, net.stats, pad_channels=1)
  import onnx  # pylint: disable=g-import-not-at-top
  groups = [a.i for n in onnx.load_from_string(onx).graph.node if n.op_type == "Conv"
            for a in n.attribute if a.name == "group" and a.i > 1]
  assert any(g % 8 for g in groups), groups
  ref = np.asarray(fused.Fused(net.plan, net.params, net.stats)(jnp.asarray(X)))
  _close(runtimes.OnnxRuntime(onx, threads=1)(X), ref, "unpadded")


def test_onnx_same_pads_match_tensorflow():
  """SAME pads: stride 1 symmetric, stride 2 the extra row/column at the end."""
  assert onnx_export.same_pads((8, 8), 3, 1) == [1, 1, 1, 1]
  assert onnx_export.same_pads((8, 8), 3, 2) == [0, 0, 1, 1]
  assert onnx_export.same_pads((7, 8), 5, 2) == [2, 1, 2, 2]
  assert onnx_export.same_pads((9, 9), 3, 2) == [1, 1, 1, 1]


def test_litert_roundtrip(tmp_path):
  """The LiteRT flatbuffer through ai_edge_litert's interpreter == fused logits."""
  tfl, ref = _models(tmp_path)
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
    runtimes.OnnxRuntime(b"", threads=1)
