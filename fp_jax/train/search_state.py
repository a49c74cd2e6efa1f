"""The search state: its layout, checkpoint form, resume checks and save hooks.

Operability (DESIGN §3): the whole state, including the position inside an
epoch, is checkpointed in DIR/search/ckpt at every epoch end, every
`search.ckpt_every_steps` child steps (0: off) and when SIGTERM arrives (the
current step finishes, then the run saves and exits with status 0). Rerunning
the same command resumes from the latest checkpoint and truncates
metrics.jsonl / samples.jsonl back to it, so a killed-and-resumed run writes
the same lines and arch.json as one never killed (timing fields aside).
--config.overwrite=True starts afresh. A non-finite child loss stops the run
with an error before anything non-finite is saved.

`search` below is a `search.Search`: the static part of a run.
"""
from __future__ import annotations

import json
import math

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from fp_jax.run import checkpoint
from fp_jax.models import controller
from fp_jax.run import errors
from fp_jax.models import supernet
from jax.sharding import NamedSharding, PartitionSpec


def epoch_start(child, ctrl, epoch, last_samples, steps_per_epoch):
  """State at the start of `epoch`; the position fields say how far into it a run got."""
  spe = steps_per_epoch
  return {"child": child, "controller": ctrl, "epoch": epoch,
          "pos": 0,                    # child steps done in this epoch
          "updates": 0,                # controller updates done in this epoch
          "losses": np.zeros(spe, np.float32), "accs": np.zeros(spe, np.float32),
          "samples": [],               # this epoch's rewarded samples so far
          "entropy": None,             # of the epoch's latest controller update
          "last_samples": last_samples}   # the previous epoch's (choose() takes them)


def position(search, state):
  """Monotone checkpoint number: child steps plus controller updates done so far."""
  per_epoch = search.steps_per_epoch + search.config.search.controller_updates
  return state["epoch"] * per_epoch + state["pos"] + state["updates"]


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
  """The state as checkpoint leaves (arrays, numbers, JSON strings)."""
  return {"child": state["child"],
          # on the host: small, and written once (by process 0) in multi-process runs
          "controller": jax.tree.map(np.asarray, jax.device_get(state["controller"])),
          "epoch": int(state["epoch"]), "pos": int(state["pos"]),
          "updates": int(state["updates"]),
          "losses": np.asarray(state["losses"], np.float32),
          "accs": np.asarray(state["accs"], np.float32),
          "entropy": float("nan") if state["entropy"] is None else float(state["entropy"]),
          "samples": json.dumps(state["samples"]),
          "last_samples": json.dumps(state["last_samples"]),
          "settings": json.dumps(settings(search), sort_keys=True)}


def _template(search):
  """to_checkpoint(init_state()) as shapes (child) and zeros (controller): nothing computed."""
  def init():
    params = supernet.init(jax.random.key(0), search.plan, search.config.search.init_scale,
                           search.config.search.final_init,
                           search.config.search.share_inputs)
    return ({"params": params, "opt_state": search.tx.init(params)},
            controller.init_state(jax.random.key(0), search.ccfg))

  child, ctrl = jax.eval_shape(init)
  replicated = NamedSharding(search.mesh, PartitionSpec())
  child = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                       child)
  ctrl = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), ctrl)
  return to_checkpoint(search, epoch_start(child, ctrl, 0, [], search.steps_per_epoch))


def restore(search, ckpt, step):
  """The state saved as checkpoint `step` by a run with compatible settings."""
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
  entropy = saved["entropy"]
  return {"child": saved["child"], "controller": jax.tree.map(jnp.asarray, saved["controller"]),
          "epoch": saved["epoch"], "pos": saved["pos"], "updates": saved["updates"],
          "losses": saved["losses"], "accs": saved["accs"], "samples": samples,
          "entropy": None if math.isnan(entropy) else entropy, "last_samples": last}


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
  """Search.run_epoch hooks: save every `every` child steps and when SIGTERM arrives."""

  def __init__(self, search, ckpt, preempt, every):
    self.search, self.ckpt, self.preempt, self.every = search, ckpt, preempt, every
    self.last = None   # (checkpoint number, epoch, pos, updates) of the latest save

  def due(self, position):
    if self.preempt.requested:
      return True
    per_epoch = self.search.steps_per_epoch + self.search.config.search.controller_updates
    epoch, rest = divmod(position, per_epoch)
    child_steps = epoch * self.search.steps_per_epoch + rest
    # child steps only; the epoch's last one is followed by the epoch-end checkpoint
    return bool(self.every) and 0 < rest < self.search.steps_per_epoch \
        and child_steps % self.every == 0

  def save(self, state):
    step = position(self.search, state)
    if state["pos"] == 0 and state["updates"] == 0:
      where = f"end of epoch {state['epoch']}"
    else:
      where = (f"epoch {state['epoch'] + 1}: {state['pos']}/{self.search.steps_per_epoch} "
               f"child steps, {state['updates']}/"
               f"{self.search.config.search.controller_updates} controller updates")
    if not _all_finite((state["child"], state["controller"]["params"])):
      raise NonFinite(f"search: parameters became non-finite ({where})")
    self.ckpt.save(step, to_checkpoint(self.search, state))
    self.last = (step, state["epoch"], state["pos"], state["updates"])
    logging.info("search: saved checkpoint %d (%s) in %s", step, where, self.ckpt.directory)
    return self.preempt.requested
