"""The supernet cell's node loop has its own VJP (supernet._nodes: the nodes in reverse, each
slot's input read back from the final value buffer, no per-node residuals): its gradients
equal autodiff of the plain node scan, for both slot dispatches and several traced arcs."""
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from fp_jax.models import space
from fp_jax.models import supernet


def _plain_nodes(run_op, op_vjp, sep_p, buf, rows):
  """The node scan differentiated by JAX (what _nodes replaces)."""
  del op_vjp

  def node(buf, inputs):
    k, row, node_p = inputs
    return buf.at[k + 2].set(supernet._slots(run_op, buf, row, node_p)), None

  return lax.scan(node, buf, (jnp.arange(space.NUM_NODES), rows, sep_p))[0]


@pytest.mark.parametrize("dispatch", ["switch", "select"])
def test_node_vjp_equals_autodiff_of_the_scan(dispatch, monkeypatch):
  plan = supernet.make_plan(1, 4, (6, 6, 1), 10)
  spec = plan.cells[0]
  p = supernet.init(jax.random.key(0), plan, final="enas", share_inputs=False)["cells"][0]
  h0, h1 = (jax.random.normal(jax.random.key(k), (3, *spec.hw, spec.filters)) for k in (1, 2))
  # arcs: random ones, and one whose slots all read h(i-2) with identity or pools (the same
  # buffer slot's cotangent added many times)
  arcs = [space.sample_uniform(np.random.default_rng(s))[:space.CELL_LEN] for s in range(3)]
  arcs.append(np.array([0, space.IDENTITY, 0, space.MAX] * space.NUM_NODES))

  def grads():
    def loss(p, h0, h1, arc):
      out, nodes = supernet.cell(p, arc, h0, h1, with_nodes=True, dispatch=dispatch)
      return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.cos(nodes))
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return [fn(p, h0, h1, jnp.asarray(a, jnp.int32)) for a in arcs]

  got = grads()
  monkeypatch.setattr(supernet, "_nodes", _plain_nodes)
  want = grads()
  for g, w in zip(got, want):
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()) + 1e-6)
