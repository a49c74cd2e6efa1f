"""Where the fused path's batch-1 time goes: its thunks, and what the pointwise convs cost.

  python -m bench.fused_parts [--num_layers 3 --out_filters 8 --image 8 --channels 1]
                              [--cpus 1] [--images 600] [--no_runtimes] [--name fused_parts]

The published ENAS arc at the given size, random weights with BN statistics estimated
(networks.random_init / estimate_bn, as bench/latency.py). Compiles the fused network
(fused.Fused, the latency stage's options) twice: as it is, and with every sep_conv's two
pointwise 1x1 convs (the GEMMs after each depthwise) left out, and counts each
computation's thunk-making ops in its optimized HLO (dots, custom calls: the depthwise
kernel, fusions). Times both, interleaved on the same images (latency.interleave, medians),
with LiteRT and ONNX Runtime on fp_jax's exports of the full network beside them (unless
--no_runtimes). The difference is what those GEMMs cost inside the network: the most a
kernel computing the pointwise conv inside the depthwise one could save. Writes
bench/results/<name>.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--num_layers", type=int, default=3)
  p.add_argument("--out_filters", type=int, default=8)
  p.add_argument("--image", type=int, default=8, help="height = width")
  p.add_argument("--channels", type=int, default=1)
  p.add_argument("--images", type=int, default=600, help="batch-1 calls timed per variant")
  p.add_argument("--cpus", type=int, default=1, help="pin to this many cores (0: all)")
  p.add_argument("--no_runtimes", action="store_true", help="skip LiteRT and ONNX Runtime")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--name", default="fused_parts")
  return p.parse_args(argv)


def without_pointwise(fused):
  """fused.sep_conv with both pointwise convs left out (biases kept): [B,H,W,C] -> same."""
  def sep_conv(fs, x, stride=1, opts=fused.Options()):
    y = fused.depthwise(x, fs["dw1"], opts.depthwise, fused.MAX_PAD, relu=True, stride=stride)
    return fused.depthwise(y, fs["dw2"], opts.depthwise, relu=True, bias=fs["b1"]) + fs["b2"]
  return sep_conv


def op_counts(compiled):
  """{dots, custom_calls, fusions} of a compiled computation's optimized HLO."""
  text = compiled.as_text()
  return {"dots": text.count(" dot("), "custom_calls": text.count(" custom-call("),
          "fusions": text.count(" fusion(")}


def build(args):
  """({name: compiled fn(x)}, {name: op counts}, net, x numpy [1,H,W,C])."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fp_jax.infer import fused, networks  # pylint: disable=g-import-not-at-top
  from fp_jax.models import child, space  # pylint: disable=g-import-not-at-top

  arc = space.parse_arc(space.ENAS_ARC)
  shape = (args.image, args.image, args.channels)
  plan = child.make_plan(arc, args.num_layers, args.out_filters, shape, 10)
  params, stats = networks.random_init(plan, args.seed)
  stats = networks.estimate_bn(plan, params, stats, args.seed)
  net = networks.Net(plan, arc, params, stats)
  x = np.random.default_rng(args.seed).standard_normal((1,) + shape).astype(np.float32)
  xj = jax.numpy.asarray(x)
  fns, counts, original = {}, {}, fused.sep_conv
  for name in ("fused", "fused_without_pointwise"):
    fused.sep_conv = original if name == "fused" else without_pointwise(fused)
    try:
      c = fused.Fused(plan, params, stats, fused.Options(im2col=True, engine="xla")).network(xj)
    finally:
      fused.sep_conv = original
    counts[name] = op_counts(c)
    fns[name] = (lambda c: lambda: c(xj))(c)
  return fns, counts, net, x


def run(args):
  if args.cpus:          # before JAX creates its CPU client and thread pool
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cpus])
  import jax  # pylint: disable=g-import-not-at-top
  from fp_jax.infer import latency, machine, runtimes  # pylint: disable=g-import-not-at-top

  load_start = os.getloadavg()
  fns, counts, net, x = build(args)
  if not args.no_runtimes:
    runners, _ = runtimes.build({"net": net}, x.shape[1:], (1,), len(runtimes.usable_cores()),
                                log=lambda *a: None)
    for r in runtimes.RUNTIMES:
      fns[r] = (lambda f: lambda: f(x))(runners["net", r])
  for f in fns.values():         # warm up
    for _ in range(20):
      jax.block_until_ready(f())
  ms = latency.interleave({k: (lambda f: lambda i: 1e3 * latency.timed(f))(f)
                           for k, f in fns.items()}, args.images, block=20)
  median = {k: statistics.median(v) for k, v in ms.items()}
  result = {
      "args": vars(args), "cpu": machine.cpu_info(),
      "load_start": load_start, "load_end": os.getloadavg(), "ops": counts,
      "median_ms": median,
      "pointwise_ms": median["fused"] - median["fused_without_pointwise"],
      "pointwise_share": 1 - median["fused_without_pointwise"] / median["fused"]}
  return result


def markdown(r):
  a = r["args"]
  lines = [f"# Fused path: thunks and the pointwise convs' cost ({a['num_layers']} layers, "
           f"F {a['out_filters']}, {a['image']}x{a['image']}x{a['channels']}, batch 1)", "",
           f"cpu: {r['cpu']['model']} ({', '.join(r['cpu']['isa'])}); {a['cpus'] or 'all'} core(s); medians over {a['images']} "
           f"interleaved calls; load average {r['load_start'][0]:.2f} -> "
           f"{r['load_end'][0]:.2f}", "",
           "| variant | median ms | dots | depthwise custom calls | fusions |",
           "|---|---|---|---|---|"]
  for k, v in r["median_ms"].items():
    c = r["ops"].get(k, {})
    lines.append(f"| {k} | {v:.4f} | {c.get('dots', '')} | {c.get('custom_calls', '')} | "
                 f"{c.get('fusions', '')} |")
  lines += ["", f"The pointwise convs after the depthwise ones cost {r['pointwise_ms']:.4f} ms "
                f"({100 * r['pointwise_share']:.0f} % of the fused network's time)."]
  return "\n".join(lines) + "\n"


def main():
  args = parse()
  r = run(args)
  from bench import common  # pylint: disable=g-import-not-at-top
  common.write_outputs(args.name, r, markdown(r))


if __name__ == "__main__":
  main()
