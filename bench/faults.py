"""Fault campaign: SIGKILLs at random moments of the search, final and compress stages,
damaged checkpoints, a NaN in a step and a full disk during a save, each followed by what a
user does next (rerun the same command; follow the error line's advice), and every finished
run compared with an unbroken one (bitwise: metrics and samples except their timings,
arch.json, result.json, weights.npz).

  python -m bench.faults [--kills 21] [--seed 0] [--workdir DIR]

Tiny runs of configs/smoke.py (digits) on one CPU device, with a shared compilation cache.
Writes bench/results/faults.{json,md}: one row per fault with its outcome, rewritten after
every fault; a rerun with the same arguments does only the faults missing (each SIGKILL's
moment is drawn from (seed, its number)). A SIGKILL that lands after the stage finished is
drawn again. The full-disk case needs `mount -t tmpfs`
(root); without it the row says so.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("search", "final", "compress")
ARGS = ["--config=configs/smoke.py", "--config.search.epochs=2",
        "--config.search.steps_per_epoch=6", "--config.search.ckpt_every_steps=2",
        "--config.search.num_layers=1", "--config.search.out_filters=4",
        "--config.search.batch_size=16", "--config.search.eval_batch_size=16",
        "--config.search.controller_updates=2", "--config.search.controller_samples=3",
        "--config.search.uniform_child_epochs=1", "--config.search.num_candidates=2",
        "--config.search.final_eval_batches=1", "--config.final.num_layers=1",
        "--config.final.out_filters=4", "--config.final.epochs=3",
        "--config.final.steps_per_epoch=6", "--config.final.batch_size=16",
        "--config.compress.finetune_epochs=3", "--config.compress.steps_per_epoch=4",
        "--config.compress.batch_size=16", "--config.compress.bn_batches=2"]
OUTPUTS = {"search": ("search/arch.json", "search/metrics.jsonl", "search/samples.jsonl"),
           "final": ("final/result.json", "final/metrics.jsonl", "final/weights.npz"),
           "compress": ("compress/result.json", "compress/metrics.jsonl",
                        "compress/weights.npz")}
TIMING = re.compile(r"sec|time")    # metric keys that measure time, not the run
# A NaN from the given step on (every stage's training batches go through data.train_batch)
NAN_RUNNER = """
import os, sys
import numpy as np
from fp_jax import data
step0 = int(os.environ["FAULT_NAN_STEP"])
batch = data.train_batch
def poisoned(x, y, **kw):
  xb, yb = batch(x, y, **kw)
  return (np.full_like(xb, np.nan) if kw["step"] >= step0 else xb), yb
data.train_batch = poisoned
from absl import app
from fp_jax import main
sys.argv[0] = "fp_jax.main"
app.run(main.main, flags_parser=main.parse_flags)
"""


def env_of(cache):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  return env


def command(workdir, stages, runner=None):
  head = [sys.executable, "-c", runner] if runner else [sys.executable, "-m", "fp_jax.main"]
  return head + ARGS + [f"--config.stages={','.join(stages)}", f"--workdir={workdir}"]


def run(workdir, stages, env, kill_after=None, runner=None, timeout=900):
  """(exit status, stderr, seconds); SIGKILL after kill_after seconds when given."""
  t = time.perf_counter()
  p = subprocess.Popen(command(workdir, stages, runner), cwd=ROOT, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    _, err = p.communicate(timeout=kill_after if kill_after is not None else timeout)
  except subprocess.TimeoutExpired:
    p.send_signal(signal.SIGKILL if kill_after is not None else signal.SIGTERM)
    _, err = p.communicate()
  finally:
    if p.poll() is None:   # the campaign itself stopped: no orphan left writing to a trial
      p.kill()
      p.communicate()
  return p.returncode, err, time.perf_counter() - t


def errors_of(err):
  return [l for l in err.splitlines() if l.startswith("error:")]


def checkpoints(workdir, stage):
  d = os.path.join(workdir, stage, "ckpt")
  return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def _jsonl(path):
  with open(path) as f:
    return [{k: v for k, v in json.loads(l).items() if not TIMING.search(k)}
            for l in f if l.strip()]


def same_outputs(a, b, stage):
  """'' when stage's outputs in work dirs a and b are equal (timings aside), else what
  differs first."""
  for rel in OUTPUTS[stage]:
    pa, pb = os.path.join(a, rel), os.path.join(b, rel)
    if not os.path.exists(pb):
      return f"{rel} missing"
    if rel.endswith(".npz"):
      wa, wb = np.load(pa), np.load(pb)
      if sorted(wa.files) != sorted(wb.files):
        return f"{rel}: other arrays"
      bad = [k for k in wa.files if not np.array_equal(wa[k], wb[k])]
      if bad:
        return f"{rel}: {bad[0]} differs"
    elif rel.endswith(".jsonl"):
      if _jsonl(pa) != _jsonl(pb):
        return f"{rel} differs"
    else:
      with open(pa) as fa, open(pb) as fb:
        if json.load(fa) != json.load(fb):
          return f"{rel} differs"
  return ""


def prepared(ref, workdir, stage):
  """A fresh work dir holding ref's outputs of the stages before `stage`."""
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(workdir)
  for earlier in STAGES[:STAGES.index(stage)]:
    for rel in OUTPUTS[earlier]:
      os.makedirs(os.path.join(workdir, os.path.dirname(rel)), exist_ok=True)
      shutil.copy(os.path.join(ref, rel), os.path.join(workdir, rel))
  return workdir


