"""Fashion-MNIST, hardware-aware options: `layers` / `macs` / `latency` Ratios, rounding, distillation.

All runs are configs/fashion.py:a0.02_b20 (fake pruning, the short recipe, the budget of
bench/fashion_table.py), every stage run by the program itself and timed:

  setting          how                                                   overrides
  layers           fashion_table's fp_a0.02_b20 run of the seed, reused  -
                   (search, final, compress copied); latency stage only
  layers+c8        layers' final network compressed again + latency      compress.round_to=8
  layers+distill   layers' final network compressed again + latency      compress.distill=True
  layers+recompress  the same with no override: the control of the two above (compress
                   with today's code; fashion_table's ran at an earlier commit)
  latency          whole pipeline + latency                              search.ratio_measure=latency
  macs             whole pipeline + latency                              search.ratio_measure=macs
  layers_r8        whole pipeline + latency                              search.round_to=8 compress.round_to=8
  macs_r8          ... ratio_measure=macs, both round_to=8
  latency_r8       ... ratio_measure=latency, both round_to=8
  best+distill     the whole-pipeline setting (latency .. latency_r8) with the lowest
                   fine-tuned error at this seed: its final network compressed again
                   with compress.distill=True (runs once all five have finished)

  python -m bench.hardware_table [--seeds 0 1] [--settings layers latency ...] [--max_runs N]

Rows (bench/results/hardware_table.{json,md,png}): ratios, final error, fine-tuned error,
compressed multiply-adds, the latency stage's fused batch-1 latency (median over
configs/fashion.py's latency.images=300 interleaved images) of the unpruned final network and
of the compressed one, the reduction, and the search's own predicted fused latency of the
chosen network (arch.json's latency_ms / masked_latency_ms; runs whose search had a latency
table). The 1-minute load average is sampled every 5 s while each latency stage runs (kept
in the run's bench_times.json under `latency_load`). The PNG: fine-tuned error against
measured fused latency, one marker per setting, hollow markers for the unpruned networks.

Resumable as bench/fashion_table.py (its `run_stages`, `restore`, `command`, `recipe_key`,
`row_of` helpers): work directories under --workdir, each finished stage's small outputs
under --keep (the repository), restored into a missing work directory on another machine.
Weights are kept only while a later stage may need them: compress/weights.npz until the
run's latency stage is kept, final/weights.npz of the runs that trained their own (the
bases of layers+c8, layers+distill and best+distill). `--max_runs N` stops after N new runs;
`--max_runs 0` rewrites the table from the finished rows.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import fashion_table as ft  # pylint: disable=g-import-not-at-top
from bench import hardware_report  # pylint: disable=g-import-not-at-top

VARIANT = "fp_a0.02_b20"          # fashion_table's setting name (configs/fashion.py:a0.02_b20)
# name -> (mode, overrides); mode: reuse (fashion_table's run), from:<base> (compress + latency
# from base's final network), full (search, final, compress, latency)
SETTINGS = {
    "layers": ("reuse", ()),
    "layers+c8": ("from:layers", ("compress.round_to=8",)),
    "layers+distill": ("from:layers", ("compress.distill=True",)),
    "layers+recompress": ("from:layers", ()),
    "latency": ("full", ("search.ratio_measure=latency",)),
    "macs": ("full", ("search.ratio_measure=macs",)),
    "layers_r8": ("full", ("search.round_to=8", "compress.round_to=8")),
    "macs_r8": ("full", ("search.ratio_measure=macs", "search.round_to=8",
                         "compress.round_to=8")),
    "latency_r8": ("full", ("search.ratio_measure=latency", "search.round_to=8",
                            "compress.round_to=8")),
    "best+distill": ("from:best", ("compress.distill=True",)),
}
FULL = [s for s, (m, _) in SETTINGS.items() if m == "full"]
STAGES = ("search", "final", "compress", "latency")
LATENCY_JSON = "latency/latency.json"
WORKDIR = "/var/tmp/fp_jax_bench/hardware_table"
KEEP_DIR = os.path.join(ROOT, "bench", "results", "hardware_table_runs")
LAYERS_SOURCE = "/var/tmp/fp_jax_bench/fashion_table/fp_a0.02_b20_seed{seed}_*"
FASHION_KEEP = ft.KEEP_DIR
FINAL_W, COMPRESS_W = "final/weights.npz", "compress/weights.npz"
log = ft.log


@contextlib.contextmanager
def stage_tables(keep, own_final):
  """fashion_table's stage tables with the latency stage added, while it runs one of our
  work directories (scoped: fashion_table's module is as it was afterwards). Weights are
  kept (and restored) only while the run's latency stage is not kept; a run's own final
  weights always (they are the base of the compress-only settings)."""
  latency_kept = bool(keep) and os.path.exists(os.path.join(keep, LATENCY_JSON))
  done = dict(ft.DONE, latency=LATENCY_JSON)
  kept = dict(ft.KEEP)
  kept["final"] = ("final/result.json",) + ((FINAL_W,) if own_final or not latency_kept else ())
  kept["compress"] = ("compress/result.json",) + (() if latency_kept else (COMPRESS_W,))
  kept["latency"] = (LATENCY_JSON,)
  with mock.patch.object(ft, "DONE", done), mock.patch.object(ft, "KEEP", kept), \
       mock.patch.object(ft, "STAGES", STAGES):
    yield


def prune_keep(keep, own_final):
  """Drops the weights a kept run no longer needs (its latency stage is kept)."""
  if not keep or not os.path.exists(os.path.join(keep, LATENCY_JSON)):
    return
  for rel in (COMPRESS_W,) + (() if own_final else (FINAL_W,)):
    path = os.path.join(keep, rel)
    if os.path.exists(path):
      os.remove(path)


class LoadSampler:
  """The 1-minute load average every `every` seconds while a stage runs."""

  def __init__(self, every=5.0):
    self.every, self.samples, self._stop = every, [], threading.Event()
    self._thread = threading.Thread(target=self._loop, daemon=True)

  def _loop(self):
    while True:
      self.samples.append(round(os.getloadavg()[0], 2))
      if self._stop.wait(self.every):
        return

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.samples.append(round(os.getloadavg()[0], 2))

  def summary(self):
    s = self.samples
    return {"min": min(s), "mean": round(sum(s) / len(s), 2), "max": max(s), "n": len(s),
            "cores": len(os.sched_getaffinity(0))}


def run_pipeline(cmd_of, workdir, stages, keep_dir, own_final):
  """fashion_table.run_stages over `stages` (+ latency), the latency stage's load sampled;
  returns bench_times.json's dict."""
  keep = keep_dir and os.path.join(keep_dir, os.path.basename(workdir))
  pre = [s for s in stages if s != "latency"]
  with stage_tables(keep, own_final):
    times = ft.run_stages(cmd_of, workdir, pre, keep_dir) if pre else None
    if "latency" in stages:
      if keep:
        ft.restore(workdir, keep)
      ran = not os.path.exists(os.path.join(workdir, LATENCY_JSON))
      with LoadSampler() as load:
        times = ft.run_stages(cmd_of, workdir, ("latency",), keep_dir)
      if ran:
        times["latency_load"] = load.summary()
        times_path = os.path.join(workdir, "bench_times.json")
        with open(times_path, "w") as f:
          json.dump(times, f)
        if keep:
          ft._copy(workdir, keep, ("bench_times.json",))  # pylint: disable=protected-access
  prune_keep(keep, own_final)
  return times


def find_layers_source(seed, pattern=LAYERS_SOURCE, fashion_keep=FASHION_KEEP):
  """fashion_table's fp_a0.02_b20 work directory of the seed (the newest), else its kept copy."""
  import glob  # pylint: disable=g-import-not-at-top
  dirs = sorted(glob.glob(pattern.format(seed=seed)), key=os.path.getmtime)
  dirs = [d for d in dirs if os.path.exists(os.path.join(d, ft.DONE["final"]))]
  name = os.path.basename(dirs[-1]) if dirs else None
  kept = sorted(glob.glob(os.path.join(fashion_keep, f"{VARIANT}_seed{seed}_*")))
  keep = (os.path.join(fashion_keep, name) if name and
          os.path.isdir(os.path.join(fashion_keep, name)) else (kept[-1] if kept else None))
  return (dirs[-1] if dirs else None), keep


def copy_stages(work, sources, rels):
  """Copies each of `rels` absent from `work` from the first of `sources` that has it;
  returns those none had."""
  missing = []
  for rel in rels:
    if os.path.exists(os.path.join(work, rel)):
      continue
    src = next((s for s in sources if s and os.path.exists(os.path.join(s, rel))), None)
    if src is None:
      missing.append(rel)
      continue
    ft._copy(src, work, (rel,))  # pylint: disable=protected-access
  return missing


def seed_layers(work, source, fashion_keep):
  """Run 1's work directory from fashion_table's: search, final, compress (compress only
  with its weights, which the latency stage reads; without them compress runs again)."""
  if os.path.exists(os.path.join(work, ft.DONE["compress"])):
    return
  srcs = [source, fashion_keep]
  missing = copy_stages(work, srcs, ("search/arch.json", "search/metrics.jsonl",
                                     "final/result.json", FINAL_W))
  if missing:
    raise SystemExit(f"error: {missing} of the layers run are in neither {srcs}")
  if not copy_stages(work, srcs, (COMPRESS_W,)):
    copy_stages(work, srcs, ("compress/result.json",))
  else:
    log(f"{work}: the layers run's compress/weights.npz is missing: compress runs again")
  if not os.path.exists(os.path.join(work, "bench_times.json")):
    copy_stages(work, srcs, ("bench_times.json",))   # its search/final/compress seconds
  log(f"layers run copied from {source or fashion_keep}")


def seed_from(work, base):
  """A compress-only run's work directory: the base's search and final network."""
  if os.path.exists(os.path.join(work, ft.DONE["compress"])):
    return
  missing = copy_stages(work, [base], ("search/arch.json", "search/metrics.jsonl",
                                       "final/result.json", FINAL_W))
  if missing:
    raise SystemExit(f"error: {missing} missing in {base}")


def latency_figures(lat):
  """(baseline, pruned) fused batch-1 median ms, and their means, from latency.json."""
  det = lat.get("network_detail", {})
  out = {}
  for n in ("baseline", "pruned"):
    for path in ("fused", "perop"):
      d = det.get(f"{n}_{path}") or {}
      out[f"{n}_{path}_ms"] = d.get("median_ms", lat["network"][f"{n}_{path}_ms"])
      out[f"{n}_{path}_mean_ms"] = lat["network"][f"{n}_{path}_ms"]
      out[f"{n}_{path}_p10_p90_ms"] = ([d["p10_ms"], d["p90_ms"]] if "p10_ms" in d else None)
  out["latency_reduction_pct"] = 100.0 * (1.0 - out["pruned_fused_ms"] / out["baseline_fused_ms"])
  out["executed_macs_pruned_fused"] = lat.get("executed_macs_pruned_fused")
  out["latency_device"] = lat.get("device")
  out["latency_images"] = lat.get("images")
  return out


def row_of(workdir, setting, seed, times, mode, base=None):
  """fashion_table's row of the run plus its measured and predicted latency."""
  row = ft.row_of(workdir, setting, seed, times)
  comp = ft._read(workdir, ft.DONE["compress"])  # pylint: disable=protected-access
  arch = ft._read(workdir, ft.DONE["search"])  # pylint: disable=protected-access
  lat = ft._read(workdir, LATENCY_JSON)  # pylint: disable=protected-access
  cfg = results_config(workdir)
  row.update(latency_figures(lat))
  own_search = mode == "full"
  row.update(
      mode=mode, base=base, overrides=list(SETTINGS[setting][1]),
      ratio_measure=cfg.get("search", {}).get("ratio_measure", "layers"),
      search_round_to=cfg.get("search", {}).get("round_to", 1),
      compress_round_to=comp.get("round_to", 1), distill=bool(comp.get("distill", False)),
      widths=comp.get("widths"),
      predicted_latency_ms=arch.get("latency_ms") if own_search else None,
      predicted_masked_latency_ms=arch.get("masked_latency_ms") if own_search else None,
      latency_load=times.get("latency_load"),
      cpu_model=times.get("cpu_model", {}).get("latency"))
  for k in ("reward_per_epoch", "entropy_per_epoch"):
    if not own_search and mode != "reuse":
      row[k] = []                     # the base's search, not this run's
  return row


def results_config(workdir):
  return ft.results.read_json(workdir, "config.json") or {}


def refresh(args, row):
  """A finished row with the latency figures read again from its latency.json (work
  directory, else the keep directory): rows written by an older harness gain new fields."""
  name = os.path.basename(workdir_of(args, row["setting"], row["seed"], row.get("base"))[2])
  for root in (args.workdir, args.keep):
    if root and os.path.exists(os.path.join(root, name, LATENCY_JSON)):
      row.update(latency_figures(ft._read(os.path.join(root, name), LATENCY_JSON)))  # pylint: disable=protected-access
      break
  return row


def best_base(rows, seed):
  """The whole-pipeline setting with the lowest fine-tuned error at `seed` (None until all
  of them have finished)."""
  done = {r["setting"]: r for r in rows if r["seed"] == seed and r["setting"] in FULL}
  if len(done) < len(FULL):
    return None
  return min(done.values(), key=lambda r: r["test_error_finetuned"])["setting"]


def workdir_of(args, setting, seed, base=None):
  """(row key, the run's overrides, its work directory); best+distill's base is part of
  its key (another best: another run) and its base's recipe part of its overrides."""
  overrides = list(args.set) + list(SETTINGS[setting][1])
  extra = f"hardware:{setting}" + (f":{base}" if setting == "best+distill" else "")
  key = ft.recipe_key(VARIANT, seed, overrides, extra=extra)
  if setting == "best+distill":
    overrides = list(SETTINGS[base][1]) + overrides
  if not any(o.startswith("latency.engine=") for o in overrides):
    # the table holds the measured fused latency against the search's prediction, which
    # models the XLA engine; every row so far ran on it (before the native engine existed),
    # so every row does: part of each run's command, not of its key (as those rows' keys)
    overrides = overrides + ["latency.engine=xla"]
  return key, overrides, os.path.join(args.workdir, f"{setting}_seed{seed}_{key}")


def run_one(args, setting, seed, rows):
  """Runs (or resumes) one setting at one seed; returns its row (None: its base is not
  finished)."""
  mode, _ = SETTINGS[setting]
  base_setting = None
  if mode.startswith("from:"):
    base_setting = mode[5:]
    if base_setting == "best":
      base_setting = best_base(rows, seed)
      if base_setting is None:
        log(f"best+distill seed {seed}: not every whole-pipeline setting has finished")
        return None
  key, overrides, work = workdir_of(args, setting, seed, base_setting)
  own_final = mode in ("reuse", "full")
  keep = args.keep and os.path.join(args.keep, os.path.basename(work))
  cmd_of = lambda st: ft.command(ft.SETTINGS[VARIANT], seed, work, st, overrides)
  if keep:
    with stage_tables(keep, own_final):
      ft.restore(work, keep)
  if mode == "reuse":
    source, fkeep = find_layers_source(seed, args.layers_source, args.fashion_keep)
    seed_layers(work, source, fkeep)
    times = run_pipeline(cmd_of, work, STAGES, args.keep, own_final)
  elif mode == "full":
    times = run_pipeline(cmd_of, work, STAGES, args.keep, own_final)
  else:
    _, _, base = workdir_of(args, base_setting, seed)
    bkeep = args.keep and os.path.join(args.keep, os.path.basename(base))
    if bkeep:
      with stage_tables(bkeep, True):
        ft.restore(base, bkeep)
    if not os.path.exists(os.path.join(base, FINAL_W)):
      log(f"{setting} seed {seed}: {base_setting}'s final network is not finished")
      return None
    seed_from(work, base)
    times = run_pipeline(cmd_of, work, STAGES, args.keep, own_final)   # search, final: kept
  row = row_of(work, setting, seed, times, mode.split(":")[0], base_setting)
  row["key"] = key
  return row


def write(args, rows, jobs):
  env = {"cpu": ft.cpu_model(), "loadavg": [round(v, 2) for v in os.getloadavg()],
         "time": time.strftime("%Y-%m-%d %H:%M:%S"), "cores": len(os.sched_getaffinity(0))}
  done = {(r["setting"], r["seed"]) for r in rows}
  missing = [list(j) for j in jobs if j not in done]
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"environment": env, "args": vars(args), "rows": rows, "missing": missing}, f,
              indent=1)
  stem = args.out[:-len(".json")]
  md = hardware_report.markdown(rows, env, missing, list(SETTINGS))
  with open(stem + ".md", "w") as f:
    f.write(md)
  if rows:
    hardware_report.plot(rows, stem + ".png")
  return md


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seeds", type=int, nargs="+", default=[0])
  p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
  p.add_argument("--workdir", default=WORKDIR)
  p.add_argument("--keep", default=KEEP_DIR)
  p.add_argument("--layers_source", default=LAYERS_SOURCE,
                 help="glob of fashion_table's fp_a0.02_b20 work directory ({seed} filled in)")
  p.add_argument("--fashion_keep", default=FASHION_KEEP,
                 help="fashion_table's keep directory (its runs' kept stages)")
  p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                 help="config overrides for every run (e.g. search.epochs=2)")
  p.add_argument("--max_runs", type=int, default=-1,
                 help="at most N new runs (-1: all; 0: rewrite the table from finished rows)")
  p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "hardware_table.json"))
  args = p.parse_args(argv)
  old = {}
  if os.path.exists(args.out):
    old = {r["key"]: r for r in json.load(open(args.out)).get("rows", [])}
  jobs = [(s, seed) for seed in args.seeds for s in args.settings]
  rows, new_runs = [], 0
  for setting, seed in jobs:
    if setting == "best+distill":
      base = best_base(rows, seed)
      key = workdir_of(args, setting, seed, base)[0] if base else None
      done_any = [r for r in old.values() if r["setting"] == setting and r["seed"] == seed]
      if base is None and done_any:      # rewriting a table without the whole-pipeline rows
        rows.extend(done_any)
        continue
    else:
      key = workdir_of(args, setting, seed)[0]
    if key in old:
      rows.append(refresh(args, old[key]))
      continue
    if 0 <= args.max_runs <= new_runs:
      log(f"--max_runs {args.max_runs} reached; {setting} seed {seed} left for a rerun")
      continue
    row = run_one(args, setting, seed, rows)
    if row is None:
      continue
    rows.append(row)
    new_runs += 1
    write(args, rows, jobs)
  print(write(args, rows, jobs))


if __name__ == "__main__":
  main()
