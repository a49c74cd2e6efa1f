"""Does the supernet rank pruned architectures as they rank when trained alone? (Fake
pruning's proxy: the masked supernet's PruneAcc for a pruned, fine-tuned network.)

From one trained supernet (a finished Fashion-MNIST search: --search_dir, else one is run
with configs/fashion.py), candidates (arc, ratios) -- the search's own samples plus
uniformly random ones -- are scored on --eval_batches validation batches with the final
supernet weights (TrainAcc, PruneAcc, Gap, reward: Search.evaluate_ratios, as the search
does); --samples of them at evenly spaced reward quantiles are then each trained as a fixed
network with one short recipe (the program's final and compress stages with final.arc and
compress.ratios: masked at its ratios with BN re-estimated, then fine-tuned). Kendall tau
and Spearman rho (scipy.stats) between the supernet's and the standalone figures, with
bootstrap 95 % intervals (resampling the architectures), and a scatter PNG.

  python -m bench.proxy_fidelity [--samples 16] [--search_dir DIR] [--workdir DIR]

Each standalone run keeps its work directory (a rerun trains only what is missing;
`--max_samples N` trains at most N new ones, then writes the figures of those done). The
results JSON is rewritten after every sample and holds the search's resolved config, the
picked candidates and the finished rows, so a rerun on another machine (work directories
gone) trains only the samples still missing, without the search. Writes
bench/results/proxy_fidelity.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import fashion_table  # pylint: disable=g-import-not-at-top
from fp_jax import config as config_lib  # pylint: disable=g-import-not-at-top

WORKDIR = "/var/tmp/fp_jax_bench/proxy_fidelity"
# supernet figure -> standalone figure it stands in for
PAIRS = (("train_acc", "final_acc"), ("prune_acc", "masked_acc"),
         ("prune_acc", "finetuned_acc"), ("reward", "standalone_reward"),
         ("gap", "standalone_gap"))


def _tau_b(x, y):
  """Kendall's tau-b of each row of x against the same row of y: (B, n), (B, n) -> (B,)."""
  sx = np.sign(x[:, :, None] - x[:, None, :])
  sy = np.sign(y[:, :, None] - y[:, None, :])
  return (sx * sy).sum((1, 2)) / np.sqrt((sx * sx).sum((1, 2)) * (sy * sy).sum((1, 2)))


