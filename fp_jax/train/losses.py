"""The training loss of both networks: cross-entropy of the logits plus the aux head's.

One body for the supernet step (search_steps.py) and the fixed network's step (trainer.py),
written per device: the values are averaged over the devices of `axis_name`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fp_jax.run import precision
from fp_jax.run.parallel import AXIS


def xent(logits, labels):
  """Mean cross-entropy of logits f32 [B, K] against int labels [B]."""
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))


def classification_loss(logits, aux, labels, aux_weight, axis_name=AXIS):
  """(loss, (ce, acc)) of one device's batch, each averaged over the devices of axis_name
  (None: this batch alone, outside a mapped step).

  logits [B, K] and aux [B, K] (the aux head's, or None) in the compute dtype, taken to
  float32 first; labels int [B]. loss = ce + aux_weight * xent(aux) is what the gradient
  minimises; ce (the main head's cross-entropy) and acc (its accuracy) are the metrics.
  """
  logits, aux = precision.cast((logits, aux), jnp.float32)
  ce = xent(logits, labels)
  loss = ce + aux_weight * xent(aux, labels) if aux is not None else ce
  acc = jnp.mean(jnp.argmax(logits, -1) == labels)
  if axis_name is None:
    return loss, (ce, acc)
  return jax.lax.pmean(loss, axis_name), jax.lax.pmean((ce, acc), axis_name)
