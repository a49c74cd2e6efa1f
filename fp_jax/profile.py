"""The `profile` stage: params and multiply-adds of the configured architecture.

Needs no data: the image shape comes from the dataset name (or, for npz and
other TFDS names, from the dataset itself). Writes DIR/profile.json.
"""
from __future__ import annotations

import json
import os

from absl import logging
import jax

from fp_jax.models import child
from fp_jax import data
from fp_jax.models import flops
from fp_jax import results
from fp_jax.models import space

KNOWN_SHAPES = {"cifar10": ((32, 32, 3), 10), "synthetic": ((32, 32, 3), 10),
                "digits": ((8, 8, 1), 10), "fashion_mnist": ((28, 28, 1), 10)}


def image_shape(config):
  if config.data.name in KNOWN_SHAPES:
    return KNOWN_SHAPES[config.data.name]
  ds = data.load(config.data.name, 0, tfds_data_dir=config.data.tfds_data_dir,
                 idx_dir=config.data.idx_dir)
  return ds.image_shape, ds.num_classes


def run(config, workdir):
  arc = results.configured_arc(config, workdir)
  shape, num_classes = image_shape(config)
  f = config.final
  plan = child.make_plan(arc, f.num_layers, f.out_filters, shape, num_classes)
  counts = flops.count(plan)
  params, _ = jax.eval_shape(lambda: child.init(jax.random.key(0), plan))
  assert flops.param_count(params) == counts["params"], "analytic params != pytree params"
  result = {"macs": counts["macs"], "params": counts["params"],
            "params_no_aux": counts["params_no_aux"], "aux_macs": counts["aux_macs"],
            "arc_string": space.arc_to_string(arc), "num_layers": f.num_layers,
            "out_filters": f.out_filters, "image_shape": list(shape),
            "num_classes": num_classes}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "profile.json"), "w") as fh:
      json.dump(result, fh, indent=1)
  logging.info("profile: %.2fM multiply-adds, %.3fM params (%.3fM without aux head)",
               counts["macs"] / 1e6, counts["params"] / 1e6, counts["params_no_aux"] / 1e6)
  print(f"profile: {counts['macs'] / 1e6:.2f}M multiply-adds, {counts['params'] / 1e6:.3f}M "
        f"params ({counts['params_no_aux'] / 1e6:.3f}M without aux head)")
  return result
