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


def distill_kl(logits, teacher_logits, temperature):
  """Mean over the batch of KL(softmax(teacher / T) || softmax(logits / T)) (nats), float32:
  sum_k p_k (log p_k - log q_k), p the teacher's softened distribution, q the student's.
  The teacher's side carries no gradient."""
  t = jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32)) / temperature
  s = jnp.asarray(logits, jnp.float32) / temperature
  log_p, log_q = jax.nn.log_softmax(t), jax.nn.log_softmax(s)
  return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1))


def distillation_loss(loss, logits, teacher_logits, weight, temperature, axis_name=AXIS):
  """(loss + weight * T^2 * KL, KL) (Hinton et al. 2015: the T^2 keeps the soft term's
  gradients on the scale of the hard one's as T changes): `loss` the usual training loss
  (classification_loss's, already averaged over axis_name), KL distill_kl of this device's
  batch averaged over the devices of axis_name (None: this batch alone)."""
  kl = distill_kl(logits, teacher_logits, temperature)
  if axis_name is not None:
    kl = jax.lax.pmean(kl, axis_name)
  return loss + weight * temperature * temperature * kl, kl
