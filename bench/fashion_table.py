"""Fashion-MNIST: are fake pruning's networks more accurate at equal cost than the alternatives?

Settings (configs/fashion.py variants), each at every seed, every stage run by the program
itself (`python -m fp_jax.main ... --config.stages=STAGE`, timed):

  enas          a0_b0              plain ENAS; its chosen arc also compressed at uniform
                                   ratios (--uniform, every stage alike): the baseline curve
  random        a0.02_b20_random   random search, the fake-pruning reward, same budget
  fp_a0.02_b0   a0.02_b0           the ratio term alone
  fp_a0.02_b20  a0.02_b20          fake pruning (the paper's 60 % setting)
  fp_a0.5_b20   a0.5_b20           fake pruning, aggressive (the paper's 73 %)

  python -m bench.fashion_table [--seeds 0 1] [--settings enas random ...] [--max_runs N]

Each run keeps its work directory under --workdir (a killed stage resumes from its
checkpoints); each finished stage's outputs that later stages and the table read (KEEP: the
chosen arc, the search's metrics, the final network's result and weights) are also copied to
--keep, in the repository, and restored from there into a missing work directory, so a table
is finished across sessions on other machines (a stage cut short restarts there). Finished
runs are kept as rows of the results JSON, so a rerun completes only what is missing
(`--max_runs N` stops after N new pipeline runs: a long table is done in parts;
`--max_runs 0` only rewrites the table). Parts run in parallel processes write their own
--out; `--merge A.json B.json` takes their rows (a merged row replaces the same key's). Writes
bench/results/fashion_table.{json,md,png}: per run and per setting (mean
and spread over seeds) final error, masked error (BN re-estimated, no fine-tuning),
fine-tuned error, multiply-adds and params after compression, wall time per stage; each
compressed network's fine-tuned error against the ENAS arc's uniform-pruning curve at the
same multiply-adds; the controller's mean reward and entropy per epoch beside random
search's.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import fashion_report as report  # pylint: disable=g-import-not-at-top
from fp_jax import config as config_lib  # pylint: disable=g-import-not-at-top
from fp_jax import results  # pylint: disable=g-import-not-at-top

SETTINGS = {"enas": "a0_b0", "random": "a0.02_b20_random", "fp_a0.02_b0": "a0.02_b0",
            "fp_a0.02_b20": "a0.02_b20", "fp_a0.5_b20": "a0.5_b20"}
STAGES = ("search", "final", "compress")
DONE = {"search": "search/arch.json", "final": "final/result.json",
        "compress": "compress/result.json"}
WORKDIR = "/var/tmp/fp_jax_bench/fashion_table"   # outside the work tree: kept between sessions
KEEP_DIR = os.path.join(ROOT, "bench", "results", "fashion_table_runs")   # in the repository
KEEP = {"search": ("search/arch.json", "search/metrics.jsonl"),
        "final": ("final/result.json", "final/weights.npz"),
        "compress": ("compress/result.json",)}


def log(msg):
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _read(workdir, rel):
  """DIR/rel's JSON object (the stage has finished: it exists)."""
  out = results.read_json(workdir, rel)
  if out is None:
    raise SystemExit(f"error: {os.path.join(workdir, rel)} does not exist")
  return out


_jsonl = results.read_jsonl


def command(variant, seed, workdir, stage, overrides=()):
  """The program's command line for one stage of one run."""
  return ([sys.executable, "-m", "fp_jax.main", f"--config={ROOT}/configs/fashion.py:{variant}",
           f"--workdir={workdir}", f"--config.seed={seed}", f"--config.stages={stage}"] +
          [f"--config.{o}" for o in overrides])


def _children_cpu():
  ru = resource.getrusage(resource.RUSAGE_CHILDREN)
  return ru.ru_utime + ru.ru_stime


def _copy(src_root, dst_root, rels):
  for rel in rels:
    dst = os.path.join(dst_root, rel)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copyfile(os.path.join(src_root, rel), dst)


