"""Learning-rate schedules."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cosine_restarts(steps_per_epoch, t0, tmul, lr_max, lr_min):
  """SGDR (Loshchilov & Hutter): cycles of t0, t0*tmul, ... epochs, lr_max -> lr_min.

  Returns an optax-style schedule step -> lr, continuous within an epoch.
  """
  def schedule(step):
    epoch = jnp.asarray(step, jnp.float32) / steps_per_epoch
    if tmul == 1:
      start, length = jnp.floor(epoch / t0) * t0, jnp.float32(t0)
    else:
      # cycle n starts at t0 * (tmul^n - 1) / (tmul - 1)
      n = jnp.floor(jnp.log1p(epoch * (tmul - 1) / t0) / jnp.log(tmul))
      start = t0 * (tmul ** n - 1) / (tmul - 1)
      length = t0 * tmul ** n
    frac = jnp.clip((epoch - start) / length, 0.0, 1.0)
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + jnp.cos(jnp.pi * frac))
  return schedule


def scale_by_lr_arg():
  """optax transform scaling updates by -lr, with lr passed to update(..., lr=...): a step
  that takes the learning rate as an input compiles once for every schedule."""
  def update(updates, state, params=None, *, lr):
    del params
    return jax.tree.map(lambda u: -lr * u, updates), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def momentum_lr_arg(momentum, l2, grad_clip):
  """L2 (gradient 2*l2*w, as ENAS's l2 * sum w^2), global-norm clipping and Nesterov momentum
  SGD, the learning rate an argument of update (lr=...): the transform of the supernet
  (search), the final network and compress fine-tuning, whose steps take the learning rate
  of cosine_restarts as an input."""
  return optax.chain(optax.add_decayed_weights(2 * l2), optax.clip_by_global_norm(grad_clip),
                     optax.trace(decay=momentum, nesterov=True), scale_by_lr_arg())
