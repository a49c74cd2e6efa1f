"""The latency table of search.ratio_measure=latency: predicted vs measured fused latency.

  python -m bench.latency_table [--num_layers 3 --out_filters 16 --image 28 --channels 1
                                 --networks 24 --reps 200 --cache DIR]

Builds the table (fp_jax.infer.latency_table.build) for the Fashion recipe's final
network (configs/fashion.py: 3 layers, F 16, 28x28x1, 10 classes; ratio_choices 0..0.8)
in a fresh cache folder (--cache: reuse one; then nothing is measured), timing the build.
Then --networks random pruned networks, none of them the calibration's: a uniform arc
(space.sample_uniform) and stage ratios drawn from ratio_choices each; both the unpruned
and the pruned network (random weights, L1 pruning as compress prunes) compiled by
fused.Fused and timed at batch 1, all interleaved in blocks of 5 calls (fp_jax.infer.
latency's way), --reps calls each, median. Reported per network: measured and predicted ms
of both, % error, the Ratio of the reward from measured and from predicted latencies, and
the blocks looked up by estimate (keys no enumeration draw reached); overall median and
worst absolute % error (target: median <= 10 %), beside the same with uncalibrated entries
(raw isolated-block times, call_ms_raw as intercept). The calibration's own
networks' fit error is reported too (fit_median_abs_error_pct). Load average at start and end.
Writes bench/results/latency_table.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--num_layers", type=int, default=3)
  p.add_argument("--out_filters", type=int, default=16)
  p.add_argument("--image", type=int, default=28)
  p.add_argument("--channels", type=int, default=1)
  p.add_argument("--classes", type=int, default=10)
  p.add_argument("--networks", type=int, default=24, help="random pruned networks checked")
  p.add_argument("--reps", type=int, default=200, help="batch-1 calls timed per network")
  p.add_argument("--draws", type=int, default=0, help="enumeration draws (0: the module's)")
  p.add_argument("--cache", default="", help="table cache folder (default: a fresh one)")
  p.add_argument("--seed", type=int, default=2)
  p.add_argument("--out", default="", help="JSON path (default bench/results/latency_table.json)")
  return p.parse_args()


def main():
  args = parse()
  load_start = os.getloadavg()
  import numpy as np  # pylint: disable=g-import-not-at-top

  from bench import common  # pylint: disable=g-import-not-at-top
  from fp_jax.infer import block_latency as bl  # pylint: disable=g-import-not-at-top
  from fp_jax.infer import fused  # pylint: disable=g-import-not-at-top
  from fp_jax.infer import machine  # pylint: disable=g-import-not-at-top
  from fp_jax.infer import latency_table as lt  # pylint: disable=g-import-not-at-top
  from fp_jax.infer import network_blocks  # pylint: disable=g-import-not-at-top
  from fp_jax.models import space  # pylint: disable=g-import-not-at-top

  choices = tuple(np.round(np.arange(0.0, 0.81, 0.1), 1))
  shape = network_blocks.Shape(args.num_layers, args.out_filters,
                               (args.image, args.image, args.channels), args.classes)
  opts = fused.Options(im2col=True)      # the latency stage's defaults (configs/default.py)
  cache = args.cache or tempfile.mkdtemp(prefix="fp_jax_latency_table_")
  t0 = time.perf_counter()
  table, build_s, path = lt.build(cache, shape, choices, opts, draws=args.draws or None,
                                  log=common.log)
  common.log(f"table: {len(table.entries)} entries in {build_s:.0f}s ({path})")

  rng = np.random.default_rng(args.seed)
  draws = [(space.sample_uniform(rng), rng.choice(np.asarray(choices, np.float32), 5))
           for _ in range(args.networks)]
  pred = lt.Predictor(table, shape, opts.pad_channels)
  raw = lt.Table({n: table.meta["raw_ms"][n] for n in table.entries},
                 table.meta["call_ms_raw"], {})
  nets, rows = [], []
  t1 = time.perf_counter()
  for i, (arc, ratios) in enumerate(draws):
    plan = shape.plan(arc)
    for r in (None, ratios):
      nets.append((plan,) + tuple(bl.random_network(plan, r, seed=100 + i)))
  ms = bl.measure_networks(nets, opts, reps=args.reps)
  common.log(f"{len(nets)} networks compiled and timed ({time.perf_counter() - t1:.0f}s)")
  err = lambda p, m: 100.0 * (p - m) / m
  for i, (arc, ratios) in enumerate(draws):
    full_ms, pruned_ms = ms[2 * i], ms[2 * i + 1]
    p_full, p_pruned = pred(arc, ratios)
    blocks = pred.blocks(arc) + pred.blocks(arc, ratios)
    raw_full, raw_pruned = raw.predict(pred.blocks(arc)), raw.predict(pred.blocks(arc, ratios))
    rows.append({"arc": space.arc_to_string(arc), "ratios": [float(r) for r in ratios],
                 "measured_ms": full_ms, "predicted_ms": p_full,
                 "masked_measured_ms": pruned_ms, "masked_predicted_ms": p_pruned,
                 "error_pct": err(p_full, full_ms), "masked_error_pct": err(p_pruned, pruned_ms),
                 "raw_error_pct": err(raw_full, full_ms),
                 "masked_raw_error_pct": err(raw_pruned, pruned_ms),
                 "ratio_measured": 8 * (1 - pruned_ms / full_ms),
                 "ratio_predicted": 8 * (1 - p_pruned / p_full),
                 "estimated_blocks": len(table.missing(blocks)), "blocks": len(blocks)})
  errs = [abs(e) for r in rows for e in (r["error_pct"], r["masked_error_pct"])]
  raw_errs = [abs(e) for r in rows for e in (r["raw_error_pct"], r["masked_raw_error_pct"])]
  ratio_err = [abs(r["ratio_predicted"] - r["ratio_measured"]) for r in rows]
  corr = float(np.corrcoef([r["ratio_measured"] for r in rows],
                           [r["ratio_predicted"] for r in rows])[0, 1])
  builds = table.meta["builds"]
  result = {
      "cpu": machine.cpu_info(), "device": machine.device_description(),
      "environment": common.environment(), "load_start": load_start, "load_end": os.getloadavg(),
      "network": table.meta["network"], "options": table.meta["options"], "cache": path,
      "entries": len(table.entries), "build_s": build_s,
      "build": builds[-1] if builds else None, "calibration": table.meta["calibration"],
      "call_ms_raw": table.meta["call_ms_raw"], "intercept_ms": table.call_ms,
      "reps": args.reps, "networks": len(rows), "rows": rows,
      "median_abs_error_pct": statistics.median(errs), "worst_abs_error_pct": max(errs),
      "fit_median_abs_error_pct": statistics.median(
          abs(100 * (n["fitted_ms"] - n["measured_ms"]) / n["measured_ms"])
          for n in table.meta["calibration"]["networks"]),
      "median_abs_error_pct_uncalibrated": statistics.median(raw_errs),
      "worst_abs_error_pct_uncalibrated": max(raw_errs),
      "ratio_abs_error_median": statistics.median(ratio_err),
      "ratio_abs_error_worst": max(ratio_err), "ratio_correlation": corr,
      "estimated_blocks": sum(r["estimated_blocks"] for r in rows),
      "blocks": sum(r["blocks"] for r in rows), "target_median_pct": 10.0,
      "met": statistics.median(errs) <= 10.0, "wall_s": time.perf_counter() - t0,
  }
  path = common.write_json("latency_table", args.out, result)
  with open(os.path.splitext(path)[0] + ".md", "w") as f:
    f.write(to_markdown(result, common.table))
  common.log(f"median |error| {result['median_abs_error_pct']:.1f}% worst "
             f"{result['worst_abs_error_pct']:.1f}% -> {path}")


def to_markdown(r, table):
  cal = r["calibration"]
  b = r["build"] or {}
  head = (f"# Latency table: predicted vs measured fused latency\n\n"
          f"{r['device']}; load average {r['load_start'][0]:.1f} at start, "
          f"{r['load_end'][0]:.1f} at end (2 cores shared with other jobs). Network "
          f"`{r['network']}`, options `{r['options']}`.\n\n"
          f"Table: {r['entries']} entries; built in {r['build_s']:.0f} s "
          f"({b.get('measured', 0)} blocks and {b.get('networks', 0)} calibration networks "
          f"measured in {b.get('seconds', 0):.0f} s). Calibration (`fit`): intercept "
          f"{cal['intercept_ms']:.3f} ms, per-block {1e3 * cal['per_block_ms']:.1f} us, factors "
          + ", ".join(f"{g} {v:.3f}" for g, v in cal["factors"].items())
          + f" (empty call {r['call_ms_raw']:.4f} ms).\n\n"
          f"{r['networks']} random pruned networks (not the calibration's), each unpruned and "
          f"pruned, median of {r['reps']} batch-1 calls: median |error| "
          f"**{r['median_abs_error_pct']:.1f} %**, worst {r['worst_abs_error_pct']:.1f} % "
          f"(target median <= {r['target_median_pct']:.0f} %: "
          f"{'met' if r['met'] else 'not met'}); uncalibrated entries: median "
          f"{r['median_abs_error_pct_uncalibrated']:.1f} %, worst "
          f"{r['worst_abs_error_pct_uncalibrated']:.1f} %; the calibration networks' own fit: "
          f"median {r['fit_median_abs_error_pct']:.1f} %. Ratio (8 x (1 - pruned / unpruned))"
          f" from predicted vs measured latencies: median |difference| "
          f"{r['ratio_abs_error_median']:.3f}, worst {r['ratio_abs_error_worst']:.3f}, "
          f"correlation {r['ratio_correlation']:.3f}. Blocks looked up by estimate: "
          f"{r['estimated_blocks']} of {r['blocks']}.\n\n")
  rows = [(i, f"{x['measured_ms']:.3f}", f"{x['predicted_ms']:.3f}", f"{x['error_pct']:+.1f}",
           f"{x['masked_measured_ms']:.3f}", f"{x['masked_predicted_ms']:.3f}",
           f"{x['masked_error_pct']:+.1f}", f"{x['ratio_measured']:.2f}",
           f"{x['ratio_predicted']:.2f}", x["estimated_blocks"])
          for i, x in enumerate(r["rows"])]
  return head + table(["#", "unpruned ms", "predicted", "error %", "pruned ms", "predicted",
                       "error %", "Ratio measured", "Ratio predicted", "estimated blocks"],
                      rows) + "\n"


if __name__ == "__main__":
  main()
