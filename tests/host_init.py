"""Fixed-network pytrees filled on the host (fast: no per-shape PRNG compiles), shared by the
pruning tests: He-normal convs, random BN scales (0.3..1.5, so the 'bn' criterion has no
ties) and biases, zero means; running variances 1, or uniform in 0.5..1.5 (random_var)."""
import jax
import jax.numpy as jnp
import numpy as np

from fp_jax.models import child


def random_net(plan, seed, random_var=False):
  """(params, stats) of child.init's layout for `plan`, drawn from numpy's generator `seed`."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: child.init(jax.random.key(0), plan))

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      a = rng.uniform(0.3, 1.5, leaf.shape)
    elif name.endswith("['bias']"):
      a = 0.2 * rng.standard_normal(leaf.shape)
    elif name.endswith(("['b']", "['mean']")):
      a = np.zeros(leaf.shape)
    elif name.endswith("['var']"):
      a = rng.uniform(0.5, 1.5, leaf.shape) if random_var else np.ones(leaf.shape)
    else:
      a = rng.standard_normal(leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
    return jnp.asarray(a, jnp.float32)

  return tuple(jax.tree_util.tree_map_with_path(fill, t) for t in shapes)
