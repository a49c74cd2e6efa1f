"""The search state: its layout, checkpoint form, resume checks and save hooks.

Operability (DESIGN §3): the whole state, including the position inside an
epoch, is checkpointed in DIR/search/ckpt at every epoch end, every
`search.ckpt_every_steps` supernet steps (0: off) and when SIGTERM arrives (the
current step finishes, then the run saves and exits with status 0). Rerunning
the same command resumes from the latest checkpoint and truncates
metrics.jsonl / samples.jsonl back to it, so a killed-and-resumed run writes
the same lines and arch.json as one never killed (timing fields aside).
--config.overwrite=True starts afresh. A non-finite supernet loss stops the run
with an error before anything non-finite is saved.

`search` below is a `search.Search`: the static part of a run.
"""
from __future__ import annotations

import json
import math
from typing import Any

from absl import logging
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fp_jax.run import checkpoint
from fp_jax.models import controller
from fp_jax.run import errors
from fp_jax.models import supernet
from fp_jax.train.search_steps import SupernetState
from jax.sharding import NamedSharding, PartitionSpec

def _static():
  return flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class SearchState:
  """Everything the search carries from step to step (ENAS's loop), as one pytree.

  The arrays: the supernet (SupernetState, replicated over the mesh), the controller
  (controller.ControllerState) and the losses and accuracies of the epoch's supernet steps
  (f32 [steps_per_epoch], 0 for steps not made; written when Search.train_supernet saves or
  returns the state). The position and the epoch's host records are static fields. No PRNG
  key: every key and draw is a function of (config.seed, streams.Purpose, position), so the
  position is all a resumed run needs.
  """
  supernet: SupernetState
  controller: controller.ControllerState
  losses: np.ndarray
  accs: np.ndarray
  epoch: int = _static()              # epochs completed
  steps: int = _static()              # supernet steps done in epoch `epoch`
  updates: int = _static()            # controller updates done in epoch `epoch`
  samples: tuple = _static()          # this epoch's rewarded samples.jsonl rows so far
  entropy: Any = _static()            # of the epoch's latest controller update (None: none yet)
  last_samples: tuple = _static()     # the previous epoch's rows (choose() takes them)

  @classmethod
  def epoch_start(cls, supernet_state, ctrl, epoch, last_samples, steps_per_epoch):
    """The state at the start of `epoch` (nothing of it done yet)."""
    return cls(supernet_state, ctrl, np.zeros(steps_per_epoch, np.float32),
               np.zeros(steps_per_epoch, np.float32), epoch, 0, 0, (), None,
               tuple(last_samples))


def position(state, steps_per_epoch, controller_updates):
  """The checkpoint number of `state`: supernet steps plus controller updates done so far
  (monotone over the run)."""
  return state.epoch * (steps_per_epoch + controller_updates) + state.steps + state.updates


def settings(search):
  """The config values a resumed run must share with the checkpoint's run."""
  c, s = search.config, search.config.search
  hard = {"seed": c.seed, "data.name": c.data.name, "data.valid_size": c.data.valid_size,
          "steps_per_epoch": search.steps_per_epoch,
          "ratio_choices": [float(r) for r in search.ratio_choices]}
  for k in ("num_layers", "out_filters", "batch_size", "eval_batch_size",
            "controller_updates", "controller_samples", "init_scale", "final_init",
            "share_inputs", "policy"):
    hard[f"search.{k}"] = s[k]
  soft = {f"data.{k}": c.data[k] for k in ("crop_pad", "flip")}
  for k in ("alpha", "beta", "importance", "uniform_child_epochs", "lr_max", "lr_min",
            "lr_t0", "lr_tmul", "momentum", "l2", "aux_weight", "grad_clip", "keep_prob"):
    soft[f"search.{k}"] = s[k]
  for k in c.controller.keys():
    soft[f"controller.{k}"] = c.controller[k]
  return {"hard": hard, "soft": soft}


# settings added after checkpoints were first written: their value in the older ones
_ADDED_SETTINGS = {"search.policy": "controller"}


def to_checkpoint(search, state):
  """The state as checkpoint leaves (arrays, numbers, JSON strings).

  These keys are the checkpoint format on disk (DIR/search/ckpt, since its first
  version): 'child' holds the supernet, 'pos' the supernet steps of the epoch."""
  return {"child": {"params": state.supernet.params, "opt_state": state.supernet.opt_state},
          # on the host: small, and written once (by process 0) in multi-process runs
          "controller": jax.tree.map(np.asarray, jax.device_get(_controller_dict(state.controller))),
          "epoch": int(state.epoch), "pos": int(state.steps), "updates": int(state.updates),
          "losses": np.asarray(state.losses, np.float32),
          "accs": np.asarray(state.accs, np.float32),
          "entropy": float("nan") if state.entropy is None else float(state.entropy),
          "samples": json.dumps(list(state.samples)),
          "last_samples": json.dumps(list(state.last_samples)),
          "settings": json.dumps(settings(search), sort_keys=True)}


