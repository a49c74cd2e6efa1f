"""Where the native engine's batch-1 time goes: each kind of instruction timed alone.

  python -m bench.native_parts [--num_layers 15 --out_filters 36 --image 32 --channels 3]
                               [--ratio 0] [--cpus 1] [--threads 0] [--calls 300]

The published ENAS arc at the given size, random weights (networks.random_init; --ratio r
compacts every stage by r), folded as the fused path folds it (fused.Fused, engine xla) and
built into one native program (native.build). Compiles the program as it is, with only one
kind of instruction run (`native.network(..., skip=...)` skips the others: the values are
then meaningless, the work per instruction is the same) and with none run (the call's own
cost), and times them interleaved (latency.interleave, medians). On a CPU with AVX-512 the
whole program, its GEMMs alone and its depthwise alone also run on the kernels
native.vector_isa did not pick ('[avx2]' or '[avx512]' rows). Multiply-adds per kind come from the program's own instructions. Writes bench/results/<name>.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--num_layers", type=int, default=15)
  p.add_argument("--out_filters", type=int, default=36)
  p.add_argument("--image", type=int, default=32, help="height = width")
  p.add_argument("--channels", type=int, default=3)
  p.add_argument("--ratio", type=float, default=0.0, help="prune every stage by this ratio")
  p.add_argument("--calls", type=int, default=300, help="batch-1 calls timed per variant")
  p.add_argument("--cpus", type=int, default=1, help="pin to this many cores (0: all)")
  p.add_argument("--threads", type=int, default=0, help="native.network threads (0: all)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--name", default="native_parts")
  return p.parse_args(argv)


def macs_by_kind(prog, weighted=True):
  """{op name: multiply-adds (gemm, convk, dw) or elements written (the others)} of a Program;
  a GEMM's over the input channels it reads (weighted: its `kw`) or over all of them."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fp_jax.infer import native  # pylint: disable=g-import-not-at-top
  f = native.F
  _, bufs, ins, _ = native.parse(prog.prog)
  names = {v: k for k, v in native.OPS.items()}
  out = {}
  for r in ins:
    op, x, y = names[int(r[f["op"]])], bufs[r[f["in0"]]], bufs[r[f["out"]]]
    pixels, c = int(y[1] * y[2]), int(x[3])
    kw = int(r[f["kw"]]) if weighted else c
    n = {"gemm": pixels * kw * int(r[f["n"]]), "dw": pixels * c * int(r[f["k"]]) ** 2,
         "convk": pixels * c * int(r[f["k"]]) ** 2 * int(r[f["n"]])}.get(op, pixels * c)
    out[op] = out.get(op, 0) + n
  return {k: int(v) for k, v in out.items()}, {k: int(np.sum(ins[:, 0] == v))
                                              for k, v in native.OPS.items()}


