"""The fixed network's training loop, shared by the final and compress stages.

`FixedTrainer` holds the compiled data-parallel steps (shared by every trainer of
the same network and hyperparameters: learning rate and drop-path progress are
step inputs) and runs epochs from a state {net: {params, stats, opt_state},
epoch, pos, loss_sum, acc_sum}; `train` adds checkpoints (orbax, DIR/<stage>/ckpt),
resume, SIGTERM handling, metrics (jsonl + TensorBoard) and progress. Training batches
come from the host or are built inside the step (data.input, fp_jax/augment.py).
With a teacher (Recipe.distill: compress.distill) the step also runs the teacher's
eval-mode forward pass on the same augmented batch and adds the distillation term
(losses.distillation_loss).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fp_jax.run import checkpoint
from fp_jax import augment
from fp_jax import config as config_lib
from fp_jax.models import child
from fp_jax.pruning import masks as masks_lib
from fp_jax import data
from fp_jax.run import errors
from fp_jax.run import logs
from fp_jax.pruning import masked_update
from fp_jax.run import parallel
from fp_jax.run import precision
from fp_jax.run import preemption
from fp_jax.train import losses as loss_lib
from fp_jax.train import schedules
from fp_jax.run.parallel import AXIS, BATCH, REPLICATED


@dataclasses.dataclass(frozen=True)
class Recipe:
  """Everything the fixed network's training loop reads (hashable: keys compiled steps)."""
  epochs: int
  steps_per_epoch: int      # resolved (> 0)
  batch_size: int
  eval_batch_size: int
  lr_max: float
  lr_min: float
  lr_t0: int                # epochs of the first cosine cycle
  lr_tmul: int
  momentum: float
  l2: float
  grad_clip: float
  aux_weight: float
  keep_prob: float
  drop_path_keep_prob: float
  cutout: int
  crop_pad: int
  flip: bool
  dtype: str = "float32"    # compute dtype (fp_jax/run/precision.py)
  input: str = "host"       # data.input: host | device batches (fp_jax/augment.py)
  distill: tuple = None     # (weight, temperature): train against FixedTrainer's teacher

  @property
  def total_steps(self):
    return self.epochs * self.steps_per_epoch


def make_train_step(plan, tx, hparams, seed, mesh, dtype="float32", distill=None):
  """Data-parallel step: (state{params, stats, opt_state}, x, y, step, lr, progress) ->
  (state, metrics). lr and progress (step / total steps, ramps drop-path) are inputs, so
  one compilation serves every schedule and length. distill (weight, temperature): the
  step takes the teacher {params, stats} (replicated) after the state, and metrics add
  'distill_kl' (_step_fn)."""
  lead = (REPLICATED,) * (2 if distill else 1)
  return parallel.data_parallel(_step_fn(plan, tx, hparams, seed, dtype, distill), mesh,
                                lead + (BATCH, BATCH) + (REPLICATED,) * 3,
                                (REPLICATED, REPLICATED), donate_argnums=(0,))


def make_device_train_step(plan, tx, hparams, seed, mesh, dtype="float32", aug=(0, False, 0),
                           distill=None):
  """make_train_step with the batch built on the devices (data.input=device): (state,
  [teacher,] x_all uint8 [N,H,W,C], y_all [N], lut f32 [256, C] (augment.table) (these
  replicated), idx, offsets, flips, centres (augment.plan, split over `data`), step, lr,
  progress) -> (state, metrics); aug = (crop_pad, flip, cutout). Each device gathers and
  augments its rows (augment.augment: bitwise the host's batch), then runs
  make_train_step's body (the teacher, with distill, sees that same batch)."""
  body = _step_fn(plan, tx, hparams, seed, dtype, distill)
  crop_pad, flip, cutout = aug
  lead = 1 if distill else 0

  def step(state, *args):
    teacher, (x_all, y_all, lut, idx, offsets, flips, centres, *rest) = args[:lead], args[lead:]
    p = {"idx": idx, "offsets": offsets, "flips": flips, "centres": centres}
    x = augment.augment(x_all, p, lut, crop_pad=crop_pad, flip=flip, cutout=cutout, xp=jnp)
    return body(state, *teacher, x, jnp.take(y_all, idx, axis=0), *rest)

  return parallel.data_parallel(step, mesh,
                                (REPLICATED,) * (4 + lead) + (BATCH,) * 4 + (REPLICATED,) * 3,
                                (REPLICATED, REPLICATED), donate_argnums=(0,))


