"""Tests for fp_jax.infer: per-op and fused executors, BN folding, im2col, breakdown, export."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp_jax.models import child
from fp_jax.models import flops
from fp_jax.models import graph
from fp_jax.models import layers
from fp_jax.models import space
from fp_jax.infer import batching
from fp_jax.infer import export
from fp_jax.infer import folding
from fp_jax.infer import fused
from fp_jax.infer import latency
from fp_jax.infer import networks
from fp_jax.infer import padding
from fp_jax.infer import perop

F, HW, CLASSES = 4, 8, 10
X = jax.random.normal(jax.random.PRNGKey(1), (3, HW, HW, 3))
OPS = perop.Ops()           # shared compile cache: nets of equal widths reuse primitives
_CACHE = {}

# name -> (arc, num_layers, ratios or None (unpruned)); num_layers 1: cells reduce, reduce,
# normal (stride-2 factorized calibrations); 0: two reduction cells (stride 4 too)
CASES = {
    "enas_pruned": (space.parse_arc(space.ENAS_ARC), 1, (0.5, 0.25, 0.5, 0.5, 0.75)),
    "uniform3": (space.sample_uniform(np.random.default_rng(3)), 1, None),
    "uniform4_pruned": (space.sample_uniform(np.random.default_rng(4)), 2,
                        (0.25, 0.5, 0.75, 0.5, 0.25)),
    "tiny": (space.parse_arc(space.ENAS_ARC), 0, (0.5, 0.5, 0.5, 0.5, 0.5)),
}


def _net(name):
  """(plan, params, stats): random weights, random BN stats, maybe compacted."""
  if name not in _CACHE:
    arc, num_layers, ratios = CASES[name]
    plan = child.make_plan(arc, num_layers, F, (HW, HW, 3), CLASSES)
    params, stats = networks.random_init(plan, len(name))
    if ratios is not None:
      params, stats = networks.prune(plan, params, stats, ratios)
    _CACHE[name] = (plan, params, stats)
  return _CACHE[name]


def _executors(name):
  """(PerOp, Fused) of a case, shared by the tests (compiled pieces are reused)."""
  if ("exec", name) not in _CACHE:
    _CACHE["exec", name] = (perop.PerOp(*_net(name), ops=OPS), fused.Fused(*_net(name)))
  return _CACHE["exec", name]


def _reference(name):
  """child.forward eval logits on X (cached)."""
  if ("ref", name) not in _CACHE:
    plan, params, stats = _net(name)
    fn = jax.jit(lambda p, s, x: child.forward(plan, p, s, x, False, with_aux=False)[0])
    _CACHE["ref", name] = np.asarray(fn(params, stats, X))
  return _CACHE["ref", name]


def _close(a, b, ref, label):
  tol = 1e-5 * max(1.0, float(np.max(np.abs(ref))))
  diff = float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
  print(f"{label}: max diff {diff:.3g} (tol {tol:.3g})")
  assert diff <= tol, (label, diff, tol)


@pytest.mark.parametrize("name", ["enas_pruned", "uniform3", "uniform4_pruned"])
def test_fused_equals_perop_equals_child(name):
  plan = _net(name)[0]
  kinds = {n.kind for n in plan.nodes}
  assert any(s.reduce for s in plan.cells) and "fr" in kinds and "sep" in kinds
  if name == "enas_pruned":      # strided sep_convs and pools in the reduction cells
    assert {n.kind for n in plan.nodes if n.stride == 2} >= {"sep", "avg", "max", "fr"}
  ref = _reference(name)
  po, fu = _executors(name)
  _close(po(X), ref, ref, f"{name} per-op vs child")
  _close(fu(X), ref, ref, f"{name} fused vs child")
  _close(fu(X), po(X), ref, f"{name} fused vs per-op")
  if name == "enas_pruned":
    _close(fu.run_cells(X), ref, ref, f"{name} fused cells vs child")


def test_fused_options_and_compact_widths():
  """im2col + grouped-conv depthwise give the same logits; compact nets are smaller."""
  plan, params, stats = _net("enas_pruned")
  assert params["blocks"]["stem"]["conv"].shape[-1] < plan.stem_channels
  assert params["fc"]["w"].shape[0] < plan.cells[-1].out_channels
  ref = _reference("enas_pruned")
  opts = fused.Options(im2col=True, depthwise="xla", engine="xla")
  _close(fused.Fused(plan, params, stats, opts)(X), ref, ref, str(opts))
  with pytest.raises(ValueError, match="depthwise"):
    fused.Fused(plan, params, stats, fused.Options(depthwise="fast"))


@pytest.mark.parametrize("multiple", [1, 3, 8])
def test_channel_padding_keeps_logits(multiple):
  """Every channel group padded to the multiple (odd compact widths, factorized
  reductions, reduction cells) with zeros; logits unchanged."""
  plan, params, stats = _net("uniform4_pruned")
  ref = _reference("uniform4_pruned")
  padded, _ = padding.pad_channels(plan, params, stats, multiple)
  plain_w = flops.widths_of_params(plan, params)
  pad_w = flops.widths_of_params(plan, padded)
  if multiple > 1:
    assert any(w % multiple for w in plain_w["values"][1:])            # something to pad
  for j, n in enumerate(plan.nodes):
    if n.kind in ("conv", "fr", "sep"):
      assert pad_w["values"][j] % multiple == 0, (n.name, pad_w["values"][j])
      assert pad_w["values"][j] - plain_w["values"][j] < multiple
  for name, w in pad_w["inner"].items():
    assert w % multiple == 0
  # the original weights, then zeros
  for name, blk in padded["blocks"].items():
    for k, w in blk.items():
      if k.startswith(("conv", "pw", "dw")):
        orig = np.asarray(params["blocks"][name][k])
        w = np.asarray(w)
        assert np.sum(np.abs(w)) == pytest.approx(np.sum(np.abs(orig)), rel=1e-6)
  opts = fused.Options(pad_channels=multiple, engine="xla")
  _close(fused.Fused(plan, params, stats, opts)(X), ref, ref, f"pad {multiple}")
  with pytest.raises(ValueError, match="pad_channels"):
    fused.Fused(plan, params, stats, fused.Options(pad_channels=0))


def test_padding_concat_layout():
  """A concat of padded parts is padded after each part (blocked layout)."""
  plan, params, stats = _net("uniform4_pruned")
  lay = padding.layouts(plan, params, 8)
  for j, n in enumerate(plan.nodes):
    if n.kind == "concat":
      off, parts = 0, []
      for i in n.inputs:
        parts.append(np.where(lay["values"][i] >= 0, lay["values"][i] + off, -1))
        off += flops.widths_of_params(plan, params)["values"][i]
      np.testing.assert_array_equal(lay["values"][j], np.concatenate(parts))


def test_depthwise_shared_padding():
  """A depthwise padded by MAX_PAD (its taps offset) equals the k // 2 one."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((2, 6, 5, 3)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 1, 3)), jnp.float32)
  for impl in ("shift", "flat"):
    np.testing.assert_allclose(fused.depthwise(x, w, impl, pad=fused.MAX_PAD),
                               fused.depthwise(x, w, impl), rtol=1e-6, atol=1e-6)


