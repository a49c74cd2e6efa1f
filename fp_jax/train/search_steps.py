"""The search's compiled steps: the supernet training step and the reward evaluation.

Both are data-parallel (parallel.data_parallel over mesh axis `data`) and take the
architecture as traced data, so each compiles once for every architecture. Both run the
supernet's slots with one `dispatch` (slot_ops.resolve_dispatch of config.search.dispatch:
'switch' conditionals or branch-free 'select').
"""
from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from fp_jax import augment
from fp_jax.run import parallel
from fp_jax.run import precision
from fp_jax.pruning import masks as masks_lib
from fp_jax.train import losses as loss_lib
from fp_jax.train import schedules
from fp_jax.models import controller
from fp_jax.models import supernet
from fp_jax.run.parallel import AXIS, BATCH, REPLICATED


@flax.struct.dataclass
class SupernetState:
  """The shared weights under training (supernet.init's tree) and their optimizer state.

  The supernet keeps no BN statistics (batch statistics only, models/supernet.py)."""
  params: Any
  opt_state: Any


def empty_stages(plan):
  """Stages (0..4) that hold no cell of `plan` (num_layers < 3)."""
  return [k for k in range(5) if all(spec.stage != k for spec in plan.cells)]


def optimizer_settings(s):
  """The settings in config.search `s` that the supernet's compiled steps hold (hashable: keys
  `compiled`): momentum, L2 and clipping. The learning rate is a step input
  (supernet_schedule's), so one compilation serves every schedule and length."""
  return (s.momentum, s.l2, s.grad_clip)


def supernet_schedule(s, steps_per_epoch):
  """The supernet's learning rate by global step: SGDR over config.search `s`'s lr_t0,
  lr_tmul, lr_max, lr_min (schedules.cosine_restarts)."""
  return schedules.cosine_restarts(steps_per_epoch, s.lr_t0, s.lr_tmul, s.lr_max, s.lr_min)


def controller_config(config, num_ratio_choices):
  """The controller's settings (controller.ControllerConfig) in `config`."""
  c = config.controller
  return controller.ControllerConfig(
      num_ratio_choices=num_ratio_choices, lstm_size=c.lstm_size, temperature=c.temperature,
      tanh_constant=c.tanh_constant, op_tanh_reduce=c.op_tanh_reduce,
      entropy_weight=c.entropy_weight, baseline_decay=c.baseline_decay, lr=c.lr)


def supernet_optimizer(s, steps_per_epoch):
  """(optax transform, lr schedule) of the supernet (config.search `s`): L2, clipping and
  Nesterov momentum, the step's learning rate passed as update(..., lr=)
  (schedules.momentum_lr_arg, as the fixed network's), and supernet_schedule's SGDR."""
  return (schedules.momentum_lr_arg(*optimizer_settings(s)),
          supernet_schedule(s, steps_per_epoch))


def make_supernet_step(plan, tx, aux_weight, keep_prob, mesh, dtype="float32",
                       dispatch="switch"):
  """Data-parallel supernet step: (SupernetState, arc int32 [40], key, x [B, H, W, C],
  y int32 [B], lr f32 []) -> (SupernetState, {'loss', 'acc'} of the main head).

  tx: supernet_optimizer's transform (it takes the learning rate `lr`, so the step compiles
  once for every schedule).

  keep_prob: dropout keep of the pooled features (ENAS's search script: 0.9); key: the
  step's PRNG key (folded with the device index inside); dtype: compute dtype
  (fp_jax/run/precision.py: params, optimizer state and loss stay float32); dispatch:
  'switch' | 'select' (supernet.forward)."""
  return parallel.data_parallel(_supernet_step_fn(plan, tx, aux_weight, keep_prob, dtype,
                                                  dispatch), mesh,
                                (REPLICATED,) * 3 + (BATCH, BATCH, REPLICATED),
                                (REPLICATED, REPLICATED), donate_argnums=(0,))


