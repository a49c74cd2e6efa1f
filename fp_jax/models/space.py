"""ENAS micro search space: the 40-int architecture string.

A cell has 2 inputs (index 0 = h(i-2), 1 = h(i-1)) and NUM_NODES nodes; node k
(k = 0..4, numbered 2..6 as an input) is `op_a(in_a) + op_b(in_b)` with
in_a, in_b < k + 2. A cell is 4 * NUM_NODES ints `in_a op_a in_b op_b ...`; an
arc is the normal cell followed by the reduction cell (40 ints).
"""
from __future__ import annotations

import numpy as np

NUM_NODES = 5
OPS = ("sep_conv3x3", "sep_conv5x5", "avg_pool3x3", "max_pool3x3", "identity")
NUM_OPS = len(OPS)
SEP3, SEP5, AVG, MAX, IDENTITY = range(NUM_OPS)
CELL_LEN = 4 * NUM_NODES
ARC_LEN = 2 * CELL_LEN

# The published ENAS micro architecture (Pham et al. 2018), used by benchmarks.
ENAS_NORMAL = "0 2 0 0 0 4 0 1 0 4 1 1 1 0 0 1 0 2 1 1"
ENAS_REDUCE = "1 0 1 0 0 3 0 2 1 1 3 1 1 0 0 4 0 3 1 1"
ENAS_ARC = ENAS_NORMAL + " " + ENAS_REDUCE


def validate_arc(arc) -> np.ndarray:
  """Returns `arc` as int32 [40]; raises ValueError naming what is wrong."""
  arc = np.asarray(arc)
  if arc.shape != (ARC_LEN,):
    raise ValueError(f"arc must have {ARC_LEN} ints (normal cell then reduction "
                     f"cell, 4 per node), got {arc.size}"
                     + (f" in shape {arc.shape}" if arc.ndim != 1 else ""))
  if not np.issubdtype(arc.dtype, np.integer):
    raise ValueError("arc must contain integers")
  for c, name in enumerate(("normal", "reduce")):
    for k in range(NUM_NODES):
      for s in range(2):
        i = c * CELL_LEN + 4 * k + 2 * s
        inp, op = int(arc[i]), int(arc[i + 1])
        if not 0 <= inp < k + 2:
          raise ValueError(f"arc: {name} cell node {k + 2} input {'ab'[s]} = {inp}"
                           f" (position {i}) must be in 0..{k + 1}")
        if not 0 <= op < NUM_OPS:
          raise ValueError(f"arc: {name} cell node {k + 2} op {'ab'[s]} = {op} "
                           f"(position {i + 1}) must be in 0..{NUM_OPS - 1}")
  return arc.astype(np.int32)


def parse_arc(text: str) -> np.ndarray:
  """Parses a string of 40 ints (spaces or commas) into a validated int32 [40]."""
  tokens = str(text).replace(",", " ").split()
  try:
    values = [int(t) for t in tokens]
  except ValueError:
    raise ValueError(f"arc must be {ARC_LEN} integers separated by spaces, "
                     f"got {text!r}") from None
  return validate_arc(np.array(values, dtype=np.int64))


def arc_to_string(arc) -> str:
  return " ".join(str(int(v)) for v in np.asarray(arc).reshape(-1))


def split(arc) -> tuple[np.ndarray, np.ndarray]:
  """(normal [20], reduce [20])."""
  arc = np.asarray(arc)
  return arc[:CELL_LEN], arc[CELL_LEN:]


def used_nodes(cell) -> np.ndarray:
  """bool [2 + NUM_NODES]: which of inputs/nodes are consumed by some node."""
  cell = np.asarray(cell).reshape(NUM_NODES, 4)
  used = np.zeros(2 + NUM_NODES, bool)
  used[cell[:, 0]] = True
  used[cell[:, 2]] = True
  return used


def output_nodes(cell) -> list[int]:
  """Indices (2..6) of the nodes concatenated into the cell output."""
  used = used_nodes(cell)
  return [k for k in range(2, 2 + NUM_NODES) if not used[k]]


def sample_uniform(rng: np.random.Generator) -> np.ndarray:
  """A uniformly random valid arc, int32 [40]."""
  arc = []
  for _ in range(2):
    for k in range(NUM_NODES):
      for _ in range(2):
        arc += [rng.integers(0, k + 2), rng.integers(0, NUM_OPS)]
  return validate_arc(np.array(arc))


def render_cell(cell, name: str = "cell") -> str:
  """Readable text rendering of one cell, e.g. `node2 = sep_conv3x3(h[i-2]) + ...`."""
  cell = np.asarray(cell).reshape(NUM_NODES, 4)
  names = ["h[i-2]", "h[i-1]"] + [f"node{k}" for k in range(2, 2 + NUM_NODES)]
  lines = [f"{name}:"]
  for k, (a, oa, b, ob) in enumerate(cell):
    lines.append(f"  node{k + 2} = {OPS[oa]}({names[a]}) + {OPS[ob]}({names[b]})")
  lines.append("  output = concat(" + ", ".join(names[k] for k in output_nodes(cell)) + ")")
  return "\n".join(lines)


def render_arc(arc) -> str:
  normal, reduce = split(arc)
  return render_cell(normal, "normal cell") + "\n" + render_cell(reduce, "reduction cell")


def reduction_layers(num_layers: int) -> tuple[int, int]:
  """Indices of the two reduction cells among the num_layers + 2 cells."""
  d = num_layers // 3
  return d, 2 * d + 1


def stage_of_layer(num_layers: int) -> list[int]:
  """Stage index 0..4 of each of the num_layers + 2 cells.

  Stages: 0 normal, 1 first reduction cell, 2 normal, 3 second reduction
  cell, 4 normal (the 5 pruning ratios of the controller).
  """
  r1, r2 = reduction_layers(num_layers)
  stages = []
  for i in range(num_layers + 2):
    stages.append(0 if i < r1 else 1 if i == r1 else 2 if i < r2 else 3 if i == r2 else 4)
  return stages
