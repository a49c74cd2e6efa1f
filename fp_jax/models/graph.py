"""The fixed (final) network as a flat graph of blocks, built as ENAS builds it.

One definition of the fixed-arc network (melodyguan/enas, src/cifar10/micro_child.py
`_model`, `_fixed_layer`, `_maybe_calibrate_size`, `_fixed_combine`), read by every
consumer: `child.forward` (training and eval), `flops.count`, pruning (its channel
spaces, `channel_spaces`, below), `compaction`, and the per-op and fused executors.

Per cell i (F doubles at the two reduction cells, which run at stride 2):
  calibration  h(i-2): factorized reduction (ReLU first) when it is larger than
               h(i-1), else ReLU-1x1-BN when its channels differ from F, else as is;
               h(i-1): ReLU-1x1-BN when its channels differ from F, else as is;
  layer_base   ReLU-1x1-BN on the calibrated h(i-1), in every cell;
  nodes        node k = op_a(in_a) + op_b(in_b); an op reading a cell input in a
               reduction cell runs at stride 2: sep_conv's first depthwise is strided,
               pooling is strided, identity becomes a factorized reduction (no ReLU);
  combine      concat of every node *and cell input* no node uses, the larger ones
               factorized-reduced (no ReLU) to the output size.
The stem is a 3x3 conv to 3F + BN; the aux head follows cell (second reduction + 1).

A graph is a tuple of `Node`s in execution order; node j's output is value j.
Parametrised nodes (conv, fr, sep) keep their params under params['blocks'][name].
"""
from __future__ import annotations

import dataclasses

from fp_jax.models import channels
from fp_jax.models import space

KINDS = ("image", "conv", "fr", "sep", "avg", "max", "add", "concat")
PARAM_KINDS = ("conv", "fr", "sep")


@dataclasses.dataclass(frozen=True)
class Node:
  name: str            # unique; the params/stats key of conv, fr and sep nodes
  kind: str            # one of KINDS
  inputs: tuple        # indices of the nodes whose outputs it reads
  channels: int        # output channels (unpruned); sep: also its inner width
  hw: tuple            # output (H, W)
  k: int = 1           # kernel size (conv, sep; pools are 3x3)
  stride: int = 1      # fr: always 2; sep: of the first depthwise; pools
  relu: bool = False   # ReLU on the input (conv, fr; sep always ReLUs)
  cell: int = -1       # cell index; -1 for the image and the stem
  drop: bool = False   # drop-path on this output in training (node ops but identity)


@dataclasses.dataclass(frozen=True)
class GraphCell:
  index: int
  reduce: bool
  stage: int           # 0..4, the pruning stage (DESIGN §6)
  filters: int         # F of this cell
  hw: tuple            # output (H, W)
  inputs: tuple        # node indices of h(i-2), h(i-1) as the cell receives them
  out: int             # node index of the cell output
  out_channels: int


@dataclasses.dataclass(frozen=True)
class GraphPlan:
  in_channels: int
  image_hw: tuple
  stem_channels: int
  num_classes: int
  nodes: tuple         # Node, in execution order; nodes[0] is the image
  cells: tuple         # GraphCell
  aux_index: int       # the aux head reads the output of this cell
  out: int             # node index of the last cell's output (the classifier's input)

  @property
  def stem(self):
    return 1