def restore(workdir, keep):
  """Copies the stages kept in `keep` (finished elsewhere) into `workdir` where it lacks them."""
  for stage in STAGES:
    if (os.path.exists(os.path.join(keep, DONE[stage])) and
        not os.path.exists(os.path.join(workdir, DONE[stage]))):
      _copy(keep, workdir, KEEP[stage])
      log(f"{stage} of {os.path.basename(workdir)} restored from {keep}")
  if (os.path.exists(os.path.join(keep, "bench_times.json")) and
      not os.path.exists(os.path.join(workdir, "bench_times.json"))):
    _copy(keep, workdir, ("bench_times.json",))


def run_stages(cmd_of, workdir, stages=STAGES, keep_dir=None):
  """Runs the stages not yet done in `workdir` (first restoring those kept under
  keep_dir/NAME, NAME the work directory's name; each newly finished stage is kept there);
  their wall seconds, under 'cpu_s' their CPU seconds (user + system of the stage's
  process: unchanged by other load or a paused process) and under 'cpu_model' the CPU each
  ran on (one seed's results differ between CPUs), in DIR/bench_times.json."""
  keep = keep_dir and os.path.join(keep_dir, os.path.basename(workdir))
  if keep:
    restore(workdir, keep)
  times_path = os.path.join(workdir, "bench_times.json")
  times = json.load(open(times_path)) if os.path.exists(times_path) else {}
  for stage in stages:
    if os.path.exists(os.path.join(workdir, DONE[stage])):
      if keep and not os.path.exists(os.path.join(keep, DONE[stage])):
        kept = KEEP[stage] + (("bench_times.json",) if os.path.exists(times_path) else ())
        _copy(workdir, keep, kept)            # finished before it was kept
      continue
    cmd = cmd_of(stage)
    log(" ".join(cmd[1:]))
    os.makedirs(workdir, exist_ok=True)
    t, cpu = time.perf_counter(), _children_cpu()
    with open(os.path.join(workdir, f"{stage}.log"), "a") as out:
      r = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if r.returncode:
      raise SystemExit(f"error: {stage} failed (exit {r.returncode}); see "
                       f"{os.path.join(workdir, stage + '.log')}")
    times[stage] = times.get(stage, 0.0) + time.perf_counter() - t   # resumed: summed
    cpu_s = times.setdefault("cpu_s", {})
    cpu_s[stage] = cpu_s.get(stage, 0.0) + _children_cpu() - cpu
    times.setdefault("cpu_model", {})[stage] = cpu_model()   # XLA's CPU code, so results, differ
    with open(times_path, "w") as f:
      json.dump(times, f)
    if keep:
      _copy(workdir, keep, KEEP[stage] + ("bench_times.json",))
  return times


def row_of(workdir, setting, seed, times):
  """One run's figures, read from its work directory."""
  fin, comp = _read(workdir, DONE["final"]), _read(workdir, DONE["compress"])
  arch = _read(workdir, DONE["search"])
  metrics = _jsonl(workdir, "search/metrics.jsonl")
  return {"setting": setting, "seed": seed, "arc_string": arch["arc_string"],
          "ratios": comp["ratios"], "search_reward": arch["reward"],
          "search_train_acc": arch["train_acc"], "search_prune_acc": arch["prune_acc"],
          "test_error": fin["test_error"], "macs": fin["macs"], "params": fin["params_no_aux"],
          "test_error_masked": comp["test_error_masked"],
          "test_error_finetuned": comp["test_error_finetuned"],
          "pruned_macs": comp["pruned_macs"], "pruned_params": comp["pruned_params_no_aux"],
          "seconds": times,
          "reward_per_epoch": [m["reward"] for m in metrics],
          "entropy_per_epoch": [m["entropy"] for m in metrics]}


