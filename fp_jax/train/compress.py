"""The compress stage: mask the trained network, fine-tune (or retrain) it, remove channels.

  1. load DIR/final/weights.npz; ratios from compress.ratios or search/arch.json;
  2. masks of every channel group by importance (compress.importance; 'taylor' reads
     the loss gradients averaged over the compress.bn_batches batches; kept counts
     rounded up to multiples of compress.round_to, masks.keep_count), applied;
     test_error_masked_stale_bn: the masked network with the unpruned network's
     running BN statistics (stale: masking changes every later activation);
  3. BN re-estimation (bn_reestimate.py): the masked network's running statistics
     recomputed, without gradients, as the exact average over compress.bn_batches
     training batches of compress.batch_size, fed as eval feeds images
     (normalised, no augmentation; batch statistics synchronised over devices);
     test_error_masked: the masked network with these statistics, no training
     (what the search's PruneAcc measures with batch statistics);
  4. mode 'finetune': train the masked network, starting from the re-estimated
     statistics, with the masks held in optimizer state and applied after every
     update (pruned weights stay exactly zero); mode 'scratch': train the thin
     network from a fresh initialisation; both for compress.finetune_epochs
     epochs, one cosine cycle from compress.lr_max, otherwise the final recipe;
     compress.distill (either mode): the unpruned trained network is the teacher, in
     eval mode on the same augmented batch inside the step, and the loss is the
     usual one + distill_weight * T^2 * KL(softmax(teacher/T) || softmax(student/T)),
     T = distill_temperature (trainer._step_fn, losses.distillation_loss);
  5. compact (channels really removed) and test it: test_error_finetuned;
     max_abs_diff_masked_vs_compact compares the masked and compact logits of
     the same weights on the first test batch (eval mode);
  6. write DIR/compress/{result.json, weights.npz, metrics.jsonl, tb/, ckpt/}.
"""
from __future__ import annotations

import dataclasses
import json
import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from fp_jax.pruning import bn_reestimate
from fp_jax.models import child
from fp_jax.pruning import compaction
from fp_jax.pruning import masks as masks_lib
from fp_jax import config as config_lib
from fp_jax import data
from fp_jax.models import flops
from fp_jax.run import precision
from fp_jax.run import parallel
from fp_jax import results
from fp_jax.run.parallel import BATCH, REPLICATED
from fp_jax.run import weights
from fp_jax.train import final
from fp_jax.train import losses as loss_lib
from fp_jax.train import streams
from fp_jax.train import trainer as trainer_lib
from fp_jax.train.streams import Purpose, Stream


def load_trained(workdir):
  """(plan, arc, params, stats, meta) of DIR/final/weights.npz."""
  plan, arc, tree, meta = weights.load_network(
      os.path.join(workdir, results.FINAL_WEIGHTS), "compress",
      "run the final stage first (--config.stages=final,compress)")
  to_jax = lambda t: jax.tree.map(jax.numpy.asarray, t)
  return plan, arc, to_jax(tree["params"]), to_jax(tree["stats"]), meta


def compress_recipe(config, num_train):
  c = config.compress
  base = final.final_recipe(config, num_train)
  spe = c.steps_per_epoch or data.batches_per_epoch(num_train, c.batch_size)
  lr_max = config.final.lr_max if c.mode == "scratch" else c.lr_max
  distill = (c.distill_weight, c.distill_temperature) if c.distill else None
  return dataclasses.replace(base, epochs=c.finetune_epochs, steps_per_epoch=spe,
                             batch_size=c.batch_size, lr_max=lr_max, lr_min=c.lr_min,
                             lr_t0=max(c.finetune_epochs, 1), lr_tmul=1, distill=distill)


def bn_batches(config, x, y, mean, std, labels=False):
  """compress.bn_batches training batches of compress.batch_size, shuffled (its own stream),
  as eval feeds images (normalised, no crop, flip or cutout): this process's rows
  f32 [B/P, H, W, C] of each global batch (with labels: (images, labels int32 [B/P]))."""
  c = config.compress
  for step in range(c.bn_batches):
    xb, yb = data.train_batch(x, y, step=step, batch_size=c.batch_size, seed=config.seed,
                              stream=Stream.BN_REESTIMATE, mean=mean, std=std,
                              process_index=jax.process_index(),
                              process_count=jax.process_count())
    yield (xb, yb) if labels else xb


