"""Tests for fp_jax.models.flops: analytic counts vs the parameter pytree, the traced jaxpr and XLA."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp_jax.models import child
from fp_jax.models import flops
from fp_jax.models import layers
from fp_jax.models import space

ARCS = {"enas": space.ENAS_ARC,
        "random1": space.arc_to_string(space.sample_uniform(np.random.default_rng(1))),
        "random2": space.arc_to_string(space.sample_uniform(np.random.default_rng(2)))}
SHAPES = [(16, 16, 3), (8, 8, 1)]
CASES = [pytest.param(name, shape, id=f"{name}-{'x'.join(map(str, shape))}")
         for name in ARCS for shape in SHAPES]

# Hand-computed case: 4x4x1 images, 3 classes, num_layers 3 (cells: normal, reduce,
# normal, reduce, normal), F 2; every op identity and every input h(i-2) or h(i-1),
# so each cell concatenates all 5 nodes (out = 5F).
ALL_IDENTITY = " ".join(["0 4 1 4"] * 10)
# The same with the first normal-cell op a sep_conv3x3 (the cell outputs do not change).
ONE_SEP3 = "0 0 1 4 " + " ".join(["0 4 1 4"] * 9)


def _shapes(plan):
  """(params, stats) as ShapeDtypeStructs: child.init without running it."""
  return jax.eval_shape(lambda: child.init(jax.random.key(0), plan))


def _forward(plan):
  def f(params, stats, x):
    return child.forward(plan, params, stats, x, train=False, with_aux=False)[0]
  return f


def _image(shape):
  return jax.ShapeDtypeStruct((1,) + tuple(shape), jnp.float32)


def _xla_flops(fn, *args):
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis["flops"])


@pytest.fixture
def xla_depthwise(monkeypatch):
  """Depthwise convolutions as grouped convolutions, so the jaxpr sees them as convs
  (jax.checkpoint caches traces: cleared so none traced with another impl is reused)."""
  jax.clear_caches()
  monkeypatch.setattr(layers, "DEPTHWISE_IMPL", "xla")
  yield
  jax.clear_caches()


@pytest.mark.parametrize("name,shape", CASES)
def test_params_match_pytree(name, shape):
  arc = space.parse_arc(ARCS[name])
  plan = child.make_plan(arc, 3, 8, shape, 10)
  counts = flops.count(plan)
  params, stats = _shapes(plan)
  assert counts["params"] == flops.param_count(params)
  no_aux = {k: v for k, v in params.items() if k != "aux"}
  assert set(params) - set(no_aux) == {"aux"}
  assert counts["params_no_aux"] == flops.param_count(no_aux)
  assert counts["params"] - counts["params_no_aux"] == flops.param_count(params["aux"]) > 0
  assert set(counts) == {"macs", "params", "params_no_aux", "aux_macs"}
  assert all(isinstance(v, int) for v in counts.values())


@pytest.mark.parametrize("name,shape", CASES)
def test_macs_match_jaxpr_and_xla(name, shape, xla_depthwise):
  del xla_depthwise
  arc = space.parse_arc(ARCS[name])
  plan = child.make_plan(arc, 3, 8, shape, 10)
  counts = flops.count(plan)
  params, stats = _shapes(plan)
  fwd = _forward(plan)
  x = _image(shape)
  assert flops.jaxpr_macs(fwd, params, stats, x) == counts["macs"]
  # the aux head adds exactly aux_macs
  def with_aux(p, s, x):
    return child.forward(plan, p, s, x, train=False, with_aux=True)[:2]
  assert flops.jaxpr_macs(with_aux, params, stats, x) == counts["macs"] + counts["aux_macs"]
  # XLA: 2 flops per multiply-add, less the zero-padding taps of SAME convolutions,
  # plus BN/ReLU/pooling/add elementwise work.
  ratio = _xla_flops(fwd, params, stats, x) / (2 * counts["macs"])
  assert 0.85 <= ratio <= 1.15, ratio


def test_jaxpr_macs_of_single_ops(xla_depthwise):
  del xla_depthwise
  x = jax.ShapeDtypeStruct((2, 6, 5, 3), jnp.float32)
  w = jax.ShapeDtypeStruct((3, 3, 3, 4), jnp.float32)
  assert flops.jaxpr_macs(lambda x, w: layers.conv(x, w), x, w) == 2 * 6 * 5 * 4 * 9 * 3
  assert flops.jaxpr_macs(lambda x, w: layers.conv(x, w, stride=2), x, w) \
      == 2 * 3 * 3 * 4 * 9 * 3
  w1 = jax.ShapeDtypeStruct((1, 1, 3, 4), jnp.float32)   # a 1x1 runs as a dot_general
  assert flops.jaxpr_macs(lambda x, w: layers.conv(x, w), x, w1) == 2 * 6 * 5 * 3 * 4
  dw = jax.ShapeDtypeStruct((5, 5, 1, 3), jnp.float32)
  assert flops.jaxpr_macs(layers.depthwise_conv, x, dw) == 2 * 6 * 5 * 3 * 25
  a = jax.ShapeDtypeStruct((7, 11), jnp.float32)
  b = jax.ShapeDtypeStruct((11, 13), jnp.float32)
  assert flops.jaxpr_macs(lambda a, b: jnp.tanh(a) @ b, a, b) == 7 * 11 * 13
  # inside a nested jit the walk still finds them
  assert flops.jaxpr_macs(jax.jit(lambda a, b: a @ b), a, b) == 7 * 11 * 13
  assert flops.jaxpr_macs(lambda a: jnp.maximum(a, 0.0) + 1.0, a) == 0


def test_published_arc_enas_counts():
  """The published ENAS cell at 15 layers / F 36 under the official code's conventions."""
  arc = space.parse_arc(space.ENAS_ARC)
  plan = child.make_plan(arc, 15, 36, (32, 32, 3), 10)
  counts = flops.count(plan)
  assert counts["macs"] == 620_907_552
  assert counts["params_no_aux"] == 3_894_372
  assert counts["params"] == 4_389_220
  params, _ = _shapes(plan)
  assert flops.param_count(params) == counts["params"]