def uniform_row(base, workdir, ratio, seed, cmd_of, keep_dir=None):
  """The ENAS run's trained network compressed at `ratio` in every stage."""
  if not os.path.exists(os.path.join(workdir, DONE["compress"])):
    _copy(base, workdir, (DONE["search"], DONE["final"], "final/weights.npz"))
  times = run_stages(cmd_of, workdir, ("compress",), keep_dir)
  comp = _read(workdir, DONE["compress"])
  return {"setting": "enas_uniform", "seed": seed, "uniform_ratio": ratio,
          "ratios": comp["ratios"], "test_error_masked": comp["test_error_masked"],
          "test_error_finetuned": comp["test_error_finetuned"],
          "pruned_macs": comp["pruned_macs"], "pruned_params": comp["pruned_params_no_aux"],
          "seconds": times}


# Config fields added after the table's first rows were written (at 05cab55). Those rows'
# keys hash the recipe without them; while a recipe holds their defaults (configs/default.py:
# what the code did before them), recipe_keys also gives that form, so extending the config
# keeps the finished rows (tests/fashion_bench_test.py reproduces every stored row's key).
ADDED_AFTER_FIRST_ROWS = (
    "compress.distill", "compress.distill_temperature", "compress.distill_weight",
    "compress.round_to", "data.input", "matmul_precision", "preemption_sync_steps",
    "search.dispatch", "search.latency_table_dir", "search.round_to")
# fields added after every committed row (fashion and hardware tables) was written: left out
# of every key while at their defaults, so those rows keep today's keys; a value off the
# default is another recipe (another key)
ADDED_AFTER_STORED_ROWS = ("latency.micro_batch", "latency.engine")


def _without(recipe, fields):
  """recipe (config JSON) with the dotted `fields` removed, as sorted JSON."""
  out = json.loads(recipe)
  for f in fields:
    *sections, leaf = f.split(".")
    section = out
    for name in sections:
      section = section[name]
    del section[leaf]
  return json.dumps(out, sort_keys=True)


def recipe_keys(setting, seed, overrides, extra=""):
  """The row keys of (setting, seed, overrides, extra): today's (ADDED_AFTER_STORED_ROWS left
  out at their defaults), then the first rows' form where it applies (ADDED_AFTER_FIRST_ROWS).
  Rows are reused only for the same setting, seed, overrides and resolved recipe (the
  variant's config from configs/fashion.py, field by field: a rewording of the file keeps
  its rows, a changed value does not)."""
  from configs import default, fashion  # pylint: disable=g-import-not-at-top
  config = fashion.get_config(SETTINGS["enas" if setting == "enas_uniform" else setting])
  # a cache's location, which FP_JAX_LATENCY_TABLE_DIR may move, is not part of the recipe
  config.search.latency_table_dir = default.LATENCY_TABLE_DIR

  def key(recipe):
    blob = json.dumps([setting, seed, sorted(overrides), extra, recipe])
    return hashlib.sha1(blob.encode()).hexdigest()[:12]

  now, defaults = config_lib.fields(config), config_lib.fields(default.get_config())
  defaults["search.latency_table_dir"] = default.LATENCY_TABLE_DIR
  recipe = _without(config.to_json(sort_keys=True),
                    [f for f in ADDED_AFTER_STORED_ROWS if now[f] == defaults[f]])
  keys = [key(recipe)]
  if all(now[f] == defaults[f] for f in ADDED_AFTER_FIRST_ROWS):
    keys.append(key(_without(recipe, ADDED_AFTER_FIRST_ROWS)))
  return keys


def recipe_key(setting, seed, overrides, extra=""):
  """The key a new row of (setting, seed, overrides, extra) is written with."""
  return recipe_keys(setting, seed, overrides, extra)[0]


def run_dir(root, keep, prefix, keys):
  """root/<prefix><key> of the first key whose directory exists there or in keep (a run
  begun under an earlier key resumes there), else of keys[0]; returns (path, key)."""
  for k in keys:
    if any(os.path.isdir(os.path.join(d, prefix + k)) for d in (root, keep)):
      return os.path.join(root, prefix + k), k
  return os.path.join(root, prefix + keys[0]), keys[0]


