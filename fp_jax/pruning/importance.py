"""Step 2 of pruning: importance criteria (one registry) and both networks' unit scores.

A criterion scores the output channels of a *producer* -- a conv, factorized reduction
or pointwise conv, each followed by BN -- from its kernels and its BN scale
(`Criterion.score`), optionally on a tree derived from the params (`Criterion.tree`:
taylor's w * dL/dw), or draws scores that ignore the weights (`Criterion.draw`: the
random baseline). A unit's importance is the sum of its channels' scores over the
group's producers. Registered criteria:

  l1      L1 norm of the producing filters
  bn      |BN scale| of the producer
  taylor  first-order Taylor score sum |w * dL/dw| over the same filters (Molchanov et
          al. 2019; `grads`: the loss gradients of the same params)
  random  uniform random scores (a baseline; `key`)

Adding a criterion is one `register` call here: both networks' masks and config
validation (which reads CRITERIA) take it from the registry.
"""
from __future__ import annotations

import collections.abc
import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from fp_jax.models import slot_ops
from fp_jax.models import graph
from fp_jax.models import space
from fp_jax.models import supernet
from fp_jax.pruning import groups as groups_lib


@dataclasses.dataclass(frozen=True)
class Criterion:
  """score(kernels, scale, lead) -> f32 [*lead, O]: a producer's output-channel scores
  from its kernels (each [*lead, ..., O_i], the O_i concatenated make O) and BN scale
  [*lead, O]; lead: leading axes of stacked weight sets, kept. tree(params, grads): the
  tree `score` reads (None: the params). draw(key, n) -> f32 [n]: scores without
  weights, instead of `score`. needs: 'grads' or 'key' when the caller must pass one."""
  score: Optional[Callable] = None
  tree: Optional[Callable] = None
  draw: Optional[Callable] = None
  needs: Optional[str] = None


REGISTRY = {}


class _Names(collections.abc.Sequence):
  """The registered criteria's names in registration order (a live view of REGISTRY)."""

  def __getitem__(self, i):
    return tuple(REGISTRY)[i]

  def __len__(self):
    return len(REGISTRY)

  def __repr__(self):
    return repr(tuple(REGISTRY))


CRITERIA = _Names()


def register(name, criterion):
  """Adds `criterion` (a Criterion) under `name`; returns it."""
  REGISTRY[name] = criterion
  return criterion


def l1_score(kernels, scale, lead=0):
  """Per-output-channel L1 norms of kernels [*lead, ..., O_i], concatenated: [*lead, O]."""
  del scale
  return jnp.concatenate([jnp.sum(jnp.abs(w), axis=tuple(range(lead, w.ndim - 1)))
                          for w in kernels], -1)


register("l1", Criterion(score=l1_score))
register("bn", Criterion(score=lambda kernels, scale, lead=0: jnp.abs(scale)))
register("taylor", Criterion(score=l1_score, tree=lambda p, g: jax.tree.map(jnp.multiply, p, g),
                             needs="grads"))
register("random", Criterion(draw=lambda key, n: jax.random.uniform(key, (n,), jnp.float32),
                             needs="key"))


def resolve(name, params, grads=None, key=None):
  """(Criterion, the tree its score reads) of criterion `name`; ValueError for an unknown
  name or a missing gradient / key."""
  if name not in REGISTRY:
    raise ValueError(f"criterion must be one of {CRITERIA}, got {name!r}")
  crit = REGISTRY[name]
  if crit.needs == "grads" and grads is None:
    raise ValueError(f"criterion {name!r} needs the loss gradients of the params")
  if crit.needs == "key" and key is None:
    raise ValueError(f"criterion {name!r} needs a PRNG key")
  return crit, (params if crit.tree is None else crit.tree(params, grads))


def _kernels(p):
  """The kernels of a conv+BN producer {'conv'|'conv1','conv2', 'bn'}."""
  return (p["conv"],) if "conv" in p else (p["conv1"], p["conv2"])


