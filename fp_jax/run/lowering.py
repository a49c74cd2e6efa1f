"""The program's compiled functions lowered for a named platform without its device, and a
census of what the lowered modules hold.

  lower(fn, args, platform, allow=())  -> jax.export.Exported (StableHLO for `platform`)
  census(exported or module text, per_call=True)
                                       -> {conditionals, whiles, collectives, custom_calls
                                           {target: n}, host_callbacks, ops, unknown_trips}
  functions(config, image_shape, num_classes, mesh, platform)
                                       -> {name: (jitted fn, abstract args, allow)}: the
                                          supernet step, the reward evaluation, the fixed
                                          network's step and the fused network

`jax.export.export(jit_fn, platforms=[p])` lowers for cpu, cuda, rocm or tpu on a CPU-only
install (lowering needs no device; compiling would). What differs by platform is decided
while tracing: layers.depthwise_conv's and fused.depthwise's 'auto' pick shifted sums (and
on CPU fp_jax's FFI kernel) there, grouped convolutions elsewhere; config.search.dispatch
'auto' picks branch-free 'select' slots for cuda / rocm and lax.switch conditionals for
cpu / tpu (slot_ops.resolve_dispatch of the target platform). `lower` traces under
`traced_for(platform)` and `functions` builds the fused network for `platform`, so the
module is the one that platform's process would build. jit caches its traces per function,
so build a function anew for each platform (`functions` does).

Sharded steps (jit of shard_map over mesh axis `data`): export records the mesh's device
count (`Exported.nr_devices`), not its devices, so a mesh of this host's CPU devices
serves for any platform: export for N accelerators from a mesh of N CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N). An AbstractMesh handed to shard_map
is not enough with jax 0.10.2: jit without explicit in/out shardings (parallel.data_parallel)
then exports nr_devices 1 around collectives over N devices.

jax.export refuses custom calls without a compatibility guarantee (fp_jax's depthwise
kernel, kernels.TARGET, and its training kernels, kernels.TRAIN_TARGETS) unless named in `allow`,
and (jax 0.10.2) host callbacks outright, so an export that succeeds holds neither unless
allowed; `census` also reads the text of jit(f).lower(...).as_text(), which may hold both.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from fp_jax.infer import folding
from fp_jax.infer import fused
from fp_jax.infer import kernels
from fp_jax.infer import networks
from fp_jax.models import slot_ops
from fp_jax.models import child
from fp_jax.models import layers
from fp_jax.models import space
from fp_jax.models import supernet
from fp_jax.pruning import groups as groups_lib
from fp_jax.run import precision
from fp_jax.train import schedules
from fp_jax.train import search_steps
from fp_jax.train import trainer

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
CONDITIONALS = ("stablehlo.case", "stablehlo.if")
COLLECTIVES = ("stablehlo.all_reduce", "stablehlo.all_gather", "stablehlo.reduce_scatter",
               "stablehlo.collective_permute", "stablehlo.all_to_all",
               "stablehlo.collective_broadcast")
FUNCTIONS = ("supernet_step", "reward_eval", "fixed_step", "fused_network")

# one operation per statement: `[%r[:n][, ...] =] "dialect.op"(...)` or `dialect.op ...`;
# func's own ops print without their dialect inside a function (`return`, `call @f`)
_OP = re.compile(r'^(\s*)(?:%[\w#:, %]*=\s*)?"?([a-z_]\w*\.[\w.]+|return|call)\b')
_FUNC = re.compile(r"^\s*func\.func\s+(?:public\s+|private\s+)?@([\w.$-]+)")
_CALLEE = re.compile(r"call\s+@([\w.$-]+)|callee\s*=\s*@([\w.$-]+)")
_TARGET = re.compile(r'custom_call\s+@([\w.$-]+)|call_target_name\s*=\s*"([^"]+)"')
_HOST = re.compile(r"callback", re.I)
_CONST = re.compile(r"^\s*(%[\w]+) = stablehlo\.constant dense<(-?\d+)> : tensor<[iu]\d+>")
_COMPARE = re.compile(r"stablehlo\.compare\s+LT,\s*(%[\w#]+),\s*(%[\w#]+)")


def _resolve_auto(impl, platform):
  """layers.depthwise_conv's 'auto' as a `platform` process resolves it."""
  return ("shift" if platform == "cpu" else "xla") if impl == "auto" else impl


