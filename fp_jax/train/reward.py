"""The fake-pruning reward (DESIGN §6) and one sample's evaluation: its samples.jsonl row.

Reward = a * Ratio * (1 + b * Gap) + TrainAcc, Gap = PruneAcc - TrainAcc,
where TrainAcc / PruneAcc are the accuracies of the unmasked / masked
architecture on the same validation minibatch and Ratio is the sum over the
network's cells of their stage's pruning ratio. a = 0 is plain ENAS.
Computed in Python floats from the logged values, so samples.jsonl satisfies
the formula exactly.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fp_jax.models import supernet_flops
from fp_jax.models import supernet
from fp_jax.pruning import groups as groups_lib


def fake_pruning_reward(train_acc: float, prune_acc: float, ratio: float, *,
                        alpha: float, beta: float) -> dict:
  gap = prune_acc - train_acc
  reward = alpha * ratio * (1 + beta * gap) + train_acc
  return {"train_acc": train_acc, "prune_acc": prune_acc, "gap": gap, "ratio": ratio,
          "reward": reward}


def make(alpha: float, beta: float):
  """The reward function handed to the search loop: (train_acc, prune_acc, ratio) -> dict."""
  return functools.partial(fake_pruning_reward, alpha=alpha, beta=beta)


def evaluate(plan, reward_eval, reward_fn, measure, params, arc, ratios, batch, key,
             latency=None) -> dict:
  """The samples.jsonl fields of `arc` (int [40]) masked at stage `ratios` (f32 [5]).

  reward_eval: search_steps.make_reward_eval's compiled step, run on `batch` (x, y: one
  sharded validation batch) with `key` (criterion 'random'); reward_fn: `make`'s.
  Returns {arc, ratios, train_acc, prune_acc, gap, ratio (supernet_flops.ratio `measure`),
  reward, macs, masked_macs}: the multiply-adds of the searched network unmasked and with
  the evaluation's kept channels, from one walk of the arc (supernet_flops.count); with
  `latency` (latency_table.Predictor: (arc, ratios) -> ms of the deployed network unpruned
  and pruned) also latency_ms and masked_latency_ms, whatever the measure.
  """
  ratios = np.asarray(ratios, np.float32)
  train_acc, prune_acc, kept = reward_eval(params, jnp.asarray(arc), jnp.asarray(ratios),
                                           groups_lib.supernet_groups(plan, arc), key, *batch)
  macs, masked_macs = supernet_flops.count(
      plan, arc, supernet.stack_kept([supernet.full_kept(plan), jax.device_get(kept)]))
  lat = {}
  if latency is not None:
    lat["latency_ms"], lat["masked_latency_ms"] = latency(arc, ratios)
  ratio = supernet_flops.ratio(measure, plan, ratios, macs, masked_macs, **lat)
  return dict(arc=[int(a) for a in arc], ratios=[float(r) for r in ratios],
              **reward_fn(float(train_acc), float(prune_acc), ratio), macs=macs,
              masked_macs=masked_macs, **lat)