def run(args):
  if args.cpus:          # before JAX creates its CPU client and thread pool
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cpus])
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fp_jax.infer import fused, latency, machine, native, networks  # pylint: disable=g-import-not-at-top
  from fp_jax.models import child, space  # pylint: disable=g-import-not-at-top

  load_start = os.getloadavg()
  round_trip_start = machine.core_round_trip()
  shape = (args.image, args.image, args.channels)
  plan = child.make_plan(space.parse_arc(space.ENAS_ARC), args.num_layers, args.out_filters,
                         shape, 10)
  params, stats = networks.random_init(plan, args.seed)
  if args.ratio:
    params, stats = networks.prune(plan, params, stats, (args.ratio,) * 5)
  prog = native.build(plan, fused.Fused(plan, params, stats, fused.Options(engine="xla")).fp)
  macs, counts = macs_by_kind(prog)
  x = jax.numpy.asarray(np.random.default_rng(args.seed).standard_normal((1,) + shape),
                        np.float32)
  kinds = [k for k in native.OPS if k != "class" and counts[k]]
  variants = {"all": ()} | {f"only {k}": tuple(o for o in kinds if o != k) for k in kinds}
  variants["none"] = tuple(kinds)
  isa = {k: "auto" for k in variants}
  other = {"avx2": "avx512", "avx512": "avx2"}[native.vector_isa()]
  if other == "avx2" or {"avx512f", "avx512vl"} <= machine.proc_cpuinfo()["flags"]:
    for k in ("all", "only gemm", "only dw"):   # the other kernels, side by side
      variants[f"{k} [{other}]"], isa[f"{k} [{other}]"] = variants[k], other
  fns = {}
  for name, skip in variants.items():
    c = jax.jit(lambda x, s=skip, i=isa[name]: native.network(prog, x, threads=args.threads,
                                                              skip=s, isa=i))
    fns[name] = (lambda c: lambda: c(x))(c.lower(x).compile())
  for f in fns.values():         # warm up
    for _ in range(20):
      jax.block_until_ready(f())
  ms = latency.interleave({k: (lambda f: lambda i: 1e3 * latency.timed(f))(f)
                           for k, f in fns.items()}, args.calls, block=10)
  median = {k: statistics.median(v) for k, v in ms.items()}
  peak = machine.matmul_peak_gflops(2048)
  gmacs = {k: macs[k.split()[0]] / ((median[f"only {k}"] - median["none"]) * 1e6)
           for k in ("gemm", "dw", "convk", "gemm [avx2]", "dw [avx2]", "gemm [avx512]",
                     "dw [avx512]") if f"only {k}" in median
           and median[f"only {k}"] > median["none"]}
  return {"args": vars(args), "cpu": machine.cpu_info(), "load_start": load_start,
          "load_end": os.getloadavg(), "instructions": counts, "work": macs,
          "median_ms": median, "gmacs_per_s": gmacs, "matmul_peak_gflops": peak,
          "vector_isa": native.vector_isa(),
          "arena_floats": prog.arena_floats,
          "core_round_trip": [round_trip_start, machine.core_round_trip()]}


def markdown(r):
  a = r["args"]
  lines = [f"# Native engine: each kind of instruction alone ({a['num_layers']} layers, "
           f"F {a['out_filters']}, {a['image']}x{a['image']}x{a['channels']}, ratio "
           f"{a['ratio']}, batch 1)", "",
           f"cpu: {r['cpu']['model']} ({', '.join(r['cpu']['isa'])}); {a['cpus'] or 'all'} "
           f"core(s), threads={a['threads']}; medians over {a['calls']} interleaved calls; load "
           f"average {r['load_start'][0]:.2f} -> {r['load_end'][0]:.2f}; fp32 matmul peak "
           f"{r['matmul_peak_gflops']:.1f} GFLOP/s; kernels {r.get('vector_isa', 'avx2')}", "",
           "| variant | median ms | instructions | multiply-adds (elements) | GMAC/s |",
           "|---|---|---|---|---|"]
  for k, v in r["median_ms"].items():
    kind = k[5:] if k.startswith("only ") else ""
    g = r["gmacs_per_s"].get(kind)
    base = kind.split()[0] if kind else ""
    lines.append(f"| {k} | {v:.4f} | {r['instructions'].get(base, '')} | "
                 f"{r['work'].get(base, '')} | {'' if g is None else f'{g:.1f}'} |")
  lines += ["", "GMAC/s: the kind's multiply-adds over its time less the empty call's ('none')."]
  rt = r.get("core_round_trip") or [None, None]
  if all(rt):
    from bench import common  # pylint: disable=g-import-not-at-top  (imports jax)
    lines += ["", common.round_trip_line(*rt).strip()]
  return "\n".join(lines) + "\n"


def main():
  args = parse()
  r = run(args)
  from bench import common  # pylint: disable=g-import-not-at-top
  common.write_outputs(args.name, r, markdown(r))


if __name__ == "__main__":
  main()
