"""Where every random number of a run comes from: named data streams and RNG purposes.

Batches, keys and draws are pure functions of (config.seed, a name below, a position), so
a resumed run redraws exactly what an uninterrupted one draws and the state carries no
PRNG key. The values are the numbers the runs have always used (changing one changes
every result that reads it).

  data.train_batch(..., seed=seed, stream=Stream.REWARD)   # batch order and augmentation
  key(seed, Purpose.SUPERNET_STEP, step)                   # a jax PRNG key
  rng(seed, Purpose.UNIFORM_ARCS, epoch)                   # a numpy Generator
"""
from __future__ import annotations

import enum

import jax
import numpy as np


class Stream(enum.IntEnum):
  """Data streams of data.train_batch: each use of the data gets its own batch order."""
  SUPERNET = 0        # the search's supernet training batches (step = global supernet step)
  REWARD = 1          # validation batches of the controller updates' rewards
  CHOOSE = 2          # validation batches re-evaluating the candidates for arch.json
  PROXY = 3           # bench/proxy_fidelity's re-scoring of candidates
  FINAL = 10          # the final stage's training batches
  COMPRESS = 20       # the compress stage's fine-tuning batches
  BN_REESTIMATE = 30  # the compress stage's BN re-estimation (and taylor-gradient) batches


class Purpose(enum.IntEnum):
  """What a key or numpy draw is for (the int folded into the seed first)."""
  SUPERNET_ARCS = 0      # (epoch) the controller's architectures of an epoch's supernet steps
  UPDATE_SAMPLES = 1     # (update) the architectures one controller update is rewarded for
  CHOOSE_SAMPLE = 2      # () the policy's one draw when choose() has no samples
  UNIFORM_ARCS = 3       # (epoch) numpy: uniform architectures of warm-up / random-policy epochs
  SUPERNET_STEP = 4      # (global step) dropout key of one supernet step
  REWARD_SCORES = 5      # (stream, batch) importance 'random' scores of one reward evaluation
  FINAL_INIT = 10        # () the final network's initialisation
  COMPRESS_INIT = 20     # () compress mode 'scratch': the thin network's fresh initialisation
  COMPRESS_SCORES = 40   # () compress importance 'random' scores


def key(seed: int, purpose: Purpose, *ints: int) -> jax.Array:
  """The PRNG key of (seed, purpose, ints): fold_in of each in turn."""
  k = jax.random.fold_in(jax.random.key(seed), int(purpose))
  for i in ints:
    k = jax.random.fold_in(k, int(i))
  return k


def rng(seed: int, purpose: Purpose, *ints: int) -> np.random.Generator:
  """A numpy Generator that is a pure function of (seed, purpose, ints)."""
  return np.random.default_rng([int(seed), int(purpose), *(int(i) for i in ints)])
