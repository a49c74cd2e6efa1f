"""Where the test suite's time goes: the README's test command run with bench/suite_plugin.py,
per file its wall seconds and the share spent in XLA compiles (in the test processes), each
worker's busy time and the idle tail at the end.

  python -m bench.suite_profile                       # the whole suite, -n 2 --dist loadfile
  python -m bench.suite_profile --files tests/final_test.py --workers 0 --name suite_final
  python -m bench.suite_profile --from_dir DIR        # summarise a kept profile directory

Writes bench/results/<name>.{json,md}; --keep DIR keeps the per-worker records. Times are one
run's, on a machine whose speed drifts between runs: compare files within a run, and runs only
with their user CPU seconds beside them.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # pylint: disable=g-import-not-at-top
from bench import suite_plugin
from bench.fashion_table import cpu_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMS = ("wall_s", "compile_s", "compiles", "trace_s", "lower_s", "cache_read_s",
        "checkpoint_blocking_s")


def load_records(directory):
  """{worker: {nodeid: record}} from the plugin's <worker>.json files in directory."""
  out = {}
  for name in sorted(os.listdir(directory)):
    if name.endswith(".json"):
      with open(os.path.join(directory, name)) as f:
        rec = json.load(f)
      out[rec["worker"]] = rec["tests"]
  return out


def summarise(records):
  """Per-file and per-worker sums of the plugin's records.

  records: {worker: {nodeid: {start, end, wall_s, compile_s?, compiles?, ...}}}. A file's
  figures are the sums over its tests; a worker's busy time the sum of its tests' wall
  seconds; tail_s the time from the first worker's last test end to the last one's."""
  files = collections.OrderedDict()
  workers = {}
  for worker, tests in records.items():
    ends = [t["end"] for t in tests.values() if "end" in t]
    workers[worker] = {"tests": len(tests), "busy_s": sum(t["wall_s"] for t in tests.values()),
                       "first_start": min(t["start"] for t in tests.values()),
                       "last_end": max(ends) if ends else None}
    for nodeid, t in tests.items():
      path = nodeid.split("::")[0]
      f = files.setdefault(path, {"worker": worker, "tests": 0, **{k: 0.0 for k in SUMS}})
      f["tests"] += 1
      for k in SUMS:
        f[k] += t.get(k, 0)
  for f in files.values():
    f["compiles"] = int(f["compiles"])
    f["compile_share"] = f["compile_s"] / f["wall_s"] if f["wall_s"] else 0.0
  ends = [w["last_end"] for w in workers.values() if w["last_end"] is not None]
  start = min(w["first_start"] for w in workers.values())
  totals = {k: sum(f[k] for f in files.values()) for k in SUMS}
  totals["compiles"] = int(totals["compiles"])
  totals["compile_share"] = totals["compile_s"] / totals["wall_s"] if totals["wall_s"] else 0.0
  failed = sorted(f"{nodeid} ({t['failed']})" for tests in records.values()
                  for nodeid, t in tests.items() if "failed" in t)
  return {"failed": failed, "programs": programs(records),
          "files": dict(sorted(files.items(), key=lambda kv: -kv[1]["wall_s"])),
          "workers": workers, "totals": totals,
          "span_s": max(ends) - start if ends else 0.0,
          "tail_s": max(ends) - min(ends) if ends else 0.0}


def programs(records):
  """{program name: {compiles, compile_s, tests, files}} over every test, the most
  compile seconds first: which programs the suite compiles again and again."""
  out = {}
  for tests in records.values():
    for nodeid, t in tests.items():
      for name, (n, secs) in t.get("programs", {}).items():
        p = out.setdefault(name, {"compiles": 0, "compile_s": 0.0, "tests": 0, "files": set()})
        p["compiles"] += n
        p["compile_s"] += secs
        p["tests"] += 1
        p["files"].add(nodeid.split("::")[0])
  for p in out.values():
    p["files"] = len(p["files"])
  return dict(sorted(out.items(), key=lambda kv: -kv[1]["compile_s"]))


def run(files, workers, directory):
  """Runs pytest over files with the plugin writing into directory: (wall s, user CPU s,
  system CPU s, pytest's last line, return code)."""
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "bench.suite_plugin",
         "-p", "no:cacheprovider"]
  if workers:
    cmd += ["-n", str(workers), "--dist", "loadfile"]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  env[suite_plugin.ENV] = directory
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  t = time.time()
  proc = subprocess.run(cmd + list(files), cwd=ROOT, env=env, capture_output=True, text=True)
  wall = time.time() - t
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  lines = [l for l in proc.stdout.splitlines() if l.strip()]
  last = lines[-1] if lines else proc.stderr.strip()[-300:]
  return (wall, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime, last,
          proc.returncode)


