"""The final stage: train the chosen architecture from scratch and test it.

Recipe (DESIGN §5; config.final): num_layers x out_filters network of the arc,
aux head (weight 0.4), drop-path on every non-identity op with keep
probability scaled by depth and ramped over training (ENAS), dropout before the
classifier, optional cutout, cosine restarts, L2, Nesterov momentum, global-norm
clipping. Data-parallel over `data` with synchronised BN, like the search. The
validation images held out for the controller's rewards are trained on too
(they exist only for the search). Writes DIR/final/{metrics.jsonl,
result.json, weights.npz}.

`FixedTrainer` is the fixed network's loop, shared with the compress stage
(which adds masks held in optimizer state).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fp_jax import child
from fp_jax import compaction
from fp_jax import data
from fp_jax import errors
from fp_jax import flops
from fp_jax import masked_update
from fp_jax import parallel
from fp_jax import results
from fp_jax import schedules
from fp_jax import space
from fp_jax import weights
from fp_jax.parallel import AXIS, BATCH, REPLICATED


def xent(logits, labels):
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))


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

  @property
  def total_steps(self):
    return self.epochs * self.steps_per_epoch


def final_recipe(config, num_train):
  f, d = config.final, config.data
  spe = f.steps_per_epoch or data.batches_per_epoch(num_train, f.batch_size)
  return Recipe(f.epochs, spe, f.batch_size, f.eval_batch_size, f.lr_max, f.lr_min, f.lr_t0,
                f.lr_tmul, f.momentum, f.l2, f.grad_clip, f.aux_weight, f.keep_prob,
                f.drop_path_keep_prob, f.cutout, d.crop_pad, d.flip)


def training_images(ds):
  """Train + validation split: the final network trains on every labelled training image."""
  return (np.concatenate([ds.x_train, ds.x_valid]), np.concatenate([ds.y_train, ds.y_valid]))


def make_train_step(plan, arc, tx, hparams, seed, mesh):
  """Data-parallel step: (state{params, stats, opt_state}, x, y, step, lr, progress) ->
  (state, metrics). lr and progress (step / total steps, ramps drop-path) are inputs, so
  one compilation serves every schedule and length."""
  arc = np.asarray(arc)
  aux_weight, keep_prob, drop_path_keep_prob = hparams

  def step(state, x, y, step_idx, lr, progress):
    reg = {"key": jax.random.fold_in(jax.random.key(seed), step_idx), "keep_prob": keep_prob,
           "drop_path_keep_prob": drop_path_keep_prob, "progress": progress}

    def loss_fn(params):
      logits, aux, stats = child.forward(plan, arc, params, state["stats"], x, True, AXIS,
                                         with_aux=aux_weight > 0, reg=reg)
      ce = xent(logits, y)
      loss = ce + aux_weight * xent(aux, y) if aux is not None else ce
      acc = jnp.mean(jnp.argmax(logits, -1) == y)
      return jax.lax.pmean(loss, AXIS), (jax.lax.pmean((ce, acc), AXIS), stats)

    (_, ((ce, acc), stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"], lr=lr)
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "stats": stats, "opt_state": opt_state}, {"loss": ce, "acc": acc}

  return parallel.data_parallel(step, mesh, (REPLICATED, BATCH, BATCH) + (REPLICATED,) * 3,
                                (REPLICATED, REPLICATED), donate_argnums=(0,))


def make_eval_step(plan, arc, mesh):
  """(params, stats, x, y, weight) -> (correct, count) summed over the global batch."""
  arc = np.asarray(arc)

  def evaluate(params, stats, x, y, w):
    logits = child.forward(plan, arc, params, stats, x, False, AXIS, with_aux=False)[0]
    correct = jnp.sum((jnp.argmax(logits, -1) == y) * w)
    return jax.lax.psum(correct, AXIS), jax.lax.psum(jnp.sum(w), AXIS)

  return parallel.data_parallel(evaluate, mesh, (REPLICATED, REPLICATED, BATCH, BATCH, BATCH),
                                (REPLICATED, REPLICATED))


def _transform(optim, plan, arc, masked):
  tx = schedules.momentum_lr_arg(*optim)
  if masked:
    tx = masked_update.hold_masks(tx, None, lambda p, m: compaction.apply_child_masks(plan, arc,
                                                                                        p, m))
  return tx


@functools.lru_cache(maxsize=16)
def _steps(plan, arc_key, optim, hparams, seed, mesh, masked):
  """Compiled steps shared by every trainer of the same network and hyperparameters
  (the final network and its compress stage share the eval step)."""
  arc = np.asarray(arc_key)
  return (make_train_step(plan, arc, _transform(optim, plan, arc, masked), hparams, seed, mesh),
          make_eval_step(plan, arc, mesh))


@dataclasses.dataclass
class FixedTrainer:
  """The fixed network's training loop (final stage; compress fine-tuning with masks)."""
  plan: object
  arc: np.ndarray
  recipe: Recipe
  seed: int
  stream: int               # data stream (final 10, compress 20): different batch orders
  mean: np.ndarray
  std: np.ndarray
  mesh: object
  masks: object             # held in optimizer state during training, or None
  schedule: object
  train_step: object
  eval_step: object

  @classmethod
  def build(cls, plan, arc, recipe, seed, stream, mean, std, mesh=None, masks=None):
    """masks (optional, compaction.child_masks layout): held fixed in optimizer state and
    applied after every update, so masked channels stay exactly zero."""
    mesh = mesh or parallel.make_mesh()
    parallel.check_batch(recipe.batch_size, "batch_size", mesh)
    parallel.check_batch(recipe.eval_batch_size, "eval_batch_size", mesh)
    r = recipe
    schedule = schedules.cosine_restarts(r.steps_per_epoch, r.lr_t0, r.lr_tmul, r.lr_max,
                                         r.lr_min)
    train_step, eval_step = _steps(
        plan, tuple(int(a) for a in arc), (r.momentum, r.l2, r.grad_clip),
        (r.aux_weight, r.keep_prob, r.drop_path_keep_prob), seed, mesh, masks is not None)
    return cls(plan, np.asarray(arc), recipe, seed, stream, mean, std, mesh, masks, schedule,
               train_step, eval_step)

  def init_state(self, params, stats):
    """Training state from host copies (the steps donate their input buffers)."""
    r = self.recipe
    tx = _transform((r.momentum, r.l2, r.grad_clip), self.plan, self.arc, self.masks is not None)
    opt_state = tx.init(params)
    if self.masks is not None:
      opt_state = masked_update.MaskedState(opt_state.inner, self.masks)
    net = jax.device_get({"params": params, "stats": stats, "opt_state": opt_state})
    return {"net": parallel.replicate(self.mesh, net), "epoch": 0}

  def run_epoch(self, state, x, y):
    """One epoch over (x uint8 [N,H,W,C], y [N]); returns (state, metrics)."""
    r, epoch = self.recipe, state["epoch"]
    net, losses, accs = state["net"], [], []
    t0 = time.perf_counter()
    for i in range(r.steps_per_epoch):
      step = epoch * r.steps_per_epoch + i
      xb, yb = data.train_batch(x, y, step=step, batch_size=r.batch_size, seed=self.seed,
                                stream=self.stream, mean=self.mean, std=self.std,
                                crop_pad=r.crop_pad, flip=r.flip, cutout=r.cutout,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
      net, m = self.train_step(net, *parallel.shard(self.mesh, (xb, yb)),
                               jnp.asarray(step, jnp.int32),
                               jnp.asarray(self.schedule(step), jnp.float32),
                               jnp.asarray((step + 1) / max(r.total_steps, 1), jnp.float32))
      losses.append(m["loss"])
      accs.append(m["acc"])
    losses, accs = np.asarray(jax.device_get(losses)), np.asarray(jax.device_get(accs))
    seconds = time.perf_counter() - t0
    if not np.all(np.isfinite(losses)):
      raise errors.RunError(f"training loss became {losses[~np.isfinite(losses)][0]} in epoch "
                            f"{epoch + 1}; lower the learning rate (lr_max) or check the data")
    step = (epoch + 1) * r.steps_per_epoch
    metrics = {"step": step, "epoch": epoch + 1, "loss": float(losses.mean()),
               "train_acc": float(accs.mean()), "lr": float(self.schedule(step - 1)),
               "images_per_sec": r.steps_per_epoch * r.batch_size / seconds,
               "step_time": seconds / r.steps_per_epoch}
    return {"net": net, "epoch": epoch + 1}, metrics

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


def train_epochs(trainer, state, x, y, stage, writer=None):
  """Runs the remaining epochs of `trainer.recipe`, logging and writing metrics."""
  r = trainer.recipe
  while state["epoch"] < r.epochs:
    state, metrics = trainer.run_epoch(state, x, y)
    if writer:
      writer(metrics)
    logging.info("%s epoch %d/%d: loss %.4f acc %.3f lr %.4g %.0f img/s", stage,
                 metrics["epoch"], r.epochs, metrics["loss"], metrics["train_acc"],
                 metrics["lr"], metrics["images_per_sec"])
  return state


def _jsonl_writer(path):
  if jax.process_index() != 0:
    return None
  open(path, "w").close()

  def write(record):
    with open(path, "a") as f:
      f.write(json.dumps(record) + "\n")
  return write


def meta_of(plan, arc, num_layers, out_filters, **extra):
  return {"arc_string": space.arc_to_string(arc), "num_layers": num_layers,
          "out_filters": out_filters, "image_shape": [*plan.image_hw, plan.in_channels],
          "num_classes": plan.num_classes, **extra}


def run(config, workdir, ds):
  """Trains the configured arc (final.arc or search/arch.json); writes DIR/final/*."""
  f = config.final
  out = os.path.join(workdir, "final")
  os.makedirs(out, exist_ok=True)
  arc = results.configured_arc(config, workdir)
  plan = child.make_plan(arc, f.num_layers, f.out_filters, ds.image_shape, ds.num_classes)
  x, y = training_images(ds)
  recipe = final_recipe(config, len(y))
  trainer = FixedTrainer.build(plan, arc, recipe, config.seed, 10, ds.mean, ds.std)
  params, stats = child.init(jax.random.fold_in(jax.random.key(config.seed), 10), plan, arc)
  state = trainer.init_state(params, stats)
  counts = flops.count(plan, arc)
  logging.info("final: %s, %d layers, F %d: %.2fM multiply-adds, %.3fM params; %d epochs x %d "
               "steps of %d", space.arc_to_string(arc), f.num_layers, f.out_filters,
               counts["macs"] / 1e6, counts["params_no_aux"] / 1e6, recipe.epochs,
               recipe.steps_per_epoch, recipe.batch_size)
  state = train_epochs(trainer, state, x, y, "final",
                       _jsonl_writer(os.path.join(out, "metrics.jsonl")))
  net = jax.device_get(state["net"])
  test_acc = trainer.evaluate(state["net"]["params"], state["net"]["stats"], ds.x_test, ds.y_test)
  result = {"test_error": 100.0 * (1.0 - test_acc), "test_acc": test_acc,
            "macs": counts["macs"], "params": counts["params"],
            "params_no_aux": counts["params_no_aux"], "epochs": recipe.epochs,
            "steps_per_epoch": recipe.steps_per_epoch, "batch_size": recipe.batch_size,
            "arc_string": space.arc_to_string(arc), "num_layers": f.num_layers,
            "out_filters": f.out_filters, "test_images": int(len(ds.y_test))}
  if jax.process_index() == 0:
    weights.save(os.path.join(workdir, results.FINAL_WEIGHTS),
                 {"params": net["params"], "stats": net["stats"]},
                 meta_of(plan, arc, f.num_layers, f.out_filters))
    with open(os.path.join(out, "result.json"), "w") as fh:
      json.dump(result, fh, indent=1)
  logging.info("final: test error %.2f%% (%d test images)", result["test_error"],
               len(ds.y_test))
  print(f"final: test error {result['test_error']:.2f}% ({counts['macs'] / 1e6:.2f}M "
        f"multiply-adds, {counts['params_no_aux'] / 1e6:.3f}M params)")
  return result
