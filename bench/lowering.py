"""What the program's compiled functions hold when lowered for cpu, cuda and tpu, from this
CPU-only host (fp_jax/run/lowering.py: jax.export, no device needed).

For each config (default: the smoke config, the Fashion-MNIST config and its `_long`
variant, the paper's search / final sizes meant for a GPU) and each of its compiled
functions (the supernet step, the reward evaluation, the fixed network's training step,
the fused network at batch 1), the census of the exported module for each platform:
conditionals (stablehlo.case / if: on XLA:GPU each copies its predicate to the host and
waits), while loops, collectives, custom calls, host callbacks and operations per call
(lowering.census: a loop's ops times its trip count, a conditional's largest branch), and
the static count of conditionals in the module.
The steps are sharded over a mesh of --devices forced CPU devices (export records the
count, not the devices).

  python -m bench.lowering [--devices 8] [--configs smoke fashion fashion:a0.02_b20_long]

Writes bench/results/lowering.{json,md}.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", type=int, default=8, help="mesh size (forced CPU devices)")
  parser.add_argument("--configs", nargs="+",
                      default=["smoke", "fashion", "fashion:a0.02_b20_long"],
                      help="configs/NAME.py[:VARIANT]")
  parser.add_argument("--platforms", nargs="+", default=["cpu", "cuda", "tpu"])
  parser.add_argument("--out", default="", help="JSON path (default bench/results/lowering.json)")
  return parser.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:   # before JAX starts: the mesh's devices
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={ARGS.devices}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from bench import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from fp_jax.run import lowering  # pylint: disable=g-import-not-at-top,wrong-import-position
from fp_jax.run import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position

# image shape and classes of each dataset the configs name (data.py loads them)
DATASETS = {"digits": ((8, 8, 1), 10), "fashion_mnist": ((28, 28, 1), 10),
            "cifar10": ((32, 32, 3), 10), "synthetic": ((32, 32, 3), 10)}


def load_config(spec):
  name, _, variant = spec.partition(":")
  module = importlib.import_module(f"configs.{name}")
  return module.get_config(variant) if variant else module.get_config()


def sizes(config):
  s, f = config.search, config.final
  return {"search": f"{s.num_layers} layers F {s.out_filters}, batch {s.batch_size} / "
                    f"reward {s.eval_batch_size}",
          "final": f"{f.num_layers} layers F {f.out_filters}, batch {f.batch_size}",
          "data": config.data.name, "importance": config.search.importance,
          "dtype": config.dtype}


def run(args):
  mesh = parallel.make_mesh()
  results = {}
  for spec in args.configs:
    config = load_config(spec)
    image_shape, classes = DATASETS[config.data.name]
    results[spec] = {"sizes": sizes(config), "functions": {}}
    for platform in args.platforms:
      fns = lowering.functions(config, image_shape, classes, mesh, platform)
      for name, (fn, fargs, allow) in fns.items():
        t = time.perf_counter()
        exported = lowering.lower(fn, fargs, platform, allow)
        seconds = time.perf_counter() - t
        c = lowering.census(exported)
        c["static_conditionals"] = lowering.census(exported, per_call=False)["conditionals"]
        c["nr_devices"], c["export_s"] = exported.nr_devices, round(seconds, 2)
        results[spec]["functions"].setdefault(name, {})[platform] = c
        common.log(f"{spec} {name} {platform}: {c['conditionals']} conditionals, "
                   f"{c['collectives']} collectives, {c['custom_calls']} ({seconds:.1f} s)")
  return results


def to_markdown(result):
  lines = [f"Lowered with jax.export on a CPU-only host (jax {result['environment']['jax']}), "
           f"steps sharded over {result['devices']} devices; StableHLO as exported, before "
           "XLA's passes (e.g. its all-reduce combiner). Counts per call: a loop's ops times "
           "its trip count, a private function's per call site, a conditional's largest "
           "branch; `static`: the conditionals written in the module. Conditionals: "
           "stablehlo.case / if (on XLA:GPU each copies its predicate to the host); "
           "collectives: all-reduce, all-gather, reduce-scatter, collective-permute, "
           "all-to-all; host callbacks: Python callbacks, host send / recv.", ""]
  headers = ["function", "platform", "conditionals", "static", "whiles", "collectives",
             "custom calls", "host callbacks", "ops", "export s"]
  for spec, r in result["results"].items():
    lines += [f"## {spec}", "", "; ".join(f"{k}: {v}" for k, v in r["sizes"].items()), ""]
    rows = []
    for name, by_platform in r["functions"].items():
      for platform, c in by_platform.items():
        calls = ", ".join(f"{k} {v}" for k, v in c["custom_calls"].items()) or "0"
        rows.append([name, platform, c["conditionals"], c["static_conditionals"], c["whiles"],
                     c["collectives"], calls, c["host_callbacks"], c["ops"], c["export_s"]])
    lines += [common.table(headers, rows), ""]
  return "\n".join(lines)


def main():
  args = ARGS or parse_args()
  if jax.device_count() != args.devices:
    sys.exit(f"error: {jax.device_count()} devices, --devices={args.devices}: run as "
             f"`python -m bench.lowering` (it sets XLA_FLAGS before JAX starts)")
  result = {"command": "python -m bench.lowering " + " ".join(sys.argv[1:]),
            "environment": common.environment(), "devices": args.devices,
            "results": run(args)}
  path = common.write_json("lowering", args.out, result)
  with open(os.path.splitext(path)[0] + ".md", "w") as f:
    f.write(to_markdown(result) + "\n")
  common.log(f"wrote {path}")


if __name__ == "__main__":
  main()
