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
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

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


def recipe_key(setting, seed, overrides, extra=""):
  """Rows are reused only for the same setting, seed, overrides and resolved recipe (the
  variant's config from configs/fashion.py, field by field: a rewording of the file keeps
  its rows, a changed value does not)."""
  from configs import fashion  # pylint: disable=g-import-not-at-top
  variant = SETTINGS["enas" if setting == "enas_uniform" else setting]
  recipe = fashion.get_config(variant).to_json(sort_keys=True)
  blob = json.dumps([setting, seed, sorted(overrides), extra, recipe])
  return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _mean_sd(values):
  values = [v for v in values if v is not None]
  if not values:
    return None, None
  return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def uniform_curve(rows, seed=None):
  """(macs ascending, fine-tuned error) of the ENAS uniform-pruning points (one seed, or the
  mean over seeds at each ratio), the unpruned ENAS network (ratio 0) included."""
  pts = {}
  for r in rows:
    if seed is not None and r["seed"] != seed:
      continue
    if r["setting"] == "enas_uniform":
      pts.setdefault(r["uniform_ratio"], []).append((r["pruned_macs"], r["test_error_finetuned"]))
    elif r["setting"] == "enas":
      pts.setdefault(0.0, []).append((r["macs"], r["test_error"]))
  curve = sorted((statistics.mean(m for m, _ in v), statistics.mean(e for _, e in v))
                 for v in pts.values())
  return [m for m, _ in curve], [e for _, e in curve]


def vs_curve(row, rows):
  """Fine-tuned error minus the same seed's ENAS uniform curve at the row's pruned
  multiply-adds (linear interpolation; None outside the curve's range)."""
  macs, errs = uniform_curve(rows, row["seed"])
  if len(macs) < 2 or not macs[0] <= row["pruned_macs"] <= macs[-1]:
    return None
  return row["test_error_finetuned"] - float(np.interp(row["pruned_macs"], macs, errs))


def summarise(rows):
  """Mean and spread (sample std) over seeds of each setting's figures."""
  out = {}
  keys = ("test_error", "test_error_masked", "test_error_finetuned", "pruned_macs",
          "pruned_params", "macs", "params", "vs_enas_uniform")
  for setting in list(SETTINGS) + ["enas_uniform"]:
    groups = {}
    for r in rows:
      if r["setting"] == setting:
        groups.setdefault(r.get("uniform_ratio"), []).append(r)
    for ratio, rs in sorted(groups.items(), key=lambda kv: kv[0] or 0):
      name = setting if ratio is None else f"enas + uniform {ratio:g}"
      s = {"seeds": len(rs)}
      for k in keys:
        s[k], s[k + "_sd"] = _mean_sd([r.get(k) for r in rs])
      for stage in STAGES:
        s[f"{stage}_s"], _ = _mean_sd([r["seconds"].get(stage) for r in rs])
        s[f"{stage}_cpu_s"], _ = _mean_sd([r["seconds"].get("cpu_s", {}).get(stage) for r in rs])
      out[name] = s
  return out


def reward_curves(rows, setting):
  """Mean over seeds of the per-epoch mean reward and entropy of one setting's searches."""
  rs = [r for r in rows if r["setting"] == setting and r.get("reward_per_epoch")]
  if not rs:
    return None
  n = min(len(r["reward_per_epoch"]) for r in rs)
  mean = lambda k: [statistics.mean(r[k][i] for r in rs) for i in range(n)]
  return {"reward": mean("reward_per_epoch"), "entropy": mean("entropy_per_epoch"),
          "seeds": len(rs)}


def _fmt(m, sd, scale=1.0, digits=2):
  if m is None:
    return "-"
  return f"{m / scale:.{digits}f} ± {sd / scale:.{digits}f}"


