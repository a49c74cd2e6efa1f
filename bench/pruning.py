"""Cost of fake pruning in the controller's reward: PruneAcc vs TrainAcc evaluation.

  python -m bench.pruning [--num_layers 6 --out_filters 20 --batch 160 --image 32]

Times, interleaved over random arcs and per-stage ratios (all traced, each
function compiled once): (a) TrainAcc = supernet forward + accuracy, (b) PruneAcc
= masks.supernet_masks + masks.apply_supernet_masks + forward + accuracy,
(c) the mask transform alone (masks; masks + apply), and (d) the full reward
evaluation search_steps.make_reward_eval (both accuracies in one call). --batch is the
evaluation batch (search.eval_batch_size). Writes bench/results/pruning.json.
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

from bench import common
from configs import default
from fp_jax.run import parallel
from fp_jax.pruning import groups as groups_lib
from fp_jax.pruning import importance
from fp_jax.pruning import masks as masks_lib
from fp_jax.models import space
from fp_jax.models import supernet
from fp_jax.run.parallel import AXIS, BATCH, REPLICATED
from fp_jax.train import search_steps


def main():
  parser = common.add_size_flags(argparse.ArgumentParser(description=__doc__), steps=10)
  parser.add_argument("--criterion", default="l1", choices=importance.CRITERIA)
  args = parser.parse_args()
  shape = (args.image, args.image, 3)
  mesh = parallel.make_mesh(jax.devices()[:1])
  plan = supernet.make_plan(args.num_layers, args.out_filters, shape, args.classes)
  common.log("initialising the supernet")
  t = time.perf_counter()
  params = common.block(supernet.init(jax.random.key(args.seed), plan))
  init_s = time.perf_counter() - t
  params = parallel.replicate(mesh, params)
  n_params = int(sum(np.size(a) for a in jax.tree.leaves(params)))
  x, y = parallel.shard(mesh, common.synthetic_batch(args.seed, args.batch, args.image,
                                                     args.classes))

  def acc(p, arc, x, y):
    logits = supernet.forward(plan, p, arc, x, AXIS, with_aux=False)[0]
    return jax.lax.pmean(jnp.mean(jnp.argmax(logits, -1) == y), AXIS)

  def masked(p, arc, ratios, groups):
    masks = masks_lib.supernet_masks(plan, p, arc, ratios, groups, args.criterion)
    return masks_lib.apply_supernet_masks(plan, p, arc, masks)

  fns = {
      "train_acc": parallel.data_parallel(acc, mesh, (REPLICATED,) * 2 + (BATCH, BATCH),
                                          REPLICATED),
      "prune_acc": parallel.data_parallel(
          lambda p, arc, ratios, g, x, y: acc(masked(p, arc, ratios, g), arc, x, y), mesh,
          (REPLICATED,) * 4 + (BATCH, BATCH), REPLICATED),
      "masks": jax.jit(lambda p, arc, ratios, g: masks_lib.supernet_masks(plan, p, arc, ratios, g,
                                                                        args.criterion)),
      "masks_apply": jax.jit(masked),
      "reward_eval": search_steps.make_reward_eval(plan, args.criterion, mesh),
  }
  arc0 = jnp.asarray(space.sample_uniform(np.random.default_rng(args.seed)))
  r0 = jnp.zeros((5,), jnp.float32)
  g = lambda arc: groups_lib.supernet_groups(plan, np.asarray(arc))   # host-side, per arc
  call_args = {"train_acc": lambda arc, r: (params, arc, x, y),
               "prune_acc": lambda arc, r: (params, arc, r, g(arc), x, y),
               "masks": lambda arc, r: (params, arc, r, g(arc)),
               "masks_apply": lambda arc, r: (params, arc, r, g(arc)),
               "reward_eval": lambda arc, r: (params, arc, r, g(arc), jax.random.key(0), x, y)}
  compiled, compile_s = {}, {}
  for name, fn in fns.items():
    compiled[name], tr, co = common.compile_timed(fn, *call_args[name](arc0, r0))
    compile_s[name] = tr + co
    common.log(f"{name}: trace {tr:.1f}s compile {co:.1f}s")

  rng = np.random.default_rng(args.seed + 1)
  choices = np.asarray(default.get_config().search.ratio_choices, np.float32)
  reps = args.warmup + args.steps
  arcs = [jnp.asarray(space.sample_uniform(rng)) for _ in range(reps)]
  ratios = [jnp.asarray(rng.choice(choices, 5)) for _ in range(reps)]
  run = lambda name: lambda rep: common.block(compiled[name](*call_args[name](arcs[rep],
                                                                                  ratios[rep])))
  times, cpu = common.interleave({n: run(n) for n in fns}, args.steps, args.warmup)
  common.log("timed")
  res = {n: dict(common.summary(t, cpu[n]), compile_s=compile_s[n]) for n, t in times.items()}
  med = {n: r["median_s"] for n, r in res.items()}
  res["ratio_prune_over_train"] = med["prune_acc"] / med["train_acc"]
  res["ratio_reward_over_train"] = med["reward_eval"] / med["train_acc"]
  res["ratio_reward_over_train_plus_prune"] = med["reward_eval"] / (med["train_acc"]
                                                                     + med["prune_acc"])
  res["params"] = n_params
  res["supernet_init_s"] = init_s
  result = {"args": vars(args), "env": dict(common.environment(), loadavg_end=os.getloadavg()),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "results": res}
  path = common.write_json("pruning", args.out, result)
  img = lambda n: args.batch / med[n]
  rows = [["(a) TrainAcc eval: forward + acc", 1e3 * med["train_acc"], img("train_acc"),
           compile_s["train_acc"]],
          ["(b) PruneAcc eval: masks + apply + forward + acc", 1e3 * med["prune_acc"],
           img("prune_acc"), compile_s["prune_acc"]],
          ["(b) / (a) (target <= 1.2)", res["ratio_prune_over_train"], "", ""],
          ["(c) supernet_masks alone", 1e3 * med["masks"], "", compile_s["masks"]],
          ["(c) supernet_masks + apply_supernet_masks", 1e3 * med["masks_apply"], "",
           compile_s["masks_apply"]],
          ["(d) reward eval (both accs, make_reward_eval)", 1e3 * med["reward_eval"],
           img("reward_eval"), compile_s["reward_eval"]],
          ["(d) / (a)", res["ratio_reward_over_train"], "", ""],
          ["(d) / ((a) + (b))", res["ratio_reward_over_train_plus_prune"], "", ""],
          ["supernet.init (eager)", 1e3 * init_s, "", ""]]
  print(f"pruning: layers={args.num_layers} filters={args.out_filters} eval batch={args.batch} "
        f"image={args.image} criterion={args.criterion} supernet params={n_params} "
        f"({args.steps} timed reps over random arcs/ratios, medians)")
  print(common.table(["what", "median ms (or ratio)", "img/s", "compile s"], rows))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