def resume_until_done(workdir, stage, env):
  """Reruns the same command once, as a user would: (exit status, runs, stderr)."""
  rc, err, _ = run(workdir, [stage], env)
  return rc, 1, err


def kill_trial(ref, workdir, stage, seconds, rng, env, log):
  """SIGKILL at a uniform moment of the stage's unbroken wall time (`seconds`, or the last
  attempt's when that one finished before its kill), then the same command."""
  for _ in range(5):
    prepared(ref, workdir, stage)
    at = float(rng.uniform(0.05, 0.95) * seconds)
    rc, _, took = run(workdir, [stage], env, kill_after=at)
    if rc == -signal.SIGKILL:
      break
    seconds = took   # it finished first (the machine got faster): draw within this run's time
  else:
    return {"fault": "SIGKILL", "stage": stage, "outcome": "finished before every kill drawn"}
  on_disk = checkpoints(workdir, stage)
  rc, _, err = resume_until_done(workdir, stage, env)
  # killed after the stage wrote its result (while exiting): the rerun refuses it as finished
  finished = rc == 2 and "already finished" in " ".join(errors_of(err))
  diff = (same_outputs(ref, workdir, stage) if rc == 0 or finished else
          f"exit {rc}: {errors_of(err)}")
  done = ("killed after writing its result; the rerun refused the finished stage (one "
          "error line), its outputs equal to the unbroken run's" if finished else
          "resumed, equal to the unbroken run")
  row = {"fault": "SIGKILL", "stage": stage, "at_s": round(at, 2),
         "checkpoints_at_kill": on_disk,
         "resumed_from": _resumed_from(err),
         "outcome": done if not diff else f"DIFFERS: {diff}",
         "equal": not diff}
  log(row)
  return row


def _resumed_from(err):
  m = re.search(r"resuming from checkpoint (\d+)", err)
  return int(m.group(1)) if m else None