def test_dot_library_compiler_options():
  """dots=auto|xla: XLA:CPU's own dots (no YNNPACK fusion) on the calling thread (Eigen's
  pool off), per compilation, in the fused and per-op paths alike; ynn: XLA's defaults."""
  plan, params, stats = _net("tiny")
  assert jax.default_backend() == "cpu"
  hlo = {d: fused.Fused(plan, params, stats, fused.Options(dots=d, engine="xla")).network(
      X[:1]).as_text()
         for d in ("auto", "ynn")}
  assert "ynn_fusion" not in hlo["auto"] and "ynn_fusion" in hlo["ynn"]
  assert fused.compiler_options(fused.Options(dots="ynn")) is None
  assert fused.compiler_options(fused.Options()) == fused.compiler_options(
      fused.Options(dots="xla")) == {"xla_cpu_experimental_ynn_fusion_type": "",
                                     "xla_cpu_multi_thread_eigen": False}
  ops = perop.Ops(fused.compiler_options(fused.Options()))
  ops("dense", X[:1, 0, 0], jnp.ones((3, 4)))
  assert all("ynn_fusion" not in c.as_text() for c in ops.cache.values())
  with pytest.raises(ValueError, match="dots"):
    fused.Fused(plan, params, stats, fused.Options(dots="mkl"))


