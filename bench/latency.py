"""Inference latency: fp_jax's per-op and fused paths against the peers, unpruned vs pruned.

  python -m bench.latency [--num_layers 15 --out_filters 36 --image 32 --images 300
                           --batch 64 --warmup 20 --target 0.6 --cpus 1] [--no_peers]

The published ENAS architecture (space.ENAS_ARC) at final-training size,
random weights (networks.random_init) with BN statistics estimated on random
images (networks.estimate_bn), compacted with one ratio for all 5 stages, chosen
(flops.count of compaction.ratio_widths) so multiply-adds fall by about --target,
and the compact network's BN statistics estimated again. Both networks are
exported to ONNX and LiteRT by fp_jax (fp_jax.infer.onnx_export, export;
--no_runtimes skips them), and handed to the strongest peers a user would pick
(bench/peers.py, the same weights in PyTorch: ONNX Runtime on the torch.onnx
export, torch.compile, eager; --no_peers skips them; they need
bench/requirements.txt). Runs fp_jax.infer.latency.measure (batch-1 latency per
image, every variant for both networks interleaved on the same images;
throughput at --batch; stem and first-cell breakdown; memory; matmul peak) with
the fused options given (default: engine auto, the native engine on CPU; for the XLA
engine: im2col stem, channels padded to 8, XLA's own dots), then times the pruned fused
network on the XLA engine and with each of its options switched back (the ablation
table). The peer table compares the fused path with the fastest peer of
each network (each peer's own figure shown beside it).
Targets (reported, not asserted): pruned fused >= 2x pruned per-op, >= 4x
unpruned per-op, and <= 3x the multiply-add floor 2 * macs / fp32 matmul peak;
against the fastest peer: batch-1 median >= 1.5x faster, batch throughput >= the
peer's. The JSON records the CPU model and its vector extensions (AVX2 / AVX-512 /
AMX).

--cpus N pins the process to N cores before JAX starts (its intra-op thread pool
follows) and gives ONNX Runtime and LiteRT N threads (0: all usable cores);
--xla_flags adds XLA flags. Writes bench/results/latency.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--num_layers", type=int, default=15)
  p.add_argument("--out_filters", type=int, default=36)
  p.add_argument("--image", type=int, default=32, help="height = width (3 channels)")
  p.add_argument("--classes", type=int, default=10)
  p.add_argument("--images", type=int, default=300, help="batch-1 images timed per variant")
  p.add_argument("--batch", type=int, default=64, help="throughput batch")
  p.add_argument("--warmup", type=int, default=20)
  p.add_argument("--target", type=float, default=0.6, help="multiply-add reduction to aim for")
  p.add_argument("--depthwise", default="auto", help="fused and per-op depthwise implementation")
  p.add_argument("--no_im2col", action="store_true", help="fused stem by XLA's conv, not im2col")
  p.add_argument("--pad_channels", type=int, default=8, help="fused channel padding multiple")
  p.add_argument("--dots", default="auto", help="XLA:CPU GEMMs: auto | xla | ynn")
  p.add_argument("--micro_batch", type=int, default=0,
                 help="fused batch chunks (engine xla): 0 auto, -1 the whole batch, n images")
  p.add_argument("--engine", default="auto", choices=("auto", "native", "xla"),
                 help="fused engine (latency.engine): auto is native on CPU where it runs")
  p.add_argument("--cpus", type=int, default=0, help="pin to this many cores (0: all)")
  p.add_argument("--xla_flags", default="", help="appended to XLA_FLAGS before JAX starts")
  p.add_argument("--no_runtimes", action="store_true",
                 help="skip ONNX Runtime and LiteRT on fp_jax's exports")
  p.add_argument("--no_peers", action="store_true",
                 help="skip the PyTorch peers (bench/peers.py)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="compute dtype of fp_jax's executors (exports stay float32)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="", help="JSON path (default bench/results/latency.json)")
  return p.parse_args()


def batch_chunks(nets, opts, batch, seed, reps):
  """XLA-engine fused throughput (median img/s over `reps` interleaved batches) of both networks
  at `batch` with micro_batch=-1 (the whole batch as one computation) and as `opts` resolves
  it (batching.micro_batch_size: the whole batch too when it is no larger), after one batch
  each to compile and warm up."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fp_jax.infer import batching, fused, latency  # pylint: disable=g-import-not-at-top
  plan = nets["baseline"].plan
  size = batching.micro_batch_size(opts.micro_batch,
                                   batching.largest_activation_bytes(plan, opts.dtype))
  x = jax.numpy.asarray(np.random.default_rng(seed).standard_normal(
      (batch,) + plan.image_hw + (plan.in_channels,)).astype(np.float32))
  label = {-1: "whole batch"}
  if size and size < batch:
    label[size] = f"chunks of {batching.chunk_shape(batch, size)[1]}"
  fns = {}
  for n in ("baseline", "pruned"):
    for mb in label:
      f = fused.Fused(nets[n].plan, nets[n].params, nets[n].stats,
                      dataclasses.replace(opts, micro_batch=mb)).network(x)
      jax.block_until_ready(f(x))
      fns[n, label[mb]] = f
  times = latency.interleave({k: (lambda f: lambda i: latency.timed(lambda: f(x)))(f)
                              for k, f in fns.items()}, reps)
  return {"micro_batch": size, "batch": batch, "reps": reps,
          "images_per_s": {n: {lab: batch / float(np.median(times[n, lab]))
                               for (net, lab) in fns if net == n} for n in ("baseline", "pruned")}}


