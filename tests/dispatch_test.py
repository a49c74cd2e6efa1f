"""config.search.dispatch: the supernet's branch-free 'select' slots equal lax.switch's on CPU
(forward, aux head, every parameter's gradient, the reward's masked forward) and hold no
conditional; 'auto' resolves per platform; a bad value is one ConfigError.

Tolerances: XLA compiles the branch-free program with other fusions than the conditionals'
branches, so float32 sums (BN statistics, 1x1 convs) round in another order (the
zero-padded taps themselves add exact zeros: test_padded_kernel_equals_the_3x3_one). The
bound, |select - switch| <= 1e-4 |switch| + 1e-5 max|switch over the tree| (a gradient
leaf whose true value is 0, e.g. a BN offset that the next BN cancels, holds rounding
noise only: hence the tree-wide term), was met with 5x margin on these arcs (largest
ratio 0.21, gradients; 0.15 logits, 0.04 masked logits); a misaligned padded kernel,
a wrong weight set or a leaked branch costs differences of order 1e-2..1.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from fp_jax import config as config_lib
from fp_jax import data
from fp_jax.models import slot_ops
from fp_jax.models import layers
from fp_jax.models import space
from fp_jax.models import supernet
from fp_jax.pruning import groups as groups_lib
from fp_jax.pruning import masks as masks_lib
from fp_jax.run import lowering
from fp_jax.run import parallel
from fp_jax.train import losses as loss_lib
from fp_jax.train import search
from fp_jax.train import search_steps
from tests.tiny import tiny_config

# 3 layers: 5 cells (normal, reduce, normal, reduce, normal), two scanned runs of two cells,
# as configs/fashion.py's search; F 4, 8x8 images, batch 8
PLAN = supernet.make_plan(3, 4, (8, 8, 1), 10)
BATCH = 8
RATIOS = np.asarray([0.5, 0.25, 0.5, 0.75, 0.25], np.float32)
DISPATCH = ("switch", "select")


def _covering_arcs():
  """6 arcs in which every node slot of both cells runs every op and reads every input it
  may (node k: inputs 0..k+1), then 2 uniform draws."""
  arcs = []
  for j in range(6):
    arc = [v for c in range(2) for k in range(space.NUM_NODES) for s in range(2)
           for v in ((j + s + c) % (k + 2), (j + k + 2 * s + 3 * c) % space.NUM_OPS)]
    arcs.append(space.validate_arc(np.asarray(arc)))
  rng = np.random.default_rng(3)
  return arcs + [space.sample_uniform(rng) for _ in range(2)]


ARCS = _covering_arcs()


def test_the_arcs_cover_every_op_and_input_of_every_slot():
  for c in range(2):
    idx, op = zip(*[supernet.slots(a[c * space.CELL_LEN:(c + 1) * space.CELL_LEN]) for a in ARCS])
    idx, op = np.stack(idx), np.stack(op)                  # [arcs, 5, 2]
    for k in range(space.NUM_NODES):
      for s in range(2):
        assert set(op[:, k, s]) == set(range(space.NUM_OPS))
        assert set(idx[:, k, s]) == set(range(k + 2))


@pytest.fixture(scope="module")
def setup():
  """(params (one weight set per input), x, y, {dispatch: jitted (params, arc) -> ((loss,
  (logits, aux)), grads)})."""
  params = supernet.init(jax.random.key(0), PLAN, share_inputs=False)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((BATCH, 8, 8, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, BATCH), jnp.int32)

  def loss(p, arc, dispatch):
    logits, aux = supernet.forward(PLAN, p, arc, x, reg={"key": jax.random.key(1),
                                                          "keep_prob": 0.9},
                                   dispatch=dispatch)
    return loss_lib.classification_loss(logits, aux, y, 0.4, None)[0], (logits, aux)

  fns = {d: jax.jit(jax.value_and_grad(lambda p, a, d=d: loss(p, a, d), has_aux=True))
         for d in DISPATCH}
  return params, x, y, fns


def _close(got, want, rtol=1e-4, scale=1e-5):
  """|got - want| <= rtol |want| + scale max|want over the tree|, leaf by leaf."""
  top = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(want))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=rtol, atol=scale * top,
                               err_msg=jax.tree_util.keystr(path))


def _unused_sets(arc, sets):
  """bool [cells][5, 2, sets] per op name: the sep_conv weight sets no slot of `arc` runs."""
  out = []
  for spec in PLAN.cells:
    idx, op = supernet.slots(supernet.cell_arc(arc, spec))
    chosen = np.eye(sets, dtype=bool)[np.minimum(idx, sets - 1)]          # [5, 2, sets]
    out.append({name: ~(chosen & (op == o)[..., None])
                for name, o in (("sep3", space.SEP3), ("sep5", space.SEP5))})
  return out


def test_select_equals_switch_forward_aux_and_gradients(setup):
  params, _, _, fns = setup
  for arc in ARCS:
    (l0, (z0, a0)), g0 = fns["switch"](params, jnp.asarray(arc))
    (l1, (z1, a1)), g1 = fns["select"](params, jnp.asarray(arc))
    _close((l1, z1, a1), (l0, z0, a0))
    _close(g1, g0)
    # exactly as switch: weights no slot runs (other ops, other inputs' sets) get zeros
    for cg, unused in zip(g1["cells"], _unused_sets(arc, supernet.MAX_INPUTS)):
      for name, mask in unused.items():
        for leaf in jax.tree.leaves(cg[name]):
          assert not np.any(np.asarray(leaf)[mask]), (name, space.arc_to_string(arc))


def test_select_equals_switch_on_the_rewards_masked_forward(setup):
  """The reward's masked network (masks.supernet_masks at nonzero ratios, applied to the
  weights; sep3's masked kernels then zero-padded) gives switch's logits, and masks do
  remove channels (the masked logits differ from the unmasked ones)."""
  params, _, _, fns = setup
  masks_fn = jax.jit(lambda p, a, r, g: masks_lib.apply_supernet_masks(
      PLAN, p, a, masks_lib.supernet_masks(PLAN, p, a, r, g)))
  for arc in ARCS:
    a = jnp.asarray(arc)
    masked = masks_fn(params, a, RATIOS, groups_lib.supernet_groups(PLAN, arc))
    (_, (z0, _)), _ = fns["switch"](masked, a)
    (_, (z1, _)), _ = fns["select"](masked, a)
    _close(z1, z0)
    full = fns["switch"](params, a)[0][1][0]
    assert float(jnp.max(jnp.abs(full - z0))) > 1e-3


def test_padded_kernel_equals_the_3x3_one():
  """A 3x3 depthwise kernel zero-padded to 5x5 gives the 3x3 SAME correlation, exactly
  with the shifted sums (the extra taps add exact zeros)."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 7, 6, 3)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 1, 3)), jnp.float32)
  w5 = slot_ops.pad_kernel(w, 5)
  assert w5.shape == (5, 5, 1, 3) and jnp.array_equal(w5[1:4, 1:4], w)
  assert float(jnp.abs(w5).sum() - jnp.abs(w).sum()) == 0.0
  for stride in (1, 2):
    np.testing.assert_array_equal(layers.depthwise_conv(x, w5, stride),
                                  layers.depthwise_conv(x, w, stride))
  stacked = slot_ops.pad_kernel(jnp.stack([w, 2 * w]), 5)              # leading axes kept
  assert stacked.shape == (2, 5, 5, 1, 3) and jnp.array_equal(stacked[1, 1:4, 1:4], 2 * w)


