"""The search's compiled steps: the supernet training step and the reward evaluation.

Both are data-parallel (parallel.data_parallel over mesh axis `data`) and take the
architecture as traced data, so each compiles once for every architecture.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from fp_jax.run import parallel
from fp_jax.run import precision
from fp_jax.pruning import masks as masks_lib
from fp_jax.train import schedules
from fp_jax.models import supernet
from fp_jax.run.parallel import AXIS, BATCH, REPLICATED
from fp_jax.train.trainer import xent


def empty_stages(plan):
  """Stages (0..4) that hold no cell of `plan` (num_layers < 3)."""
  return [k for k in range(5) if all(spec.stage != k for spec in plan.cells)]


def _opt_key(s, steps_per_epoch):
  return (steps_per_epoch, s.lr_t0, s.lr_tmul, s.lr_max, s.lr_min, s.momentum, s.l2, s.grad_clip)


def child_optimizer(s, steps_per_epoch):
  """(optax transform, lr schedule) of the supernet: L2, clipping, Nesterov SGDR."""
  return schedules.sgdr_momentum(*_opt_key(s, steps_per_epoch))


def make_child_step(plan, tx, aux_weight, keep_prob, mesh, dtype="float32"):
  """Data-parallel supernet step: (child_state, arc, key, x, y) -> (child_state, metrics).

  keep_prob: dropout keep of the pooled features (ENAS's search child: 0.9); key: the
  step's PRNG key (folded with the device index inside); dtype: compute dtype
  (fp_jax/run/precision.py: params, optimizer state and loss stay float32)."""
  def step(state, arc, key, x, y):
    def loss_fn(params):
      pc, xc = precision.compute(params, x, dtype)
      logits, aux = supernet.forward(plan, pc, arc, xc, AXIS,
                                     reg={"key": key, "keep_prob": keep_prob})
      logits, aux = precision.cast((logits, aux), jnp.float32)
      ce = xent(logits, y)
      loss = ce + aux_weight * xent(aux, y) if aux is not None else ce
      acc = jnp.mean(jnp.argmax(logits, -1) == y)
      return jax.lax.pmean(loss, AXIS), jax.lax.pmean((ce, acc), AXIS)

    (_, (ce, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state}, {"loss": ce, "acc": acc}

  return parallel.data_parallel(step, mesh, (REPLICATED,) * 3 + (BATCH, BATCH),
                                (REPLICATED, REPLICATED), donate_argnums=(0,))


def make_reward_eval(plan, criterion, mesh, dtype="float32"):
  """(params, arc, ratios [5], groups, key, x, y) -> (train_acc, prune_acc, kept) on one
  batch; kept (supernet.Kept): the masked network's channels in every space.

  groups: groups.supernet_groups(plan, arc) (host-side, static shapes); key: the PRNG
  key of criterion 'random'. Criterion 'taylor' scores with the gradient of the
  unmasked architecture's loss on this batch (one more backward pass). dtype: compute
  dtype (masks and gradients in float32)."""
  def evaluate(params, arc, ratios, groups, key, x, y):
    logits = lambda p: precision.cast(supernet.forward(
        plan, precision.cast(p, dtype), arc, precision.cast(x, dtype), AXIS,
        with_aux=False)[0], jnp.float32)
    acc = lambda z: jax.lax.pmean(jnp.mean(jnp.argmax(z, -1) == y), AXIS)
    def loss(p):                       # (global-batch loss, logits)
      z = logits(p)
      return jax.lax.pmean(xent(z, y), AXIS), z

    grads = None
    if criterion == "taylor":
      grads, full = jax.grad(loss, has_aux=True)(params)
    else:
      full = logits(params)
    masks = masks_lib.supernet_masks(plan, params, arc, ratios, groups, criterion, grads, key)
    masked = logits(masks_lib.apply_supernet_masks(plan, params, arc, masks))
    return acc(full), acc(masked), masks["kept"]

  return parallel.data_parallel(evaluate, mesh, (REPLICATED,) * 5 + (BATCH, BATCH),
                                (REPLICATED,) * 3)


@functools.lru_cache(maxsize=8)
def _steps(plan, mesh, opt, aux_weight, keep_prob, criterion, dtype="float32"):
  """Optimizer and compiled steps, shared by every Search with the same settings."""
  tx, schedule = schedules.sgdr_momentum(*opt)
  return (tx, schedule, make_child_step(plan, tx, aux_weight, keep_prob, mesh, dtype),
          make_reward_eval(plan, criterion, mesh, dtype))
