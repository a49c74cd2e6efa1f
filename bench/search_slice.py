"""A real search slice, for device checks: two epochs of the search as the program runs them
(Search.run_epoch: `--steps` supernet steps on host-built batches, then one controller update
whose `--rewards` samples each get one reward evaluation), on synthetic data of CIFAR's shape
at the config's search size. The first epoch compiles; the second is timed under
jax.profiler (a trace TensorBoard's profile plugin reads).

  python -m bench.search_slice [--config configs/cifar.py] [--steps 20] [--rewards 10] \
      [--dispatch auto] [--trace_dir DIR] [--small] [--out JSON]

--small: 1 layer, F 4, batch 8 (a dry run on CPU). Prints and writes one JSON object.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def load_config(path):
  spec = importlib.util.spec_from_file_location("slice_config", os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/cifar.py")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--rewards", type=int, default=10)
  p.add_argument("--dispatch", default="auto", help="search.dispatch")
  p.add_argument("--trace_dir", default="", help="jax.profiler trace (default: a temp dir)")
  p.add_argument("--small", action="store_true")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)

  import jax   # pylint: disable=g-import-not-at-top
  from fp_jax import config as config_lib   # pylint: disable=g-import-not-at-top
  from fp_jax import data   # pylint: disable=g-import-not-at-top
  from fp_jax.models import slot_ops   # pylint: disable=g-import-not-at-top
  from fp_jax.train import search as search_lib   # pylint: disable=g-import-not-at-top

  config = load_config(args.config)
  s = config.search
  config.data.name = "synthetic"
  if args.small:
    s.num_layers, s.out_filters, s.batch_size, s.eval_batch_size = 1, 4, 8, 8
  s.epochs, s.steps_per_epoch = 2, args.steps
  s.controller_updates, s.controller_samples, s.uniform_child_epochs = 1, args.rewards, 0
  s.dispatch = args.dispatch
  config_lib.validate(config)
  ds = data.load("synthetic", s.eval_batch_size,
                 synthetic_sizes=(s.batch_size * args.steps, s.eval_batch_size))
  t = time.perf_counter()
  srch = search_lib.Search.build(config, ds, config_lib.ratio_choices(config))
  build_s = time.perf_counter() - t
  state = srch.init_state()
  t = time.perf_counter()
  state, first, _ = srch.run_epoch(state)
  first_s = time.perf_counter() - t
  trace = args.trace_dir or tempfile.mkdtemp(prefix="search_slice_trace_")
  t = time.perf_counter()
  with jax.profiler.trace(trace):
    state, second, _ = srch.run_epoch(state)
  second_s = time.perf_counter() - t
  files = [os.path.join(d, f) for d, _, fs in os.walk(trace) for f in fs]
  result = {
      "device": str(jax.devices()[0]), "backend": jax.default_backend(),
      "devices": jax.device_count(), "config": args.config, "small": args.small,
      "search": {k: s[k] for k in ("num_layers", "out_filters", "batch_size",
                                   "eval_batch_size")},
      "dispatch": slot_ops.resolve_dispatch(s.dispatch, jax.default_backend()),
      "supernet_steps": args.steps,
      "reward_evaluations": args.rewards, "build_s": build_s,
      "epoch1_s (compiles)": first_s, "epoch2_s (profiled)": second_s,
      "epoch2_step_ms": 1e3 * second["step_time"], "epoch2_images_per_sec":
          second["images_per_sec"],
      "epoch2_controller_and_rewards_s": second_s - second["step_time"] * args.steps,
      "child_loss": [first["child_loss"], second["child_loss"]],
      "trace_dir": trace, "trace_bytes": sum(os.path.getsize(f) for f in files),
      "trace_files": len(files)}
  text = json.dumps(result, indent=1)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