# ---------------------------------------------------------------- the supernet (traced)


def _supernet_space_scores(plan, tree, arc, score):
  """Scores f32 [N] of the channels of every space, in supernet.space_table's order
  (0 where no producer opens the space: node spaces): each slot's sep_conv scores are
  its chosen op's, at its chosen input's weight set."""
  out = {"stem": score(_kernels(tree["stem"]), tree["stem"]["bn"]["scale"])}
  for spec in plan.cells:
    i, cp = spec.index, tree["cells"][spec.index]
    for name in ("calib_x", "calib_y", "reduce"):
      if name in cp:
        out[(name, i)] = score(_kernels(cp[name]), cp[name]["bn"]["scale"])
    part = supernet.cell_arc(arc, spec)
    idx, op = supernet.slots(part)
    sets = cp["sep3"]["bn1"]["scale"].shape[2]
    onehot = jax.nn.one_hot(slot_ops.weight_index(idx, sets), sets)       # [5, 2, sets]
    picked = [jnp.einsum("ksi,ksic->ksc", onehot, score((cp[name][w],), cp[name][bn]["scale"], 3))
              for name in ("sep3", "sep5") for w, bn in (("pw1", "bn1"), ("pw2", "bn2"))]
    is5 = (op == space.SEP5)[..., None]
    inner = jnp.where(is5, picked[2], picked[0])                          # [5, 2, F]
    outer = jnp.where(is5, picked[3], picked[1])
    for k in range(space.NUM_NODES):
      for s in range(2):
        out[("out", i, k, s)], out[("inner", i, k, s)] = outer[k, s], inner[k, s]
    rows = supernet.unused(part)[:, None, None]       # the final conv reads unused values
    out[("final", i)] = score((cp["final"]["w"] * rows,), cp["final"]["bn"]["scale"])
  return jnp.concatenate([out[key] if key in out else jnp.zeros((w,), jnp.float32)
                          for key, w, _ in supernet.space_table(plan)])


def supernet_units(plan, params, arc, groups, criterion="l1", grads=None, key=None):
  """Importance f32 [N] of every unit id of `groups` (groups.supernet_groups(plan, arc);
  N: channels of all spaces, ids past the real units score 0) of the supernet running
  arc int32 [40]. All arguments but plan and criterion may be traced."""
  crit, tree = resolve(criterion, params, grads, key)
  n = sum(w for _, w, _ in supernet.space_table(plan))
  if crit.draw is not None:
    imp = crit.draw(key, n)
  else:
    imp = _supernet_space_scores(plan, tree, arc, crit.score)
  return jnp.zeros(n, jnp.float32).at[groups["unit_of"]].add(imp)


# ---------------------------------------------------------------- the fixed network (traced)


def child_units(plan, params, criterion="l1", grads=None, key=None):
  """Importance f32 [U] of every unit of groups.child_groups(plan): each producer's
  scores added to the units of its channels (a sep_conv: pw2/bn2 its output, pw1/bn1
  its inner space); `random` draws one score per unit."""
  g, inner = groups_lib.child_groups(plan)
  crit, tree = resolve(criterion, params, grads, key)
  if crit.draw is not None:
    return crit.draw(key, len(g.unit_group))
  imp = jnp.zeros(len(g.unit_group), jnp.float32)
  for j, n in graph.param_nodes(plan):
    p = tree["blocks"][n.name]
    if n.kind == "sep":
      imp = imp.at[g.unit_of[j]].add(crit.score((p["pw2"],), p["bn2"]["scale"]))
      imp = imp.at[g.unit_of[inner[n.name]]].add(crit.score((p["pw1"],), p["bn1"]["scale"]))
    else:
      imp = imp.at[g.unit_of[j]].add(crit.score(_kernels(p), p["bn"]["scale"]))
  return imp
