"""Channel spaces: the structure a network declares for pruning.

A *space* is the channel axis of one tensor (a node's output, a sep_conv's inner
width). Each network builds its `Spaces` beside its builder -- the supernet for a
sampled arc (`supernet.channel_spaces`), the fixed graph for its arc
(`graph.channel_spaces`) -- and pruning/groups.py derives units and groups from
that alone.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Spaces:
  """A network's channel spaces, in the network's own order, and their ties.

  ties: ((a, a_offset, b, b_offset, length), ...): channel a[a_offset + t] is channel
  b[b_offset + t] for t < length (identity and pooling pass channels through, an add
  ties its operands and output, a concat ties each part to a segment of its output).
  """
  widths: tuple    # int per space: its channels
  stages: tuple    # int per space: the pruning stage (0..4) whose ratio it takes
  member: tuple    # bool per space: its units form one group (False: a concat)
  fixed: tuple     # bool per space: never pruned (the image's channels)
  ties: tuple
