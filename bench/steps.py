"""Train steps to time (supernet / fixed network) from any revision of fp_jax, and their
memory: shared by bench/search_step.py, bench/final_step.py and bench/revisions.py.

A revision other than the working tree is exported (`git archive REV fp_jax`) into a
temporary directory as a package renamed `fpj_<rev>`, so before/after variants run
interleaved in one process (same load, same data).
"""
from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from configs import default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def package(rev):
  """Module prefix of fp_jax at git revision `rev` ('' or 'cur': the working tree)."""
  if rev in ("", "cur"):
    return "fp_jax"
  name = "fpj_" + "".join(c if c.isalnum() else "_" for c in rev)
  if name in sys.modules:
    return name
  tmp = tempfile.mkdtemp(prefix="fp_jax_rev_")
  tar = subprocess.run(["git", "-C", ROOT, "archive", rev, "fp_jax"], check=True,
                       capture_output=True).stdout
  subprocess.run(["tar", "-x", "-C", tmp], input=tar, check=True)
  os.rename(os.path.join(tmp, "fp_jax"), os.path.join(tmp, name))
  for d, _, files in os.walk(os.path.join(tmp, name)):
    for f in files:
      if f.endswith(".py"):
        p = os.path.join(d, f)
        src = open(p).read()
        src = src.replace("from fp_jax", f"from {name}").replace("import fp_jax",
                                                                  f"import {name}")
        open(p, "w").write(src)
  sys.path.insert(0, tmp)
  return name


# where a module of an older revision lives now (fp_jax's packages by idea)
HOMES = ("", "models.", "pruning.", "train.", "run.")


def _mod(pkg, name):
  """Module `name` (its old top-level name, or its path) of revision `pkg`, wherever that
  revision keeps it."""
  for home in HOMES:
    try:
      return importlib.import_module(f"{pkg}.{home}{name}")
    except ModuleNotFoundError as e:
      if not e.name or not e.name.startswith(f"{pkg}."):
        raise
  raise ModuleNotFoundError(f"{pkg}: no module {name}")


def _compute(pkg, params, x, dtype):
  if dtype == "float32":
    return params, x
  return _mod(pkg, "precision").compute(params, x, dtype)


def _supernet_api(pkg):
  """(optimizer(cfg, steps_per_epoch), make_step, state(params, opt_state), takes_lr) of
  revision pkg: search_steps' supernet_optimizer / make_supernet_step / SupernetState, or, in
  revisions before them, search's child_optimizer / make_child_step and a dict state;
  takes_lr: the step takes the learning rate as its last input (revisions with
  search_steps.supernet_schedule)."""
  try:
    steps = _mod(pkg, "search_steps")
  except ModuleNotFoundError:
    steps = None
  if hasattr(steps, "make_supernet_step"):
    return (steps.supernet_optimizer, steps.make_supernet_step, steps.SupernetState,
            hasattr(steps, "supernet_schedule"))
  search = _mod(pkg, "search")
  return (search.child_optimizer, search.make_child_step,
          lambda params, opt_state: {"params": params, "opt_state": opt_state}, False)


def supernet_step(pkg, num_layers, filters, batch, image, classes, dtype="float32", seed=0,
                  dispatch=None):
  """(compiled step, state, call(state, rep) -> (state, loss)) of the supernet step
  (search_steps.make_supernet_step) on a 1-device mesh, a fresh uniformly sampled arc every
  call; dispatch: its node slots' 'switch' | 'select' (None: the revision's default)."""
  parallel, space, supernet = _mod(pkg, "parallel"), _mod(pkg, "space"), _mod(pkg, "supernet")
  optimizer, make_step, state_of, takes_lr = _supernet_api(pkg)
  cfg = default.get_config().search
  tx, _ = optimizer(cfg, steps_per_epoch=100)
  mesh = parallel.make_mesh(jax.devices()[:1])
  plan = supernet.make_plan(num_layers, filters, (image, image, 3), classes)
  params = supernet.init(jax.random.key(seed), plan)
  state = parallel.replicate(mesh, state_of(params, tx.init(params)))
  x, y = parallel.shard(mesh, common.synthetic_batch(seed, batch, image, classes))
  lr = (jnp.asarray(cfg.lr_max, jnp.float32),) if takes_lr else ()
  extra = () if dtype == "float32" else (dtype,)
  step = make_step(plan, tx, cfg.aux_weight, cfg.keep_prob, mesh, *extra,
                   **({} if dispatch is None else {"dispatch": dispatch}))
  arc0 = jnp.asarray(space.parse_arc(space.ENAS_ARC))
  compiled, trace_s, compile_s = common.compile_timed(step, state, arc0, jax.random.key(0), x, y,
                                                      *lr)
  rng = np.random.default_rng(seed + 1)

  def call(state, rep):
    state, m = compiled(state, jnp.asarray(space.sample_uniform(rng)), jax.random.key(rep), x, y,
                        *lr)
    return state, float(m["loss"])
  return compiled, state, call, trace_s + compile_s