def test_shift_depthwise_is_not_counted_by_jaxpr(monkeypatch):
  """With the CPU 'shift' depthwise the jaxpr has no depthwise conv: macs fall short by
  exactly the depthwise multiply-adds of every sep_conv."""
  monkeypatch.setattr(layers, "DEPTHWISE_IMPL", "shift")
  arc = space.parse_arc(ONE_SEP3)
  plan = child.make_plan(arc, 3, 2, (4, 4, 1), 3)
  params, stats = _shapes(plan)
  traced = flops.jaxpr_macs(_forward(plan), params, stats, _image((4, 4, 1)))
  # one sep_conv3x3 per normal cell: c = 2 on 4x4, 4 on 2x2, 8 on 1x1; dw 3x3 twice
  assert traced == flops.count(plan)["macs"] - (16 * 36 + 4 * 72 + 144)


def test_hand_computed_all_identity(xla_depthwise):
  del xla_depthwise
  arc = space.parse_arc(ALL_IDENTITY)
  plan = child.make_plan(arc, 3, 2, (4, 4, 1), 3)
  assert [c.filters for c in plan.cells] == [2, 4, 4, 8, 8]
  assert [c.hw for c in plan.cells] == [(4, 4), (2, 2), (2, 2), (1, 1), (1, 1)]
  assert [c.out_channels for c in plan.cells] == [10, 20, 20, 40, 40]
  assert plan.aux_index == 4
  names = {n.name: n.kind for n in plan.nodes if n.kind in ("conv", "fr")}
  # ENAS: calibrations only where channels/sizes differ, layer_base in every cell, strided
  # identity in reduction cells -> factorized reduction (10 per reduction cell)
  assert [k for k in names if k.startswith("cells/2/")] == [
      "cells/2/calib_x", "cells/2/calib_y", "cells/2/base"]
  assert names["cells/2/calib_x"] == "fr" and names["cells/4/calib_x"] == "fr"
  assert sum(k.startswith("cells/1/node") for k in names) == 10
  stem = (16 * 9 * 1 * 6, 9 * 6 + 2 * 6)
  conv = lambda hw, ci, co: (hw * ci * co, ci * co + 2 * co)   # 1x1 conv / fr + BN
  blocks = [
      conv(16, 6, 2), conv(16, 6, 2), conv(16, 2, 2),                      # cell 0
      conv(16, 6, 4), conv(16, 10, 4), conv(16, 4, 4)] + [conv(4, 4, 4)] * 10 + [
      conv(4, 10, 4), conv(4, 20, 4), conv(4, 4, 4),                       # cell 2 (fr x)
      conv(4, 20, 8), conv(4, 20, 8), conv(4, 8, 8)] + [conv(1, 8, 8)] * 10 + [
      conv(1, 20, 8), conv(1, 40, 8), conv(1, 8, 8)]                       # cell 4 (fr x)
  fc = (40 * 3, 40 * 3)                                                    # no bias (ENAS)
  macs = stem[0] + sum(b[0] for b in blocks) + fc[0]
  params_no_aux = stem[1] + sum(b[1] for b in blocks) + fc[1]
  # aux head on the last cell (1x1, 40 channels): pool window 1, 1x1 conv 40->128 + BN,
  # 1x1 conv 128->768 + BN, linear 768->3 (no bias)
  aux_macs = 40 * 128 + 128 * 768 + 768 * 3
  aux_params = 40 * 128 + 256 + 128 * 768 + 2 * 768 + 768 * 3
  assert (macs, params_no_aux) == (6616, 2554)
  expected = {"macs": macs, "params": params_no_aux + aux_params,
              "params_no_aux": params_no_aux, "aux_macs": aux_macs}
  assert flops.count(plan) == expected
  params, stats = _shapes(plan)
  assert flops.param_count(params) == params_no_aux + aux_params
  assert flops.jaxpr_macs(_forward(plan), params, stats, _image((4, 4, 1))) == macs


