"""Cross-platform lowering without a device (fp_jax/run/lowering.py): the program's compiled
functions export for cuda and tpu from this CPU host, with neither CPU custom calls nor host
callbacks, and the census counts a hand-built module exactly."""
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from fp_jax.infer import kernels
from fp_jax.models import child
from fp_jax.models import layers
from fp_jax.models import space
from fp_jax.run import lowering
from fp_jax.run import parallel
from tests import tiny

IMAGE, CLASSES = (8, 8, 1), 10          # the smoke config's digits
_CACHE = {}


def _config():
  config = tiny.tiny_config()
  config.final.num_layers = 0           # 2 cells: quick to trace
  config.final.out_filters = 4
  return config


def _exports(platform):
  """{name: (Exported, allow)} of lowering.functions for `platform` (cached)."""
  if platform not in _CACHE:
    mesh = parallel.make_mesh()
    fns = lowering.functions(_config(), IMAGE, CLASSES, mesh, platform)
    _CACHE[platform] = {name: (lowering.lower(fn, args, platform, allow), allow)
                        for name, (fn, args, allow) in fns.items()}
  return _CACHE[platform]


def _cpu_target(target):
  fp_jax_cpu = (kernels.TARGET, *kernels.TRAIN_TARGETS)
  return target in fp_jax_cpu or "cpu" in target.lower() or target.startswith(
      ("lapack_", "ducc_"))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_program_exports_for_accelerators(platform):
  exports = _exports(platform)
  assert tuple(exports) == lowering.FUNCTIONS
  n = jax.device_count()
  for name, (exported, allow) in exports.items():
    assert allow == ()
    assert exported.platforms == (platform,), name
    assert exported.nr_devices == (1 if name == "fused_network" else n), name
    c = lowering.census(exported)
    assert c["host_callbacks"] == 0, name
    assert not [t for t in c["custom_calls"] if _cpu_target(t)], (name, c["custom_calls"])
    assert c["unknown_trips"] == 0, name
  step, evaluate, fixed = (lowering.census(exports[k][0]) for k in lowering.FUNCTIONS[:3])
  # search.dispatch 'auto': branch-free 'select' slots for cuda; for tpu a lax.switch per
  # operand of each of a cell's 5 nodes, per cell (2), forward and backward (the step) /
  # forward only, unmasked and masked (the reward evaluation): 2 x 10 x 2
  assert step["conditionals"] == evaluate["conditionals"] == (0 if platform == "cuda" else 40)
  assert fixed["conditionals"] == 0          # the fixed network's arc is static
  assert min(step["collectives"], evaluate["collectives"], fixed["collectives"]) > 0


@pytest.mark.parametrize("platform,dispatch,conditionals", [("cuda", "switch", 40),
                                                             ("tpu", "select", 0)])
def test_an_explicit_dispatch_holds_on_any_platform(platform, dispatch, conditionals):
  config = _config()
  config.search.dispatch = dispatch
  fn, args, allow = lowering.functions(config, IMAGE, CLASSES, parallel.make_mesh(),
                                       platform)["supernet_step"]
  assert lowering.census(lowering.lower(fn, args, platform, allow))["conditionals"] == \
      conditionals


def _grouped_convs(exported):
  return len(re.findall(r"feature_group_count = (?!1 )\d+", exported.mlir_module()))


def test_depthwise_follows_the_platform():
  """Off CPU the depthwise convolutions are grouped convolutions; on CPU fp_jax's FFI
  kernels (the steps' training pair, the fused network's depthwise), which export refuses
  unless allowed. DEPTHWISE_IMPL and SEP_IMPL are restored after tracing."""
  cuda = _exports("cuda")
  config = _config()
  plan = child.make_plan(space.parse_arc(space.ENAS_ARC), config.final.num_layers,
                         config.final.out_filters, IMAGE, CLASSES)
  depthwise = 2 * sum(n.kind == "sep" for n in plan.nodes)       # two per sep conv
  assert _grouped_convs(cuda["fused_network"][0]) == depthwise
  assert _grouped_convs(cuda["reward_eval"][0]) > 0
  assert layers.DEPTHWISE_IMPL == "auto"
  fns = lowering.functions(config, IMAGE, CLASSES, parallel.make_mesh(), "cpu")
  fn, args, allow = fns["reward_eval"]
  evaluate = lowering.lower(fn, args, "cpu", allow)
  assert _grouped_convs(evaluate) == 0
  # on cpu the sep convs' ReLU -> depthwise -> pointwise run fp_jax's training kernel
  assert allow == (kernels.TRAIN_TARGETS if kernels.available() else ())
  if allow:
    assert lowering.census(evaluate)["custom_calls"].get(kernels.SEP_TARGETS["fwd"], 0) > 0
  assert layers.SEP_IMPL == "auto"
  fn, args, allow = fns["fused_network"]
  if not kernels.available():
    assert allow == ()
    pytest.skip("fp_jax's CPU kernel is not available here")
  assert allow == (kernels.TARGET,)
  c = lowering.census(lowering.lower(fn, args, "cpu", allow))
  assert c["custom_calls"] == {kernels.TARGET: depthwise}
  with pytest.raises(ValueError, match=kernels.TARGET):
    lowering.lower(fn, args, "cpu")
  with pytest.raises(ValueError, match="CPU-only"):
    lowering.fused_options(lowering.fused.Options(depthwise="kernel"), "cuda")


