"""The final stage: train the chosen architecture from scratch and test it.

Recipe (DESIGN §5; config.final): num_layers x out_filters network of the arc,
aux head (weight 0.4), drop-path on every non-identity op with keep
probability scaled by depth and ramped over training (ENAS), dropout before the
classifier, optional cutout, cosine restarts, L2, Nesterov momentum, global-norm
clipping. Data-parallel over `data` with synchronised BN, like the search. The
validation images held out for the controller's rewards are trained on too
(they exist only for the search). Writes DIR/final/{metrics.jsonl, tb/,
ckpt/, result.json, weights.npz}; the loop is train/trainer.py.
"""
from __future__ import annotations

import json
import os

from absl import logging
import jax
import numpy as np

from fp_jax.models import child
from fp_jax import data
from fp_jax.models import flops
from fp_jax.pruning import masks as masks_lib
from fp_jax import results
from fp_jax.models import space
from fp_jax.run import precision
from fp_jax.run import weights
from fp_jax.train import streams
from fp_jax.train import trainer as trainer_lib
from fp_jax.train.streams import Purpose, Stream


def final_recipe(config, num_train):
  f, d = config.final, config.data
  spe = f.steps_per_epoch or data.batches_per_epoch(num_train, f.batch_size)
  return trainer_lib.Recipe(f.epochs, spe, f.batch_size, f.eval_batch_size, f.lr_max, f.lr_min,
                            f.lr_t0, f.lr_tmul, f.momentum, f.l2, f.grad_clip, f.aux_weight,
                            f.keep_prob, f.drop_path_keep_prob, f.cutout, d.crop_pad, d.flip,
                            config.dtype, d.input)


def training_images(ds):
  """Train + validation split: the final network trains on every labelled training image."""
  return (np.concatenate([ds.x_train, ds.x_valid]), np.concatenate([ds.y_train, ds.y_valid]))


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
  # masks of all ones: the unmasked update (masked_update.hold_masks), in the compiled step
  # the compress stage's fine-tuning of this network reuses
  trainer = trainer_lib.FixedTrainer.build(plan, recipe, config.seed, Stream.FINAL, ds.mean,
                                           ds.std, masks=masks_lib.keep_all(plan))

  def init_state():
    params, stats = child.init(streams.key(config.seed, Purpose.FINAL_INIT), plan)
    return trainer.init_state(params, stats)

  counts = flops.count(plan)
  logging.info("final: %s, %d layers, F %d: %.2fM multiply-adds, %.3fM params; %d epochs x %d "
               "steps of %d", space.arc_to_string(arc), f.num_layers, f.out_filters,
               counts["macs"] / 1e6, counts["params_no_aux"] / 1e6, recipe.epochs,
               recipe.steps_per_epoch, recipe.batch_size)
  state = trainer_lib.train(trainer, init_state, x, y, out, "final", config.overwrite,
                            sync_every=config.preemption_sync_steps)
  net = jax.device_get(state["net"])
  test_acc = trainer.evaluate(state["net"]["params"], state["net"]["stats"], ds.x_test, ds.y_test)
  result = {"test_error": 100.0 * (1.0 - test_acc), "test_acc": test_acc,
            "macs": counts["macs"], "params": counts["params"],
            "params_no_aux": counts["params_no_aux"], "epochs": recipe.epochs,
            "steps_per_epoch": recipe.steps_per_epoch, "batch_size": recipe.batch_size,
            "arc_string": space.arc_to_string(arc), "num_layers": f.num_layers,
            "out_filters": f.out_filters, "test_images": int(len(ds.y_test)),
            "matmul_precision": precision.matmul_precision()}
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
