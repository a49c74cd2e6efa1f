"""The fixed network equals an independent computation of ENAS's `_fixed_layer`.

`enas_logits` below follows the official code's control flow directly (a list of
layers, `_maybe_calibrate_size`, layer_base, per-node x/y ops with their strides,
`_fixed_combine`), with its own primitives written on lax (TF SAME padding computed
explicitly), and reads the weights by the names child.init gives them. It shares
nothing with graph.py / child.py but those names, so a structural mistake in
either shows as different logits.
"""
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from fp_jax.models import child
from fp_jax.models import space
from fp_jax.infer import networks

DN = ("NHWC", "HWIO", "NHWC")


def _tf_pads(n, k, s):
  out = -(-n // s)
  total = max((out - 1) * s + k - n, 0)
  return (total // 2, total - total // 2)


def _pads(x, k, s):
  return [_tf_pads(x.shape[1], k, s), _tf_pads(x.shape[2], k, s)]


def _bn(p, s, x):
  return (x - s["mean"]) / jnp.sqrt(s["var"] + 1e-5) * p["scale"] + p["bias"]


def _conv(x, w, s=1):
  return lax.conv_general_dilated(x, w, (s, s), _pads(x, w.shape[0], s), dimension_numbers=DN,
                                  precision=lax.Precision.HIGHEST)


def _relu_conv_bn(blk, st, x, relu=True):
  return _bn(blk["bn"], st["bn"], _conv(jax.nn.relu(x) if relu else x, blk["conv"]))


def _factorized(blk, st, x):
  """ENAS `_factorized_reduction` at stride 2: two 1x1 VALID paths, the second shifted."""
  p1 = lax.conv_general_dilated(x, blk["conv1"], (2, 2), "VALID", dimension_numbers=DN,
                                precision=lax.Precision.HIGHEST)
  shifted = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))[:, 1:, 1:, :]
  p2 = lax.conv_general_dilated(shifted, blk["conv2"], (2, 2), "VALID", dimension_numbers=DN,
                                precision=lax.Precision.HIGHEST)
  return _bn(blk["bn"], st["bn"], jnp.concatenate([p1, p2], -1))


def _sep(blk, st, x, stride):
  """ENAS `_fixed_conv`: 2 x [ReLU, separable conv (first strided), BN]."""
  for i, s in ((1, stride), (2, 1)):
    x = jax.nn.relu(x)
    c = x.shape[-1]
    x = lax.conv_general_dilated(x, blk[f"dw{i}"], (s, s), _pads(x, blk[f"dw{i}"].shape[0], s),
                                 dimension_numbers=DN, feature_group_count=c,
                                 precision=lax.Precision.HIGHEST)
    x = _bn(blk[f"bn{i}"], st[f"bn{i}"], _conv(x, blk[f"pw{i}"]))
  return x


def _pool(kind, x, s):
  pad = [(0, 0)] + _pads(x, 3, s) + [(0, 0)]
  if kind == "max":
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, s, s, 1), pad)
  tot = lax.reduce_window(x, 0.0, lax.add, (1, 3, 3, 1), (1, s, s, 1), pad)
  cnt = lax.reduce_window(jnp.ones_like(x), 0.0, lax.add, (1, 3, 3, 1), (1, s, s, 1), pad)
  return tot / cnt