def _pmeans(n, v):                       # a loop of n pmeans
  return jax.lax.fori_loop(0, n, lambda i, u: u + jax.lax.pmean(u, parallel.AXIS), v)


@jax.jit
def _helper(v):                          # one private function, two call sites
  return jax.lax.switch(jnp.int32(v.sum() > 0), [lambda: _pmeans(2, v), lambda: -v,
                                                 lambda: 2 * v])


def _body(c, _):
  c = jax.lax.cond(c.sum() > 0, lambda: 2 * c, lambda: c - 1)
  return _pmeans(3, c), None


def _hand_built(w, x):
  y, _ = jax.lax.scan(_body, x * w, None, length=7)
  y = jax.lax.while_loop(lambda v: v.sum() < 100, lambda v: 2 * v, _helper(_helper(y)))
  return jax.lax.psum(y, parallel.AXIS)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_census_counts_exactly(platform):
  fn = parallel.data_parallel(_hand_built, parallel.make_mesh(), (P(), P(parallel.AXIS)),
                              P(parallel.AXIS))
  args = (jax.ShapeDtypeStruct((4,), jnp.float32), jax.ShapeDtypeStruct((8, 4), jnp.float32))
  exported = lowering.lower(fn, args, platform)
  per_call = lowering.census(exported)
  static = lowering.census(exported, per_call=False)
  # per call: 7 scan iterations x (1 cond, 1 loop of 3 pmeans) + 2 helper switches, each
  # running at most a loop of 2 pmeans; loops: the scan, 7 + 2 fori_loops, the while_loop
  # (its trip count unknown); the final psum
  assert {k: per_call[k] for k in ("conditionals", "whiles", "collectives", "unknown_trips",
                                   "custom_calls", "host_callbacks")} == {
      "conditionals": 9, "whiles": 11, "collectives": 26, "unknown_trips": 1,
      "custom_calls": {}, "host_callbacks": 0}
  assert {k: static[k] for k in ("conditionals", "whiles", "collectives")} == {
      "conditionals": 2, "whiles": 4, "collectives": 3}
  assert per_call["ops"] > static["ops"] > 0


def test_census_counts_host_callbacks():
  cb = lambda x: jax.pure_callback(lambda a: a, jax.ShapeDtypeStruct((4,), jnp.float32), x)
  text = jax.jit(lambda x: cb(cb(x)) + 1).lower(jnp.zeros(4)).as_text()
  c = lowering.census(text)
  assert c["host_callbacks"] == 2
  assert c["custom_calls"] == {"xla_ffi_python_cpu_callback": 2}
  with pytest.raises(NotImplementedError):      # export refuses host callbacks outright
    lowering.lower(jax.jit(cb), (jnp.zeros(4),), "cpu")


def test_matmul_precision_follows_the_platform():
  """config.matmul_precision 'auto': float32 (HIGHEST) dots for cpu and cuda, TPU's default
  single bfloat16 pass for tpu (precision.AUTO_MATMUL)."""
  f = jax.jit(lambda a, b: a @ b)
  args = (jax.ShapeDtypeStruct((4, 8), jnp.float32), jax.ShapeDtypeStruct((8, 2), jnp.float32))
  found = {p: re.findall(r"precision = \[([A-Z, ]*)\]", lowering.lower(f, args, p).mlir_module())
           for p in ("cpu", "cuda", "tpu")}
  assert found == {"cpu": ["HIGHEST, HIGHEST"], "cuda": ["HIGHEST, HIGHEST"], "tpu": []}