def taylor_grads(plan, params, stats, batches, mesh):
  """dL/dparams of the eval-mode cross-entropy of the trained network, averaged over
  `batches` ((images, labels) of equal global size; criterion 'taylor')."""
  def grad(p, s, x, y):
    def loss(p):
      logits = child.forward(plan, p, s, x, False, with_aux=False)[0]
      return jax.lax.pmean(loss_lib.xent(logits, y), parallel.AXIS)
    return jax.grad(loss)(p)
  step = parallel.data_parallel(grad, mesh, (REPLICATED, REPLICATED, BATCH, BATCH), REPLICATED)
  params, stats = parallel.replicate(mesh, jax.device_get((params, stats)))
  total, k = None, 0
  for xb, yb in batches:
    g = jax.device_get(step(params, stats, *parallel.shard(mesh, (xb, yb))))
    total = g if total is None else jax.tree.map(np.add, total, g)
    k += 1
  return jax.tree.map(lambda a: jnp.asarray(a / k, jnp.float32), total)


def importance_inputs(config, plan, params, stats, x, y, mean, std, mesh):
  """(grads, key) the compress.importance criterion reads (None where it reads none)."""
  c = config.compress
  grads = key = None
  if c.importance == "taylor":
    grads = taylor_grads(plan, params, stats,
                         bn_batches(config, x, y, mean, std, labels=True), mesh)
  if c.importance == "random":
    key = streams.key(config.seed, Purpose.COMPRESS_SCORES)
  return grads, key


def train_mode_stats(plan):
  """Per-device (params, stats, x) -> new stats: the train-mode forward pass (batch
  statistics synchronised over parallel.AXIS, no dropout or drop-path, no aux head)."""
  return lambda p, s, x: child.forward(plan, p, s, x, True, parallel.AXIS,
                                       with_aux=False)[2]


def max_abs_diff(plan, params_a, stats_a, params_b, stats_b, x):
  """max |logits_a - logits_b| on x in eval mode (two networks of the same plan)."""
  run = jax.jit(lambda p, s: child.forward(plan, p, s, x, False, with_aux=False)[0])
  return float(np.max(np.abs(np.asarray(run(params_a, stats_a)) -
                             np.asarray(run(params_b, stats_b)))))