def ceil_hw(hw, s):
  return (-(-hw[0] // s), -(-hw[1] // s))


def build(arc, num_layers, out_filters, image_shape, num_classes):
  """The GraphPlan of the fixed network of `arc` (int [40], static)."""
  normal, reduce_arc = space.split(arc)
  h, w, c = image_shape
  r1, r2 = space.reduction_layers(num_layers)
  stages = space.stage_of_layer(num_layers)
  nodes = []

  def add(name, kind, inputs, channels, hw, **kw):
    nodes.append(Node(name, kind, tuple(inputs), channels, tuple(hw), **kw))
    return len(nodes) - 1

  ch = lambda v: nodes[v].channels
  hw_of = lambda v: nodes[v].hw
  img = add("image", "image", (), c, (h, w))
  stem = add("stem", "conv", (img,), 3 * out_filters, (h, w), k=3)
  prev, f, cells = [stem, stem], out_filters, []
  for i in range(num_layers + 2):
    reduce = i in (r1, r2)
    if reduce:
      f *= 2
    stride = 2 if reduce else 1
    pre = f"cells/{i}/"
    x, y = prev
    if hw_of(x) != hw_of(y):
      x = add(pre + "calib_x", "fr", (x,), f, hw_of(y), stride=2, relu=True, cell=i)
    elif ch(x) != f:
      x = add(pre + "calib_x", "conv", (x,), f, hw_of(x), relu=True, cell=i)
    if ch(y) != f:
      y = add(pre + "calib_y", "conv", (y,), f, hw_of(y), relu=True, cell=i)
    base = add(pre + "base", "conv", (y,), f, hw_of(y), relu=True, cell=i)
    vals, used = [x, base], [0] * (2 + space.NUM_NODES)
    rows = (reduce_arc if reduce else normal).reshape(space.NUM_NODES, 4)
    for k, row in enumerate(rows):
      operands = []
      for s in range(2):
        j, op = int(row[2 * s]), int(row[2 * s + 1])
        used[j] += 1
        src, st = vals[j], (stride if j < 2 else 1)
        name, out_hw = f"{pre}node{k + 2}/{'ab'[s]}", ceil_hw(hw_of(vals[j]), st)
        if op in (space.SEP3, space.SEP5):
          v = add(name, "sep", (src,), f, out_hw, k=3 if op == space.SEP3 else 5, stride=st,
                  cell=i, drop=True)
        elif op in (space.AVG, space.MAX):
          assert ch(src) == f, "pool inputs are calibrated to F"
          v = add(name, "avg" if op == space.AVG else "max", (src,), f, out_hw, k=3, stride=st,
                  cell=i, drop=True)
        elif st > 1:
          v = add(name, "fr", (src,), f, out_hw, stride=st, cell=i)
        else:
          v = src
        operands.append(v)
      assert hw_of(operands[0]) == hw_of(operands[1])
      vals.append(add(f"{pre}node{k + 2}", "add", operands, f, hw_of(operands[0]), cell=i))
    outs = [j for j in range(2 + space.NUM_NODES) if used[j] == 0]
    out_hw = min(hw_of(vals[j]) for j in outs)
    parts = []
    for j in outs:
      v = vals[j]
      if hw_of(v) != out_hw:
        v = add(f"{pre}combine/{j}", "fr", (v,), f, out_hw, stride=2, cell=i)
      parts.append(v)
    out = (add(pre + "out", "concat", parts, sum(ch(v) for v in parts), out_hw, cell=i)
           if len(parts) > 1 else parts[0])
    cells.append(GraphCell(i, reduce, stages[i], f, out_hw, tuple(prev), out, ch(out)))
    prev = [prev[1], out]
  return GraphPlan(c, (h, w), 3 * out_filters, num_classes, tuple(nodes), tuple(cells),
                   min(r2 + 1, num_layers + 1), prev[1])


def param_nodes(plan):
  """[(index, Node)] of the nodes that hold parameters (conv, fr, sep)."""
  return [(j, n) for j, n in enumerate(plan.nodes) if n.kind in PARAM_KINDS]


def stage_of(plan, j):
  """Pruning stage of node j (the stem and the image: 0)."""
  cell = plan.nodes[j].cell
  return 0 if cell < 0 else plan.cells[cell].stage


def channel_spaces(plan, widths=None):
  """(channels.Spaces, {sep name: inner space index}) of the graph: value j is space j,
  sep node j's inner width a space after all values. widths (flops.full_widths layout;
  default: the plan's) gives the widths of a compact or padded network. Pools pass
  channels through, an add ties its operands, a concat its parts to its segments."""
  nodes = plan.nodes
  vw = [n.channels for n in nodes] if widths is None else list(widths["values"])
  width = list(vw)
  member = [n.kind != "concat" for n in nodes]
  stages = [stage_of(plan, j) for j in range(len(nodes))]
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
      inner[n.name] = len(width)
      width.append(n.channels if widths is None else widths["inner"][n.name])
      member.append(True)
      stages.append(stages[j])
      fixed.append(False)
  return channels.Spaces(tuple(width), tuple(stages), tuple(member), tuple(fixed),
                         tuple(ties)), inner
