"""Search-size child training step: weight-sharing supernet vs the fixed network.

  python -m bench.search_step [--num_layers 6 --out_filters 20 --batch 160 --image 32]
                              [--dtype float32|bfloat16]

Times, interleaved, (a) the supernet step (search_steps.make_supernet_step, 1-device mesh)
with a freshly sampled arc every step, (a') the same step with one arc held
fixed, and (b) the fixed network (child.py) of that arc compiled statically with
the same optimizer, loss (cross-entropy + aux_weight * aux) and train-mode BN.
Also compile times, and the controller's sample / update of `--controller_num`
architectures; XLA temp bytes of both steps and the process's peak RSS after the
supernet's compile and first step (before the fixed network is built) and at the end.
Before/after a change, per dtype: bench/final_step.py --kind supernet --revs REV,cur.
Writes bench/results/search_step.json and prints a table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench import common
from configs import default
from fp_jax.models import child
from fp_jax.models import controller
from fp_jax.run import memory
from fp_jax.run import precision
from fp_jax.run import parallel
from fp_jax.models import space
from fp_jax.models import supernet
from fp_jax.train import losses as loss_lib
from fp_jax.train import search_steps


def make_fixed_step(plan, tx, aux_weight, dtype="float32"):
  """The fixed network's train step, equivalent to search_steps.make_supernet_step: (state,
  x, y, lr) -> (state, metrics)."""
  def step(state, x, y, lr):
    def loss_fn(params):
      pc, xc = precision.compute(params, x, dtype)
      logits, aux, stats = child.forward(plan, pc, state["stats"], xc, True)
      loss, (ce, acc) = loss_lib.classification_loss(logits, aux, y, aux_weight, None)
      return loss, (ce, acc, stats)

    (_, (ce, acc, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"], lr=lr)
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state, "stats": stats}, {"loss": ce, "acc": acc}

  return jax.jit(step, donate_argnums=(0,))


def temp_mb(compiled):
  """XLA's scratch memory of one call (allocated, and page-faulted, every call on CPU)."""
  try:
    return compiled.memory_analysis().temp_size_in_bytes / 2**20
  except Exception:   # not every backend reports it
    return None


def param_count(tree):
  return int(sum(np.size(a) for a in jax.tree.leaves(tree)))


