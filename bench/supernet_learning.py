"""Does the shared-weight supernet learn under uniformly random architectures?

Trains the supernet on digits (scikit-learn 8x8, the smoke config's data) with a
fresh uniformly random architecture every step, as the search's warm-up does,
and records the mean child accuracy (training batches, dropout on) per epoch, for
3, 5 and 8 cells (num_layers 1, 3, 6) and several designs:

  current   fp_jax's defaults (configs/default.py search.*): ENAS's supernet
            (supernet.py), init_scale, lr, clipping, dropout as configured
  legacy    the supernet before ENAS parity: supernet.py of fp_jax at LEGACY (0c0c863),
            loaded by bench/steps.py (every cell input calibrated, a reduction cell
            reduces both inputs, cells output all 5 nodes, no per-cell projection)
  plus any variant given by --variant NAME:key=value,... over the current design
            (keys: init_scale, final_init, share_inputs, lr_max, lr_min, grad_clip, keep_prob,
            warmup_epochs, optimizer)

  python -m bench.supernet_learning [--epochs 60 --batch 64 --filters 8] [--cli]

--cli also runs the search through the command line at 8 cells, as a user would:
  python -m fp_jax.main --config=configs/smoke.py --config.stages=search
    --config.search.num_layers=6 --config.search.out_filters=8 --config.search.batch_size=64
    --config.search.epochs=60 --config.search.uniform_child_epochs=60 --config.search.lr_t0=60
and reports the child accuracy of its last epoch (search/metrics.jsonl).

Writes bench/results/supernet_learning.{json,md,png}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench import steps
from configs import smoke
from fp_jax import data
from fp_jax.train import losses as loss_lib
from fp_jax.train import schedules
from fp_jax.models import space
from fp_jax.models import supernet
from fp_jax.train.streams import Stream

RESULTS = os.path.join(os.path.dirname(__file__), "results")
LEGACY = "0c0c863"             # the last revision before ENAS parity


@dataclasses.dataclass(frozen=True)
class Setup:
  design: str = "current"      # current | legacy
  init_scale: str = "fan_in"
  final_init: str = "identity"
  share_inputs: bool = True
  lr_max: float = 0.05
  lr_min: float = 0.0005
  grad_clip: float = 5.0
  keep_prob: float = 0.9
  warmup_epochs: int = 0       # linear lr warm-up from 0 over these epochs
  optimizer: str = "sgd"       # sgd (Nesterov momentum 0.9) | adam


def defaults():
  s = smoke.get_config().search
  return Setup(init_scale=s.init_scale, final_init=s.final_init, share_inputs=s.share_inputs,
               lr_max=s.lr_max, lr_min=s.lr_min,
               grad_clip=s.grad_clip, keep_prob=s.keep_prob)


def run(setup, num_layers, filters, batch, epochs, seed=0, ds=None):
  """Mean child accuracy per epoch (list) under uniformly random arcs."""
  ds = ds or data.load("digits", 256)
  spe = data.batches_per_epoch(len(ds.y_train), batch)
  shape = ds.image_shape
  if setup.design == "legacy":
    legacy = steps._mod(steps.package(LEGACY), "supernet")
    plan = legacy.make_plan(num_layers, filters, shape, ds.num_classes)
    params = legacy.init(jax.random.key(seed), plan)
    fwd = lambda p, a, x, key: legacy.forward(plan, p, a, x)
  else:
    plan = supernet.make_plan(num_layers, filters, shape, ds.num_classes)
    params = supernet.init(jax.random.key(seed), plan, setup.init_scale, setup.final_init,
                           setup.share_inputs)
    fwd = lambda p, a, x, key: supernet.forward(
        plan, p, a, x, reg={"key": key, "keep_prob": setup.keep_prob})
  cosine = schedules.cosine_restarts(spe, epochs, 1, setup.lr_max, setup.lr_min)
  warm = max(1, setup.warmup_epochs * spe)
  lr = (cosine if not setup.warmup_epochs else
        lambda step: cosine(step) * jnp.minimum(1.0, (step + 1) / warm))
  inner = (optax.sgd(lr, momentum=0.9, nesterov=True) if setup.optimizer == "sgd"
           else optax.adam(lr))
  tx = optax.chain(optax.add_decayed_weights(2e-4), optax.clip_by_global_norm(setup.grad_clip),
                   inner)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, arc, key, x, y):
    def loss_fn(p):
      logits, aux = fwd(p, arc, x, key)
      loss, (_, acc) = loss_lib.classification_loss(logits, aux, y, 0.4, None)
      return loss, acc
    (_, acc), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), opt, acc

  rng = np.random.default_rng([seed, 3])
  curve = []
  for epoch in range(epochs):
    accs = []
    for i in range(spe):
      x, y = data.train_batch(ds.x_train, ds.y_train, step=epoch * spe + i, batch_size=batch,
                              seed=seed, stream=Stream.SUPERNET, mean=ds.mean, std=ds.std, crop_pad=0,
                              flip=False)
      params, opt, acc = step(params, opt, jnp.asarray(space.sample_uniform(rng)),
                              jax.random.fold_in(jax.random.key(seed), epoch * spe + i),
                              jnp.asarray(x), jnp.asarray(y))
      accs.append(acc)
    curve.append(float(np.mean(jax.device_get(accs))))
  return curve


def run_cli(epochs, batch, filters, num_layers=6):
  """The search through `python -m fp_jax.main` (smoke.py, uniform arcs every epoch):
  child_acc per epoch from search/metrics.jsonl."""
  import subprocess   # pylint: disable=g-import-not-at-top
  import sys   # pylint: disable=g-import-not-at-top
  import tempfile   # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with tempfile.TemporaryDirectory() as work:
    cmd = [sys.executable, "-m", "fp_jax.main", "--config=configs/smoke.py",
           f"--workdir={work}", "--config.stages=search",
           f"--config.search.num_layers={num_layers}", f"--config.search.out_filters={filters}",
           f"--config.search.batch_size={batch}", f"--config.search.epochs={epochs}",
           f"--config.search.uniform_child_epochs={epochs}", f"--config.search.lr_t0={epochs}"]
    subprocess.run(cmd, cwd=root, check=True, capture_output=True)
    with open(os.path.join(work, "search", "metrics.jsonl")) as f:
      return [json.loads(line)["child_acc"] for line in f], " ".join(cmd[1:])


def parse_variant(text, base):
  name, _, kv = text.partition(":")
  fields = {f.name: f.type for f in dataclasses.fields(Setup)}
  changes = {}
  for item in filter(None, kv.split(",")):
    k, v = item.split("=")
    if k not in fields:
      raise SystemExit(f"error: --variant {text!r}: unknown key {k!r}")
    changes[k] = {"str": str, "float": float, "int": int,
                  "bool": lambda t: t.lower() in ("1", "true")}[fields[k]](v)
  return name, dataclasses.replace(base, **changes)


def plot(results, path):
  import matplotlib   # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt   # pylint: disable=g-import-not-at-top
  layers_list = sorted({r["num_layers"] for r in results})
  fig, axes = plt.subplots(1, len(layers_list), figsize=(5 * len(layers_list), 3.6),
                           squeeze=False)
  for ax, nl in zip(axes[0], layers_list):
    for r in results:
      if r["num_layers"] == nl:
        ax.plot(np.arange(1, len(r["curve"]) + 1), r["curve"], label=r["name"])
    ax.set_title(f"{nl + 2} cells (num_layers {nl})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("child accuracy (random arcs)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--epochs", type=int, default=60)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--filters", type=int, default=8)
  ap.add_argument("--num_layers", default="1,3,6")
  ap.add_argument("--designs", default="current,legacy")
  ap.add_argument("--variant", action="append", default=[])
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--cli", action="store_true")
  ap.add_argument("--out", default=os.path.join(RESULTS, "supernet_learning"))
  a = ap.parse_args()
  base = defaults()
  setups = [(d, dataclasses.replace(base, design=d)) for d in a.designs.split(",") if d]
  setups += [parse_variant(v, base) for v in a.variant]
  ds = data.load("digits", 256)
  results = []
  for nl in [int(v) for v in a.num_layers.split(",")]:
    for name, setup in setups:
      t = time.perf_counter()
      curve = run(setup, nl, a.filters, a.batch, a.epochs, a.seed, ds)
      r = {"name": name, "num_layers": nl, "cells": nl + 2, "setup": dataclasses.asdict(setup),
           "curve": curve, "last": curve[-1], "seconds": time.perf_counter() - t}
      results.append(r)
      print(f"{name:>12} {nl + 2} cells: last-epoch child acc {curve[-1]:.3f} "
            f"(best {max(curve):.3f}, {r['seconds']:.0f} s)", flush=True)
  names = [n for n, _ in setups]
  if a.cli:
    t = time.perf_counter()
    curve, cmd = run_cli(a.epochs, a.batch, a.filters)
    results.append({"name": "command line", "num_layers": 6, "cells": 8, "command": cmd,
                    "curve": curve, "last": curve[-1], "seconds": time.perf_counter() - t})
    names.append("command line")
    print(f"command line 8 cells: last-epoch child acc {curve[-1]:.3f}", flush=True)
  os.makedirs(os.path.dirname(a.out), exist_ok=True)
  meta = {"epochs": a.epochs, "batch": a.batch, "filters": a.filters, "seed": a.seed,
          "data": "digits", "steps_per_epoch": data.batches_per_epoch(len(ds.y_train), a.batch)}
  with open(a.out + ".json", "w") as f:
    json.dump({**meta, "names": names, "results": results}, f, indent=1)
  report(a.out)


def report(out):
  """Writes OUT.md (and OUT.png) from OUT.json."""
  with open(out + ".json") as f:
    run_ = json.load(f)
  results = run_["results"]
  names = run_.get("names") or list(dict.fromkeys(r["name"] for r in results))
  lines = [f"Supernet under uniformly random architectures: digits, F {run_['filters']}, batch "
           f"{run_['batch']}, {run_['epochs']} epochs x {run_['steps_per_epoch']} steps; mean "
           "child accuracy of the last epoch (training batches), and in brackets the mean of "
           "the last 5 epochs (an epoch's figure averages only its steps' random arcs)", ""]
  layers_all = sorted({r["num_layers"] for r in results})
  lines += ["| design | " + " | ".join(f"{nl + 2} cells" for nl in layers_all) + " |",
            "|---|" + "---|" * len(layers_all)]
  for name in names:
    got = {r["num_layers"]: f"{r['last']:.3f} ({np.mean(r['curve'][-5:]):.3f})"
           for r in results if r["name"] == name}
    lines.append(f"| {name} | " + " | ".join(got.get(nl, "-") for nl in layers_all) + " |")
  with open(out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  plot(results, out + ".png")


if __name__ == "__main__":
  main()
