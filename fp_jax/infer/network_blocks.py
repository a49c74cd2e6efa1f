"""The blocks of a fused network: what the latency table (latency_table.py) is keyed by.

A network is a list of `Block`s, one per graph node (conv, fr, sep, avg, max, add, concat)
and the classifier, keyed by kind, kernel, stride, input ReLU, input (H, W) and widths
(rounded up to the padding multiple). `network_widths` gives the widths the fused path runs
for the deployed network (unpruned, or compacted at stage ratios as compress compacts it,
groups padded as padding.padded_widths pads them); `blocks` lists a plan's blocks at those
widths; `enumerate_blocks` lists the blocks of DRAWS random (arc, ratios) draws of one
network `Shape`, remembered under its `fingerprint`; `parse_name` inverts Block.name.
"""
from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np

from fp_jax.infer import padding
from fp_jax.models import flops
from fp_jax.models import graph
from fp_jax.models import space
from fp_jax.pruning import compaction

DRAWS = 1500          # random (arc, ratios) draws whose blocks the enumeration lists


@dataclasses.dataclass(frozen=True, order=True)
class Block:
  """One block of the fused network at batch 1 (widths already rounded to the grid)."""
  kind: str        # conv | fr | sep | avg | max | add | concat | classifier
  hw: tuple        # input (H, W)
  cin: int         # input width (concat: all parts together)
  cout: int        # output width (classifier: classes)
  k: int = 1       # kernel (conv, sep; pools are 3x3)
  stride: int = 1
  relu: bool = False   # ReLU on the input (conv, fr; sep and the classifier always)
  inner: int = 0   # sep: inner width; concat: number of parts

  @property
  def name(self):
    """The entry key, e.g. 'sep k5 s2 relu 28x28 16>16>16'."""
    mid = f">{self.inner}" if self.kind == "sep" else (f"/{self.inner}" if self.inner else "")
    return (f"{self.kind} k{self.k} s{self.stride}{' relu' if self.relu else ''} "
            f"{self.hw[0]}x{self.hw[1]} {self.cin}{mid}>{self.cout}")

  def cost(self):
    """A rough work count (multiply-adds or elements), only to scale estimates."""
    h, w = self.hw
    hw = h * w / self.stride ** 2
    if self.kind == "sep":
      return h * w * self.k ** 2 * self.cin / self.stride ** 2 + hw * (
          self.cin * self.inner + self.k ** 2 * self.inner + self.inner * self.cout)
    if self.kind in ("conv", "fr"):
      return hw * self.k ** 2 * self.cin * self.cout
    return h * w * (self.cin + (self.cout if self.kind == "classifier" else 0))



def network_widths(plan, ratios=None, pad=8, round_to=1):
  """Widths (flops.full_widths layout) the fused path runs: the unpruned network (ratios
  None) or the one compress produces at stage `ratios` [5], groups padded to `pad`."""
  w = flops.full_widths(plan) if ratios is None else compaction.ratio_widths(
      plan, np.asarray(ratios, np.float32), round_to)
  return padding.padded_widths(plan, w, pad)


def blocks(plan, widths, pad=8):
  """[Block] of every node of graph `plan` at `widths`, then the classifier."""
  vals, inner = widths["values"], widths["inner"]
  grid = lambda j: vals[j] if plan.nodes[j].kind == "image" else padding.round_up(vals[j], pad)
  out = []
  for j, n in enumerate(plan.nodes):
    if n.kind == "image":
      continue
    i = n.inputs[0]
    hw = plan.nodes[i].hw
    if n.kind == "concat":
      total = sum(grid(i) for i in n.inputs)
      out.append(Block("concat", n.hw, total, total, inner=len(n.inputs)))
    elif n.kind == "add":
      out.append(Block("add", n.hw, grid(j), grid(j)))
    elif n.kind in ("avg", "max"):
      out.append(Block(n.kind, hw, grid(i), grid(j), k=3, stride=n.stride))
    elif n.kind == "sep":
      out.append(Block("sep", hw, grid(i), grid(j), n.k, n.stride, True,
                       padding.round_up(inner[n.name], pad)))
    else:   # conv, fr
      out.append(Block(n.kind, hw, grid(i), grid(j), n.k, n.stride, n.relu))
  out.append(Block("classifier", plan.nodes[plan.out].hw, grid(plan.out), plan.num_classes,
                   relu=True))
  return out


@dataclasses.dataclass(frozen=True)
class Shape:
  """The deployed (final) network's size: graph.build's arguments but the arc."""
  num_layers: int
  out_filters: int
  image_shape: tuple
  num_classes: int

  def plan(self, arc):
    return _plan(self, tuple(int(a) for a in np.asarray(arc)))


@functools.lru_cache(maxsize=4096)
def _plan(shape, arc):
  return graph.build(np.asarray(arc), shape.num_layers, shape.out_filters, shape.image_shape,
                     shape.num_classes)


def fingerprint(shape, ratio_choices, pad, round_to, draws=DRAWS):
  """The name an enumeration is remembered by in the cache."""
  h, w, c = shape.image_shape
  r = ",".join(f"{float(x):g}" for x in ratio_choices)
  return (f"L{shape.num_layers} F{shape.out_filters} {h}x{w}x{c} cls{shape.num_classes} "
          f"ratios[{r}] pad{pad} round{round_to} draws{draws}")


def enumerate_blocks(shape, ratio_choices, pad=8, round_to=1, draws=DRAWS, seed=0):
  """Sorted [Block] of the unpruned and pruned networks of `draws` random draws: a uniform
  arc (space.sample_uniform) and a uniform choice of ratio_choices per stage each (half
  the draws with every stage at one ratio). Keys reached by no draw are rare (the
  bench counts them) and estimated by Table.lookup."""
  rng = np.random.default_rng(seed)
  choices = np.asarray(ratio_choices, np.float32)
  found = set()
  for d in range(draws):
    plan = shape.plan(space.sample_uniform(rng))
    ratios = (rng.choice(choices, 5) if d % 2 else np.full(5, rng.choice(choices)))
    for r in (None, ratios):
      found.update(blocks(plan, network_widths(plan, r, pad, round_to), pad))
  return sorted(found)


_NAME = re.compile(r"(\w+) k(\d+) s(\d+)( relu)? (\d+)x(\d+) (\d+)(?:[>/](\d+))?>(\d+)$")


def parse_name(name):
  """The Block of an entry name (Block.name's inverse)."""
  kind, k, s, relu, h, w, cin, mid, cout = _NAME.match(name).groups()
  return Block(kind, (int(h), int(w)), int(cin), int(cout), int(k), int(s), bool(relu),
               int(mid or 0))


def network_of(plan, ratios=None, pad=8, round_to=1):
  """[Block] of the network the fused path runs for `plan`: unpruned (ratios None) or
  compacted at stage `ratios` [5] (network_widths)."""
  return blocks(plan, network_widths(plan, ratios, pad, round_to), pad)
