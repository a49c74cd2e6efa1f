"""Training-step speed and memory: the fixed network at final size (default) or the
supernet, per code revision and compute dtype, beside the eager PyTorch peer,
interleaved in one process.

  python -m bench.final_step [--kind fixed|supernet] [--revs cur] [--dtypes float32,bfloat16]
                             [--num_layers 15 --out_filters 36 --batch 144 --image 32]
  python -m bench.final_step --kind supernet --num_layers 6 --out_filters 20 --batch 160 \\
                             --revs b2541a7,cur --name search_step_revisions
  python -m bench.final_step --kind supernet,torch,torch_cl --dtypes float32 \\
                             --num_layers 6 --out_filters 20 --batch 160 --name vs_torch

--kind supernet,supernet_select times the supernet step's lax.switch slots against its
branch-free ones (config.search.dispatch). --kind takes several kinds: `torch` / `torch_cl` are the eager PyTorch build of the fixed
ENAS-arc network (bench/torch_peer.py, NCHW / channels_last; needs bench/requirements.txt),
checked equal to fp_jax's network before it is timed.

Each variant (revision x dtype) is compiled once (trace + compile seconds, XLA temp bytes
from compiled.memory_analysis()) and called once per repetition, the order rotating
(bench/common.py: medians of wall and CPU seconds; load average recorded). Peak RSS is
per process, so each variant's is measured in a fresh process of its own (compile plus
two steps; the working tree's runs install fp_jax.run.memory's post-compile heap trim, as
the program does). `--revs` names git revisions (bench/steps.py exports them as
renamed packages); `cur` is the working tree. Writes bench/results/<name>.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # pylint: disable=g-import-not-at-top
from bench import steps
from fp_jax.run import memory


def parse(argv=None, kind="fixed", size=(15, 36, 144)):
  p = common.add_size_flags(argparse.ArgumentParser(description=__doc__), steps=3)
  p.set_defaults(num_layers=size[0], out_filters=size[1], batch=size[2])
  p.add_argument("--kind", default=kind,
                 help=f"comma-separated, of {sorted(steps.BUILDERS)}; the peers {steps.PEERS} "
                      "run the working tree in float32 only")
  p.add_argument("--revs", default="cur", help="comma-separated git revisions; cur = working tree")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--no_rss", action="store_true", help="skip the per-variant RSS processes")
  p.add_argument("--name", default="", help="results file name (default final_step / <kind>_step)")
  return p.parse_args(argv)


def run(args):
  memory.install()
  kinds, revs, dtypes = args.kind.split(","), args.revs.split(","), args.dtypes.split(",")
  for kind in kinds:
    if kind not in steps.BUILDERS:
      raise SystemExit(f"error: --kind {kind!r}: must be among {sorted(steps.BUILDERS)}")
  variants, info = {}, {}
  # older revisions: float32 only; the peers: the working tree in float32 only
  combos = [(k, r, d) for k in kinds for r in revs for d in dtypes
            if (d == "float32" or r == "cur") and (k not in steps.PEERS or
                                                   (r, d) == ("cur", "float32"))]
  for kind, rev, dtype in combos:
    name = f"{rev}/{dtype}" if len(kinds) == 1 else f"{kind} {rev}/{dtype}"
    common.log(f"{name}: building")
    compiled, state, call, compile_s = steps.build(kind, rev, args, dtype)
    box = {"state": state, "losses": []}

    def f(rep, box=box, call=call):
      box["state"], loss = call(box["state"], rep)
      box["losses"].append(loss)
    variants[name] = f
    info[name] = {"kind": kind, "rev": rev, "dtype": dtype, "compile_s": compile_s,
                  "xla_temp_bytes": steps.xla_temp_bytes(compiled), "losses": box["losses"]}
    common.log(f"{name}: compile {compile_s:.1f}s, temp "
               f"{(info[name]['xla_temp_bytes'] or 0) / 2**20:.0f} MiB")
  load0 = os.getloadavg()
  wall, cpu = common.interleave(variants, args.steps, args.warmup)
  load1 = os.getloadavg()
  for name in variants:
    s = common.summary(wall[name], cpu[name])
    info[name].update(s, img_s=args.batch / s["median_s"])
    if not args.no_rss:
      kind, rev, dtype = info[name]["kind"], info[name]["rev"], info[name]["dtype"]
      info[name]["peak_rss_bytes"], info[name]["peak_device_bytes"] = steps.rss_child(
          kind, rev, args, dtype)
  return info, load0, load1


def main(argv=None, kind="fixed", size=(15, 36, 144)):
  args = parse(argv, kind, size)
  info, load0, load1 = run(args)
  gib = lambda b: "" if b is None else f"{b / 2**30:.2f}"
  rows = [[name, v["img_s"], 1e3 * v["median_s"], v["median_user_s"], v["median_sys_s"],
           gib(v.get("peak_rss_bytes")), gib(v.get("peak_device_bytes")),
           gib(v["xla_temp_bytes"]), v["compile_s"]] for name, v in info.items()]
  headers = ["revision/dtype", "img/s", "step ms (median)", "user cpu s", "sys cpu s",
             "peak RSS GiB", "peak device GiB", "XLA temp GiB", "compile s"]
  title = (f"{args.kind} step: layers={args.num_layers} filters={args.out_filters} "
           f"batch={args.batch} image={args.image}, {args.steps} timed reps (medians), "
           f"load average {load0[0]:.1f} -> {load1[0]:.1f} on {os.cpu_count()} cores")
  table = common.table(headers, rows)
  name = args.name or ("final_step" if args.kind == "fixed" else
                       f"{args.kind.replace(',', '_')}_step")
  result = {"args": vars(args), "env": common.environment(), "loadavg_start": load0,
            "process_peak_rss_bytes": memory.peak_rss_bytes(),
            "process_peak_device_bytes": memory.device_peak_bytes(),
            "loadavg_end": load1, "variants": info, "table": table}
  path = common.write_json(name, args.out, result)
  with open(os.path.splitext(path)[0] + ".md", "w") as f:
    f.write(f"{title}\n\n{table}\n")
  print(title)
  print(table)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
