"""child.forward scans runs of same-signature cells; the result equals the cell-by-cell
network (every cell its own run): logits, aux logits and BN statistics of the whole
network, and the gradients of a scanned run, with drop-path and dropout on."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from fp_jax.models import child
from fp_jax.models import layers
from fp_jax.models import space

# every op kind, few sep_convs (compile time): normal and reduction cell, (a, op, b, op) x 5
ARC = np.array([0, 0, 1, 2, 2, 4, 1, 3, 3, 2, 0, 4, 4, 3, 2, 4, 5, 4, 3, 2,
                0, 3, 1, 4, 2, 1, 0, 2, 3, 4, 2, 3, 4, 2, 1, 4, 5, 3, 4, 4])
REG = {"key": jax.random.key(2), "keep_prob": 0.8, "drop_path_keep_prob": 0.6, "progress": 0.7}
SINGLE = lambda plan, p: [[c.index] for c in plan.cells]


def close(got, want, rel):
  """Leaf-wise |got - want| <= rel * max|want leaf| + a floor of 1e-6 x the largest leaf
  (XLA fuses the two programs differently; float sums reorder, and some gradients are
  zero in exact arithmetic, e.g. a conv's before BN's mean)."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  floor = 1e-6 * max(float(np.abs(w).max()) for w in jax.tree.leaves(want))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=0, atol=rel * float(np.abs(w).max()) + floor)


def _plan():
  space.validate_arc(ARC)
  plan = child.make_plan(ARC, 12, 4, (8, 8, 1), 10)   # cells NNNN R NNNN R NNNN
  return plan, child.init(jax.random.key(0), plan)


def test_forward_with_scanned_runs_equals_cell_by_cell(monkeypatch):
  plan, (params, stats) = _plan()
  # a stage's first two normal cells calibrate their inputs, the rest chain unchanged
  assert child.cell_runs(plan, params) == [[0], [1], [2, 3], [4], [5], [6, 7, 8], [9], [10],
                                           [11, 12, 13]]
  x = layers.normal(jax.random.key(1), (6, 8, 8, 1))
  fwd = lambda p: child.forward(plan, p, stats, x, True, reg=REG)
  got = jax.jit(fwd)(params)
  monkeypatch.setattr(child, "cell_runs", SINGLE)
  close(got, jax.jit(fwd)(params), 1e-5)


def test_scanned_run_gradients_equal_cell_by_cell():
  """Cells 6-8 as one scan vs three single-cell runs chained: outputs, statistics and
  the gradients of parameters and inputs."""
  plan, (params, stats) = _plan()
  run = [6, 7, 8]
  c = plan.cells[6]
  shape = lambda j: (6,) + plan.nodes[j].hw + (plan.nodes[j].channels,)
  h0 = layers.normal(jax.random.key(3), shape(c.inputs[0]))
  h1 = layers.normal(jax.random.key(4), shape(c.inputs[1]))
  key = jax.random.key(5)
  block = lambda n, p, s, h: child.apply_block(n, p, s, h, True)

  def drop_at(j, cell_index, y):
    keep = child.path_keep_prob(0.6, cell_index, len(plan.cells), 0.7)
    return jax.random.bernoulli(jax.random.fold_in(key, j), keep, y.shape[:1])[:, None, None,
                                                                              None] * y / keep

  def loss(p, a, b, scanned):
    if scanned:
      ys, sts = child.apply_run(plan, run, p, stats, a, b, block, drop_at)
    else:
      ys, sts = [], []
      for i in run:
        y, st = child.apply_run(plan, [i], p, stats, a, b, block, drop_at)
        ys.append(y[0])
        sts += st
        a, b = b, y[0]
    return sum(jnp.sum(jnp.sin(y)) for y in ys), (jnp.stack(list(ys)), sts)

  grad = functools.partial(jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True),
                                   static_argnums=3))
  close(grad(params, h0, h1, True), grad(params, h0, h1, False), 1e-4)