def _step_fn(plan, tx, hparams, seed, dtype, distill=None):
  """The per-device train step body: (state, x f32 [b,H,W,C], y [b], step, lr, progress).

  distill (weight, temperature): (state, teacher {params, stats}, x, ...): the teacher
  (the unpruned network) runs in eval mode (running BN statistics, no dropout or
  drop-path, no aux head, no gradient) on the same batch x, and the loss gains
  weight * T^2 * KL(softmax(teacher / T) || softmax(logits / T)) of the main head
  (losses.distillation_loss); metrics add 'distill_kl' (the KL, global-batch mean)."""
  aux_weight, keep_prob, drop_path_keep_prob = hparams

  def step(state, *args):
    teacher, (x, y, step_idx, lr, progress) = (args[0], args[1:]) if distill else (None, args)
    reg = {"key": jax.random.fold_in(jax.random.key(seed), step_idx), "keep_prob": keep_prob,
           "drop_path_keep_prob": drop_path_keep_prob, "progress": progress}
    if distill:
      t_logits = precision.cast(child.forward(
          plan, precision.cast(teacher["params"], dtype), teacher["stats"],
          precision.cast(x, dtype), False, AXIS, with_aux=False)[0], jnp.float32)
      t_logits = jax.lax.stop_gradient(t_logits)

    def loss_fn(params):
      pc, xc = precision.compute(params, x, dtype)
      logits, aux, stats = child.forward(plan, pc, state["stats"], xc, True, AXIS,
                                         with_aux=aux_weight > 0, reg=reg)
      loss, (ce, acc) = loss_lib.classification_loss(logits, aux, y, aux_weight)
      metrics = {"loss": ce, "acc": acc}
      if distill:
        loss, metrics["distill_kl"] = loss_lib.distillation_loss(loss, logits, t_logits,
                                                                 *distill)
      return loss, (metrics, stats)

    (_, (metrics, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"], lr=lr)
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "stats": stats, "opt_state": opt_state}, metrics

  return step


def make_eval_step(plan, mesh, dtype="float32"):
  """(params, stats, x, y, weight) -> (correct, count) summed over the global batch."""

  def evaluate(params, stats, x, y, w):
    logits = child.forward(plan, precision.cast(params, dtype), stats,
                           precision.cast(x, dtype), False, AXIS, with_aux=False)[0]
    correct = jnp.sum((jnp.argmax(logits, -1) == y) * w)
    return jax.lax.psum(correct, AXIS), jax.lax.psum(jnp.sum(w), AXIS)

  return parallel.data_parallel(evaluate, mesh, (REPLICATED, REPLICATED, BATCH, BATCH, BATCH),
                                (REPLICATED, REPLICATED))


def _transform(optim, plan, masked):
  tx = schedules.momentum_lr_arg(*optim)
  if masked:
    tx = masked_update.hold_masks(tx, None, lambda p, m: masks_lib.apply_child_masks(plan, p, m))
  return tx


@functools.lru_cache(maxsize=16)
def _steps(plan, optim, hparams, seed, mesh, masked, dtype="float32", aug=None, distill=None):
  """Compiled steps shared by every trainer of the same network and hyperparameters
  (the final network, trained with masks of all ones, and its compress stage's fine-tuning
  share the train and eval steps: one compilation for both stages). The plan holds the arc.
  aug (crop_pad, flip, cutout): also the data.input=device train step (else None);
  distill: Recipe.distill (the train steps take the teacher)."""
  tx = _transform(optim, plan, masked)
  device = None if aug is None else make_device_train_step(plan, tx, hparams, seed, mesh,
                                                           dtype, aug, distill)
  return (make_train_step(plan, tx, hparams, seed, mesh, dtype, distill),
          make_eval_step(plan, mesh, dtype), device)


@dataclasses.dataclass
class FixedTrainer:
  """The fixed network's training loop (final stage; compress fine-tuning with masks)."""
  plan: object
  recipe: Recipe
  seed: int
  stream: int               # streams.Stream (FINAL, COMPRESS): different batch orders
  mean: np.ndarray
  std: np.ndarray
  mesh: object
  masks: object             # held in optimizer state during training, or None
  schedule: object
  train_step: object
  eval_step: object
  device_step: object = None      # data.input=device: make_device_train_step
  placed: tuple = None            # (x, y, device copies of x, y, augment.table) once placed
  fallback_noted: bool = False
  teacher: object = None          # recipe.distill: {params, stats} replicated over the mesh

  @classmethod
  def build(cls, plan, recipe, seed, stream, mean, std, mesh=None, masks=None, teacher=None):
    """masks (optional, masks.child_masks layout): held fixed in optimizer state and
    applied after every update, so masked channels stay exactly zero. teacher (params,
    stats) of a network of the same plan (the unpruned one): required with
    recipe.distill, refused without."""
    mesh = mesh or parallel.make_mesh()
    parallel.check_batch(recipe.batch_size, "batch_size", mesh)
    parallel.check_batch(recipe.eval_batch_size, "eval_batch_size", mesh)
    r = recipe
    schedule = schedules.cosine_restarts(r.steps_per_epoch, r.lr_t0, r.lr_tmul, r.lr_max,
                                         r.lr_min)
    if r.input not in augment.INPUTS:
      raise config_lib.ConfigError(f"data.input={r.input!r}: must be one of "
                                   f"{', '.join(augment.INPUTS)}")
    if (teacher is None) != (not r.distill):
      raise ValueError("FixedTrainer: a teacher goes with recipe.distill, and only with it")
    distill = (float(r.distill[0]), float(r.distill[1])) if r.distill else None
    train_step, eval_step, device_step = _steps(
        plan, (r.momentum, r.l2, r.grad_clip),
        (r.aux_weight, r.keep_prob, r.drop_path_keep_prob), seed, mesh, masks is not None,
        r.dtype, (r.crop_pad, r.flip, r.cutout) if r.input == "device" else None, distill)
    if teacher is not None:
      teacher = parallel.replicate(mesh, jax.device_get(
          {"params": teacher[0], "stats": teacher[1]}))
    return cls(plan, recipe, seed, stream, mean, std, mesh, masks, schedule,
               train_step, eval_step, device_step, teacher=teacher)

  def init_state(self, params, stats):
    """Training state from host copies (the steps donate their input buffers)."""
    r = self.recipe
    tx = _transform((r.momentum, r.l2, r.grad_clip), self.plan, self.masks is not None)
    opt_state = tx.init(params)
    if self.masks is not None:
      opt_state = masked_update.MaskedState(opt_state.inner, self.masks)
    net = jax.device_get({"params": params, "stats": stats, "opt_state": opt_state})
    return {"net": parallel.replicate(self.mesh, net), "epoch": 0, "pos": 0, "loss_sum": 0.0,
            "acc_sum": 0.0, **self._kl_sum(0.0)}

  def _kl_sum(self, value):
    """{'kl_sum': value} in the state of a distilling trainer (else nothing: the state,
    and so its checkpoints, are those of a run without distillation)."""
    return {"kl_sum": value} if self.teacher is not None else {}

  def run_epoch(self, state, x, y, stop=None):
    """The rest of the current epoch over (x uint8 [N,H,W,C], y [N]).

    Returns (state, metrics) at the epoch's end, or (state, None) part-way when
    stop() turned True after a step (the state then records the position and the
    partial loss sums, so a resumed epoch reports what an uninterrupted one would).
    """
    r, epoch = self.recipe, state["epoch"]
    net, losses, accs, kls = state["net"], [], [], []
    lead = () if self.teacher is None else (self.teacher,)
    t0 = time.perf_counter()
    i = state["pos"]
    inputs = self._inputs(x, y, range(epoch * r.steps_per_epoch + i,
                                      (epoch + 1) * r.steps_per_epoch))
    with contextlib.closing(inputs):
      while i < r.steps_per_epoch:
        step = epoch * r.steps_per_epoch + i
        train_step, args = next(inputs)
        net, m = train_step(net, *lead, *args, jnp.asarray(step, jnp.int32),
                            jnp.asarray(self.schedule(step), jnp.float32),
                            jnp.asarray((step + 1) / max(r.total_steps, 1), jnp.float32))
        losses.append(m["loss"])
        accs.append(m["acc"])
        if "distill_kl" in m:
          kls.append(m["distill_kl"])
        i += 1
        if stop is not None and i < r.steps_per_epoch and stop():
          break
    losses, accs = np.asarray(jax.device_get(losses)), np.asarray(jax.device_get(accs))
    kls = np.asarray(jax.device_get(kls))
    seconds = time.perf_counter() - t0
    if not np.all(np.isfinite(losses)):
      raise errors.RunError(f"training loss became {losses[~np.isfinite(losses)][0]} in epoch "
                            f"{epoch + 1}; lower the learning rate (lr_max) or check the data")
    loss_sum, acc_sum = state["loss_sum"], state["acc_sum"]
    for loss, acc in zip(losses.tolist(), accs.tolist()):   # in order: a resumed epoch sums
      loss_sum, acc_sum = loss_sum + loss, acc_sum + acc    # exactly as an unbroken one
    kl_sum = state.get("kl_sum", 0.0)
    for kl in kls.tolist():
      kl_sum = kl_sum + kl

    if i < r.steps_per_epoch:
      return {"net": net, "epoch": epoch, "pos": i, "loss_sum": loss_sum,
              "acc_sum": acc_sum, **self._kl_sum(kl_sum)}, None
    step = (epoch + 1) * r.steps_per_epoch
    done = len(losses)
    metrics = {"step": step, "epoch": epoch + 1, "loss": loss_sum / r.steps_per_epoch,
               "train_acc": acc_sum / r.steps_per_epoch, "lr": float(self.schedule(step - 1)),
               "images_per_sec": done * r.batch_size / seconds, "step_time": seconds / done}
    if self.teacher is not None:
      metrics["distill_kl"] = kl_sum / r.steps_per_epoch
    return {"net": net, "epoch": epoch + 1, "pos": 0, "loss_sum": 0.0, "acc_sum": 0.0,
            **self._kl_sum(0.0)}, metrics

  def _inputs(self, x, y, steps):
    """Yields (train step, its data arguments) for each global step in `steps`: float32
    batches split over `data` (data.input=host, or device with x over the limit: then built
    one ahead by a thread), or the placed uint8 set and the split plan (device)."""
    r, pi, pc = self.recipe, jax.process_index(), jax.process_count()
    def host(step):
      return data.train_batch(x, y, step=step, batch_size=r.batch_size, seed=self.seed,
                              stream=self.stream, mean=self.mean, std=self.std,
                              crop_pad=r.crop_pad, flip=r.flip, cutout=r.cutout,
                              process_index=pi, process_count=pc)
    if r.input == "device" and augment.fits_on_device(x):
      if self.placed is None or self.placed[0] is not x or self.placed[1] is not y:
        dev = parallel.replicate(self.mesh, (x, np.asarray(y, np.int32),
                                             augment.table(self.mean, self.std)))
        self.placed = (x, y, dev)
      per = r.batch_size // pc
      local = slice(pi * per, (pi + 1) * per)
      for step in steps:
        p = augment.plan(len(x), *x.shape[1:3], step=step, batch_size=r.batch_size,
                         seed=self.seed, stream=self.stream, crop_pad=r.crop_pad, local=local)
        yield self.device_step, self.placed[2] + parallel.shard(
            self.mesh, (p["idx"], p["offsets"], p["flips"], p["centres"]))
      return
    batches = (host(step) for step in steps)
    if r.input == "device":
      if not self.fallback_noted:
        logging.info("data.input=device: the train set (%.2f GB) is over %.2f GB; batches are "
                     "built on the host by a prefetch thread", x.nbytes / 1e9,
                     augment.DEVICE_LIMIT_BYTES / 1e9)
        self.fallback_noted = True
      batches = augment.prefetch(host, steps)
    with contextlib.closing(batches):
      for xb, yb in batches:
        yield self.train_step, parallel.shard(self.mesh, (xb, yb))

  def evaluate(self, params, stats, x, y):
    """Accuracy of (params, stats) on all of x, y in eval mode (running BN statistics)."""
    correct = count = 0.0
    for xb, yb, wb in data.eval_batches(x, y, batch_size=self.recipe.eval_batch_size,
                                        mean=self.mean, std=self.std,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count()):
      c, n = self.eval_step(params, stats, *parallel.shard(self.mesh, (xb, yb, wb)))
      correct, count = correct + float(c), count + float(n)
    return correct / count




def _position(trainer, state):
  return state["epoch"] * trainer.recipe.steps_per_epoch + state["pos"]


def train(trainer, init_state, x, y, out, stage, overwrite=False, sync_every=1):
  """Trains to the end of trainer.recipe with checkpoints in out/ckpt; resumes from the latest.

  init_state() builds the fresh state (called only without a checkpoint). Metrics go to
  out/metrics.jsonl and out/tb/ (process 0). SIGTERM: the current step finishes, a
  checkpoint is saved, preemption.Preempted (exit status 0) is raised; rerunning the same
  command resumes (multi-process: agreed every `sync_every` steps, preemption.py). A
  non-finite loss raises RunError and keeps the last good checkpoint.
  """
  r, is_main = trainer.recipe, jax.process_index() == 0
  ckpt_dir = os.path.join(out, "ckpt")
  if overwrite:
    checkpoint.clear(ckpt_dir)
  writer = logs.MetricsWriter(out, "metrics", enabled=is_main)
  ckpt = checkpoint.Checkpointer(ckpt_dir, keep=2)
  latest = None
  try:
    with preemption.Preemption(sync_every=sync_every) as preempt:
      state = init_state()
      latest = ckpt.latest_step()
      if latest is None:
        writer.reset()
      else:
        state = ckpt.restore(latest, state)
        writer.truncate_after(state["epoch"] * r.steps_per_epoch)
        logging.info("%s: resuming from checkpoint %d in %s (epoch %d, step %d of it)", stage,
                     latest, ckpt_dir, state["epoch"] + 1, state["pos"])
      bar = logs.Progress(r.epochs, stage, initial=state["epoch"], unit="epoch", enabled=is_main)
      try:
        while state["epoch"] < r.epochs:
          state, metrics = trainer.run_epoch(state, x, y, stop=lambda: preempt.requested)
          if metrics is not None:
            writer.write(metrics)
            bar.update(1, loss=metrics["loss"], acc=metrics["train_acc"])
          step = _position(trainer, state)
          ckpt.save(step, state)
          if preempt.requested and state["epoch"] < r.epochs:
            raise preemption.Preempted(
                f"{stage}: stopped by {preempt.signal_name or 'request'} after saving "
                f"checkpoint {step} in {ckpt_dir}; rerun the same command to resume")
      finally:
        bar.close()
  except errors.RunError as e:
    if isinstance(e, checkpoint.CheckpointError):
      raise
    kept = ckpt.latest_step()
    raise errors.RunError(f"{stage}: {e}; " + (
        f"the last good checkpoint ({kept}) in {ckpt_dir} is kept" if kept is not None
        else "no checkpoint had been saved") + ckpt.resume_note(latest)) from None
  finally:
    ckpt.close()
    writer.close()
  return state