def enas_logits(arc, num_layers, params, stats, x):
  """Eval-mode logits of ENAS's fixed-arc network (micro_child.py `_model`)."""
  P, S = params["blocks"], stats["blocks"]
  normal, reduce_arc = np.asarray(arc[:20]), np.asarray(arc[20:])
  pool_distance = num_layers // 3
  pool_layers = [pool_distance, 2 * pool_distance + 1]
  stem = _relu_conv_bn(P["stem"], S["stem"], x, relu=False)
  layers_ = [stem, stem]
  out_filters = params["blocks"]["stem"]["conv"].shape[-1] // 3
  for layer_id in range(num_layers + 2):
    pre = f"cells/{layer_id}/"
    stride = 1
    if layer_id in pool_layers:
      out_filters *= 2
      stride = 2
    cell_arc = reduce_arc if stride == 2 else normal
    # _maybe_calibrate_size
    h0, h1 = layers_
    if h0.shape[1] != h1.shape[1]:
      h0 = _factorized(P[pre + "calib_x"], S[pre + "calib_x"], jax.nn.relu(h0))
    elif h0.shape[-1] != out_filters:
      h0 = _relu_conv_bn(P[pre + "calib_x"], S[pre + "calib_x"], h0)
    if h1.shape[-1] != out_filters:
      h1 = _relu_conv_bn(P[pre + "calib_y"], S[pre + "calib_y"], h1)
    # layer_base
    h1 = _relu_conv_bn(P[pre + "base"], S[pre + "base"], h1)
    vals, used = [h0, h1], np.zeros(7, int)
    for cell_id in range(5):
      ys = []
      for s, slot in enumerate("ab"):
        idx, op = int(cell_arc[4 * cell_id + 2 * s]), int(cell_arc[4 * cell_id + 2 * s + 1])
        used[idx] += 1
        y, st = vals[idx], stride if idx in (0, 1) else 1
        name = f"{pre}node{cell_id + 2}/{slot}"
        if op in (0, 1):
          y = _sep(P[name], S[name], y, st)
        elif op in (2, 3):
          y = _pool("avg" if op == 2 else "max", y, st)
        elif st > 1:
          y = _factorized(P[name], S[name], y)
        ys.append(y)
      vals.append(ys[0] + ys[1])
    # _fixed_combine
    out_hw = min(v.shape[1] for v, u in zip(vals, used) if u == 0)
    outs = []
    for i, (v, u) in enumerate(zip(vals, used)):
      if u == 0:
        if v.shape[1] > out_hw:
          v = _factorized(P[f"{pre}combine/{i}"], S[f"{pre}combine/{i}"], v)
        outs.append(v)
    layers_ = [layers_[1], jnp.concatenate(outs, -1)]
  feats = jnp.mean(jax.nn.relu(layers_[1]), axis=(1, 2))
  return feats @ params["fc"]["w"]


ARCS = {
    "published": space.ENAS_ARC,
    # n_out = 2 normal / 1 reduction: skipped calibrations (compaction_test's arcs)
    "skip_calib": "0 0 1 1 2 4 0 2 3 3 1 0 4 4 1 3 4 0 2 1 0 0 1 1 2 3 0 4 3 1 1 2 4 0 3 0 5 1 2 4",
    # unused cell inputs: h(i-2) / h(i-1) never read join the concat (reduced in
    # reduction cells)
    "unused_inputs": "1 0 1 1 2 2 2 4 3 0 3 3 4 1 4 4 5 2 5 0 0 1 0 2 2 3 2 4 3 0 3 1 4 2 4 3 5 0 5 1",
    "random": space.arc_to_string(space.sample_uniform(np.random.default_rng(11))),
}


@pytest.mark.parametrize("name,num_layers", [("published", 3), ("skip_calib", 6),
                                             ("unused_inputs", 3), ("random", 2),
                                             ("random", 0)])
def test_fixed_network_equals_enas_reference(name, num_layers):
  arc = space.parse_arc(ARCS[name])
  plan = child.make_plan(arc, num_layers, 4, (8, 8, 3), 10)
  if name == "unused_inputs":
    assert any(n.name.endswith(("combine/0", "combine/1")) for n in plan.nodes)
  params, stats = networks.random_init(plan, 3)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  ref = np.asarray(enas_logits(arc, num_layers, params, stats, x))
  got = np.asarray(child.forward(plan, params, stats, x, False, with_aux=False)[0])
  scale = max(1.0, float(np.max(np.abs(ref))))
  assert np.max(np.abs(got - ref)) <= 1e-4 * scale, (np.max(np.abs(got - ref)), scale)
