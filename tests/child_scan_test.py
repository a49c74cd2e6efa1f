"""child.forward scans runs of same-signature cells; the result equals the cell-by-cell
network (every cell its own run): logits, aux logits, BN statistics and gradients, with
drop-path and dropout on."""
import jax
import jax.numpy as jnp
import numpy as np

from fp_jax import child
from fp_jax import space

# every op kind, few sep_convs (compile time): normal and reduction cell, (a, op, b, op) x 5
ARC = np.array([0, 0, 1, 2, 2, 4, 1, 3, 3, 2, 0, 4, 4, 3, 2, 4, 5, 4, 3, 2,
                0, 3, 1, 4, 2, 1, 0, 2, 3, 4, 2, 3, 4, 2, 1, 4, 5, 3, 4, 4])


def test_scanned_cell_runs_equal_cell_by_cell(monkeypatch):
  space.validate_arc(ARC)
  plan = child.make_plan(ARC, 12, 4, (8, 8, 1), 10)   # cells NNNN R NNNN R NNNN
  params, stats = child.init(jax.random.key(0), plan)
  # a stage's first two normal cells calibrate their inputs, the rest chain unchanged
  assert child.cell_runs(plan, params) == [[0], [1], [2, 3], [4], [5], [6, 7, 8], [9], [10],
                                           [11, 12, 13]]
  x = jax.random.normal(jax.random.key(1), (6, 8, 8, 1))
  reg = {"key": jax.random.key(2), "keep_prob": 0.8, "drop_path_keep_prob": 0.6,
         "progress": 0.7}

  def run(p):
    logits, aux, new = child.forward(plan, ARC, p, stats, x, True, reg=reg)
    return jnp.sum(jnp.sin(logits)) + jnp.sum(jnp.cos(aux)), (logits, aux, new)

  got = jax.jit(jax.value_and_grad(run, has_aux=True))(params)
  monkeypatch.setattr(child, "cell_runs", lambda plan, p: [[c.index] for c in plan.cells])
  want = jax.jit(jax.value_and_grad(run, has_aux=True))(params)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  # the same ops and draws; XLA fuses them differently (float sums reordered), and some
  # gradients are zero in exact arithmetic (a conv before BN's mean): a floor on the scale
  # of all gradients
  floor = 1e-6 * max(float(np.abs(w).max()) for w in jax.tree.leaves(want))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-4 * float(np.abs(w).max()) + floor)
