"""The `latency` stage: per-op graph vs fused XLA vs ONNX Runtime vs LiteRT, unpruned vs pruned.

For the unpruned network (DIR/final/weights.npz) and the compact pruned one
(DIR/compress/weights.npz), or random weights with `latency.init=random`
(BN statistics estimated on random images, networks.estimate_bn):

- the BN-folded networks exported to ONNX (onnx_export.py: NCHW, any batch) and
  LiteRT (export.py, one model per batch size; DIR/latency/{baseline,pruned}.onnx
  and .tflite at batch 1), run by the LiteRT
  interpreter and ONNX Runtime on `latency.threads` cores (runtimes.py says how
  each runtime's threads are set);
- batch-1 latency, mean (and median) over `latency.images` images after
  `latency.warmup` warm-up calls, all variants (2 networks x per-op, fused,
  ONNX Runtime, LiteRT) interleaved on the same images in blocks of
  LATENCY_BLOCK images (the order rotating) so load from other processes hits
  all alike while each variant runs with warm caches;
- throughput (images/s) at `latency.batch_size`, interleaved alike;
- achieved GFLOP/s (2 x multiply-adds of flops.count / latency) beside this
  machine's fp32 matmul peak (a timed large jnp.dot), and the multiply-add
  floor 2 x macs / peak;
- memory: the fused computation's arguments + outputs + temporaries
  (compiled.memory_analysis()); per-op: the max over its compiled calls;
- max |fused - per-op| logits (and each vs child.forward, and each runtime's vs
  fused) beside the largest |logit|.

Breakdown (`stages`, for each network): the stem (per-op parts conv, bn; fused:
one conv with BN folded) and `layer_0`, the first cell with its input
calibrations, in parts:

  calib_x     calibration of h(i-2) (ReLU-1x1-BN, or factorized reduction; none
              when ENAS skips it)
  calib_y     calibration of h(i-1) (ReLU-1x1-BN when channels differ)
  layer_base  ENAS's ReLU-1x1-BN of the calibrated h(i-1), in every cell
  ops_x       the first-operand op of every node (sep_conv / pool / strided identity's
              factorized reduction; identity: none)
  ops_y       the second-operand op of every node
  combine     the node adds, reductions of unused larger inputs, and the final concat

Parts are timed by running the piece with a wait (block_until_ready) at every
part boundary, each part charged the time since the previous boundary; per-op
parts are its primitive calls, fused parts each one XLA computation
(fused.Fused.cell_by_parts). `total` is the piece as it runs inside the
network: per-op without waits, fused as one computation. `synced_total` is
the wall time of the part-timed runs, so parts sum to it by construction (up
to the timer), and synced_total - total is the cost of the waits (per-op) or
of splitting the fused cell. Breakdown figures are means over the faster half
of the repetitions (by their total). Only process 0 writes
DIR/latency/latency.json, latency.md, runtimes.png, the models and
pruned_fused.stablehlo.

Placement (placement.py): all of the above runs on a CPU device and every export is lowered
for CPU, whatever JAX's default backend; on a GPU / TPU host latency.json adds an
`accelerator` section (the fused network at batch 1 and batch_size on that device),
labelled apart.
"""
from __future__ import annotations

import collections
import json
import os
import statistics
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from fp_jax.run import precision
from fp_jax.models import child
from fp_jax.models import flops
from fp_jax.infer import export
from fp_jax.infer import onnx_export
from fp_jax.infer import fused
from fp_jax.infer import machine
from fp_jax.infer import native
from fp_jax.infer import networks
from fp_jax.infer import perop
from fp_jax.infer import placement
from fp_jax.infer.latency_report import CELL_PARTS, NETS, to_markdown  # to_markdown: re-export
from fp_jax.infer import runtimes as runtimes_lib

LATENCY_BLOCK = 10       # consecutive images per variant before switching (warm caches)
PATHS = ("perop", "fused")


# ---------------------------------------------------------------- timing


def block(tree):
  return jax.block_until_ready(tree)


def timed(fn):
  """Wall seconds of fn(), waiting for its result."""
  t = time.perf_counter()
  block(fn())
  return time.perf_counter() - t