def damage_trial(ref, workdir, stage, how, env, log):
  """The stage's latest checkpoint damaged (a flipped byte in its array data, or that data
  truncated), as a run killed before writing its result left it: the rerun must stop with
  one error line; following its advice (delete that checkpoint) must resume as unbroken."""
  prepared(ref, workdir, stage)
  shutil.copytree(os.path.join(ref, stage, "ckpt"), os.path.join(workdir, stage, "ckpt"))
  for rel in OUTPUTS[stage]:
    if rel.endswith(".jsonl"):
      shutil.copy(os.path.join(ref, rel), os.path.join(workdir, rel))
  latest = checkpoints(workdir, stage)[-1]
  files = glob.glob(os.path.join(workdir, stage, "ckpt", str(latest), "arrays", "**", "d", "*"),
                    recursive=True)
  path = max(files, key=os.path.getsize)   # the array chunks
  with open(path, "r+b") as f:
    raw = bytearray(f.read())
    if how == "flipped byte":
      raw[len(raw) // 2] ^= 0x40
      f.seek(0)
      f.write(raw)
    else:
      f.truncate(len(raw) // 2)
  rc, err, _ = run(workdir, [stage], env)
  lines = errors_of(err)
  row = {"fault": how, "stage": stage, "checkpoint": latest, "exit": rc, "error": lines,
         "traceback": "Traceback" in err}
  advice = re.search(r"delete (\S+) to resume from checkpoint (\d+)", lines[-1] if lines else "")
  if rc != 2 or len(lines) != 1 or not advice:
    row.update(outcome=f"NOT DETECTED as one error line (exit {rc})", equal=False)
    log(row)
    return row
  shutil.rmtree(advice.group(1).rstrip(","))
  rc2, _, err2 = resume_until_done(workdir, stage, env)
  diff = same_outputs(ref, workdir, stage) if rc2 == 0 else f"exit {rc2}: {errors_of(err2)}"
  row.update(resumed_from=_resumed_from(err2), equal=not diff,
             outcome=("detected (one error line); resumed from checkpoint "
                      f"{advice.group(2)} as advised, equal to the unbroken run"
                      if not diff else f"detected; after the advice DIFFERS: {diff}"))
  log(row)
  return row


def nan_trial(ref, workdir, stage, step, env, log):
  """NaN images from training step `step` on: one error line, the last good checkpoint
  kept; rerun without the fault: resumes from it, equal to the unbroken run."""
  prepared(ref, workdir, stage)
  env_nan = dict(env, FAULT_NAN_STEP=str(step))
  rc, err, _ = run(workdir, [stage], env_nan, runner=NAN_RUNNER)
  lines = errors_of(err)
  kept = re.search(r"last good checkpoint \((\d+)\)", lines[-1] if lines else "")
  row = {"fault": f"NaN images from step {step}", "stage": stage, "exit": rc, "error": lines,
         "checkpoints": checkpoints(workdir, stage)}
  if rc != 2 or len(lines) != 1 or not kept or "Traceback" in err:
    row.update(outcome=f"NOT one error line keeping a checkpoint (exit {rc})", equal=False)
    log(row)
    return row
  rc2, _, err2 = resume_until_done(workdir, stage, env)
  diff = same_outputs(ref, workdir, stage) if rc2 == 0 else f"exit {rc2}: {errors_of(err2)}"
  row.update(kept=int(kept.group(1)), resumed_from=_resumed_from(err2), equal=not diff,
             outcome=(f"stopped, checkpoint {kept.group(1)} kept; rerun resumed from it, equal "
                      "to the unbroken run" if not diff else f"DIFFERS: {diff}"))
  log(row)
  return row


def disk_trial(ref, base, stage, env, log):
  """The work dir on a tmpfs that fills during a later checkpoint save: the run stops, the
  earlier checkpoints stay restorable (copied to a roomy disk, the rerun resumes and equals
  the unbroken run)."""
  mnt = os.path.join(base, "tmpfs")
  os.makedirs(mnt, exist_ok=True)
  one = sum(os.path.getsize(p) for p in glob.glob(
      os.path.join(ref, stage, "ckpt", str(checkpoints(ref, stage)[-1]), "**"), recursive=True)
      if os.path.isfile(p))
  before = sum(os.path.getsize(os.path.join(ref, rel)) for s in STAGES[:STAGES.index(stage)]
               for rel in OUTPUTS[s])
  size_kb = (before + int(2.5 * one)) // 1024 + 64   # room for about two checkpoints
  mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", mnt],
                         capture_output=True, text=True)
  if mount.returncode != 0:
    row = {"fault": "full disk", "stage": stage, "outcome": "not run: mount -t tmpfs refused "
           f"({mount.stderr.strip()})", "equal": None}
    log(row)
    return row
  try:
    workdir = prepared(ref, os.path.join(mnt, "run"), stage)
    rc, err, _ = run(workdir, [stage], env)
    lines = errors_of(err)
    saved = checkpoints(workdir, stage)
    roomy = os.path.join(base, "disk_resumed")
    shutil.rmtree(roomy, ignore_errors=True)
    shutil.copytree(workdir, roomy)
  finally:
    subprocess.run(["umount", mnt], capture_output=True)
  row = {"fault": f"full disk ({size_kb} KiB tmpfs)", "stage": stage, "exit": rc,
         "error": lines, "traceback": "Traceback" in err, "checkpoints_left": saved}
  rc2, _, err2 = resume_until_done(roomy, stage, env)
  diff = same_outputs(ref, roomy, stage) if rc2 == 0 else f"exit {rc2}: {errors_of(err2)}"
  row.update(resumed_from=_resumed_from(err2), equal=not diff and rc != 0,
             outcome=(f"stopped with {'one error line' if len(lines) == 1 else lines}; "
                      f"checkpoints {saved} usable: resumed from "
                      f"{_resumed_from(err2)}, equal to the unbroken run" if not diff and rc
                      else f"exit {rc}; after moving to a roomy disk: {diff or 'equal'}"))
  log(row)
  return row


def to_markdown(result):
  rows = result["rows"]
  ok = sum(1 for r in rows if r.get("equal"))
  lines = [
      "# Fault campaign", "",
      f"{result['cpu']}; `python -m bench.faults --kills {result['kills']} --seed "
      f"{result['seed']}`; tiny configs/smoke.py runs on one CPU device; unbroken stage "
      "wall times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result["stage_s"].items()),
      "", (f"**Partial: {len(rows)} of {result['trials']} faults done** (rerun the same "
           "command to continue). " if len(rows) < result["trials"] else "") +
      (f"{ok} of {len(rows)} faults ended in a run equal to the unbroken one; nothing was "
       "restored silently." if ok == len(rows) else
       f"{ok} of {len(rows)} faults ended in a run equal to the unbroken one (see the rows "
       "that say otherwise)."), "",
      "| # | fault | stage | at s | checkpoints then | resumed from | outcome |",
      "|---|---|---|---|---|---|---|"]
  for i, r in enumerate(rows, 1):
    lines.append(f"| {i} | {r['fault']} | {r['stage']} | {r.get('at_s', '')} | "
                 f"{r.get('checkpoints_at_kill', r.get('checkpoints_left', r.get('checkpoint', '')))}"
                 f" | {r.get('resumed_from', '')} | {r['outcome']} |")
  errs = sorted({e for r in rows for e in r.get("error", [])})
  if errs:
    lines += ["", "Error lines seen:", ""] + [f"- `{e}`" for e in errs]
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--kills", type=int, default=21)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workdir", default="/var/tmp/fp_jax_bench/faults")
  p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "faults.json"))
  args = p.parse_args(argv)
  signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench.faults: stopped by SIGTERM"))
  base = os.path.abspath(args.workdir)
  os.makedirs(base, exist_ok=True)
  env = env_of(os.path.join(base, "cache"))
  log = lambda r: print(json.dumps(r), flush=True)
  # the unbroken run, stage by stage (the first fills the compilation cache, the second is
  # timed and is the reference; they must agree)
  ref, stage_s = os.path.join(base, "ref"), {}
  timing = os.path.join(base, "stage_s.json")
  if os.path.exists(timing) and json.load(open(timing)).get("args") == ARGS:
    stage_s = json.load(open(timing))["stage_s"]   # a rerun: the reference is there
  else:
    for name in ("warm", "ref"):
      w = os.path.join(base, name)
      shutil.rmtree(w, ignore_errors=True)
      for stage in STAGES:
        rc, err, seconds = run(w, [stage], env)
        if rc != 0:
          sys.exit(f"error: the unbroken {stage} failed: {err[-2000:]}")
        stage_s[stage] = seconds
    for stage in STAGES:
      diff = same_outputs(os.path.join(base, "warm"), ref, stage)
      if diff:
        sys.exit(f"error: two unbroken runs differ ({diff}): nothing to compare faults with")
    with open(timing, "w") as f:
      json.dump({"args": ARGS, "stage_s": stage_s}, f)
  work = os.path.join(base, "trial")
  trials = [(f"{how} {stage}", lambda stage=stage, how=how: damage_trial(
      ref, work, stage, how, env, log))
            for stage in ("search", "final") for how in ("flipped byte", "truncated file")]
  trials += [("nan search", lambda: nan_trial(ref, work, "search", 9, env, log)),
             ("nan final", lambda: nan_trial(ref, work, "final", 14, env, log)),
             ("disk search", lambda: disk_trial(ref, base, "search", env, log))]
  trials += [(f"kill {i}", lambda i=i: kill_trial(
      ref, work, STAGES[i % 3], stage_s[STAGES[i % 3]],
      np.random.default_rng([args.seed, i]), env, log)) for i in range(args.kills)]
  # the rows written so far (same arguments): a rerun does only the trials missing
  done = {}
  if os.path.exists(args.out):
    old = json.load(open(args.out))
    if (old.get("args"), old.get("seed")) == (ARGS, args.seed):
      done = {r["trial"]: r for r in old["rows"] if "trial" in r}
  from bench import fashion_table   # pylint: disable=g-import-not-at-top
  rows = []
  for name, trial in trials:
    if name in done:
      rows.append(done[name])
      continue
    t = time.perf_counter()
    row = dict(trial(), trial=name, seconds=round(time.perf_counter() - t, 1),
               cpu=fashion_table.cpu_model())
    rows.append(row)
    write(args, stage_s, rows, len(trials))
  print(write(args, stage_s, rows, len(trials)))


def write(args, stage_s, rows, total):
  """bench/results/faults.{json,md} from the rows so far; returns the table."""
  from bench import fashion_table   # pylint: disable=g-import-not-at-top
  result = {"cpu": fashion_table.cpu_model(), "kills": args.kills, "seed": args.seed,
            "stage_s": stage_s, "args": ARGS, "loadavg": os.getloadavg(), "rows": rows,
            "trials": total}
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  md = to_markdown(result)
  with open(args.out[:-len(".json")] + ".md", "w") as f:
    f.write(md)
  return md


if __name__ == "__main__":
  main()