def markdown(result, top=25):
  s, t = result["summary"], result["summary"]["totals"]
  env = result["environment"]
  out = ["# Test suite: where the time goes", "",
         f"cpu: {result['cpu']}; `{result['command']}`; {env['time']}; load average at the "
         f"start {result['load_start']}, at the end {result['load_end']}", ""]
  if result.get("wall_s") is not None:
    out += [f"pytest: {result['pytest']}", "",
            f"wall {result['wall_s']:.0f} s, user CPU {result['user_s']:.0f} s, system CPU "
            f"{result['sys_s']:.0f} s (the pytest processes and every subprocess)", ""]
  out += [f"Test processes: {t['wall_s']:.0f} s of test wall time over the workers, "
          f"{t['compile_s']:.0f} s ({100 * t['compile_share']:.0f} %) in {t['compiles']} XLA "
          f"compiles, {t['trace_s'] + t['lower_s']:.0f} s tracing and lowering, "
          f"{t['checkpoint_blocking_s']:.0f} s blocked in checkpoint writes; "
          f"span {s['span_s']:.0f} s, idle tail {s['tail_s']:.0f} s (one worker done, "
          "another still running).", ""]
  if s["failed"]:
    out += ["Failed: " + "; ".join(s["failed"]), ""]
  out.append(common.table(
      ["worker", "tests", "busy s", "last test ends at s"],
      [[w, v["tests"], v["busy_s"],
        (v["last_end"] - min(x["first_start"] for x in s["workers"].values()))
        if v["last_end"] else ""] for w, v in sorted(s["workers"].items())]))
  rows = [[path, f["worker"], f["tests"], f["wall_s"], f["compile_s"], f["compiles"],
           f"{100 * f['compile_share']:.0f} %", f["checkpoint_blocking_s"]]
          for path, f in list(s["files"].items())[:top]]
  out += ["", f"## The {min(top, len(s['files']))} slowest files (of {len(s['files'])})", "",
          common.table(["file", "worker", "tests", "wall s", "XLA compile s", "compiles",
                        "compile share", "checkpoint blocking s"], rows),
          "", "Wall: setup + call + teardown of each test on its worker, under the other "
          "worker's load; compiles are those of the test process itself (subprocess tests "
          "compile in their children, counted in their wall time only)."]
  progs = list(s.get("programs", {}).items())
  if progs:
    out += ["", f"## The {min(top, len(progs))} programs with the most compile seconds "
            f"(of {len(progs)} names)", "",
            common.table(["program", "compiles", "XLA compile s", "s per compile", "tests",
                          "files"],
                         [[name, p["compiles"], p["compile_s"], p["compile_s"] / p["compiles"],
                           p["tests"], p["files"]] for name, p in progs[:top]]),
            "", "A program is jit's name for it (the function's name); one name can be "
            "several programs (shapes, configurations). Compiles include persistent-cache "
            "reads, which take a fraction of a second."]
  return "\n".join(out) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--files", nargs="+", default=["tests"])
  p.add_argument("--workers", type=int, default=2, help="pytest-xdist workers; 0: one process")
  p.add_argument("--name", default="suite_profile")
  p.add_argument("--out", default=None, help="JSON path (default bench/results/<name>.json)")
  p.add_argument("--keep", default=None, help="directory for the per-worker records")
  p.add_argument("--from_dir", default=None, help="summarise these records; run nothing")
  a = p.parse_args(argv)
  load_start = os.getloadavg()
  result = {"cpu": cpu_model(), "environment": common.environment(),
            "command": ("python -m pytest -q" + (f" -n {a.workers} --dist loadfile"
                                                  if a.workers else "") + " " +
                        " ".join(a.files)),
            "load_start": [round(x, 2) for x in load_start]}
  if a.from_dir:
    directory = a.from_dir
    result.update(wall_s=None, user_s=None, sys_s=None, pytest=None, returncode=None)
  else:
    directory = a.keep or tempfile.mkdtemp(prefix="fp_jax_suite_profile_")
    os.makedirs(directory, exist_ok=True)
    common.log(f"running {result['command']} (records in {directory})")
    wall, user, system, last, rc = run(a.files, a.workers, directory)
    result.update(wall_s=wall, user_s=user, sys_s=system, pytest=last, returncode=rc)
    common.log(f"{last}: {wall:.0f} s wall, {user:.0f} s user CPU")
  result["load_end"] = [round(x, 2) for x in os.getloadavg()]
  records = load_records(directory)
  if not records:
    print(f"error: no records in {directory} (pytest: {result.get('pytest')})",
          file=sys.stderr)
    return 1
  result["summary"] = summarise(records)
  path = common.write_json(a.name, a.out, result)
  md = markdown(result)
  with open(re.sub(r"\.json$", "", path) + ".md", "w") as f:
    f.write(md)
  print(md)
  return 0 if result.get("returncode") in (0, None) else 1


if __name__ == "__main__":
  sys.exit(main())