def bench_child(args, arc):
  cfg = default.get_config().search
  shape = (args.image, args.image, 3)
  tx, _ = search_steps.supernet_optimizer(cfg, steps_per_epoch=100)
  lr = jnp.asarray(cfg.lr_max, jnp.float32)
  mesh = parallel.make_mesh(jax.devices()[:1])
  x_np, y_np = common.synthetic_batch(args.seed, args.batch, args.image, args.classes)

  # (a) supernet: one compilation for every arc
  splan = supernet.make_plan(args.num_layers, args.out_filters, shape, args.classes)
  t = time.perf_counter()
  sparams = common.block(supernet.init(jax.random.key(args.seed), splan))
  init_s = time.perf_counter() - t
  n_super = param_count(sparams)
  sstate = parallel.replicate(mesh, search_steps.SupernetState(sparams, tx.init(sparams)))
  sx, sy = parallel.shard(mesh, (x_np, y_np))
  sstep = search_steps.make_supernet_step(splan, tx, cfg.aux_weight, cfg.keep_prob, mesh, args.dtype)
  fixed_arc = jnp.asarray(arc)
  common.log(f"supernet: {n_super} params, compiling the step")
  scompiled, s_trace, s_compile = common.compile_timed(sstep, sstate, fixed_arc, jax.random.key(0), sx,
                                                         sy, lr)
  common.log(f"supernet step: trace {s_trace:.1f}s compile {s_compile:.1f}s")
  sstate, _ = scompiled(sstate, fixed_arc, jax.random.key(0), sx, sy, lr)
  super_rss = memory.peak_rss_bytes()   # compile + one step, before the fixed network
  common.log(f"supernet: peak RSS {super_rss / 2**30:.2f} GiB after compile and one step")

  # (b) the fixed network of `arc`
  fplan = child.make_plan(arc, args.num_layers, args.out_filters, shape, args.classes)
  fparams, fstats = child.init(jax.random.key(args.seed), fplan)
  n_fixed = param_count(fparams)
  fstate = {"params": fparams, "opt_state": tx.init(fparams), "stats": fstats}
  fx, fy = jnp.asarray(x_np), jnp.asarray(y_np)
  fstep = make_fixed_step(fplan, tx, cfg.aux_weight, args.dtype)
  fcompiled, f_trace, f_compile = common.compile_timed(fstep, fstate, fx, fy, lr)
  common.log(f"fixed step ({n_fixed} params): trace {f_trace:.1f}s compile {f_compile:.1f}s")

  rng = np.random.default_rng(args.seed + 1)
  arcs = [space.sample_uniform(rng) for _ in range(args.warmup + args.steps)]
  state = {"super": sstate, "fixed": fstate}
  losses = {}

  def run_super(a):
    def f(rep):
      state["super"], m = scompiled(state["super"], jnp.asarray(a(rep)), jax.random.key(rep),
                                    sx, sy, lr)
      losses.setdefault("super", []).append(float(m["loss"]))
    return f

  def run_fixed(rep):
    state["fixed"], m = fcompiled(state["fixed"], fx, fy, lr)
    losses.setdefault("fixed", []).append(float(m["loss"]))

  times, cpu = common.interleave({"supernet_sampled": run_super(lambda rep: arcs[rep]),
                             "supernet_same_arc": run_super(lambda rep: arc),
                             "fixed": run_fixed}, args.steps, args.warmup)
  common.log("supernet and fixed-network steps timed")
  assert all(np.isfinite(v) for l in losses.values() for v in l), losses
  res = {k: common.summary(v, cpu[k]) for k, v in times.items()}
  for v in res.values():
    v["img_s"] = args.batch / v["median_s"]
  res["compile"] = {"supernet_trace_s": s_trace, "supernet_compile_s": s_compile,
                    "fixed_trace_s": f_trace, "fixed_compile_s": f_compile,
                    "supernet_temp_mb": temp_mb(scompiled), "fixed_temp_mb": temp_mb(fcompiled)}
  res["supernet_init_s"] = init_s
  res["memory"] = {"supernet_peak_rss_bytes": super_rss,
                   "peak_rss_bytes_end": memory.peak_rss_bytes(),
                   "supernet_xla": memory.xla_memory(scompiled),
                   "fixed_xla": memory.xla_memory(fcompiled)}
  res["params"] = {"supernet": n_super, "fixed": n_fixed}
  res["ratio_fixed_over_supernet_sampled"] = (res["fixed"]["img_s"]
                                              / res["supernet_sampled"]["img_s"])
  res["ratio_fixed_over_supernet_same_arc"] = (res["fixed"]["img_s"]
                                               / res["supernet_same_arc"]["img_s"])
  return res


def bench_controller(args):
  ccfg = controller.ControllerConfig()
  cstate = controller.init_state(jax.random.key(args.seed), ccfg)
  num = args.controller_num
  keys = jax.random.split(jax.random.key(args.seed + 2), args.controller_calls + args.warmup + 2)
  c_sample, sample_trace, sample_compile = common.compile_timed(
      controller.sample_jit, cstate.params, keys[0], num=num, cfg=ccfg)
  sampled = c_sample(cstate.params, keys[0])
  rewards = jnp.asarray(np.random.default_rng(args.seed).uniform(0, 1, num), jnp.float32)
  c_update, update_trace, update_compile = common.compile_timed(
      controller.update_jit, cstate, sampled["arc"], sampled["ratio_idx"], rewards, cfg=ccfg)
  state = {"c": cstate, "s": sampled}

  def sample(rep):
    state["s"] = common.block(c_sample(state["c"].params, keys[rep + 1]))

  def update(rep):
    state["c"], _ = common.block(c_update(state["c"], state["s"]["arc"],
                                          state["s"]["ratio_idx"], rewards))

  times, cpu = common.interleave({"sample": sample, "update": update}, args.controller_calls,
                            max(args.warmup, 2))
  res = {k: common.summary(v, cpu[k]) for k, v in times.items()}
  res["compile"] = {"sample_trace_s": sample_trace, "sample_compile_s": sample_compile,
                    "update_trace_s": update_trace, "update_compile_s": update_compile}
  res["num"] = num
  return res