def markdown(summary, rows, curves, env):
  lines = ["# Fashion-MNIST: fake pruning against ENAS + uniform pruning and random search",
           "", f"Machine: {env['cpu']}, load average {env['loadavg']}; recipe "
           "configs/fashion.py (short); means ± sample std over seeds.", "",
           "| method | seeds | final error % | masked error % (BN re-est.) | fine-tuned error % "
           "| MMACs (compressed) | params K (compressed) | vs ENAS uniform at equal MACs (pts) "
           "| search / final / compress wall s | CPU s |", "|---|---|---|---|---|---|---|---|---|---|"]
  for name, s in summary.items():
    secs = " / ".join("-" if s[f"{st}_s"] is None else f"{s[f'{st}_s']:.0f}" for st in STAGES)
    secs += " | " + " / ".join("-" if s.get(f"{st}_cpu_s") is None else
                               f"{s[f'{st}_cpu_s']:.0f}" for st in STAGES)
    lines.append(
        f"| {name} | {s['seeds']} | {_fmt(s['test_error'], s['test_error_sd'])} | "
        f"{_fmt(s['test_error_masked'], s['test_error_masked_sd'])} | "
        f"{_fmt(s['test_error_finetuned'], s['test_error_finetuned_sd'])} | "
        f"{_fmt(s['pruned_macs'], s['pruned_macs_sd'], 1e6, 3)} | "
        f"{_fmt(s['pruned_params'], s['pruned_params_sd'], 1e3, 1)} | "
        f"{_fmt(s['vs_enas_uniform'], s['vs_enas_uniform_sd'])} | {secs} |")
  lines += ["", "Final error: the chosen arc trained as the final network, unpruned (for "
            "`enas + uniform r` rows: the ENAS network's). Masked: that network masked at the "
            "ratios (the searched ones; uniform r for the curve), BN statistics re-estimated, "
            "no fine-tuning. Fine-tuned: after fine-tuning with the masks held, channels "
            "removed. vs ENAS uniform: fine-tuned error minus the same seed's ENAS "
            "uniform-pruning curve interpolated at the run's compressed multiply-adds "
            "(negative: better than uniform pruning at equal cost). Wall seconds include other "
            "load and any time the run was paused; CPU seconds (user + system of the stage's "
            "process, recorded since the table's second session) do not.", "",
            "## Search: mean reward per epoch (mean over seeds)", ""]
  for setting, c in curves.items():
    if c:
      lines.append(f"- {setting} ({c['seeds']} seeds): reward "
                   f"{' '.join(f'{v:.3f}' for v in c['reward'])}; entropy "
                   f"{' '.join(f'{v:.2f}' for v in c['entropy'])}")
  lines += ["", "## Per run", "", "| setting | seed | ratios | final % | masked % | "
            "fine-tuned % | MMACs | vs uniform |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    v = r.get("vs_enas_uniform")
    lines.append(
        f"| {r['setting']}{'' if 'uniform_ratio' not in r else ' ' + str(r['uniform_ratio'])}"
        f" | {r['seed']} | {' '.join(f'{x:g}' for x in r['ratios'])} | "
        f"{r.get('test_error', float('nan')):.2f} | {r['test_error_masked']:.2f} | "
        f"{r['test_error_finetuned']:.2f} | {r['pruned_macs'] / 1e6:.3f} | "
        f"{'-' if v is None else f'{v:+.2f}'} |")
  return "\n".join(lines) + "\n"


def plot(rows, curves, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
  colors = {"enas": "tab:gray", "random": "tab:green", "fp_a0.02_b0": "tab:blue",
            "fp_a0.02_b20": "tab:red", "fp_a0.5_b20": "tab:purple"}
  seeds = sorted({r["seed"] for r in rows})
  for seed in seeds:
    m, e = uniform_curve(rows, seed)
    if m:
      ax[0].plot(np.array(m) / 1e6, e, color="k", alpha=0.35, lw=1, marker=".")
  m, e = uniform_curve(rows)
  if m:
    ax[0].plot(np.array(m) / 1e6, e, color="k", lw=2, label="ENAS arc + uniform pruning")
  for setting, color in colors.items():
    rs = [r for r in rows if r["setting"] == setting]
    if rs:
      ax[0].scatter([r["pruned_macs"] / 1e6 for r in rs],
                    [r["test_error_finetuned"] for r in rs], color=color, s=30, label=setting)
      ax[0].scatter([r["macs"] / 1e6 for r in rs], [r["test_error"] for r in rs],
                    facecolors="none", edgecolors=color, s=30)
  ax[0].set_xlabel("multiply-adds per image (M)")
  ax[0].set_ylabel("test error (%)")
  ax[0].set_title("fine-tuned compressed networks (filled), unpruned (hollow)")
  ax[0].legend(fontsize=8)
  for setting, c in curves.items():
    if c:
      ax[1].plot(range(1, len(c["reward"]) + 1), c["reward"], color=colors[setting],
                 marker="o", label=f"{setting} reward")
  ax[1].set_xlabel("search epoch")
  ax[1].set_ylabel("mean reward of the epoch's samples")
  ax[1].set_title("controller vs random search, same budget")
  ax[1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


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
    key = recipe_key(setting, seed, args.set, "" if ratio is None else f"{ratio:g}")
    if key in old:
      rows.append(old[key])
      continue
    if 0 <= args.max_runs <= new_runs:
      log(f"--max_runs {args.max_runs} reached; {setting} seed {seed} left for a rerun")
      continue
    enas_key = key if ratio is None else recipe_key("enas", seed, args.set)
    base = os.path.join(args.workdir, f"{'enas' if ratio is not None else setting}_seed{seed}_"
                        f"{enas_key}")
    if ratio is None:
      cmd_of = lambda st, s=setting, sd=seed, w=base: command(SETTINGS[s], sd, w, st, args.set)
      times = run_stages(cmd_of, base, keep_dir=args.keep)
      row = row_of(base, setting, seed, times)
    else:
      restore(base, os.path.join(args.keep, os.path.basename(base)))
      if not os.path.exists(os.path.join(base, DONE["final"])):
        log(f"enas seed {seed} not finished: uniform {ratio:g} left for a rerun")
        continue
      work = os.path.join(args.workdir, f"enas_seed{seed}_uniform{ratio:g}_{key}")
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
      r["vs_enas_uniform"] = vs_curve(r, rows) if r["setting"] != "enas" else None
  summary = summarise(rows)
  curves = {s: reward_curves(rows, s) for s in ("fp_a0.02_b20", "random")}
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
  md = markdown(summary, rows, curves, env)
  if missing:
    md += f"\nNot run yet ({len(missing)}): {missing}\n"
  with open(stem + ".md", "w") as f:
    f.write(md)
  if rows:
    plot(rows, curves, stem + ".png")
  return md

if __name__ == "__main__":
  main()