@contextlib.contextmanager
def traced_for(platform, matmul_precision="auto"):
  """Traces made inside see `platform`'s choices: layers.DEPTHWISE_IMPL and SEP_IMPL 'auto'
  resolved (fp_jax's CPU training kernel on cpu only), and config.matmul_precision resolved
  for it (precision.AUTO_MATMUL: bfloat16 passes on TPU)."""
  if platform not in PLATFORMS:
    raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
  old, old_sep = layers.DEPTHWISE_IMPL, layers.SEP_IMPL
  if old_sep == "auto":
    layers.SEP_IMPL = "kernel" if platform == "cpu" and old == "auto" else "xla"
  layers.DEPTHWISE_IMPL = _resolve_auto(old, platform)
  try:
    with jax.default_matmul_precision(
        precision.resolve_matmul_precision(matmul_precision, platform)):
      yield
  finally:
    layers.DEPTHWISE_IMPL, layers.SEP_IMPL = old, old_sep


def fused_options(opts, platform):
  """fused.Options for a network lowered for `platform`: off CPU, depthwise 'auto' is
  'xla' (fused.depthwise_impl) and fp_jax's CPU kernel is refused."""
  if platform == "cpu":
    return opts
  impl = fused.depthwise_impl(opts.depthwise, platform=platform)
  if impl == "kernel":
    raise ValueError(f"depthwise 'kernel' (kernels.py) is CPU-only, not for {platform}")
  return dataclasses.replace(opts, depthwise=impl)


def abstract(tree):
  """jax.ShapeDtypeStruct of every leaf (arrays, numpy arrays, PRNG keys)."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), tree)


def lower(fn, args, platform, allow=()):
  """jax.export of jitted `fn` on `args` (arrays or ShapeDtypeStructs) for `platform`,
  traced under traced_for(platform). allow: custom-call targets to export although they
  carry no compatibility guarantee (e.g. kernels.TARGET on cpu)."""
  checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in allow]
  with traced_for(platform):
    return jax.export.export(fn, platforms=[platform], disabled_checks=checks)(*args)


def _trips(lines, i, consts):
  """Iterations of the stablehlo.while on lines[i] (a counted loop: its cond region
  compares an iteration argument LT a constant, from a constant start), else None."""
  indent = len(lines[i]) - len(lines[i].lstrip())
  for line in lines[i + 1:]:
    if len(line) - len(line.lstrip()) <= indent and line.lstrip().startswith("}"):
      return None                                     # the end of the cond region
    m = _COMPARE.search(line)
    if m:
      init = re.search(re.escape(m.group(1)) + r" = (%[\w#]+)[,)]", lines[i])
      lo, hi = consts.get(init.group(1)) if init else None, consts.get(m.group(2))
      return None if lo is None or hi is None else max(hi - lo, 0)
  return None


def _close(frame, parent, per_call):
  """Adds an ended loop's or conditional's counts to its parent's current branch: a loop's
  times its trips, a conditional's largest branch per key (per call) or all branches."""
  _, kind, trips, branches = frame
  if kind == "loop":
    parent[3][-1].update({k: v * trips for k, v in branches[0].items()})
  elif per_call:
    parent[3][-1].update({k: max(b[k] for b in branches) for k in set().union(*branches)})
  else:
    parent[3][-1].update(sum(branches, collections.Counter()))