def _controller_dict(c):
  return {"params": c.params, "opt_state": c.opt_state, "baseline": c.baseline, "step": c.step}


def _template(search):
  """to_checkpoint(init_state()) as shapes (supernet) and zeros (controller): nothing computed."""
  def init():
    params = supernet.init(jax.random.key(0), search.plan, search.config.search.init_scale,
                           search.config.search.final_init,
                           search.config.search.share_inputs)
    return (SupernetState(params, search.tx.init(params)),
            controller.init_state(jax.random.key(0), search.ccfg))

  net, ctrl = jax.eval_shape(init)
  replicated = NamedSharding(search.mesh, PartitionSpec())
  net = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), net)
  ctrl = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), ctrl)
  return to_checkpoint(search, SearchState.epoch_start(net, ctrl, 0, [], search.steps_per_epoch))


def restore(search, ckpt, step):
  """The SearchState saved as checkpoint `step` by a run with compatible settings."""
  saved = ckpt.restore(step, _template(search))
  where = f"checkpoint {step} in {ckpt.directory}"
  fresh = f"delete {ckpt.directory} or pass --config.overwrite=True to start afresh"
  try:
    saved_settings = json.loads(saved["settings"])
    samples, last = json.loads(saved["samples"]), json.loads(saved["last_samples"])
  except ValueError as e:
    raise checkpoint.CheckpointError(f"{where} is unreadable ({e}); {fresh}") from None
  now = settings(search)
  for key, value in now["hard"].items():
    was = saved_settings["hard"].get(key, _ADDED_SETTINGS.get(key))
    if was != json.loads(json.dumps(value)):
      raise checkpoint.CheckpointError(
          f"{where} was written with {key}={was!r}, this run has "
          f"{value!r}: rerun with the same settings, or {fresh}")
  for key, value in now["soft"].items():
    if saved_settings["soft"].get(key) != json.loads(json.dumps(value)):
      logging.warning("search: resuming %s, written with %s=%r; this run has %r (the result "
                      "will differ from an uninterrupted run with either setting)", where, key,
                      saved_settings["soft"].get(key), value)
  epochs = search.config.search.epochs
  if saved["epoch"] > epochs or (saved["epoch"] == epochs and saved["pos"] + saved["updates"]):
    raise checkpoint.CheckpointError(
        f"{where} is at epoch {saved['epoch']}, beyond search.epochs={epochs}: raise "
        f"search.epochs, or {fresh}")
  entropy, net, ctrl = saved["entropy"], saved["child"], saved["controller"]
  return SearchState(
      SupernetState(net["params"], net["opt_state"]),
      controller.ControllerState(**jax.tree.map(jnp.asarray, ctrl)),
      saved["losses"], saved["accs"], saved["epoch"], saved["pos"], saved["updates"],
      tuple(samples), None if math.isnan(entropy) else entropy, tuple(last))


class NonFinite(errors.RunError):
  pass


def _all_finite(tree):
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array):
      leaf = leaf.addressable_data(0)
    a = np.asarray(leaf)
    if np.issubdtype(a.dtype, np.inexact) and not np.all(np.isfinite(a)):
      return False
  return True


class Checkpoints:
  """Search.run_epoch hooks: save every `every` supernet steps and when SIGTERM arrives."""

  def __init__(self, search, ckpt, preempt, every):
    self.search, self.ckpt, self.preempt, self.every = search, ckpt, preempt, every
    self.last = None   # (checkpoint number, epoch, steps, updates) of the latest save

  def due(self, state):
    """Save `state` (after a supernet step or controller update) now?"""
    if self.preempt.requested:
      return True
    spe = self.search.steps_per_epoch
    # supernet steps only; the epoch's last one is followed by the epoch-end checkpoint
    return bool(self.every) and state.updates == 0 and 0 < state.steps < spe \
        and (state.epoch * spe + state.steps) % self.every == 0

  def save(self, state):
    """Writes `state` as its checkpoint; True when the run should stop here (SIGTERM)."""
    spe, updates = self.search.steps_per_epoch, self.search.config.search.controller_updates
    step = position(state, spe, updates)
    if state.steps == 0 and state.updates == 0:
      where = f"end of epoch {state.epoch}"
    else:
      where = (f"epoch {state.epoch + 1}: {state.steps}/{spe} supernet steps, "
               f"{state.updates}/{updates} controller updates")
    if not _all_finite((state.supernet, state.controller.params)):
      raise NonFinite(f"search: parameters became non-finite ({where})")
    self.ckpt.save(step, to_checkpoint(self.search, state))
    self.last = (step, state.epoch, state.steps, state.updates)
    logging.info("search: saved checkpoint %d (%s) in %s", step, where, self.ckpt.directory)
    return self.preempt.requested