def run(config, workdir, ds):
  c = config.compress
  out = os.path.join(workdir, "compress")
  os.makedirs(out, exist_ok=True)
  plan, arc, params, stats, meta = load_trained(workdir)
  if tuple(meta["image_shape"]) != tuple(ds.image_shape) or meta["num_classes"] != ds.num_classes:
    raise config_lib.ConfigError(
        f"data.name={config.data.name!r}: images {ds.image_shape} / {ds.num_classes} classes, "
        f"but final/weights.npz was trained on {tuple(meta['image_shape'])} / "
        f"{meta['num_classes']} classes")
  ratios = results.configured_ratios(config, workdir)
  x, y = final.training_images(ds)
  recipe = compress_recipe(config, len(y))

  mesh = parallel.make_mesh()
  grads, key = importance_inputs(config, plan, params, stats, x, y, ds.mean, ds.std, mesh)
  masks = jax.device_get(jax.jit(
      lambda p, r, g, k: masks_lib.child_masks(plan, p, r, c.importance, g, k, c.round_to))(
          params, np.float32(ratios), grads, key))
  masked = jax.jit(lambda p, m: masks_lib.apply_child_masks(plan, p, m))(params, masks)
  full = flops.count(plan)
  pruned = flops.count(plan, compaction.widths_of(plan, masks))
  teacher = (params, stats) if c.distill else None      # the unpruned trained network
  trainer = trainer_lib.FixedTrainer.build(plan, recipe, config.seed, Stream.COMPRESS,
                                           ds.mean, ds.std, mesh,
                                           masks=masks if c.mode == "finetune" else None,
                                           teacher=teacher)
  acc_stale = trainer.evaluate(masked, stats, ds.x_test, ds.y_test)
  restats = bn_reestimate.reestimate(train_mode_stats(plan), masked, stats,
                                     bn_batches(config, x, y, ds.mean, ds.std), trainer.mesh)
  acc_masked = trainer.evaluate(masked, restats, ds.x_test, ds.y_test)
  logging.info("compress: ratios %s, %.2fM -> %.2fM multiply-adds; masked test accuracy %.4f "
               "(BN re-estimated on %d batches), %.4f (stale BN statistics)", ratios,
               full["macs"] / 1e6, pruned["macs"] / 1e6, acc_masked, c.bn_batches, acc_stale)

  x_check = data.eval_batches(ds.x_test, ds.y_test, batch_size=min(64, len(ds.y_test)),
                              mean=ds.mean, std=ds.std).__next__()[0]
  if c.mode == "finetune":
    init_state = lambda: trainer.init_state(masked, restats)
  else:  # scratch: a fresh initialisation of the thin network, trained alone
    trainer = trainer_lib.FixedTrainer.build(plan, recipe, config.seed, Stream.COMPRESS,
                                             ds.mean, ds.std, teacher=teacher)

    def init_state():
      fresh_p, fresh_s = child.init(streams.key(config.seed, Purpose.COMPRESS_INIT), plan)
      _, thin_p, thin_s = compaction.compact(plan, fresh_p, fresh_s, masks)
      return trainer.init_state(thin_p, thin_s)
  state = trainer_lib.train(trainer, init_state, x, y, out, f"compress ({c.mode})",
                            config.overwrite, sync_every=config.preemption_sync_steps)
  net = jax.device_get(state["net"])
  if c.mode == "finetune":
    tuned_p, tuned_s = net["params"], net["stats"]
    widths, cp, cs = compaction.compact(plan, tuned_p, tuned_s, masks)
    diff = max_abs_diff(plan, tuned_p, tuned_s, cp, cs, x_check)
  else:
    widths, mcp, mcs = compaction.compact(plan, masked, restats, masks)
    diff = max_abs_diff(plan, masked, restats, mcp, mcs, x_check)
    cp, cs = jax.tree.map(jax.numpy.asarray, (net["params"], net["stats"]))
  acc_tuned = trainer.evaluate(cp, cs, ds.x_test, ds.y_test)
  if flops.param_count(cp) != pruned["params"]:
    raise AssertionError("compact params differ from the analytic count")
  result = {
      "ratios": [float(r) for r in ratios], "importance": c.importance, "mode": c.mode,
      "finetune_epochs": c.finetune_epochs, "bn_batches": c.bn_batches,
      "round_to": c.round_to, "distill": bool(c.distill),
      "distill_weight": c.distill_weight if c.distill else None,
      "distill_temperature": c.distill_temperature if c.distill else None,
      "macs": full["macs"], "params": full["params"], "params_no_aux": full["params_no_aux"],
      "pruned_macs": pruned["macs"], "pruned_params": pruned["params"],
      "pruned_params_no_aux": pruned["params_no_aux"],
      "test_error_masked": 100.0 * (1.0 - acc_masked),
      "test_error_masked_stale_bn": 100.0 * (1.0 - acc_stale),
      "test_error_finetuned": 100.0 * (1.0 - acc_tuned),
      "max_abs_diff_masked_vs_compact": diff, "widths": widths,
      "arc_string": meta["arc_string"], "matmul_precision": precision.matmul_precision()}
  if jax.process_index() == 0:
    weights.save(os.path.join(workdir, results.COMPRESS_WEIGHTS),
                 {"params": jax.device_get(cp), "stats": jax.device_get(cs)},
                 {**{k: meta[k] for k in ("arc_string", "num_layers", "out_filters",
                                          "image_shape", "num_classes")},
                  "ratios": result["ratios"], "widths": widths})
    with open(os.path.join(out, "result.json"), "w") as fh:
      json.dump(result, fh, indent=1)
  msg = (f"compress: {full['macs'] / 1e6:.2f}M -> {pruned['macs'] / 1e6:.2f}M multiply-adds, "
         f"{full['params_no_aux'] / 1e6:.3f}M -> {pruned['params_no_aux'] / 1e6:.3f}M params; "
         f"test error masked {result['test_error_masked']:.2f}% (BN re-estimated; stale BN "
         f"statistics {result['test_error_masked_stale_bn']:.2f}%), {c.mode} "
         f"{result['test_error_finetuned']:.2f}%")
  logging.info(msg)
  print(msg)
  return result
