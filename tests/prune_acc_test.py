"""PruneAcc of the reward evaluation equals an independent masked forward pass.

The reference below runs the supernet for one concrete architecture with plain
Python control flow (ENAS `_enas_layer`: calibrations where sizes or channels
differ, a reduction's factorized h(i-1) as its second input, the concat of unused
nodes and inputs through ReLU, the per-index 1x1 conv and BN), with batch-statistics
BN, and applies the masks to *activations* (every producer's output times its mask)
instead of zeroing weights. Its accuracy must equal the PruneAcc that
`search_steps.make_reward_eval` computes from weight masks, and its logits the masked
supernet's.
"""
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from fp_jax import data
from fp_jax.run import parallel
from fp_jax.pruning import groups as groups_lib
from fp_jax.pruning import masks as masks_lib
from fp_jax.models import space
from fp_jax.models import supernet
from fp_jax.train import search_steps

DN = ("NHWC", "HWIO", "NHWC")
HI = lax.Precision.HIGHEST


def _bn(p, x):
  mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
  return (x - mean) / jnp.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def _conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN, precision=HI)


def _fr(p, x, relu):
  x = jax.nn.relu(x) if relu else x
  a = lax.conv_general_dilated(x[:, ::2, ::2], p["conv1"], (1, 1), "VALID",
                               dimension_numbers=DN, precision=HI)
  sh = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))[:, 1:, 1:][:, ::2, ::2]
  b = lax.conv_general_dilated(sh, p["conv2"], (1, 1), "VALID", dimension_numbers=DN,
                               precision=HI)
  return _bn(p["bn"], jnp.concatenate([a, b], -1))


def _sep(p, x, m_inner, m_out):
  for i, m in ((1, m_inner), (2, m_out)):
    x = jax.nn.relu(x)
    x = lax.conv_general_dilated(x, p[f"dw{i}"], (1, 1), "SAME", dimension_numbers=DN,
                                 feature_group_count=x.shape[-1], precision=HI)
    x = _bn(p[f"bn{i}"], _conv(x, p[f"pw{i}"])) * m
  return x


def _pool(kind, x):
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  if kind == space.MAX:
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 1, 1, 1), pad)
  tot = lax.reduce_window(x, 0.0, lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
  return tot / lax.reduce_window(jnp.ones_like(x), 0.0, lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)


def reference_logits(plan, params, arc, masks, x):
  arc = np.asarray(arc)
  y = _bn(params["stem"]["bn"], _conv(x, params["stem"]["conv"])) * masks["stem"]
  prev = [y, y]
  for spec in plan.cells:
    cp, m = params["cells"][spec.index], masks["cells"][spec.index]
    ins = list(prev)
    if spec.reduce:
      ins = [prev[1], _fr(cp["reduce"], prev[1], relu=False) * m["reduce"]]
    h = []
    for j, name in enumerate(("calib_x", "calib_y")):
      kind = spec.calib[j]
      if kind == "none":
        h.append(ins[j])
      elif kind == "fr":
        h.append(_fr(cp[name], ins[j], relu=True) * m[name])
      else:
        h.append(_bn(cp[name]["bn"], _conv(jax.nn.relu(ins[j]), cp[name]["conv"])) * m[name])
    rows = (arc[20:] if spec.reduce else arc[:20]).reshape(5, 4)
    vals, used = h, np.zeros(7, bool)
    for k, row in enumerate(rows):
      out = 0.0
      for s in range(2):
        j, op = int(row[2 * s]), int(row[2 * s + 1])
        used[j] = True
        if op in (space.SEP3, space.SEP5):
          w = cp["sep3" if op == space.SEP3 else "sep5"]
          sets = w["pw1"].shape[2]
          p = jax.tree.map(lambda a: a[k, s, min(j, sets - 1)], w)
          out = out + _sep(p, vals[j], m["inner"][k, s], m["out"][k, s])
        elif op in (space.AVG, space.MAX):
          out = out + _pool(op, vals[j])
        else:
          out = out + vals[j]
      vals.append(out)
    idx = [j for j in range(7) if not used[j]]
    cat = jax.nn.relu(jnp.concatenate([vals[j] for j in idx], -1))
    w = jnp.concatenate([cp["final"]["w"][j] for j in idx], 0)[None, None]
    out = _bn(cp["final"]["bn"], _conv(cat, w)) * m["final"]
    prev = [ins[1], out]
  return jnp.mean(jax.nn.relu(prev[1]), (1, 2)) @ params["fc"]["w"]


def _by_space(plan, kept):
  """A supernet.Kept as a list in supernet.space_table order."""
  out = []
  for key, _, _ in supernet.space_table(plan):
    if key == "stem":
      out.append(kept.stem)
    else:
      v = getattr(kept.cells[key[1]], key[0])
      out.append(v if len(key) == 2 else np.asarray(v)[key[2:]])
  return np.asarray(out, np.float32)


def test_prune_acc_equals_activation_masked_reference():
  ds = data.load("digits", 256)
  plan = supernet.make_plan(3, 8, ds.image_shape, ds.num_classes)   # N R N R N
  mesh = parallel.make_mesh(jax.devices()[:1])
  evaluate = search_steps.make_reward_eval(plan, "l1", mesh)
  rng = np.random.default_rng(0)
  x, y, _ = next(data.eval_batches(ds.x_valid, ds.y_valid, batch_size=128, mean=ds.mean,
                                   std=ds.std))
  x, y = jnp.asarray(x), jnp.asarray(y)
  for share, final in ((True, "identity"), (False, "enas")):
    params = supernet.init(jax.random.key(1), plan, final=final, share_inputs=share)
    for _ in range(2):
      arc = space.sample_uniform(rng)
      ratios = jnp.asarray(rng.choice([0.0, 0.2, 0.4, 0.6], 5), jnp.float32)
      groups = groups_lib.supernet_groups(plan, arc)
      train_acc, prune_acc, kept = evaluate(params, jnp.asarray(arc), ratios, groups,
                                            jax.random.key(0), x, y)
      masks = masks_lib.supernet_masks(plan, params, jnp.asarray(arc), ratios, groups)
      ref = reference_logits(plan, params, arc, masks, x)
      masked = masks_lib.apply_supernet_masks(plan, params, jnp.asarray(arc), masks)
      got = supernet.forward(plan, masked, jnp.asarray(arc), x, with_aux=False)[0]
      assert float(jnp.max(jnp.abs(got - ref))) <= 1e-4 * max(1.0, float(jnp.max(jnp.abs(ref))))
      assert float(prune_acc) == float(jnp.mean(jnp.argmax(ref, -1) == y))
      # kept: the channels each space keeps, in supernet.space_table order
      flat = masks["units"][groups["unit_of"]]
      widths = np.cumsum([0] + [w for _, w, _ in supernet.space_table(plan)])
      np.testing.assert_array_equal(_by_space(plan, kept), [float(jnp.sum(flat[a:b])) for a, b
                                                            in zip(widths[:-1], widths[1:])])
      unmasked = reference_logits(plan, params, arc, jax.tree.map(jnp.ones_like, masks), x)
      assert float(train_acc) == float(jnp.mean(jnp.argmax(unmasked, -1) == y))