def cpu_model():
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return "unknown CPU"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
  p.add_argument("--uniform", type=float, nargs="+", default=[0.2, 0.4, 0.6],
                 help="uniform ratios of the ENAS arc's pruning curve")
  p.add_argument("--workdir", default=WORKDIR)
  p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                 help="config overrides for every run (e.g. search.epochs=2)")
  p.add_argument("--max_runs", type=int, default=-1,
                 help="at most N new runs (-1: all; 0: rewrite the table from finished rows)")
  p.add_argument("--keep", default=KEEP_DIR,
                  help="where each finished stage's outputs are kept and restored from")
  p.add_argument("--merge", nargs="*", default=[], metavar="JSON",
                 help="finished rows of other results JSONs (parts run in parallel)")
  p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "fashion_table.json"))
  args = p.parse_args(argv)
  old = {}
  for path in [args.out] + args.merge:
    if os.path.exists(path):
      old.update({r["key"]: r for r in json.load(open(path)).get("rows", [])})
  rows, new_runs = [], 0
  jobs = [(setting, seed, None) for seed in args.seeds for setting in args.settings]
  if "enas" in args.settings:
    jobs += [("enas_uniform", seed, u) for seed in args.seeds for u in args.uniform]
  for setting, seed, ratio in jobs:
    keys = recipe_keys(setting, seed, args.set, "" if ratio is None else f"{ratio:g}")
    done = [k for k in keys if k in old]
    if done:
      rows.append(old[done[0]])
      continue
    if 0 <= args.max_runs <= new_runs:
      log(f"--max_runs {args.max_runs} reached; {setting} seed {seed} left for a rerun")
      continue
    name = "enas" if ratio is not None else setting
    base, key = run_dir(args.workdir, args.keep, f"{name}_seed{seed}_",
                        keys if ratio is None else recipe_keys(name, seed, args.set))
    if ratio is None:
      cmd_of = lambda st, s=setting, sd=seed, w=base: command(SETTINGS[s], sd, w, st, args.set)
      times = run_stages(cmd_of, base, keep_dir=args.keep)
      row = row_of(base, setting, seed, times)
    else:
      restore(base, os.path.join(args.keep, os.path.basename(base)))
      if not os.path.exists(os.path.join(base, DONE["final"])):
        log(f"enas seed {seed} not finished: uniform {ratio:g} left for a rerun")
        continue
      work, key = run_dir(args.workdir, args.keep, f"enas_seed{seed}_uniform{ratio:g}_", keys)
      ratios = " ".join([f"{ratio:g}"] * 5)
      cmd_of = lambda st, sd=seed, w=work, q=ratios: command(
          SETTINGS["enas"], sd, w, st, list(args.set) + [f"compress.ratios={q}"])
      row = uniform_row(base, work, ratio, seed, cmd_of, args.keep)
    row["key"] = key
    rows.append(row)
    new_runs += 1
    write(args, rows, jobs)
  print(write(args, rows, jobs))


def write(args, rows, jobs):
  """The results JSON, table and plot from the rows so far (after every new run, so that a
  session that ends mid-table keeps what it finished); returns the table."""
  for r in rows:
    if r["setting"] != "enas_uniform":
      r["vs_enas_uniform"] = report.vs_curve(r, rows) if r["setting"] != "enas" else None
  summary = report.summarise(rows, SETTINGS, STAGES)
  curves = {s: report.reward_curves(rows, s) for s in ("fp_a0.02_b20", "random")}
  env = {"cpu": cpu_model(), "loadavg": [round(v, 2) for v in os.getloadavg()],
         "time": time.strftime("%Y-%m-%d %H:%M:%S"), "cores": len(os.sched_getaffinity(0))}
  done = {(r["setting"], r["seed"], r.get("uniform_ratio")) for r in rows}
  missing = [list(j) for j in jobs if j not in done]
  result = {"environment": env, "args": vars(args), "rows": rows, "summary": summary,
            "reward_curves": curves, "missing": missing}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  stem = args.out[:-len(".json")]
  md = report.markdown(summary, rows, curves, env, STAGES)
  if missing:
    md += f"\nNot run yet ({len(missing)}): {missing}\n"
  with open(stem + ".md", "w") as f:
    f.write(md)
  if rows:
    report.plot(rows, curves, stem + ".png")
  return md

if __name__ == "__main__":
  main()