def test_chunked_runs_equal_zero_padded_chunks():
  """B images in ceil(B / size) equal chunks, the last zero-padded, the padding dropped."""
  whole = lambda c: jnp.broadcast_to(jnp.sum(c, 0, keepdims=True), c.shape) + 100 * c.shape[0]
  x = jnp.arange(10.0)[:, None]
  np.testing.assert_array_equal(batching.chunked(whole, x, 4)[:, 0],   # [0..3] [4..7] [8, 9, 0, 0]
                                [406.0] * 4 + [422.0] * 4 + [417.0] * 2)
  np.testing.assert_array_equal(batching.chunked(whole, x[:9], 4)[:, 0],   # three chunks of 3
                                [303.0] * 3 + [312.0] * 3 + [321.0] * 3)
  for size in (None, 10, 64):
    np.testing.assert_array_equal(batching.chunked(whole, x, size)[:, 0], [1045.0] * 10)


def test_micro_batches_give_the_whole_batchs_logits():
  """A batch above micro_batch is one computation looping over chunks: the same logits as
  the whole batch at once; auto (0) sizes chunks to CHUNK_BYTES_CPU on CPU only."""
  plan, params, stats = _net("enas_pruned")
  x = jnp.concatenate([X, jax.random.normal(jax.random.PRNGKey(5), (4, HW, HW, 3))])
  ref = _reference("enas_pruned")
  whole = fused.Fused(plan, params, stats, fused.Options(micro_batch=-1, engine="xla"))
  assert whole.micro_batch is None and "while" not in whole.network(x).as_text()
  want = np.asarray(whole(x))
  _close(want[:3], ref, ref, "whole batch of 7 vs child.forward on 3")
  for mb in (1, 3):
    f = fused.Fused(plan, params, stats, fused.Options(micro_batch=mb, engine="xla"))
    assert "while" in f.network(x).as_text()
    _close(f(x), want, ref, f"micro_batch={mb} vs the whole batch")
  size = batching.largest_activation_bytes(plan)
  assert size == max(n.hw[0] * n.hw[1] * n.channels for n in plan.nodes) * 4
  assert fused.Fused(plan, params, stats).micro_batch == batching.CHUNK_BYTES_CPU // size
  assert batching.current_platform() == "cpu"
  with jax.default_device(jax.devices("cpu")[0]):
    assert batching.current_platform() == "cpu"
  enas = child.make_plan(space.parse_arc(space.ENAS_ARC), 15, 36, (32, 32, 3), 10)
  assert batching.largest_activation_bytes(enas) == 32 * 32 * 180 * 4     # a cell's 5-node concat
  assert batching.micro_batch_size(0, batching.largest_activation_bytes(enas), "cpu") == 8
  assert batching.micro_batch_size(0, 1000, "gpu") is None
  assert batching.micro_batch_size(0, 10 ** 9, "cpu") == 1
  assert batching.micro_batch_size(5, 1000, "tpu") == 5
  with pytest.raises(ValueError, match="micro_batch"):
    fused.Fused(plan, params, stats, fused.Options(micro_batch=-2))


