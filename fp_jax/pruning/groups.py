"""Channel groups for pruning, derived from the network's producer/consumer structure.

One definition, used for the supernet (supernet_groups, per sampled arc) and the
fixed network (fixed_groups, its graph), in the spirit of Torch-Pruning's
dependency groups:

- A *space* is the channel axis of one tensor (a node's output, or a sep_conv's
  inner width). Producers (conv / factorized reduction / sep_conv pointwise, each
  followed by BN) open a new space; consumers (the next conv, the classifier) only
  read one.
- *Ties* say that channel t of one space is channel t' of another: pooling and
  identity pass channels through, an add ties its operands and its output, a concat
  ties each part to a segment of its output. Where ENAS skips a calibration, a cell's
  nodes read the previous cell's output directly, which ties the two cells' spaces.
- A *unit* is a class of tied channels (union over all ties): pruning removes whole
  units, so every tensor sees the same channels vanish.
- A *group* is a set of units pruned together at one ratio: units that occur in the
  same non-concat space (a concat only relabels its parts' channels, so it does not
  merge its parts' groups). A group takes the ratio of the earliest stage among its
  spaces and keeps its top max(1, round((1 - ratio) * units)) units by importance,
  the sum over the group's producers of each unit's channels' importance.

The result (`Groups`) is static numpy; `unit_masks` is a pure jnp function of traced
importance and ratios, so one compilation serves every ratio and weight.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from fp_jax.models import graph


@dataclasses.dataclass(frozen=True)
class Groups:
  unit_of: tuple       # per space: int [width] unit id of each channel
  unit_group: np.ndarray   # int [U] group of each unit
  group_size: np.ndarray   # int [G] units per group
  group_stage: np.ndarray  # int [G] stage whose ratio the group takes
  group_fixed: np.ndarray  # bool [G] never pruned (the image's channels)


def _components(n, a, b):
  """Connected components of n elements under the pairs (a[i], b[i]): labels [n]."""
  if n == 0:
    return np.zeros(0, np.int64)
  m = coo_matrix((np.ones(len(a), np.int8), (np.asarray(a, np.int64), np.asarray(b, np.int64))),
                 shape=(n, n))
  return connected_components(m, directed=False)[1]


def _first_appearance(labels):
  """Relabels component labels 0, 1, ... in order of first appearance."""
  _, first, inv = np.unique(labels, return_index=True, return_inverse=True)
  rank = np.empty(len(first), np.int64)
  rank[np.argsort(first, kind="stable")] = np.arange(len(first))
  return rank[inv], len(first)


def derive(widths, ties, member, stages, fixed):
  """Units and groups of spaces.

  widths: int per space; ties: [(a, a_offset, b, b_offset, length)] channel a[a_off + t]
  is channel b[b_off + t]; member: bool per space, whether it makes its units one group
  (False for concats); stages: int per space; fixed: bool per space (never pruned).
  """
  offs = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
  ea, eb = [], []
  for a, ao, b, bo, n in ties:
    ea.append(offs[a] + ao + np.arange(n))
    eb.append(offs[b] + bo + np.arange(n))
  ea = np.concatenate(ea) if ea else np.zeros(0, np.int64)
  eb = np.concatenate(eb) if eb else np.zeros(0, np.int64)
  labels = _components(int(offs[-1]), ea, eb)
  unit, num_units = _first_appearance(labels)      # units follow channel order
  unit_of = tuple(unit[offs[s]:offs[s + 1]] for s in range(len(widths)))
  # groups: units sharing a member space; bipartite graph units <-> member spaces
  ua, ub = [], []
  for s, w in enumerate(widths):
    if member[s] and w:
      ua.append(unit_of[s])
      ub.append(np.full(w, num_units + s))
  ua = np.concatenate(ua) if ua else np.zeros(0, np.int64)
  ub = np.concatenate(ub) if ub else np.zeros(0, np.int64)
  glabel = _components(num_units + len(widths), ua, ub)[:num_units]
  unit_group, num_groups = _first_appearance(glabel)
  size = np.bincount(unit_group, minlength=num_groups)
  stage = np.full(num_groups, np.iinfo(np.int64).max)
  fix = np.zeros(num_groups, bool)
  for s, w in enumerate(widths):
    if w and member[s]:
      g = unit_group[unit_of[s]]
      np.minimum.at(stage, g, stages[s])
      fix[g] |= bool(fixed[s])
  return Groups(unit_of, unit_group.astype(np.int32), size.astype(np.int32),
                stage.astype(np.int32), fix)


def unit_masks(unit_imp, unit_group, group_size, group_stage, group_fixed, ratios):
  """0/1 f32 [U]: each group keeps its top max(1, round((1 - ratio) * size)) units by
  `unit_imp` [U] (ties: the lower unit id), ratio = ratios[group_stage]; fixed groups
  keep all. All arguments may be traced (shapes static)."""
  u = unit_imp.shape[0]
  ratio = jnp.asarray(ratios, jnp.float32)[group_stage]
  size = jnp.asarray(group_size)
  keep = jnp.maximum(1, jnp.round((1.0 - ratio) * size)).astype(jnp.int32)
  keep = jnp.where(group_fixed, size, keep)
  idx = jnp.arange(u)
  order = jnp.lexsort((idx, -unit_imp, unit_group))        # by group, then importance
  start = jnp.cumsum(size) - size
  g_sorted = jnp.asarray(unit_group)[order]
  rank = jnp.zeros(u, jnp.int32).at[order].set((idx - start[g_sorted]).astype(jnp.int32))
  return (rank < keep[jnp.asarray(unit_group)]).astype(jnp.float32)


# ---------------------------------------------------------------- the fixed network


def fixed_spaces(plan, node_widths=None):
  """Spaces of the fixed graph: node j is space j; sep node j's inner width is space
  len(nodes) + i. node_widths (flops.full_widths layout; default: the plan's) gives the
  widths of a compact network. Returns (widths, ties, member, stages, fixed,
  inner_index {name: s})."""
  nodes = plan.nodes
  vw = [n.channels for n in nodes] if node_widths is None else list(node_widths["values"])
  widths = list(vw)
  member = [n.kind != "concat" for n in nodes]
  stages = [graph.stage_of(plan, j) for j in range(len(nodes))]
  fixed = [n.kind == "image" for n in nodes]
  ties, inner = [], {}
  for j, n in enumerate(nodes):
    if n.kind in ("avg", "max"):
      ties.append((j, 0, n.inputs[0], 0, vw[j]))
    elif n.kind == "add":
      ties += [(j, 0, i, 0, vw[j]) for i in n.inputs]
    elif n.kind == "concat":
      off = 0
      for i in n.inputs:
        ties.append((j, off, i, 0, vw[i]))
        off += vw[i]
    elif n.kind == "sep":
      inner[n.name] = len(widths)
      widths.append(n.channels if node_widths is None else node_widths["inner"][n.name])
      member.append(True)
      stages.append(stages[j])
      fixed.append(False)
  return widths, ties, member, stages, fixed, inner


def fixed_groups(plan):
  """(Groups, {sep name: inner space index}) of the fixed network's graph."""
  widths, ties, member, stages, fixed, inner = fixed_spaces(plan)
  return derive(widths, ties, member, stages, fixed), inner