def _rho(x, y):
  """Spearman's rho (Pearson's r of average ranks) of each row pair: (B, n) -> (B,)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  rx, ry = stats.rankdata(x, axis=1), stats.rankdata(y, axis=1)
  rx, ry = rx - rx.mean(1, keepdims=True), ry - ry.mean(1, keepdims=True)
  return (rx * ry).sum(1) / np.sqrt((rx * rx).sum(1) * (ry * ry).sum(1))


def rank_stats(x, y, boot=2000, seed=0):
  """Kendall tau and Spearman rho of x vs y, each with a bootstrap 95 % interval.

  The resamples' statistics are computed all at once (the same tau-b and rho as
  scipy.stats.kendalltau / spearmanr, a resample per row); a resample with x or y constant
  has no rank correlation and is left out."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  x, y = np.asarray(x, float), np.asarray(y, float)
  out = {"n": len(x), "kendall_tau": float(stats.kendalltau(x, y).statistic),
         "spearman_rho": float(stats.spearmanr(x, y).statistic)}
  rng = np.random.default_rng(seed)
  i = np.array([rng.integers(0, len(x), len(x)) for _ in range(boot)]).reshape(boot, len(x))
  xs, ys = x[i], y[i]
  varied = (np.ptp(xs, axis=1) > 0) & (np.ptp(ys, axis=1) > 0)
  xs, ys = xs[varied], ys[varied]
  for name, fn in (("kendall_tau", _tau_b), ("spearman_rho", _rho)):
    v = np.concatenate([fn(xs[k:k + 256], ys[k:k + 256]) for k in range(0, len(xs), 256)]
                       or [np.zeros(0)])
    out[name + "_ci95"] = [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
  return out


def spread_by_reward(cands, n):
  """n candidates at evenly spaced quantiles of their reward (distinct, sorted by reward)."""
  order = sorted(range(len(cands)), key=lambda i: cands[i]["reward"])
  picks = np.unique(np.round(np.linspace(0, len(order) - 1, n)).astype(int))
  return [cands[order[i]] for i in picks]


def score_candidates(config, search_dir, n_search, n_random, eval_batches, seed):
  """n_search of the search's distinct samples (spread over their recorded rewards) plus
  n_random uniform ones, scored by the final supernet."""
  import jax  # pylint: disable=g-import-not-at-top
  from fp_jax import config as config_lib, data  # pylint: disable=g-import-not-at-top
  from fp_jax.models import space  # pylint: disable=g-import-not-at-top
  from fp_jax.run import checkpoint  # pylint: disable=g-import-not-at-top
  from fp_jax.train import search as search_lib, search_state  # pylint: disable=g-import-not-at-top
  from fp_jax.train.streams import Stream  # pylint: disable=g-import-not-at-top
  ds = data.load(config.data.name, config.data.valid_size, idx_dir=config.data.idx_dir,
                 tfds_data_dir=config.data.tfds_data_dir)
  choices = config_lib.ratio_choices(config)
  search = search_lib.Search.build(config, ds, choices)
  ckpt = checkpoint.Checkpointer(os.path.join(search_dir, "search", "ckpt"), keep=2)
  try:
    state = search_state.restore(search, ckpt, ckpt.latest_step())
  finally:
    ckpt.close()
  params = state.supernet.params
  seen, cands = set(), []
  for r in fashion_table._jsonl(search_dir, "search/samples.jsonl"):
    key = (tuple(r["arc"]), tuple(r["ratios"]))
    if key not in seen:
      seen.add(key)
      cands.append({"arc": r["arc"], "ratios": r["ratios"], "source": "search",
                    "reward": r["reward"]})
  cands = spread_by_reward(cands, n_search) if n_search < len(cands) else cands
  rng = np.random.default_rng([seed, 77])
  for _ in range(n_random):
    arc = space.sample_uniform(rng)
    ratios = search.stage_ratios(rng.integers(0, len(choices), 5)).tolist()
    cands.append({"arc": arc.tolist(), "ratios": ratios, "source": "random"})
  scored = []
  for c in cands:
    evals = [search.evaluate_ratios(params, np.asarray(c["arc"]), c["ratios"], b, Stream.PROXY)
             for b in range(eval_batches)]
    scored.append({**c, **{k: float(np.mean([e[k] for e in evals]))
                           for k in ("train_acc", "prune_acc", "gap", "ratio", "reward",
                                     "macs", "masked_macs")}})
  jax.clear_caches()
  return scored


def standalone(c, i, args, search_config, variant):
  """Trains candidate c alone (final + compress stages); its accuracies and reward."""
  from fp_jax.models import space  # pylint: disable=g-import-not-at-top
  workdir = os.path.join(args.workdir, f"sample{i:02d}")
  arc = space.arc_to_string(np.asarray(c["arc"]))
  overrides = [f"final.arc={arc}", f"compress.ratios={' '.join(f'{r:g}' for r in c['ratios'])}",
               f"final.num_layers={search_config.search.num_layers}",
               f"final.out_filters={search_config.search.out_filters}",
               f"final.epochs={args.final_epochs}", f"final.lr_t0={args.final_epochs}",
               f"final.steps_per_epoch={args.steps}", "compress.finetune_epochs=1",
               f"compress.steps_per_epoch={args.finetune_steps}"] + list(args.set)
  times = fashion_table.run_stages(
      lambda st: fashion_table.command(variant, args.seed, workdir, st, overrides), workdir,
      ("final", "compress"))
  fin = fashion_table._read(workdir, "final/result.json")
  comp = fashion_table._read(workdir, "compress/result.json")
  out = {"final_acc": 1 - fin["test_error"] / 100,
         "masked_acc": 1 - comp["test_error_masked"] / 100,
         "finetuned_acc": 1 - comp["test_error_finetuned"] / 100,
         "pruned_macs": comp["pruned_macs"], "seconds": times}
  out["standalone_gap"] = out["masked_acc"] - out["final_acc"]
  s = search_config.search   # the same reward formula, standalone accuracies in
  out["standalone_reward"] = (s.alpha * c["ratio"] * (1 + s.beta * out["standalone_gap"]) +
                              out["final_acc"])
  return out


def plot(rows, stats_by_pair, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(PAIRS), figsize=(4 * len(PAIRS), 3.8))
  for ax, (a, b) in zip(axes, PAIRS):
    colors = ["tab:red" if r["source"] == "search" else "tab:blue" for r in rows]
    ax.scatter([r[a] for r in rows], [r[b] for r in rows], c=colors, s=22)
    st = stats_by_pair[f"{a}~{b}"]
    ax.set_title(f"tau {st['kendall_tau']:.2f} [{st['kendall_tau_ci95'][0]:.2f}, "
                 f"{st['kendall_tau_ci95'][1]:.2f}]", fontsize=9)
    ax.set_xlabel(f"supernet {a}")
    ax.set_ylabel(f"standalone {b}")
  fig.suptitle("red: the search's samples, blue: uniformly random (arc, ratios)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


RESUME_ARGS = ("variant", "seed", "samples", "from_search", "random", "eval_batches",
               "final_epochs", "steps", "finetune_steps", "set")


def resumable(path, args):
  """The earlier invocation's JSON at `path` when it picked its candidates with these
  arguments (then its config, picks and rows are reused); else None."""
  if not os.path.exists(path):
    return None
  old = json.load(open(path))
  if "picked" not in old or any(old["args"].get(k) != getattr(args, k) for k in RESUME_ARGS
                                if not (k == "seed" and args.search_dir)):
    return None
  return old


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--variant", default="a0.02_b20", help="configs/fashion.py variant")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--search_dir", default="", help="a finished search (default: run one)")
  p.add_argument("--samples", type=int, default=16)
  p.add_argument("--from_search", type=int, default=48, help="candidates from the search")
  p.add_argument("--random", type=int, default=48, help="uniform candidates added")
  p.add_argument("--eval_batches", type=int, default=4)
  p.add_argument("--final_epochs", type=int, default=2)
  p.add_argument("--steps", type=int, default=100, help="final steps per epoch")
  p.add_argument("--finetune_steps", type=int, default=50)
  p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
  p.add_argument("--max_samples", type=int, default=-1,
                 help="train at most N new samples, then write what is done (-1: all)")
  p.add_argument("--workdir", default=WORKDIR)
  p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "proxy_fidelity.json"))
  args = p.parse_args(argv)
  import ml_collections  # pylint: disable=g-import-not-at-top
  from configs import fashion  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  old = resumable(args.out, args)
  if old is not None:   # picks and config from the JSON: no search, no scoring
    config = ml_collections.ConfigDict(old["search_config"])
    picked, scored, search_dir = old["picked"], old["candidates_scored"], old["search_dir"]
    args.seed = config.seed
    rows = {r["index"]: r for r in old["rows"] if "index" in r}
  else:
    config, search_dir = search_config(args, ml_collections, fashion)
    fashion_table.run_stages(
        lambda st: fashion_table.command(args.variant, args.seed, search_dir, st, args.set),
        search_dir, ("search",))
    cache = os.path.join(args.workdir, "candidates.json")
    if os.path.exists(cache):
      cands = json.load(open(cache))
    else:
      cands = score_candidates(config, search_dir, args.from_search, args.random,
                               args.eval_batches, args.seed)
      os.makedirs(args.workdir, exist_ok=True)
      json.dump(cands, open(cache, "w"))
    picked, scored, rows = spread_by_reward(cands, args.samples), len(cands), {}
  new = 0
  for i, c in enumerate(picked):
    if i in rows:
      continue
    if 0 <= args.max_samples <= new:
      continue
    done = os.path.exists(os.path.join(args.workdir, f"sample{i:02d}", "compress", "result.json"))
    fashion_table.log(f"sample {i + 1}/{len(picked)}: reward {c['reward']:.4f} ({c['source']})")
    rows[i] = {**c, **standalone(c, i, args, config, args.variant), "index": i}
    new += not done
    write(args, rows, picked, scored, search_dir, config, t0)
  write(args, rows, picked, scored, search_dir, config, t0)


