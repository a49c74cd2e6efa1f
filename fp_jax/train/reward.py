"""The fake-pruning reward (DESIGN §6).

Reward = a * Ratio * (1 + b * Gap) + TrainAcc, Gap = PruneAcc - TrainAcc,
where TrainAcc / PruneAcc are the accuracies of the unmasked / masked
architecture on the same validation minibatch and Ratio is the sum over the
network's cells of their stage's pruning ratio. a = 0 is plain ENAS.
Computed in Python floats from the logged values, so samples.jsonl satisfies
the formula exactly.
"""
from __future__ import annotations

import functools


def fake_pruning_reward(train_acc: float, prune_acc: float, ratio: float, *,
                        alpha: float, beta: float) -> dict:
  gap = prune_acc - train_acc
  reward = alpha * ratio * (1 + beta * gap) + train_acc
  return {"train_acc": train_acc, "prune_acc": prune_acc, "gap": gap, "ratio": ratio,
          "reward": reward}


def make(alpha: float, beta: float):
  """The reward function handed to the search loop: (train_acc, prune_acc, ratio) -> dict."""
  return functools.partial(fake_pruning_reward, alpha=alpha, beta=beta)
