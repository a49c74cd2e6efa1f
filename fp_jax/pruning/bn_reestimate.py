"""BN re-estimation: running statistics recomputed for fixed weights on a few batches.

Masking channels changes every later layer's activations, so the running BN
statistics of the unpruned network no longer describe the masked one (eval-mode
accuracy then sits near chance). `reestimate` replaces them with the statistics
of the masked network itself, measured on training batches, without gradients.

It knows nothing of the network's structure. `update(params, stats, x) -> new
stats` is a per-device train-mode forward pass (collectives over parallel.AXIS,
so batch statistics are those of the global batch, as in the training steps)
whose BN statistics are updated as an exponential moving average:

  new = m * stats + (1 - m) * batch,   batch = {'mean': E[a], 'var': E[a^2] - E[a]^2}

of the pre-BN activations a over (B, H, W), with m any constant (layers.BN_MOMENTUM).
new is affine in stats, so one forward-mode derivative at stats = 0 with
tangent 1 returns both (1 - m) * batch and m: the batch statistics are read back
without knowing m. Statistics the pass does not update (slope m = 1, e.g. the
aux head's when it is not run) keep their values. Every BN statistics node is a
dict {'mean': [C], 'var': [C]} (layers.bn_stats_init).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fp_jax.run import parallel
from fp_jax.run.parallel import BATCH, REPLICATED


def _is_bn(node):
  return isinstance(node, dict) and set(node) == {"mean", "var"}


def _bn_map(fn, *trees):
  """fn(node, ...) over the BN statistics nodes of `trees` (same structure as the first)."""
  def check(node, *rest):
    if not _is_bn(node):
      raise ValueError(f"BN statistics must be {{'mean', 'var'}} dicts, found {type(node)}")
    return fn(node, *rest)
  return jax.tree.map(check, *trees, is_leaf=_is_bn)


def batch_moments(update, params, stats, x):
  """Per-device: ({'mean': E[a], 'mean_sq': E[a^2]} per BN node over the global batch,
  {'updated': bool [C]} per BN node), each BN node's vectors [C]."""
  zeros = jax.tree.map(jnp.zeros_like, stats)
  ones = jax.tree.map(jnp.ones_like, stats)
  new, slope = jax.jvp(lambda s: update(params, s, x), (zeros,), (ones,))

  def moments(n, m):
    updated = m["mean"] < 1.0
    safe = lambda v: jnp.where(updated, 1.0 - v, 1.0)
    mean = jnp.where(updated, n["mean"] / safe(m["mean"]), 0.0)
    var = jnp.where(updated, n["var"] / safe(m["var"]), 0.0)
    return {"mean": mean, "mean_sq": var + jnp.square(mean)}

  return (_bn_map(moments, new, slope),
          _bn_map(lambda n, m: {"updated": m["mean"] < 1.0}, new, slope))


def reestimate(update, params, stats, batches, mesh=None):
  """Running statistics of (params) as the exact average over `batches`.

  Args:
    update: per-device train-mode pass (params, stats, x) -> new stats (see above).
    params, stats: the network (replicated); stats gives the structure.
    batches: iterable of this process's rows of equal-size global batches, f32
      [B/P, H, W, C], fed as the network sees them in eval (normalised, no augmentation).
    mesh: the 1-D device mesh (default: every device).

  Returns:
    stats of the same structure, f32: mean = (1/K) sum_k E_k[a] and
    var = (1/K) sum_k E_k[a^2] - mean^2 over the K batches. Per-batch means and mean
    squares are accumulated (float64, on the host), not per-batch variances: with
    equal batches this is exactly the mean and (biased) variance of the activations
    over all K * B images at once, the statistics of the population eval mode
    normalises, independent of how the images were split into batches. (An average
    of per-batch variances, the cumulative average of e.g. PyTorch, estimates the
    within-batch variance instead, smaller by the variance of the batch means.)
  """
  mesh = mesh or parallel.make_mesh()
  step = parallel.data_parallel(lambda p, s, x: batch_moments(update, p, s, x), mesh,
                                (REPLICATED, REPLICATED, BATCH), REPLICATED)
  params, stats = parallel.replicate(mesh, jax.device_get((params, stats)))
  sums, updated, k = None, None, 0
  for x in batches:
    moments, upd = jax.device_get(step(params, stats, parallel.shard(mesh, x)))
    moments = jax.tree.map(lambda a: np.asarray(a, np.float64), moments)
    sums = moments if sums is None else jax.tree.map(np.add, sums, moments)
    updated = upd if updated is None else updated
    k += 1
  if k == 0:
    raise ValueError("reestimate: no batches")
  if not any(np.any(u) for u in jax.tree.leaves(updated)):
    raise ValueError("reestimate: `update` changed no BN statistics (not a train-mode pass?)")

  def finish(old, s, u):
    mean = s["mean"] / k
    var = np.maximum(s["mean_sq"] / k - np.square(mean), 0.0)
    old = jax.device_get(old)
    return {"mean": jnp.asarray(np.where(u["updated"], mean, old["mean"]), jnp.float32),
            "var": jnp.asarray(np.where(u["updated"], var, old["var"]), jnp.float32)}

  return _bn_map(finish, stats, sums, updated)