def interleave(fns, reps, block=1):
  """fns {name: f(rep) -> result}; runs reps in blocks of `block` consecutive calls of
  each fn, the fn order rotating from block to block, so load from other processes
  hits all alike while each fn runs warm. Returns {name: [result per rep]}."""
  names, out = list(fns), {n: [] for n in fns}
  for b, start in enumerate(range(0, reps, block)):
    shift = b % len(names)
    for n in names[shift:] + names[:shift]:
      out[n].extend(fns[n](rep) for rep in range(start, min(start + block, reps)))
  return out


def _wall(fn):
  return lambda rep: {"total": timed(lambda: fn(rep))}


def _parted(fn):
  """f(rep, mark) -> value  ==>  f(rep) -> {part: s, 'total': s} with waits at marks."""
  def run(rep):
    parts, t0 = collections.defaultdict(float), time.perf_counter()
    last = [t0]

    def mark(part, value):
      block(value)
      t = time.perf_counter()
      parts[part] += t - last[0]
      last[0] = t

    block(fn(rep, mark))
    return dict(parts, total=time.perf_counter() - t0)
  return run


def faster_half_ms(samples):
  """Mean (ms) of every key over the reps whose 'total' is <= the median total."""
  med = statistics.median(s["total"] for s in samples)
  kept = [s for s in samples if s["total"] <= med]
  keys = sorted({k for s in kept for k in s})
  return {k: 1e3 * sum(s.get(k, 0.0) for s in kept) / len(kept) for k in keys}


def _latency_stats(seconds):
  ms = 1e3 * np.asarray(seconds)
  return {"mean_ms": float(ms.mean()), "median_ms": float(np.median(ms)),
          "p10_ms": float(np.percentile(ms, 10)), "p90_ms": float(np.percentile(ms, 90))}


# ---------------------------------------------------------------- measurement


def breakdown(po, fu, x, reps):
  """{'stem_conv': {...}, 'layer_0': {...}} for one network (see the module docstring)."""
  y_po, y_fu = block(po.stem(x)), block(fu.stem(x))
  stem = interleave({"perop_parts": _parted(lambda r, m: po.stem(x, m)),
                     "perop": _wall(lambda r: po.stem(x)),
                     "fused": _wall(lambda r: fu.stem(x))}, reps, block=5)
  cell = interleave({"perop_parts": _parted(lambda r, m: po.cell(0, y_po, y_po, m)),
                     "perop": _wall(lambda r: po.cell(0, y_po, y_po)),
                     "fused_parts": _parted(lambda r, m: fu.cell_by_parts(0, y_fu, y_fu, m)),
                     "fused": _wall(lambda r: fu.cell(0, y_fu, y_fu))}, reps, block=5)
  s = {k: faster_half_ms(v) for k, v in stem.items()}
  c = {k: faster_half_ms(v) for k, v in cell.items()}
  out = {"stem_conv": {
      "perop_ms": {"conv": s["perop_parts"]["conv"], "bn": s["perop_parts"]["bn"],
                   "total": s["perop"]["total"]},
      "fused_ms": {"total": s["fused"]["total"]},
      "parts_sum_ms": {"perop": s["perop_parts"]["conv"] + s["perop_parts"]["bn"]},
      "synced_total_ms": {"perop": s["perop_parts"]["total"]}}}
  layer = {"parts_sum_ms": {}, "synced_total_ms": {}}
  for path in PATHS:
    parts = {p: c[f"{path}_parts"].get(p, 0.0) for p in CELL_PARTS}
    layer[f"{path}_ms"] = dict(parts, total=c[path]["total"])
    layer["parts_sum_ms"][path] = sum(parts.values())
    layer["synced_total_ms"][path] = c[f"{path}_parts"]["total"]
  out["layer_0"] = layer
  return out