def _function_counts(lines, per_call):
  """Counter of one function's lines: op names, 'target:T' per custom call, 'host' per
  host callback, 'call:F' per call of function F, 'trips:unknown' per uncounted loop;
  per_call: a loop's ops times its trips, a conditional's largest branch."""
  consts = {m.group(1): int(m.group(2)) for m in map(_CONST.match, lines) if m}
  frames = [(-1, "root", 1, [collections.Counter()])]   # (indent, kind, trips, branches)
  for i, line in enumerate(lines):
    m = _OP.match(line)
    indent = len(line) - len(line.lstrip())
    if not m:
      if line.lstrip().startswith("}"):                # regions deeper than this one ended
        while frames[-1][0] > indent:
          _close(frames.pop(), frames[-1], per_call)
        if frames[-1][1] == "cond" and frames[-1][0] == indent and line.lstrip().startswith(
            "}, {"):
          frames[-1][3].append(collections.Counter())  # the next branch
      continue
    while frames[-1][0] >= indent:
      _close(frames.pop(), frames[-1], per_call)
    kind = {"return": "func.return", "call": "func.call"}.get(m.group(2), m.group(2))
    counts = frames[-1][3][-1]
    counts[kind] += 1
    if kind == "func.call":
      counts.update("call:" + (a or b) for a, b in _CALLEE.findall(line)[:1])
    elif kind == "stablehlo.custom_call":
      target = next(a or b for a, b in _TARGET.findall(line))
      counts["target:" + target] += 1
      counts["host"] += bool(_HOST.search(target))
    elif kind in ("stablehlo.send", "stablehlo.recv"):
      counts["host"] += "is_host_transfer = true" in line
    elif kind == "stablehlo.while":
      trips = _trips(lines, i, consts)
      counts["trips:unknown"] += trips is None
      frames.append((indent, "loop", trips if per_call and trips is not None else 1,
                     [collections.Counter()]))
    elif kind in CONDITIONALS:
      frames.append((indent, "cond", 1, [collections.Counter()]))
  while len(frames) > 1:
    _close(frames.pop(), frames[-1], per_call)
  return frames[0][3][0]


def census(module, per_call=True):
  """Counts of what the module's public function holds:

    conditionals    stablehlo.case + stablehlo.if (XLA conditionals: on GPU each copies
                    its predicate to the host and waits)
    whiles          stablehlo.while
    collectives     all_reduce, all_gather, reduce_scatter, collective_permute,
                    all_to_all, collective_broadcast
    custom_calls    {call target: count}
    host_callbacks  custom calls to Python callbacks (target *callback*) and host
                    send / recv (TPU's callbacks)
    ops             operations, one per statement as printed (a pretty-printed reduce's
                    `applies` body is part of its statement)
    unknown_trips   loops whose trip count is not a constant (counted once)

  per_call True: as one call runs them: a loop's ops times its trip count (counted loops:
  scan, fori_loop), a private function's once per call site, a conditional's largest
  branch (per key: an upper bound); False: each op as written in the module, once.
  module: a jax.export.Exported or StableHLO text (e.g. jit(f).lower(...).as_text())."""
  text = module if isinstance(module, str) else module.mlir_module()
  funcs, name = {}, None
  for line in text.splitlines():
    m = _FUNC.match(line)
    if m:
      name = m.group(1)
      funcs[name] = []
    elif name is not None and not line.startswith("#"):
      funcs[name].append(line)
  counted = {n: _function_counts(lines, per_call) for n, lines in funcs.items()}

  @functools.cache
  def total(n):
    out = collections.Counter()
    for k, v in counted[n].items():
      out.update({k2: v * v2 for k2, v2 in total(k[5:]).items()} if k.startswith("call:")
                 else {k: v})
    return out

  if per_call:
    c = total("main" if "main" in funcs else next(iter(funcs)))
  else:
    c = sum(counted.values(), collections.Counter())
  ops = {k: v for k, v in c.items() if ":" not in k and k != "host"}
  return {"conditionals": sum(c[k] for k in CONDITIONALS), "whiles": c["stablehlo.while"],
          "collectives": sum(c[k] for k in COLLECTIVES),
          "custom_calls": {k[7:]: v for k, v in sorted(c.items()) if k.startswith("target:")},
          "host_callbacks": c["host"], "ops": sum(ops.values()),
          "unknown_trips": c["trips:unknown"]}


# ---------------------------------------------------------------- the program's functions


def _batch(batch, image_shape):
  return (jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32),
          jax.ShapeDtypeStruct((batch,), jnp.int32))