def fixed_step(pkg, num_layers, filters, batch, image, classes, dtype="float32", seed=0,
               arc=None):
  """The fixed network's training step as final training runs it (trainer.make_train_step:
  drop-path, dropout, aux head, running BN statistics), 1-device mesh."""
  parallel, space = _mod(pkg, "parallel"), _mod(pkg, "space")
  child, trainer, schedules = _mod(pkg, "child"), _mod(pkg, "train.trainer"), _mod(pkg, "schedules")
  f = default.get_config().final
  arc = space.parse_arc(space.ENAS_ARC) if arc is None else arc
  plan = child.make_plan(arc, num_layers, filters, (image, image, 3), classes)
  params, stats = child.init(jax.random.key(seed), plan)
  tx = schedules.momentum_lr_arg(f.momentum, f.l2, f.grad_clip)
  mesh = parallel.make_mesh(jax.devices()[:1])
  extra = () if dtype == "float32" else (dtype,)
  takes_arc = "arc" in inspect.signature(trainer.make_train_step).parameters   # revisions < 21
  step = trainer.make_train_step(plan, *((arc,) if takes_arc else ()), tx,
                                 (f.aux_weight, f.keep_prob, f.drop_path_keep_prob), seed, mesh,
                                 *extra)
  state = parallel.replicate(mesh, {"params": params, "stats": stats,
                                    "opt_state": tx.init(params)})
  x, y = parallel.shard(mesh, common.synthetic_batch(seed, batch, image, classes))
  scalars = lambda rep: (jnp.asarray(rep, jnp.int32), jnp.asarray(f.lr_max, jnp.float32),
                         jnp.asarray(0.5, jnp.float32))
  compiled, trace_s, compile_s = common.compile_timed(step, state, x, y, *scalars(0))

  def call(state, rep):
    state, m = compiled(state, x, y, *scalars(rep))
    return state, float(m["loss"])
  return compiled, state, call, trace_s + compile_s


def _torch(channels_last):
  def builder(*args):
    from bench import torch_peer   # pylint: disable=g-import-not-at-top
    return torch_peer.fixed_step(*args, channels_last=channels_last)
  return builder


def _supernet_select(*args):
  return supernet_step(*args, dispatch="select")


# torch / torch_cl: the eager PyTorch peer (bench/torch_peer.py), NCHW / channels_last,
# working tree and float32 only. supernet_select: the supernet step with branch-free slots
# (config.search.dispatch=select; revisions that have it).
BUILDERS = {"supernet": supernet_step, "supernet_select": _supernet_select,
            "fixed": fixed_step, "torch": _torch(False), "torch_cl": _torch(True)}
PEERS = ("torch", "torch_cl")


def build(kind, rev, args, dtype):
  return BUILDERS[kind](package(rev), args.num_layers, args.out_filters, args.batch,
                        args.image, args.classes, dtype, args.seed)


def xla_temp_bytes(compiled):
  try:
    return int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    return None


def rss_child(kind, rev, args, dtype, steps=2):
  """(peak RSS bytes, peak device bytes or None) of a fresh process that compiles one
  variant and runs `steps` steps (peaks are per process: interleaved variants would
  share one)."""
  code = ("import sys, json, argparse; sys.path.insert(0, %r)\n"
          "from fp_jax.run import memory\n"
          "if %r in ('', 'cur'): memory.install()\n"
          "from bench import steps\n"
          "a = argparse.Namespace(**json.loads(sys.argv[1]))\n"
          "c, s, call, _ = steps.build(%r, %r, a, %r)\n"
          "for i in range(%d): s, _ = call(s, i)\n"
          "print('PEAK', memory.peak_rss_bytes())\n"
          "print('DEVPEAK', memory.device_peak_bytes())\n") % (ROOT, rev, kind, rev, dtype, steps)
  import json
  keys = ("num_layers", "out_filters", "batch", "image", "classes", "seed")
  out = subprocess.run([sys.executable, "-c", code, json.dumps({k: getattr(args, k) for k in keys})],
                       capture_output=True, text=True, cwd=ROOT)
  found = {}
  for line in out.stdout.splitlines():
    key, _, value = line.partition(" ")
    if key in ("PEAK", "DEVPEAK"):
      found[key] = None if value == "None" else int(value)
  if "PEAK" not in found:
    common.log(f"rss_child {kind} {rev} {dtype} failed: {out.stderr[-2000:]}")
  return found.get("PEAK"), found.get("DEVPEAK")