def search_config(args, ml_collections, fashion):
  """(resolved config, search work directory): --search_dir's own (its checkpoint must match
  it), else the variant's with --set applied, searched under --workdir."""
  if args.search_dir:   # its config.json over today's defaults (fields added since keep
    stored = fashion_table._read(args.search_dir, "config.json")   # their defaults: the
    config = fashion.get_config(args.variant)                      # behaviour it ran with)
    for path, v in config_lib.fields(ml_collections.ConfigDict(stored)).items():
      *parents, leaf = path.split(".")
      node = config
      for part in parents:
        node = node[part]
      if leaf not in node:
        raise SystemExit(f"error: {args.search_dir}/config.json: unknown field {path}")
      node[leaf] = v
    args.seed = config.seed
  else:
    config = fashion.get_config(args.variant)
    config.seed = args.seed
  for o in args.set:
    key, value = o.split("=", 1)
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], bool) else value == "True"
  return config, args.search_dir or os.path.join(args.workdir, "search_run")

def write(args, rows_by_index, picked, scored, search_dir, config, t0):
  """bench/results/proxy_fidelity.{json,md,png} of the samples trained so far."""
  rows = [rows_by_index[i] for i in sorted(rows_by_index)]
  wanted = len(picked)
  env = {"cpu": fashion_table.cpu_model(), "loadavg": [round(v, 2) for v in os.getloadavg()],
         "time": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_s": time.perf_counter() - t0}
  stats_by_pair = ({f"{a}~{b}": rank_stats([r[a] for r in rows], [r[b] for r in rows])
                    for a, b in PAIRS} if len(rows) >= 3 else {})
  result = {"environment": env, "args": vars(args), "search_dir": search_dir,
            "candidates_scored": scored, "samples_wanted": wanted, "rows": rows,
            "rank_correlation": stats_by_pair, "search_config": config.to_dict(),
            "picked": picked}
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  lines = ["# Proxy fidelity: supernet figures vs the same architectures trained alone", "",
           f"{len(rows)} of {wanted} (arc, ratios) from one supernet ({search_dir}), chosen at "
           f"evenly spaced reward quantiles among {scored} scored candidates; standalone: "
           f"{args.final_epochs} x {args.steps} steps final training, masked at the ratios "
           f"(BN re-estimated), {args.finetune_steps} fine-tuning steps. {env['cpu']}, load "
           f"{env['loadavg']}, {env['wall_s'] / 60:.0f} min this invocation.", ""]
  if len(rows) < wanted:
    lines += [f"**Partial: {wanted - len(rows)} samples not trained yet** (rerun to continue).",
              ""]
  if stats_by_pair:
    lines += ["| supernet | standalone | Kendall tau [95 % CI] | Spearman rho [95 % CI] |",
              "|---|---|---|---|"]
    for (a, b) in PAIRS:
      st = stats_by_pair[f"{a}~{b}"]
      lines.append(f"| {a} | {b} | {st['kendall_tau']:.3f} [{st['kendall_tau_ci95'][0]:.2f}, "
                   f"{st['kendall_tau_ci95'][1]:.2f}] | {st['spearman_rho']:.3f} "
                   f"[{st['spearman_rho_ci95'][0]:.2f}, {st['spearman_rho_ci95'][1]:.2f}] |")
  md = "\n".join(lines) + "\n"
  with open(args.out[:-len(".json")] + ".md", "w") as f:
    f.write(md)
  if stats_by_pair:
    plot(rows, stats_by_pair, args.out[:-len(".json")] + ".png")
  print(md)

if __name__ == "__main__":
  main()