def functions(config, image_shape, num_classes, mesh, platform, arc=None, batch=1):
  """{name: (jitted fn, abstract args, allowed custom calls)} of config's compiled
  functions, built for `platform` (FUNCTIONS order):

    supernet_step   search_steps.make_supernet_step at search.{num_layers, out_filters,
                    batch_size}: (state, arc [40], key, x, y, lr)
    reward_eval     search_steps.make_reward_eval at search.eval_batch_size with
                    search.importance: (params, arc, ratios [5], groups, key, x, y)
    fixed_step      trainer.make_train_step of `arc` at final.{num_layers, out_filters,
                    batch_size}: (state, x, y, step, lr, progress)
    fused_network   fused.forward of `arc`'s final network (random folded weights baked in
                    as constants) at `batch` images: x [batch, H, W, C] -> logits

  The supernet step and reward evaluation run their slots as `platform`'s process would:
  slot_ops.resolve_dispatch(search.dispatch, platform).
  arc: int [40] (default: ENAS's published cell); mesh: parallel.make_mesh's (its size
  divides the batches); image_shape (H, W, C)."""
  s, f, dtype = config.search, config.final, config.dtype
  arc = np.asarray(space.parse_arc(space.ENAS_ARC) if arc is None else arc, np.int32)
  key, arc_spec = jax.eval_shape(lambda: jax.random.key(0)), abstract(arc)
  out = {}

  plan = supernet.make_plan(s.num_layers, s.out_filters, tuple(image_shape), num_classes)
  tx, _ = search_steps.supernet_optimizer(s, steps_per_epoch=1)
  params = jax.eval_shape(lambda: supernet.init(jax.random.key(0), plan, s.init_scale,
                                                s.final_init, s.share_inputs))
  state = search_steps.SupernetState(params, jax.eval_shape(tx.init, params))
  dispatch = slot_ops.resolve_dispatch(s.dispatch, platform)
  step = search_steps.make_supernet_step(plan, tx, s.aux_weight, float(s.keep_prob), mesh,
                                         dtype, dispatch)
  # the steps (and the reward evaluation) run fp_jax's training kernels on cpu
  steps_allow = (kernels.TRAIN_TARGETS
                 if platform == "cpu" and kernels.available() else ())
  scalar = lambda t: jax.ShapeDtypeStruct((), t)
  out["supernet_step"] = (step, (state, arc_spec, key, *_batch(s.batch_size, image_shape),
                                 scalar(jnp.float32)), steps_allow)
  evaluate = search_steps.make_reward_eval(plan, s.importance, mesh, dtype, dispatch)
  groups = abstract(groups_lib.supernet_groups(plan, arc))
  out["reward_eval"] = (evaluate, (params, arc_spec, jax.ShapeDtypeStruct((5,), jnp.float32),
                                   groups, key, *_batch(s.eval_batch_size, image_shape)),
                         steps_allow)

  cplan = child.make_plan(arc, f.num_layers, f.out_filters, tuple(image_shape), num_classes)
  ftx = schedules.momentum_lr_arg(f.momentum, f.l2, f.grad_clip)
  cparams, stats = jax.eval_shape(lambda: child.init(jax.random.key(0), cplan))
  net = {"params": cparams, "stats": stats, "opt_state": jax.eval_shape(ftx.init, cparams)}
  fstep = trainer.make_train_step(cplan, ftx, (f.aux_weight, f.keep_prob,
                                               f.drop_path_keep_prob), config.seed, mesh, dtype)
  out["fixed_step"] = (fstep, (net, *_batch(f.batch_size, image_shape), scalar(jnp.int32),
                               scalar(jnp.float32), scalar(jnp.float32)), steps_allow)

  opts = fused_options(fused.Options(dtype=dtype), platform)
  fp = folding.folded(cplan, *networks.random_init(cplan, 0), opts.pad_channels)
  fp = jax.tree.map(lambda a: np.asarray(a).astype(jnp.dtype(dtype)), fp)   # as fused.Fused
  network = lambda x: fused.forward(cplan, fp, x.astype(dtype), opts).astype(jnp.float32)
  allow = (kernels.TARGET,) if platform == "cpu" and kernels.available() else ()
  out["fused_network"] = (jax.jit(network), (_batch(batch, image_shape)[0],), allow)
  return out
