"""Does fake pruning pick architectures that lose less accuracy when pruned? (The paper's claim.)

On digits (scikit-learn 8x8, the smoke config's data and recipes), for each seed,
runs the whole pipeline (search, final, compress) three times, with the reward's
a and b set to:

  enas        a = 0                      plain ENAS: TrainAcc only
  ratio       a = A, b = 0               ratio term, no gap term
  fake_prune  a = A, b = 20              ratio term scaled by (1 + b Gap): fake pruning

A = 0.02 * 8 / cells: the paper's a = 0.02 rewards Ratio, a sum of per-cell ratios
over its searched network's 8 cells (6 layers + 2 reductions); the smaller searched
network here has `cells` (num_layers + 2) cells, so a is scaled by 8 / cells to give
the ratio term the paper's weight against TrainAcc. Search and final run at the same
depth (every stage holds cells). Each setting and seed gets the same budgets.

For every chosen architecture, trained as the final network: its test error, its
multiply-adds, the masked test error at the same uniform ratios for every
architecture (--ratios, BN statistics re-estimated, no fine-tuning: what pruning
costs before training), and after compressing at --finetune_ratio (the compress
stage: fine-tuned, channels removed) the fine-tuned error and multiply-adds.

  python -m bench.fake_pruning [--seeds 0 1 2] [--search_epochs 12] [--final_epochs 8]

Runs are kept under --workdir (default /tmp/fp_jax_bench_fake_pruning) and reused
when the same command is rerun. Writes bench/results/fake_pruning.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import jax
import numpy as np

from bench import common
from configs import smoke
from fp_jax.pruning import bn_reestimate
from fp_jax.pruning import compaction
from fp_jax import data
from fp_jax.models import flops
from fp_jax import main as main_lib
from fp_jax.train import compress
from fp_jax.train import final
from fp_jax.train import trainer as trainer_lib
from fp_jax.pruning import masks as masks_lib
from fp_jax.train.streams import Stream

SETTINGS = {"enas": (0.0, 0.0), "ratio": (1.0, 0.0), "fake_prune": (1.0, 20.0)}  # (a / A, b)


def config_for(args, setting, seed):
  config = smoke.get_config()
  a_scale, b = SETTINGS[setting]
  s, f, k = config.search, config.final, config.compress
  s.num_layers = f.num_layers = args.num_layers
  s.alpha, s.beta = a_scale * alpha(args.num_layers), b
  s.epochs, s.uniform_child_epochs, s.lr_t0 = (args.search_epochs, args.search_epochs // 2,
                                               args.search_epochs)
  f.epochs = f.lr_t0 = args.final_epochs
  k.finetune_epochs = args.finetune_epochs
  k.ratios = " ".join([str(args.finetune_ratio)] * 5)
  config.seed = seed
  config.stages = "search,final,compress"
  return config


def alpha(num_layers):
  return 0.02 * 8 / (num_layers + 2)


def masked_error(config, workdir, ds, ratio):
  """(test error % of the final network masked at `ratio` in every stage, BN statistics
  re-estimated as the compress stage does; its multiply-adds)."""
  plan, arc, params, stats, _ = compress.load_trained(workdir)
  x, y = final.training_images(ds)
  trainer = trainer_lib.FixedTrainer.build(plan, compress.compress_recipe(config, len(y)),
                                           config.seed, Stream.COMPRESS, ds.mean, ds.std)
  masks = jax.device_get(jax.jit(lambda p, r: masks_lib.child_masks(plan, p, r))(
      params, np.full(5, ratio, np.float32)))
  masked = masks_lib.apply_child_masks(plan, params, masks)
  restats = bn_reestimate.reestimate(compress.train_mode_stats(plan), masked, stats,
                                     compress.bn_batches(config, x, y, ds.mean, ds.std),
                                     trainer.mesh)
  acc = trainer.evaluate(masked, restats, ds.x_test, ds.y_test)
  return 100.0 * (1.0 - acc), flops.count(plan, compaction.widths_of(plan, masks))["macs"]


def run_one(args, setting, seed, ds):
  workdir = os.path.join(args.workdir, f"{setting}_seed{seed}")
  config = config_for(args, setting, seed)
  if not os.path.exists(os.path.join(workdir, "compress", "result.json")):
    common.log(f"{setting} seed {seed}: pipeline in {workdir}")
    config.overwrite = True
    main_lib.run(config, workdir)
  arch = json.load(open(os.path.join(workdir, "search", "arch.json")))
  fin = json.load(open(os.path.join(workdir, "final", "result.json")))
  comp = json.load(open(os.path.join(workdir, "compress", "result.json")))
  samples = [json.loads(l) for l in open(os.path.join(workdir, "search", "samples.jsonl"))]
  last = samples[-len(samples) // 4:]   # the last quarter of the controller's samples
  masked = {}
  for r in args.ratios:
    err, macs = masked_error(config, workdir, ds, r)
    masked[str(r)] = {"test_error_masked": err, "macs": macs,
                      "loss": err - fin["test_error"]}
  return {"setting": setting, "seed": seed, "alpha": config.search.alpha,
          "beta": config.search.beta, "arc_string": arch["arc_string"],
          "searched_ratios": arch["ratios"], "search_reward": arch["reward"],
          "search_prune_acc": arch["prune_acc"], "search_train_acc": arch["train_acc"],
          "late_samples_mean_gap": statistics.mean(r["gap"] for r in last),
          "late_samples_mean_ratio": statistics.mean(r["ratio"] for r in last),
          "test_error": fin["test_error"], "macs": fin["macs"], "masked": masked,
          "finetune_ratio": args.finetune_ratio,
          "test_error_finetuned": comp["test_error_finetuned"],
          "test_error_masked_at_finetune_ratio": comp["test_error_masked"],
          "pruned_macs": comp["pruned_macs"]}


def summarise(rows, ratios):
  out = {}
  for setting in SETTINGS:
    rs = [r for r in rows if r["setting"] == setting]
    if not rs:
      continue
    mean = lambda f: statistics.mean(f(r) for r in rs)
    out[setting] = {
        "seeds": len(rs), "test_error": mean(lambda r: r["test_error"]),
        "macs": mean(lambda r: r["macs"]),
        "masked_error": {str(q): mean(lambda r: r["masked"][str(q)]["test_error_masked"])
                         for q in ratios},
        "masked_loss": {str(q): mean(lambda r: r["masked"][str(q)]["loss"]) for q in ratios},
        "test_error_finetuned": mean(lambda r: r["test_error_finetuned"]),
        "pruned_macs": mean(lambda r: r["pruned_macs"]),
        "late_samples_mean_gap": mean(lambda r: r["late_samples_mean_gap"]),
        "late_samples_mean_ratio": mean(lambda r: r["late_samples_mean_ratio"])}
  return out


def plot(rows, ratios, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(1, 2, figsize=(11, 4))
  colors = {"enas": "tab:gray", "ratio": "tab:blue", "fake_prune": "tab:red"}
  for k, setting in enumerate(SETTINGS):
    rs = [r for r in rows if r["setting"] == setting]
    if not rs:
      continue
    loss = np.array([[r["masked"][str(q)]["loss"] for q in ratios] for r in rs])
    for row in loss:
      ax[0].plot(ratios, row, color=colors[setting], alpha=0.3, lw=1)
    ax[0].plot(ratios, loss.mean(0), color=colors[setting], lw=2, marker="o", label=setting)
    for j, r in enumerate(rs):
      x = k + 0.1 * (j - (len(rs) - 1) / 2)
      ax[1].scatter([x - 0.25, x + 0.25], [r["test_error"], r["test_error_finetuned"]],
                    color=colors[setting], s=18)
  ax[0].set_xlabel("uniform ratio in every stage (masked, BN re-estimated)")
  ax[0].set_ylabel("masked test error - final test error (points)")
  ax[0].set_title("accuracy lost by masking the chosen architecture")
  ax[0].legend()
  ax[1].set_xticks(range(len(SETTINGS)), [f"{s}\nfinal | fine-tuned" for s in SETTINGS])
  ax[1].set_ylabel("test error (%)")
  ax[1].set_title(f"final (left dots) and fine-tuned at {rows[0]['finetune_ratio']} (right)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
  p.add_argument("--num_layers", type=int, default=3, help="search and final depth")
  p.add_argument("--search_epochs", type=int, default=12, help="half of them uniform warm-up")
  p.add_argument("--final_epochs", type=int, default=8)
  p.add_argument("--finetune_epochs", type=int, default=4)
  p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5])
  p.add_argument("--finetune_ratio", type=float, default=0.3)
  p.add_argument("--workdir", default="/tmp/fp_jax_bench_fake_pruning")
  p.add_argument("--out", default="")
  args = p.parse_args()
  main_lib.FLAGS.mark_as_parsed()   # main.run reads the (default) multi-process flags
  ds = data.load("digits", smoke.get_config().data.valid_size)
  rows = [run_one(args, setting, seed, ds) for seed in args.seeds for setting in args.settings]
  summary = summarise(rows, args.ratios)
  result = {"environment": common.environment(), "args": vars(args),
            "alpha_scaled": alpha(args.num_layers), "rows": rows, "summary": summary}
  path = common.write_json("fake_pruning", args.out, result)
  headers = (["setting", "seeds", "final err %", "MMACs"] +
             [f"masked err @{q}" for q in args.ratios] +
             [f"loss @{q}" for q in args.ratios] +
             [f"fine-tuned err @{args.finetune_ratio}", "pruned MMACs", "late gap", "late Ratio"])
  table = common.table(headers, [
      [s, v["seeds"], v["test_error"], v["macs"] / 1e6] +
      [v["masked_error"][str(q)] for q in args.ratios] +
      [v["masked_loss"][str(q)] for q in args.ratios] +
      [v["test_error_finetuned"], v["pruned_macs"] / 1e6, v["late_samples_mean_gap"],
       v["late_samples_mean_ratio"]] for s, v in summary.items()])
  per_run = common.table(
      ["setting", "seed", "arc", "final err %"] + [f"loss @{q}" for q in args.ratios],
      [[r["setting"], r["seed"], r["arc_string"], r["test_error"]] +
       [r["masked"][str(q)]["loss"] for q in args.ratios] for r in rows])
  md = (f"# Fake pruning on digits (a scaled to {alpha(args.num_layers):.4g})\n\n"
        f"Means over seeds {args.seeds}; loss = masked error - final error (points).\n\n"
        f"{table}\n\n## Per run\n\n{per_run}\n")
  with open(path[:-len(".json")] + ".md", "w") as fh:
    fh.write(md)
  plot(rows, args.ratios, path[:-len(".json")] + ".png")
  print(md)


if __name__ == "__main__":
  main()