def fastest_peer(rts):
  """Per network: the fused path against the fastest peer at batch 1 (every runtime that is
  not fp_jax's own executor), each peer's median, and batch throughput against the best
  peer's."""
  peers = [r for r in rts if r not in ("perop", "fused")]
  out = {}
  for n in (rts["fused"] if peers else {}):
    best = min(peers, key=lambda p: rts[p][n]["median_ms"])
    tput = max(peers, key=lambda p: rts[p][n]["images_per_s"])
    fused, peer = rts["fused"][n], rts[best][n]
    out[n] = {"fused_median_ms": fused["median_ms"],
              "peers_ms": {p: rts[p][n]["median_ms"] for p in peers},
              "fastest_peer": best, "peer_median_ms": peer["median_ms"],
              "ratio_of_medians": peer["median_vs_fused"],
              "per_repeat_ratio": peer["block_ratio_vs_fused"],
              "met_1.5": peer["median_vs_fused"] >= 1.5,
              "fused_images_per_s": fused["images_per_s"], "best_peer": tput,
              "best_peer_images_per_s": rts[tput][n]["images_per_s"],
              "met_throughput": fused["images_per_s"] >= rts[tput][n]["images_per_s"]}
  return out


def main():
  args = parse()
  load_start = os.getloadavg()
  if args.cpus:      # before JAX creates its CPU client and thread pool
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cpus])
  if args.xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from bench import common  # pylint: disable=g-import-not-at-top
  from fp_jax.models import child, flops, space  # pylint: disable=g-import-not-at-top
  from fp_jax.infer import fused, latency, machine, networks, runtimes  # pylint: disable=g-import-not-at-top
  from fp_jax.pruning import compaction  # pylint: disable=g-import-not-at-top

  round_trip_start = machine.core_round_trip()
  arc = space.parse_arc(space.ENAS_ARC)
  plan = child.make_plan(arc, args.num_layers, args.out_filters, (args.image, args.image, 3),
                         args.classes)
  full_macs = flops.count(plan)["macs"]

  def reduction(r):     # every channel group keeps masks.keep_count(size, r)
    return 1.0 - flops.count(plan, compaction.ratio_widths(plan, (r,) * 5))["macs"] / full_macs

  grid = np.round(np.arange(0.0, 0.91, 0.01), 2)
  ratio = float(grid[np.argmin([abs(reduction(r) - args.target) for r in grid])])
  common.log(f"ratio {ratio} for all stages: {100 * reduction(ratio):.1f}% fewer multiply-adds")
  t0 = time.perf_counter()
  params, stats = networks.random_init(plan, args.seed)
  stats = networks.estimate_bn(plan, params, stats, args.seed)
  cp, cs = networks.prune(plan, params, stats, (ratio,) * 5)
  cs = networks.estimate_bn(plan, cp, cs, args.seed + 1)
  nets = {"baseline": networks.Net(plan, arc, params, stats),
          "pruned": networks.Net(plan, arc, cp, cs)}
  common.log(f"networks built, BN statistics estimated ({time.perf_counter() - t0:.0f} s)")
  threads = len(runtimes.usable_cores())
  others, versions = {}, {}
  if not args.no_runtimes:
    others, _ = runtimes.build(nets, (args.image, args.image, 3), (1, args.batch), threads,
                               args.pad_channels, log=common.log)
    versions.update(runtimes.versions())
  if not args.no_peers:
    try:
      from bench import peers  # pylint: disable=g-import-not-at-top
      peer_runners, _ = peers.build(nets, (args.image, args.image, 3), (1, args.batch),
                                    threads, args.pad_channels, log=common.log)
    except ImportError as e:
      raise SystemExit(f"error: --no_peers not given but a peer cannot be imported ({e}); "
                       "pip install -r bench/requirements.txt") from None
    others.update(peer_runners)
    versions.update(peers.versions())

  t0 = time.perf_counter()
  opts = fused.Options(im2col=not args.no_im2col, depthwise=args.depthwise,
                       pad_channels=args.pad_channels, dots=args.dots, dtype=args.dtype,
                       micro_batch=args.micro_batch, engine=args.engine)
  res = latency.measure(nets, args.images, args.batch, args.warmup, opts, depthwise=args.depthwise,
                        seed=args.seed, check_child=True, log=common.log, others=others)
  res["threads"] = threads
  # ablation of the fused path's options on the pruned network, interleaved image by image
  rng = np.random.default_rng(args.seed + 1)
  singles = [jax.numpy.asarray(rng.standard_normal((1, args.image, args.image, 3)), np.float32)
             for _ in range(args.images)]
  base = dict(dataclasses.asdict(opts), engine="xla")     # the XLA engine's own options
  ablation = {"as measured": opts, "engine=xla": fused.Options(**base),
              f"xla, im2col={not opts.im2col}": fused.Options(**dict(base, im2col=not opts.im2col)),
              "xla, pad_channels=1": fused.Options(**dict(base, pad_channels=1)),
              "xla, dots=ynn": fused.Options(**dict(base, dots="ynn")),
              "xla, depthwise=shift": fused.Options(**dict(base, depthwise="shift")),
              "xla, none (im2col off, pad 1, ynn)": fused.Options(**dict(
                  base, im2col=False, pad_channels=1, dots="ynn"))}
  fns = {}
  n = nets["pruned"]
  for name, o in ablation.items():
    f = fused.Fused(n.plan, n.params, n.stats, o)
    jax.block_until_ready(f(singles[0]))
    fns[name] = f
  for rep in range(args.warmup):
    for f in fns.values():
      jax.block_until_ready(f(singles[rep % args.images]))
  lat = latency.interleave({k: (lambda f: lambda i: latency.timed(lambda: f(singles[i])))(f)
                            for k, f in fns.items()}, args.images, block=latency.LATENCY_BLOCK)
  ablation_ms = {k: float(1e3 * np.mean(v)) for k, v in lat.items()}
  common.log("ablation timed")
  chunks = batch_chunks(nets, dataclasses.replace(opts, engine="xla"), args.batch,
                        args.seed + 2, reps=8)
  common.log("batch chunks timed")

  net, floor = res["network"], res["floor_ms"]["pruned"]
  pf = net["pruned_fused_ms"]
  targets = {"pruned_fused_ms": pf,
             "fused_vs_perop_pruned": net["pruned_perop_ms"] / pf,
             "pruned_fused_vs_baseline_perop": net["baseline_perop_ms"] / pf,
             "pruned_fused_over_floor": pf / floor,
             "met": {"fused_vs_perop_ge_2": net["pruned_perop_ms"] / pf >= 2,
                     "vs_baseline_perop_ge_4": net["baseline_perop_ms"] / pf >= 4,
                     "within_3x_floor": pf / floor <= 3}}
  vs_peer = fastest_peer(res["runtimes"])
  round_trip_end = machine.core_round_trip()
  result = {"args": vars(args), "env": dict(common.environment(), loadavg_start=load_start,
                                             loadavg_end=os.getloadavg(),
                                             core_round_trip_start=round_trip_start,
                                             core_round_trip_end=round_trip_end),
            "depthwise_resolved": {"perop": fused.depthwise_impl(args.depthwise, dtype=args.dtype),
                                   "fused": fused.depthwise_impl(opts.depthwise,
                                                                 dtype=args.dtype)},
            "fused_vs_fastest_peer": vs_peer, "cpu": res["cpu"],
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "cpu_affinity": sorted(os.sched_getaffinity(0)),
            "ratio_all_stages": ratio, "mac_reduction": res["mac_reduction"],
            "threads": threads,
            "runtime_threads": {k: v for k, v in runtimes.THREADS.items()
                                if k in res["runtimes"]},
            "runtime_versions": versions,
            "wall_s": time.perf_counter() - t0,
            "ablation_pruned_fused_ms": ablation_ms,
            "batch_chunks": chunks,
            "targets": targets, "latency": res,
            "note": (f"batch-1 latency over {args.images} images per variant (the paper: 1000), "
                     f"so that a full run takes a few minutes on this shared 2-core CPU; "
                     f"1/5/15-min load averages at the end in env")}
  path = common.write_json("latency", args.out, result)
  md = [latency.to_markdown(res)]
  t = targets
  md += [f"\n## Targets (ratio {ratio} in every stage, -{100 * res['mac_reduction']:.1f}% "
         f"multiply-adds)\n",
         common.table(["pruned fused ms", "vs pruned per-op (>=2)", "vs unpruned per-op (>=4)",
                       "/ floor (<=3)", "met"],
                      [[t["pruned_fused_ms"], t["fused_vs_perop_pruned"],
                        t["pruned_fused_vs_baseline_perop"], t["pruned_fused_over_floor"],
                        " ".join(k for k, ok in t["met"].items() if ok) or "none"]])]
  if vs_peer:
    cpu = res["cpu"]
    md += [f"\n## fp_jax fused vs the fastest peer ({cpu['model']}, {', '.join(cpu['isa'])}; "
           f"{threads} thread(s); targets: batch-1 peer median / fused median >= 1.5, "
           f"batch-{args.batch} fused img/s >= the peer's)\n",
           common.table(["network", "fused median ms"] + [
               f"{runtimes.LABELS[p]} median ms" for p in next(iter(vs_peer.values()))["peers_ms"]]
               + ["fastest peer", "peer / fused", "per-repeat ratio min / q1 / median / q3 / max",
                  ">= 1.5", f"fused img/s (batch {args.batch})", "best peer img/s", ">= peer"],
               [[n, v["fused_median_ms"]] + list(v["peers_ms"].values()) + [
                   runtimes.LABELS[v["fastest_peer"]], v["ratio_of_medians"],
                   " / ".join(f"{v['per_repeat_ratio'][k]:.2f}"
                              for k in ("min", "q1", "median", "q3", "max")),
                   v["met_1.5"], v["fused_images_per_s"], v["best_peer_images_per_s"],
                   v["met_throughput"]] for n, v in vs_peer.items()])]
  md += ["\n## Fused-path options (pruned network, interleaved pass)\n",
         common.table(["fused options", "mean ms"], [[k, v] for k, v in ablation_ms.items()]),
         f"\n## Fused throughput at batch {args.batch}: the whole batch at once or a loop over "
         f"chunks (median img/s of {chunks['reps']} interleaved batches)\n",
         common.table(["network"] + list(chunks["images_per_s"]["baseline"]),
                      [[n] + list(v.values()) for n, v in chunks["images_per_s"].items()]),
         f"\nLoad average (1/5/15 min) at the start {tuple(round(v, 2) for v in load_start)}, "
         f"at the end {tuple(round(v, 2) for v in os.getloadavg())}; {threads} core(s) "
         f"{sorted(os.sched_getaffinity(0))}; threads: {result['runtime_threads']}."
         + common.round_trip_line(round_trip_start, round_trip_end)]
  stem = os.path.splitext(path)[0]
  with open(stem + ".md", "w") as f:
    f.write("\n".join(md) + "\n")
  if "onnxruntime" in res["runtimes"]:
    runtimes.plot(res["runtimes"], stem + "_runtimes.png",
                  f"batch 1, {threads} thread(s); {res['device']}")
  print("\n".join(md))
  print(f"wrote {path}, {stem}.md")


if __name__ == "__main__":
  main()