def measure(nets, images, batch_size, warmup, opts=fused.Options(), depthwise="auto",
            breakdown_reps=None, seed=0, peak_n=2048, check_child=False, log=logging.info,
            others=None):
  """Latency, throughput, breakdown and accuracy figures of nets {'baseline', 'pruned'}.

  images: number of batch-1 images; perop uses `depthwise` (fused.DEPTHWISE_IMPLS),
  fused uses `opts`; peak_n: size of the matmul timed for the peak; check_child:
  also compare both with a jitted child.forward (one more compile per network);
  others: {(net, runtime): fn(numpy x [B,H,W,C]) -> logits} (runtimes.build, for
  batch 1 and batch_size), timed interleaved with the fp_jax executors on the
  same images. Returns the latency.json dict.
  """
  others = others or {}
  plan = nets["baseline"].plan
  rng = np.random.default_rng(seed)
  xs = rng.standard_normal((images,) + plan.image_hw + (plan.in_channels,)).astype(np.float32)
  singles = [jnp.asarray(xs[i:i + 1]) for i in range(images)]
  reps_batch = max(2, min(8, images // batch_size))
  xb = jnp.asarray(rng.standard_normal((batch_size,) + xs.shape[1:]).astype(np.float32))
  ex, compile_s, counts, memory = {}, {}, {}, {}
  for name in NETS:
    net = nets[name]
    widths = flops.widths_of_params(net.plan, net.params)
    counts[name] = flops.count(net.plan, widths)
    t = time.perf_counter()
    ex[name, "perop"] = perop.PerOp(net.plan, net.params, net.stats, depthwise,
                                    ops=perop.Ops(fused.compiler_options(opts)),
                                    dtype=opts.dtype)
    block(ex[name, "perop"](singles[0]))
    compile_s[f"{name}_perop"] = time.perf_counter() - t
    t = time.perf_counter()
    ex[name, "fused"] = fused.Fused(net.plan, net.params, net.stats, opts)
    block(ex[name, "fused"](singles[0]))
    compile_s[f"{name}_fused"] = time.perf_counter() - t
    log(f"latency: {name} compiled (per-op {compile_s[f'{name}_perop']:.1f}s, "
        f"fused {compile_s[f'{name}_fused']:.1f}s)")
  variants = {f"{n}_{p}": ex[n, p] for n in NETS for p in PATHS}
  rts = [r for r in runtimes_lib.RUNTIMES + runtimes_lib.PEERS
         if any(k[1] == r for k in others)]
  everything = dict(variants, **{f"{n}_{r}": f for (n, r), f in others.items()})
  feeds = {k: singles if k in variants else [xs[i:i + 1] for i in range(images)]
           for k in everything}        # the same images: jax arrays, or numpy for others

  for rep in range(warmup):
    for k, fn in everything.items():
      block(fn(feeds[k][rep % images]))
  lat = interleave({k: (lambda f, x: lambda i: timed(lambda: f(x[i])))(f, feeds[k])
                    for k, f in everything.items()}, images, block=LATENCY_BLOCK)
  log("latency: batch-1 latency timed over %d images" % images)
  for n in NETS:
    memory[f"{n}_perop_batch1"] = ex[n, "perop"].ops.memory_bytes()
    memory[f"{n}_fused_batch1"] = ex[n, "fused"].memory_bytes(singles[0])

  logits, diffs = {}, {}
  xb_np = np.asarray(xb)
  for k, f in everything.items():
    logits[k] = np.asarray(block(f(xb if k in variants else xb_np)))  # compiles batch_size too
  for n in NETS:
    net = nets[n]
    diffs[n] = {"fused_vs_perop": float(np.max(np.abs(logits[f"{n}_fused"] - logits[f"{n}_perop"]))),
                "max_abs_logit": float(np.max(np.abs(logits[f"{n}_perop"])))}
    if check_child:
      fwd = jax.jit(lambda p, s, x, net=net: child.forward(net.plan, p, s, x, False,
                                                           with_aux=False)[0])
      ref = np.asarray(fwd(net.params, net.stats, xb))
      diffs[n]["perop_vs_child"] = float(np.max(np.abs(logits[f"{n}_perop"] - ref)))
      diffs[n]["fused_vs_child"] = float(np.max(np.abs(logits[f"{n}_fused"] - ref)))
    for r in rts:
      diffs[n][f"{r}_vs_fused"] = float(np.max(np.abs(logits[f"{n}_{r}"] - logits[f"{n}_fused"])))
  tput = interleave({k: (lambda f, x: lambda i: timed(lambda: f(x)))(
      f, xb if k in variants else xb_np) for k, f in everything.items()}, reps_batch)
  for n in NETS:
    memory[f"{n}_perop_batch{batch_size}"] = ex[n, "perop"].ops.memory_bytes()
    memory[f"{n}_fused_batch{batch_size}"] = ex[n, "fused"].memory_bytes(xb)
  log("latency: throughput at batch %d timed" % batch_size)

  reps = breakdown_reps or max(20, min(images, 200))
  stages = {n: breakdown(ex[n, "perop"], ex[n, "fused"], singles[0], reps) for n in NETS}
  log("latency: breakdown timed (%d reps)" % reps)
  peak = machine.matmul_peak_gflops(peak_n)

  net_ms = {k: _latency_stats(lat[k]) for k in variants}
  mean = {k: v["mean_ms"] for k, v in net_ms.items()}
  flop = {n: 2.0 * counts[n]["macs"] for n in NETS}
  floor_ms = {n: 1e3 * flop[n] / (peak * 1e9) for n in NETS}
  return {
      "device": machine.device_description(), "cpu": machine.cpu_info(),
      "core_round_trip": machine.core_round_trip(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "batch_size": batch_size, "images": images,
      "warmup": warmup, "im2col": opts.im2col,
      "depthwise": {"perop": depthwise, "fused": opts.depthwise},
      "depthwise_impl": {"perop": fused.depthwise_impl(depthwise, dtype=opts.dtype),
                         "fused": fused.depthwise_impl(opts.depthwise, dtype=opts.dtype)},
      "dtype": opts.dtype,      # fp_jax's executors; the exported runtimes run float32
      "pad_channels": opts.pad_channels, "dots": opts.dots,
      "micro_batch": {"option": opts.micro_batch,          # images_per_chunk None: whole batch
                      "images_per_chunk": ex["baseline", "fused"].micro_batch},
      "compiler_options": fused.compiler_options(opts) or {},
      "engine": {"option": opts.engine, "ran": ex["baseline", "fused"].engine,
                 "pruned_ran": ex["pruned", "fused"].engine,
                 "why_not_native": ex["baseline", "fused"].engine_note,
                 # the native engine's kernels here (native.vector_isa: AVX-512 or AVX2)
                 "vector_isa": native.vector_isa() if "native" in (ex["baseline", "fused"].engine,
                                                               ex["pruned", "fused"].engine)
                             else None},
      "executed_macs_pruned_fused": networks.padded_macs(nets["pruned"], opts.pad_channels),
      "network": {f"{k}_ms": v for k, v in mean.items()},
      "network_detail": net_ms,
      "speedup": {"pruned_fused_vs_pruned_perop": mean["pruned_perop"] / mean["pruned_fused"],
                  "pruned_fused_vs_baseline_perop": mean["baseline_perop"] / mean["pruned_fused"],
                  "pruned_perop_vs_baseline_perop": mean["baseline_perop"] / mean["pruned_perop"],
                  "baseline_fused_vs_baseline_perop":
                      mean["baseline_perop"] / mean["baseline_fused"]},
      "throughput_images_per_s": {k: batch_size / statistics.median(tput[k])
                                  for k in variants},
      "macs": {n: counts[n]["macs"] for n in NETS},
      "params_no_aux": {n: counts[n]["params_no_aux"] for n in NETS},
      "mac_reduction": 1.0 - counts["pruned"]["macs"] / counts["baseline"]["macs"],
      "gflops_batch1": {k: flop[k.split("_")[0]] / (v * 1e-3) / 1e9 for k, v in mean.items()},
      "matmul_peak_gflops": peak,
      "floor_ms": floor_ms,
      "fused_over_floor": {n: mean[f"{n}_fused"] / floor_ms[n] for n in NETS},
      "memory_bytes": memory,
      "max_abs_diff": max(d["fused_vs_perop"] for d in diffs.values()),
      "max_abs_logit": max(d["max_abs_logit"] for d in diffs.values()),
      "max_rel_diff": max(d["fused_vs_perop"] / max(1.0, d["max_abs_logit"])
                          for d in diffs.values()),
      "max_abs_diff_detail": diffs,
      "compile_s": compile_s,
      "perop_calls_per_image": {n: _calls_per_image(ex[n, "perop"], singles[0]) for n in NETS},
      "stages": stages["pruned"], "stages_baseline": stages["baseline"],
      "runtimes": runtimes_lib.section(
          lat, {k: batch_size / statistics.median(v) for k, v in tput.items()},
          {n: dict(diffs[n], fused=0.0, perop=diffs[n]["fused_vs_perop"],
                   **{r: diffs[n][f"{r}_vs_fused"] for r in rts}) for n in NETS},
          NETS, PATHS + tuple(rts), block=LATENCY_BLOCK),
      "timing": ("batch-1: wall time per image incl. waiting for the result, the %d "
                 "variants interleaved in blocks of %d images (rotating order); throughput: "
                 "median of %d batches; breakdown: mean over the faster half of %d reps"
                 % (len(everything), LATENCY_BLOCK, reps_batch, reps)),
  }


def _calls_per_image(po, x):
  before = po.ops.calls
  block(po(x))
  return po.ops.calls - before


def run(config, workdir):
  """The latency stage (see the module docstring): its figures on a CPU device whatever the
  default backend, plus an accelerator section on a GPU / TPU host (placement.py)."""
  cpu, accel = placement.cpu_device(), placement.accelerator()
  with jax.default_device(cpu):
    result = _run_on_cpu(config, workdir, accel)
  return result


def _run_on_cpu(config, workdir, accel):
  lat = config.latency
  if lat.init == "trained":
    nets = networks.trained_networks(workdir)
  else:
    nets = networks.random_networks(config, workdir)
  opts = fused.Options(im2col=bool(lat.im2col), pad_channels=int(lat.pad_channels),
                       dots=lat.dots, dtype=config.dtype, micro_batch=int(lat.micro_batch),
                       engine=lat.engine)
  perop_depthwise = "auto"
  if accel is not None:   # 'auto' as a CPU host resolves it, not as the accelerator
    opts = placement.for_platform(opts, "cpu")
    perop_depthwise = opts.depthwise
  threads = runtimes_lib.use_cores(int(lat.threads))
  plan = nets["baseline"].plan
  others, models = runtimes_lib.build(nets, plan.image_hw + (plan.in_channels,),
                                      (1, lat.batch_size), threads, opts.pad_channels,
                                      log=logging.info)
  result = measure(nets, lat.images, lat.batch_size, lat.warmup, opts, perop_depthwise,
                   seed=config.seed, others=others)
  result.update(init=lat.init, threads=threads, runtime_versions=runtimes_lib.versions(),
                matmul_precision=precision.matmul_precision(),
                runtime_threads={k: v for k, v in runtimes_lib.THREADS.items()
                                 if k in result["runtimes"]},
                runtime_export_options=dict(export.RUNTIME_OPTS.__dict__,
                                            pad_channels=opts.pad_channels),
                onnx_export={"layout": "NCHW (one leading Transpose of the NHWC images)",
                             "depthwise": "Conv group=C", "batch": "symbolic",
                             "opset": onnx_export.OPSET, "pad_channels": opts.pad_channels})
  if accel is not None:
    result["accelerator"] = placement.section(nets, accel, lat.images, lat.batch_size, opts,
                                              seed=config.seed)
  if jax.process_index() == 0:
    out = os.path.join(workdir, "latency")
    os.makedirs(out, exist_ok=True)
    for name, data in models.items():
      with open(os.path.join(out, name), "wb") as f:
        f.write(data)
    result["models"] = sorted(models)
    runtimes_lib.plot(result["runtimes"], os.path.join(out, "runtimes.png"),
                      f"batch 1, {threads} thread(s); {result['device']}")
    p = nets["pruned"]
    path = os.path.join(out, "pruned_fused.stablehlo")
    export.export_stablehlo(path, p.plan, p.params, p.stats,
                            p.plan.image_hw + (p.plan.in_channels,), opts)
    result["stablehlo"] = os.path.relpath(path, workdir)
    with open(os.path.join(out, "latency.json"), "w") as f:
      json.dump(result, f, indent=1)
    with open(os.path.join(out, "latency.md"), "w") as f:
      f.write(to_markdown(result))
  n = result["network"]
  msg = (f"latency: per image baseline per-op {n['baseline_perop_ms']:.3f} ms, fused "
         f"{n['baseline_fused_ms']:.3f} ms; pruned per-op {n['pruned_perop_ms']:.3f} ms, fused "
         f"{n['pruned_fused_ms']:.3f} ms")
  rt = result["runtimes"]
  msg += "; median ms baseline / pruned: " + ", ".join(
      f"{r} {rt[r]['baseline']['median_ms']:.3f} / {rt[r]['pruned']['median_ms']:.3f}" for r in rt)
  logging.info(msg)
  print(msg)
  return result
