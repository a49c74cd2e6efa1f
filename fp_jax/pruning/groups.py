"""Step 1 of pruning: channel units and groups from a network's declared channel spaces.

One derivation for both networks, from the `channels.Spaces` each declares beside its
builder (supernet.channel_spaces per sampled arc, graph.channel_spaces for the fixed
network), in the spirit of Torch-Pruning's dependency groups:

- A *space* is the channel axis of one tensor. Producers (conv / factorized reduction /
  sep_conv pointwise, each followed by BN) open a new space; consumers only read one.
- *Ties* say that channel t of one space is channel t' of another (pass-through, add,
  concat). Where ENAS skips a calibration, a cell's nodes read the previous cell's
  output directly, which ties the two cells' spaces.
- A *unit* is a class of tied channels (union over all ties): pruning removes whole
  units, so every tensor sees the same channels vanish.
- A *group* is a set of units pruned together at one ratio: units that occur in the
  same non-concat space (a concat only relabels its parts' channels, so it does not
  merge its parts' groups). A group takes the ratio of the earliest stage among its
  spaces; how many units it keeps is masks.keep_count's.

The result (`Groups`) is static numpy; `supernet_groups` pads it to arrays of static
shapes (traced data, so one compilation serves every architecture).
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from fp_jax.models import graph
from fp_jax.models import supernet


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


def derive(spaces):
  """Groups of a network's channels.Spaces (units numbered in channel order)."""
  widths, member = spaces.widths, spaces.member
  offs = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
  ea, eb = [], []
  for a, ao, b, bo, n in spaces.ties:
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
      np.minimum.at(stage, g, spaces.stages[s])
      fix[g] |= bool(spaces.fixed[s])
  return Groups(unit_of, unit_group.astype(np.int32), size.astype(np.int32),
                stage.astype(np.int32), fix)


def padded(g):
  """Group arrays of static shapes (N = channels of all spaces): {'unit_of' [N],
  'unit_group' [N], 'group_size' [N+1], 'group_stage' [N+1], 'group_fixed' [N+1]}
  (int32 / bool numpy); unused unit ids form one fixed dummy group."""
  unit_of = np.concatenate(g.unit_of).astype(np.int32)
  n, u, ng = len(unit_of), len(g.unit_group), len(g.group_size)
  pad = lambda a, size, fill: np.concatenate([a, np.full(size - len(a), fill, a.dtype)])
  size = pad(g.group_size, n + 1, 0)
  size[ng] = n - u
  return {"unit_of": unit_of, "unit_group": pad(g.unit_group, n, ng).astype(np.int32),
          "group_size": size.astype(np.int32),
          "group_stage": pad(g.group_stage, n + 1, 0).astype(np.int32),
          "group_fixed": pad(g.group_fixed, n + 1, True)}


def supernet_groups(plan, arc):
  """padded(groups) of the supernet running `arc` (concrete int [40]), cached (the search
  evaluates an arc on many batches). unit_of follows supernet.space_table's order."""
  return _supernet_groups(plan, tuple(int(v) for v in np.asarray(arc)))


@functools.lru_cache(maxsize=4096)
def _supernet_groups(plan, arc):
  return padded(derive(supernet.channel_spaces(plan, np.asarray(arc))))


@functools.lru_cache(maxsize=32)
def child_groups(plan):
  """(Groups, {sep name: inner space index}) of the fixed network `plan` (cached)."""
  spaces, inner = graph.channel_spaces(plan)
  return derive(spaces), inner
