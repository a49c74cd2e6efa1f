"""The two networks the latency stage times: unpruned and compact pruned (child.py pytrees).

From trained weights files (final/, compress/) or random weights for any arc, size and
ratios (latency does not depend on trained values; BN statistics estimated on random
images so activations stay O(1), as in a trained network), plus the widths and
multiply-adds read from parameter shapes.
"""
from __future__ import annotations

import collections
import os

import jax
import jax.numpy as jnp
import numpy as np

from fp_jax.models import child
from fp_jax.models import flops
from fp_jax.models import layers
from fp_jax import profile
from fp_jax import results
from fp_jax.run import weights
from fp_jax.infer import padding
from fp_jax.pruning import compaction


Net = collections.namedtuple("Net", "plan arc params stats")   # a child.py network
BN_BATCH = 32               # random images the BN statistics of a random network come from


def random_init(plan, seed):
  """(params, stats) with child.init's pytree structure (jax.eval_shape), filled on the
  host: He-normal conv kernels and classifier as child.init, BN scale ~ U(0.5, 1.5) and
  bias ~ N(0, 0.1), running mean ~ N(0, 0.1) and var ~ U(0.5, 1.5) (so folding
  matters). Eager child.init compiles one PRNG call per shape (15 s for a 5-cell net)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: child.init(jax.random.key(0), plan))

  def fill(path, leaf):
    name, shape = jax.tree_util.keystr(path), leaf.shape
    if name.endswith(("['scale']", "['var']")):
      a = rng.uniform(0.5, 1.5, shape)
    elif name.endswith(("['bias']", "['mean']")):
      a = rng.normal(0.0, 0.1, shape)
    elif name.endswith("['b']"):
      a = np.zeros(shape)
    elif len(shape) == 2:       # classifier / aux fc [in, out]
      a = rng.standard_normal(shape) / np.sqrt(shape[0])
    else:                       # HWIO conv kernel (depthwise: I = 1)
      a = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:3]))
    return jnp.asarray(a, jnp.float32)

  return tuple(jax.tree_util.tree_map_with_path(fill, t) for t in shapes)


def estimate_bn(plan, params, stats, seed, batch=BN_BATCH):
  """stats with every BN's running mean and variance set to its batch statistics on
  `batch` random N(0, 1) images [batch,H,W,C] (the scale of the normalised inputs).

  One train-mode child.forward: there each BN normalises by the statistics of its
  own input, computed after the BNs before it did the same, so with these
  statistics the eval-mode network reproduces the train-mode one on that batch and
  every BN output has per-channel mean `bias` and std ~`scale` at any depth (random
  running statistics instead compound: logits ~1e6 at 15 layers). The update is
  read back from the running averages child.forward returns,
  new = m * old + (1 - m) * batch (m = layers.BN_MOMENTUM); BNs it does not run
  (the aux head) come back unchanged.
  """
  x = np.random.default_rng(seed).standard_normal(
      (batch,) + tuple(plan.image_hw) + (plan.in_channels,)).astype(np.float32)
  new = jax.jit(lambda p, s, x: child.forward(plan, p, s, x, True, with_aux=False)[2])(
      params, stats, x)
  m = layers.BN_MOMENTUM
  return jax.tree.map(lambda n, o: (n - m * o) / (1 - m), new, stats)


def prune(plan, params, stats, ratios, criterion="l1", round_to=1):
  """compaction.prune without the widths: (compact params, stats)."""
  _, cp, cs = compaction.prune(plan, params, stats, ratios, criterion, round_to)
  return cp, cs


def random_networks(config, workdir):
  """{'baseline', 'pruned'} Nets: random_init weights, BN statistics estimated on random
  images (estimate_bn), pruned with the configured ratios (and compress.round_to, as
  compress prunes), then the compact network's BN statistics estimated again (as
  compress re-estimates them)."""
  arc = results.configured_arc(config, workdir)
  shape, num_classes = profile.image_shape(config)
  plan = child.make_plan(arc, config.final.num_layers, config.final.out_filters, shape,
                         num_classes)
  params, stats = random_init(plan, config.seed)
  stats = estimate_bn(plan, params, stats, config.seed)
  ratios = results.configured_ratios(config, workdir)
  cp, cs = prune(plan, params, stats, ratios, config.compress.importance,
                 config.compress.round_to)
  cs = estimate_bn(plan, cp, cs, config.seed + 1)
  return {"baseline": Net(plan, arc, params, stats), "pruned": Net(plan, arc, cp, cs)}


def trained_networks(workdir):
  """{'baseline', 'pruned'} Nets from DIR/final/weights.npz and DIR/compress/weights.npz."""
  nets = {}
  for name, rel, stage in (("baseline", results.FINAL_WEIGHTS, "final"),
                           ("pruned", results.COMPRESS_WEIGHTS, "compress")):
    plan, arc, tree, _ = weights.load_network(
        os.path.join(workdir, rel), "latency.init=trained",
        f"run the {stage} stage first (--config.stages=final,compress,latency) or use "
        "--config.latency.init=random")
    nets[name] = Net(plan, arc, tree["params"], tree["stats"])
  return nets


def padded_macs(net, multiple):
  """Multiply-adds the fused path executes with its channel groups padded to a
  multiple of `multiple` (fused.Options.pad_channels): flops.count of the padded
  network's widths."""
  p, _ = padding.pad_channels(net.plan, net.params, net.stats, multiple)
  return flops.count(net.plan, flops.widths_of_params(net.plan, p))["macs"]