def test_hand_computed_one_sep_conv(xla_depthwise):
  del xla_depthwise
  base = flops.count(child.make_plan(space.parse_arc(ALL_IDENTITY), 3, 2, (4, 4, 1), 3))
  arc = space.parse_arc(ONE_SEP3)
  plan = child.make_plan(arc, 3, 2, (4, 4, 1), 3)
  counts = flops.count(plan)
  # one sep_conv3x3 in each of the 3 normal cells (c = 2 on 4x4, 4 on 2x2, 8 on 1x1):
  # ReLU, dw 3x3 (9c), pw c->c, BN, ReLU, dw 3x3, pw c->c, BN
  def sep_macs(hw, c):
    return hw * (9 * c + c * c + 9 * c + c * c)

  def sep_params(c):
    return 2 * (9 * c + c * c + 2 * c)

  extra_macs = sep_macs(16, 2) + sep_macs(4, 4) + sep_macs(1, 8)
  extra_params = sep_params(2) + sep_params(4) + sep_params(8)
  assert (extra_macs, extra_params) == (1392, 476)
  assert counts["macs"] == base["macs"] + extra_macs
  assert counts["params_no_aux"] == base["params_no_aux"] + extra_params
  assert counts["params"] == base["params"] + extra_params
  assert counts["aux_macs"] == base["aux_macs"]
  params, stats = _shapes(plan)
  assert flops.param_count(params) == counts["params"]
  assert flops.param_count(params["blocks"]["cells/0/node2/a"]) == sep_params(2)
  assert flops.jaxpr_macs(_forward(plan), params, stats, _image((4, 4, 1))) \
      == counts["macs"]


def test_count_with_widths():
  arc = space.parse_arc(ONE_SEP3)
  plan = child.make_plan(arc, 3, 2, (4, 4, 1), 3)
  full = flops.count(plan)
  assert flops.count(plan, flops.full_widths(plan)) == full
  widths = flops.full_widths(plan)
  assert widths["values"][plan.stem] == 6
  assert widths["inner"] == {"cells/0/node2/a": 2, "cells/2/node2/a": 4, "cells/4/node2/a": 8}
  # stem 6 -> 3 channels: the stem conv and the 1x1s reading it (cell 0's two
  # calibrations, cell 1's calib_x) shrink
  widths["values"][plan.stem] = 3
  counts = flops.count(plan, widths)
  assert full["macs"] - counts["macs"] == 16 * 9 * 3 + 2 * 16 * 3 * 2 + 16 * 3 * 4
  assert full["params_no_aux"] - counts["params_no_aux"] == 9 * 3 + 2 * 3 + 2 * 3 * 2 + 3 * 4
  # the sep_conv's inner width 2 -> 1 in cell 0 (4x4, c = 2)
  widths = flops.full_widths(plan)
  widths["inner"]["cells/0/node2/a"] = 1
  counts = flops.count(plan, widths)
  assert full["macs"] - counts["macs"] == 16 * (2 * 1 + 9 * 1 + 1 * 2)
  assert full["params"] - counts["params"] == 2 * 1 + 2 * 1 + 9 * 1 + 1 * 2