def make_device_supernet_step(plan, tx, aux_weight, keep_prob, mesh, dtype="float32",
                              dispatch="switch", aug=(0, False)):
  """make_supernet_step with the batch built on the devices (data.input=device): (state,
  arc, key, x_all uint8 [N,H,W,C], y_all [N], lut f32 [256, C] (augment.table) (these
  replicated), idx, offsets, flips, centres (augment.plan, split over `data`), lr) -> (state,
  metrics); aug = (crop_pad, flip). Each device gathers and augments its rows
  (augment.augment: bitwise the host's batch), then runs make_supernet_step's body."""
  body = _supernet_step_fn(plan, tx, aux_weight, keep_prob, dtype, dispatch)
  crop_pad, flip = aug

  def step(state, arc, key, x_all, y_all, lut, idx, offsets, flips, centres, lr):
    p = {"idx": idx, "offsets": offsets, "flips": flips, "centres": centres}
    x = augment.augment(x_all, p, lut, crop_pad=crop_pad, flip=flip, xp=jnp)
    return body(state, arc, key, x, jnp.take(y_all, idx, axis=0), lr)

  return parallel.data_parallel(step, mesh, (REPLICATED,) * 6 + (BATCH,) * 4 + (REPLICATED,),
                                (REPLICATED, REPLICATED), donate_argnums=(0,))


def _supernet_step_fn(plan, tx, aux_weight, keep_prob, dtype, dispatch):
  """The per-device supernet step body: (state, arc, key, x f32 [b,H,W,C], y [b], lr)."""
  def step(state, arc, key, x, y, lr):
    def loss_fn(params):
      pc, xc = precision.compute(params, x, dtype)
      logits, aux = supernet.forward(plan, pc, arc, xc, AXIS,
                                     reg={"key": key, "keep_prob": keep_prob},
                                     dispatch=dispatch)
      return loss_lib.classification_loss(logits, aux, y, aux_weight)

    (_, (ce, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, lr=lr)
    params = optax.apply_updates(state.params, updates)
    return SupernetState(params, opt_state), {"loss": ce, "acc": acc}

  return step


def make_reward_eval(plan, criterion, mesh, dtype="float32", dispatch="switch", round_to=1):
  """(params, arc, ratios [5], groups, key, x, y) -> (train_acc, prune_acc, kept) on one
  batch; kept (supernet.Kept): the masked network's channels in every space.

  groups: groups.supernet_groups(plan, arc) (host-side, static shapes); key: the PRNG
  key of criterion 'random'. Criterion 'taylor' scores with the gradient of the
  unmasked architecture's loss on this batch (one more backward pass). dtype: compute
  dtype (masks and gradients in float32); dispatch: 'switch' | 'select', of the unmasked
  and the masked forward (supernet.forward); round_to: kept counts rounded up to its
  multiples (masks.keep_count; search.round_to)."""
  def evaluate(params, arc, ratios, groups, key, x, y):
    logits = lambda p: precision.cast(supernet.forward(
        plan, precision.cast(p, dtype), arc, precision.cast(x, dtype), AXIS,
        with_aux=False, dispatch=dispatch)[0], jnp.float32)
    acc = lambda z: jax.lax.pmean(jnp.mean(jnp.argmax(z, -1) == y), AXIS)
    def loss(p):                       # (global-batch loss, logits)
      z = logits(p)
      return jax.lax.pmean(loss_lib.xent(z, y), AXIS), z

    grads = None
    if criterion == "taylor":
      grads, full = jax.grad(loss, has_aux=True)(params)
    else:
      full = logits(params)
    masks = masks_lib.supernet_masks(plan, params, arc, ratios, groups, criterion, grads, key,
                                     round_to)
    masked = logits(masks_lib.apply_supernet_masks(plan, params, arc, masks))
    return acc(full), acc(masked), masks["kept"]

  return parallel.data_parallel(evaluate, mesh, (REPLICATED,) * 5 + (BATCH, BATCH),
                                (REPLICATED,) * 3)


@functools.lru_cache(maxsize=8)
def compiled(plan, mesh, opt, aux_weight, keep_prob, criterion, dtype="float32",
             dispatch="switch", round_to=1):
  """(tx, supernet step, reward evaluation), shared by every Search with the same settings
  (any schedule: the step takes the learning rate); opt: optimizer_settings; dispatch:
  resolved ('switch' | 'select'); round_to: search.round_to (the reward's masks)."""
  tx = schedules.momentum_lr_arg(*opt)
  return (tx, make_supernet_step(plan, tx, aux_weight, keep_prob, mesh, dtype, dispatch),
          make_reward_eval(plan, criterion, mesh, dtype, dispatch, round_to))


@functools.lru_cache(maxsize=8)
def compiled_device_step(plan, mesh, opt, aux_weight, keep_prob, dtype="float32",
                         dispatch="switch", aug=(0, False)):
  """make_device_supernet_step of `compiled`'s settings (data.input=device); aug: (crop_pad,
  flip)."""
  return make_device_supernet_step(plan, schedules.momentum_lr_arg(*opt), aux_weight,
                                   keep_prob, mesh, dtype, dispatch, aug)