def main():
  parser = common.add_size_flags(argparse.ArgumentParser(description=__doc__), steps=3)
  parser.add_argument("--arc", default="enas",
                      help="arc of the fixed network: 'enas', 'uniform' (seeded) or 40 ints")
  parser.add_argument("--controller_num", type=int, default=10)
  parser.add_argument("--controller_calls", type=int, default=50)
  parser.add_argument("--skip_child", action="store_true")
  parser.add_argument("--dtype", default="float32", choices=precision.DTYPES)
  args = parser.parse_args()
  memory.install()
  if args.arc == "enas":
    arc = space.parse_arc(space.ENAS_ARC)
  elif args.arc == "uniform":
    arc = space.sample_uniform(np.random.default_rng(args.seed))
  else:
    arc = space.parse_arc(args.arc)

  result = {"args": vars(args), "arc": space.arc_to_string(arc), "env": common.environment(),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}
  rows = []
  if not args.skip_child:
    r = result["child_step"] = bench_child(args, arc)
    c = r["compile"]
    cpu = lambda k: [r[k]["median_user_s"], r[k]["median_sys_s"]]
    rows += [
        ["supernet step, sampled arcs", r["supernet_sampled"]["img_s"],
         1e3 * r["supernet_sampled"]["median_s"], *cpu("supernet_sampled"),
         c["supernet_trace_s"] + c["supernet_compile_s"]],
        ["supernet step, same arc", r["supernet_same_arc"]["img_s"],
         1e3 * r["supernet_same_arc"]["median_s"], *cpu("supernet_same_arc"), "(same executable)"],
        ["fixed network step", r["fixed"]["img_s"], 1e3 * r["fixed"]["median_s"], *cpu("fixed"),
         c["fixed_trace_s"] + c["fixed_compile_s"]],
        ["fixed / supernet sampled (target <= 1.5)", r["ratio_fixed_over_supernet_sampled"],
         "", "", "", ""],
        ["fixed / supernet same arc", r["ratio_fixed_over_supernet_same_arc"], "", "", "", ""],
        ["supernet.init (eager)", "", 1e3 * r["supernet_init_s"], "", "", ""],
        ["XLA temp MB per step: supernet / fixed", f"{c['supernet_temp_mb']:.0f} / "
         f"{c['fixed_temp_mb']:.0f}", "", "", "", ""],
        ["peak RSS GiB: supernet (compile + 1 step) / whole run",
         f"{r['memory']['supernet_peak_rss_bytes'] / 2**30:.2f} / "
         f"{r['memory']['peak_rss_bytes_end'] / 2**30:.2f}", "", "", "", ""]]
  r = result["controller"] = bench_controller(args)
  c = r["compile"]
  rows += [[f"controller sample_jit num={r['num']}", "", 1e3 * r["sample"]["median_s"], "", "",
            c["sample_trace_s"] + c["sample_compile_s"]],
           [f"controller update_jit num={r['num']}", "", 1e3 * r["update"]["median_s"], "", "",
            c["update_trace_s"] + c["update_compile_s"]]]
  result["env"]["loadavg_end"] = os.getloadavg()
  path = common.write_json("search_step", args.out, result)
  print(f"search step: layers={args.num_layers} filters={args.out_filters} batch={args.batch} "
        f"image={args.image} arc='{result['arc']}' ({args.steps} timed reps, medians)")
  print(common.table(["what", "img/s", "median ms", "user cpu s", "sys cpu s", "compile s"],
                     rows))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
