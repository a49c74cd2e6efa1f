"""Search-step throughput against the device count (data parallelism over mesh axis `data`).

  python -m bench.scaling [--devices 1,2,4] [--processes 2] [--num_layers 1 --out_filters 8
                           --image 16 --batch 32] [--no_accelerator]

Times the supernet training step (search_steps.make_supernet_step, a freshly sampled arc
each call) for one fixed global batch split over
  - 1, 2 and 4 forced CPU devices in one process (each count in its own subprocess
    with XLA_FLAGS=--xla_force_host_platform_device_count=N);
  - 2 processes with one CPU device each, started by launch.local (jax.distributed,
    gloo collectives between the processes);
  - every accelerator jax finds (GPU/TPU) on 1, 2, 4, ... of its devices, when there is one.
Forced CPU devices share the same cores, so those rows show the overhead of
splitting the batch and of the collectives, not a speed-up. Writes
bench/results/scaling.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- worker (one configuration)

def worker(args):
  """Times the step on `args.mesh_devices` devices (0: all); process 0 writes args.json_out."""
  from fp_jax.run import parallel  # pylint: disable=g-import-not-at-top
  parallel.init_distributed(args.coordinator_address, args.num_processes, args.process_id)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  from fp_jax.models import space  # pylint: disable=g-import-not-at-top
  from fp_jax.models import supernet  # pylint: disable=g-import-not-at-top
  from fp_jax.train import search_steps  # pylint: disable=g-import-not-at-top

  counts = [int(n) for n in args.mesh_devices.split(",")] if args.mesh_devices else [0]
  cfg = default.get_config().search
  tx, _ = search_steps.supernet_optimizer(cfg, steps_per_epoch=100)
  lr = jnp.asarray(cfg.lr_max, jnp.float32)
  plan = supernet.make_plan(args.num_layers, args.out_filters, (args.image, args.image, 3),
                            args.classes)
  # a host copy: the steps donate their inputs
  params = jax.device_get(supernet.init(jax.random.key(args.seed), plan))
  x_np, y_np = common.synthetic_batch(args.seed, args.batch, args.image, args.classes)
  rng = np.random.default_rng(args.seed + 1)
  arcs = [jnp.asarray(space.sample_uniform(rng)) for _ in range(args.warmup + args.steps)]
  rows = []
  for n in counts:
    devices = jax.devices() if n == 0 else jax.devices()[:n]
    if len(devices) < n:
      continue
    mesh = parallel.make_mesh(devices)
    if args.batch % mesh.size:
      common.log(f"skipping {mesh.size} devices: batch {args.batch} does not divide")
      continue
    # this process's rows of the global batch (all of it in a single process)
    per = args.batch // jax.process_count()
    rows_p = slice(jax.process_index() * per, (jax.process_index() + 1) * per)
    x, y = parallel.shard(mesh, (x_np[rows_p], y_np[rows_p]))
    state = parallel.replicate(mesh, search_steps.SupernetState(params, tx.init(params)))
    step = search_steps.make_supernet_step(plan, tx, cfg.aux_weight, cfg.keep_prob, mesh)
    compiled, trace_s, compile_s = common.compile_timed(step, state, arcs[0], jax.random.key(0), x, y,
                                                       lr)
    times, losses = [], []
    for rep in range(args.warmup + args.steps):
      t = time.perf_counter()
      state, m = compiled(state, arcs[rep], jax.random.key(rep), x, y, lr)
      losses.append(float(m["loss"]))   # waits for the step
      if rep >= args.warmup:
        times.append(time.perf_counter() - t)
    assert all(np.isfinite(losses)), losses
    med = statistics.median(times)
    rows.append({"platform": jax.default_backend(), "device_kind": devices[0].device_kind,
                 "devices": mesh.size, "processes": jax.process_count(),
                 "global_batch": args.batch, "per_device_batch": args.batch // mesh.size,
                 "median_ms": 1e3 * med, "min_ms": 1e3 * min(times),
                 "img_s": args.batch / med, "compile_s": trace_s + compile_s,
                 "times_s": times, "first_loss": losses[0]})
    common.log(f"{jax.default_backend()} {mesh.size} devices / {jax.process_count()} processes: "
               f"{1e3 * med:.1f} ms/step, {args.batch / med:.0f} img/s")
  if jax.process_index() == 0 and args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(rows, f)


# ---------------------------------------------------------------- driver

def _size_args(args):
  return [f"--num_layers={args.num_layers}", f"--out_filters={args.out_filters}",
          f"--batch={args.batch}", f"--image={args.image}", f"--classes={args.classes}",
          f"--steps={args.steps}", f"--warmup={args.warmup}", f"--seed={args.seed}"]


def _env(devices=None, cpu=True):
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if cpu:
    env["JAX_PLATFORMS"] = "cpu"
    xla = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(xla + [f"--xla_force_host_platform_device_count={devices}"])
  return env


def _run_worker(args, extra, env, label, timeout):
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    path = f.name
  try:
    cmd = [sys.executable, "-m", "bench.scaling", "--worker", f"--json_out={path}",
           *_size_args(args), *extra]
    common.log(f"{label}: {' '.join(cmd[3:])}")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
      tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
      common.log(f"{label} failed ({proc.returncode}):\n{tail}")
      return []
    with open(path) as f:
      return json.load(f)
  except subprocess.TimeoutExpired:
    common.log(f"{label}: no result within {timeout}s")
    return []
  finally:
    os.unlink(path)


def _run_multiprocess(args, processes, timeout):
  from launch import local  # pylint: disable=g-import-not-at-top
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    path = f.name
  label = f"cpu, {processes} processes x 1 device"
  common.log(f"{label}: launch.local")
  try:
    with open(os.devnull, "w") as devnull:
      status, message = local.launch(["--worker", f"--json_out={path}", *_size_args(args)],
                                     processes, devices_per_process=1, timeout=timeout,
                                     module="bench.scaling", out=devnull, err=devnull)
    if status != 0:
      common.log(f"{label} failed: {message}")
      return []
    with open(path) as f:
      return json.load(f)
  finally:
    os.unlink(path)


def _accelerator():
  """(backend, device count) jax picks with the inherited environment, in a subprocess."""
  env = _env(cpu=False)
  code = "import jax, json; print(json.dumps([jax.default_backend(), jax.device_count()]))"
  try:
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    backend, count = json.loads(proc.stdout.strip().splitlines()[-1])
    return backend, count
  except Exception:  # pylint: disable=broad-except
    return "cpu", 1


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_size_flags(parser, steps=5, warmup=2)
  parser.set_defaults(num_layers=1, out_filters=8, batch=32, image=16)
  parser.add_argument("--devices", default="1,2,4", help="forced CPU device counts")
  parser.add_argument("--processes", type=int, default=2,
                      help="also run this many 1-device CPU processes (0: skip)")
  parser.add_argument("--no_accelerator", action="store_true", help="skip GPU/TPU rows")
  parser.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
  # worker mode (internal)
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--mesh_devices", default="", help=argparse.SUPPRESS)
  parser.add_argument("--json_out", default="", help=argparse.SUPPRESS)
  parser.add_argument("--coordinator_address", default="", help=argparse.SUPPRESS)
  parser.add_argument("--num_processes", type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--process_id", type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return worker(args)

  t0 = time.perf_counter()
  rows = []
  for n in (int(v) for v in args.devices.split(",") if v):
    rows += _run_worker(args, [], _env(n), f"cpu, 1 process x {n} devices", args.timeout)
  if args.processes > 1:
    rows += _run_multiprocess(args, args.processes, args.timeout)
  backend, count = ("cpu", 0) if args.no_accelerator else _accelerator()
  if backend != "cpu":
    counts, n = [], 1
    while n <= count:
      counts.append(n)
      n *= 2
    if counts[-1] != count:
      counts.append(count)
    rows += _run_worker(args, [f"--mesh_devices={','.join(map(str, counts))}"],
                        _env(cpu=False), f"{backend}, {count} devices", args.timeout)
  else:
    common.log("no GPU/TPU found: CPU rows only" if not args.no_accelerator else
               "accelerator rows skipped")

  base = {}
  for r in rows:   # relative to one device of the same platform
    if r["devices"] == 1 and r["processes"] == 1:
      base.setdefault(r["platform"], r["img_s"])
  for r in rows:
    r["vs_1_device"] = r["img_s"] / base[r["platform"]] if r["platform"] in base else None
  result = {"args": {k: v for k, v in vars(args).items() if k not in
                     ("worker", "mesh_devices", "json_out", "coordinator_address",
                      "num_processes", "process_id")},
            "env": common.environment(), "accelerator": backend, "rows": rows,
            "wall_s": time.perf_counter() - t0}
  result["env"]["loadavg_end"] = os.getloadavg()
  path = common.write_json("scaling", args.out, result)
  print(f"search step (supernet, sampled arcs): layers={args.num_layers} "
        f"filters={args.out_filters} image={args.image} global batch={args.batch}; "
        f"{args.steps} timed steps, medians. Forced CPU devices share {os.cpu_count()} cores: "
        f"overhead, not speed-up.")
  table = []
  for r in rows:
    setup = f"{r['platform']} ({r['device_kind']})"
    table.append([setup, r["processes"], r["devices"], r["per_device_batch"], r["median_ms"],
                  r["img_s"], "" if r["vs_1_device"] is None else r["vs_1_device"],
                  r["compile_s"]])
  print(common.table(["platform", "processes", "devices", "batch/device", "median ms", "img/s",
                      "vs 1 device", "compile s"], table))
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