def _conditionals(text):
  return sum(text.count(op) for op in lowering.CONDITIONALS)


def test_select_steps_hold_no_conditional():
  """The supernet step and the reward evaluation built with 'select' lower with no
  stablehlo.case / if; with 'switch', a case per node slot."""
  mesh = parallel.make_mesh(jax.devices()[:1])
  cfg = default.get_config().search
  tx, _ = search_steps.supernet_optimizer(cfg, steps_per_epoch=10)
  params = jax.eval_shape(lambda: supernet.init(jax.random.key(0), PLAN))
  state = search_steps.SupernetState(params, jax.eval_shape(tx.init, params))
  arc = jax.ShapeDtypeStruct((space.ARC_LEN,), jnp.int32)
  key = jax.eval_shape(lambda: jax.random.key(0))
  x = jax.ShapeDtypeStruct((BATCH, 8, 8, 1), jnp.float32)
  y = jax.ShapeDtypeStruct((BATCH,), jnp.int32)
  groups = lowering.abstract(groups_lib.supernet_groups(PLAN, ARCS[0]))
  ratios = jax.ShapeDtypeStruct((5,), jnp.float32)
  found = {}
  for d in DISPATCH:
    step = search_steps.make_supernet_step(PLAN, tx, 0.4, 0.9, mesh, dispatch=d)
    evaluate = search_steps.make_reward_eval(PLAN, "l1", mesh, dispatch=d)
    lr = jax.ShapeDtypeStruct((), jnp.float32)
    found[d] = (_conditionals(step.lower(state, arc, key, x, y, lr).as_text()),
                _conditionals(evaluate.lower(params, arc, ratios, groups, key, x, y).as_text()))
  assert found["select"] == (0, 0)
  assert min(found["switch"]) > 0


def test_auto_resolves_per_platform():
  r = slot_ops.resolve_dispatch
  assert [r("auto", p) for p in ("gpu", "cuda", "rocm", "cpu", "tpu")] == [
      "select", "select", "select", "switch", "switch"]
  assert [r(d, p) for d in ("switch", "select") for p in ("gpu", "cpu")] == [
      "switch", "switch", "select", "select"]
  with pytest.raises(ValueError, match="auto"):
    r("cond", "cpu")
  with pytest.raises(ValueError, match="resolved"):
    supernet.forward(PLAN, supernet.init(jax.random.key(0), PLAN), jnp.asarray(ARCS[0]),
                     jnp.zeros((2, 8, 8, 1)), dispatch="auto")


def test_search_builds_its_steps_with_the_resolved_setting(monkeypatch):
  """Search.build resolves search.dispatch for jax.default_backend() and hands it on."""
  seen = []
  real = search_steps.compiled
  monkeypatch.setattr(search_steps, "compiled",
                      lambda *a, **k: seen.append(a[7]) or real(*a, **k))
  ds = data.load("digits", 256)
  mesh = parallel.make_mesh(jax.devices()[:1])
  for value, backend in (("auto", "cpu"), ("auto", "gpu"), ("select", "cpu"),
                         ("switch", "gpu")):
    config = tiny_config()
    config.search.dispatch = value
    with monkeypatch.context() as m:
      m.setattr(search.jax, "default_backend", lambda backend=backend: backend)
      search.Search.build(config, ds, (0.0, 0.5), mesh)
  assert seen == ["switch", "select", "select", "switch"]


def test_a_bad_value_is_one_config_error():
  assert config_lib.FIELDS["search.dispatch"].values is slot_ops.DISPATCHES
  assert default.get_config().search.dispatch == "auto"
  config = ml_collections.ConfigDict(default.get_config().to_dict(), type_safe=False)
  config.search.dispatch = "cond"
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  assert str(e.value) == "search.dispatch='cond': must be one of auto, switch, select"