def test_perop_runs_each_primitive_separately():
  plan = _net("enas_pruned")[0]
  po = _executors("enas_pruned")[0]
  jax.block_until_ready(po(X))
  compiled, calls = len(OPS.cache), OPS.calls
  jax.block_until_ready(po(X))
  assert len(OPS.cache) == compiled                       # cached: no recompiles
  assert OPS.calls - calls > 10 * len(plan.cells)         # one dispatch per primitive
  assert {k[0] for k in OPS.cache} >= {"relu", "conv", "bn", "depthwise", "add", "concat",
                                       "subsample", "shift", "global_pool", "dense"}
  assert OPS.memory_bytes() > 0


def _bn(rng, c):
  p = {"scale": jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32),
       "bias": jnp.asarray(rng.normal(0, 0.3, c), jnp.float32)}
  s = {"mean": jnp.asarray(rng.normal(0, 0.3, c), jnp.float32),
       "var": jnp.asarray(rng.uniform(0.2, 2.0, c), jnp.float32)}
  return p, s


@pytest.mark.parametrize("k,stride", [(3, 1), (1, 1), (3, 2), (1, 2)])
def test_bn_folding_exact(k, stride):
  rng = np.random.default_rng(k + 10 * stride)
  x = jnp.asarray(rng.standard_normal((2, 7, 7, 5)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, 5, 6)), jnp.float32)
  bp, bs = _bn(rng, 6)
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  ref = layers.batch_norm(bp, bs, conv(x, w), False)[0]
  wf, bf = folding.fold_bn(w, bp, bs)
  for im2col in (False, True):
    got = fused.conv(x, jnp.asarray(wf), jnp.asarray(bf), stride=stride, use_im2col=im2col)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_folded_blocks_equal_layers():
  """Factorized reduce (BN split over both halves, one half empty too) and sep_conv."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 6)), jnp.float32)
  for h in (3, 0):   # conv1 outputs h channels of 5
    p = {"conv1": jnp.asarray(rng.standard_normal((1, 1, 6, h)), jnp.float32),
         "conv2": jnp.asarray(rng.standard_normal((1, 1, 6, 5 - h)), jnp.float32)}
    p["bn"], s = _bn(rng, 5)
    node = graph.Node("fr", "fr", (0,), 5, (4, 4), stride=2, relu=True)
    ref = layers.factorized_reduce(p, {"bn": s}, x, 2, False)[0]
    got = fused.producer(folding._fold_producer(p, {"bn": s}), node, x)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  p, s = jax.tree.map(np.asarray, layers.sep_conv_init(jax.random.PRNGKey(0), 5, 6))
  (p["bn1"], s["bn1"]), (p["bn2"], s["bn2"]) = _bn(rng, 6), _bn(rng, 6)
  for stride in (1, 2):
    ref = layers.sep_conv(p, s, x, False, stride=stride)[0]
    for impl in ("shift", "flat", "xla"):
      got = fused.sep_conv(folding._fold_sep(p, s), x, stride, fused.Options(depthwise=impl))
      np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("size,k", [(8, 3), (7, 3), (8, 5), (7, 5), (5, 5)])
def test_strided_ops_equal_xla(size, k):
  """Stride-2 depthwise and pools as the stride-1 op subsampled at TF's SAME offset equal
  XLA's strided ops (TF padding: more on the bottom/right)."""
  rng = np.random.default_rng(size + k)
  x = jnp.asarray(rng.standard_normal((2, size, size + 1, 3)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, 1, 3)), jnp.float32)
  ref = jax.lax.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO",
                                     "NHWC"), feature_group_count=3)
  old, layers.DEPTHWISE_IMPL = layers.DEPTHWISE_IMPL, "shift"
  try:
    np.testing.assert_allclose(layers.depthwise_conv(x, w, 2), ref, rtol=1e-5, atol=1e-5)
  finally:
    layers.DEPTHWISE_IMPL = old
  pad = ((0, 0),) + tuple(_tf_same(n, 3, 2) for n in x.shape[1:3]) + ((0, 0),)
  mx = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), pad)
  np.testing.assert_allclose(layers.max_pool3x3(x, 2), mx, rtol=1e-6)
  np.testing.assert_allclose(fused.pool("max", x, 2), mx, rtol=1e-6)
  tot = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 2, 2, 1), pad)
  cnt = jax.lax.reduce_window(jnp.ones_like(x), 0.0, jax.lax.add, (1, 3, 3, 1), (1, 2, 2, 1),
                              pad)
  np.testing.assert_allclose(layers.avg_pool3x3(x, 2), tot / cnt, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(fused.pool("avg", x, 2), tot / cnt, rtol=1e-5, atol=1e-6)


def _tf_same(n, k, s):
  out = -(-n // s)
  total = max((out - 1) * s + k - n, 0)
  return (total // 2, total - total // 2)


@pytest.mark.parametrize("k,stride,padding,size", [
    (3, 1, "SAME", 8), (3, 2, "SAME", 7), (5, 1, "SAME", 8), (1, 2, "SAME", 7),
    (3, 1, "VALID", 7), (2, 3, "VALID", 8), (4, 2, "SAME", 9)])
def test_im2col_equals_xla_conv(k, stride, padding, size):
  rng = np.random.default_rng(k * 7 + stride)
  x = jnp.asarray(rng.standard_normal((2, size, size + 1, 3)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, 3, 4)), jnp.float32)
  ref = jax.lax.conv_general_dilated(x, w, (stride, stride), padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  patches = fused.im2col(x, k, stride, padding)
  assert patches.shape == ref.shape[:3] + (k * k * 3,)
  got = jnp.dot(patches, w.reshape(-1, 4))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  if k > 1:
    np.testing.assert_allclose(fused.conv(x, w, None, stride, padding, use_im2col=True), ref,
                               rtol=1e-5, atol=1e-5)


def test_breakdown_parts_sum_to_total():
  po, fu = _executors("enas_pruned")
  got = latency.breakdown(po, fu, X[:1], reps=60)   # many reps: sub-ms timings on a busy CPU
  stem = got["stem_conv"]
  assert set(stem["perop_ms"]) == {"conv", "bn", "total"} and set(stem["fused_ms"]) == {"total"}
  assert stem["parts_sum_ms"]["perop"] == pytest.approx(stem["synced_total_ms"]["perop"],
                                                        rel=0.15)
  layer = got["layer_0"]
  for path in latency.PATHS:
    ms = layer[f"{path}_ms"]
    assert set(ms) == set(latency.CELL_PARTS) | {"total"}
    assert all(v >= 0 for v in ms.values())
    assert ms["calib_x"] > 0 and ms["layer_base"] > 0 and ms["ops_x"] + ms["ops_y"] > 0
    assert ms["total"] > 0
    assert sum(ms[p] for p in latency.CELL_PARTS) == pytest.approx(layer["parts_sum_ms"][path])
    assert layer["parts_sum_ms"][path] == pytest.approx(layer["synced_total_ms"][path], rel=0.15)


def test_export_stablehlo_roundtrip(tmp_path):
  plan, params, stats = _net("tiny")
  ref = _reference("tiny")
  path = str(tmp_path / "net.stablehlo")
  exported = export.export_stablehlo(path, plan, params, stats, (HW, HW, 3))
  assert "stablehlo" in exported.mlir_module()
  assert str(exported.in_avals[0].shape[0]) == "b"              # any batch size
  _close(export.load_stablehlo(path)(X), ref, ref, "stablehlo")


def test_export_savedmodel_roundtrip(tmp_path):
  pytest.importorskip("tensorflow")
  plan, params, stats = _net("tiny")
  ref = _reference("tiny")
  directory = str(tmp_path / "saved")
  export.export_savedmodel(directory, plan, params, stats, (HW, HW, 3))
  _close(export.load_savedmodel(directory)(np.asarray(X)), ref, ref, "savedmodel")
