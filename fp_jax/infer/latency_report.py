"""latency.json as the tables of latency.md (fp_jax/infer/latency.py writes both)."""
from __future__ import annotations

from fp_jax.infer import runtimes as runtimes_lib

CELL_PARTS = ("calib_x", "calib_y", "layer_base", "ops_x", "ops_y", "combine")
NETS = ("baseline", "pruned")


def _table(headers, rows):
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
                   + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows])


def to_markdown(r):
  """latency.json as tables a person reads."""
  net, tp = r["network"], r["throughput_images_per_s"]
  rows = [[n, r["macs"][n] / 1e6, r["params_no_aux"][n] / 1e6, net[f"{n}_perop_ms"],
           net[f"{n}_fused_ms"], tp[f"{n}_perop"], tp[f"{n}_fused"],
           r["gflops_batch1"][f"{n}_fused"], r["floor_ms"][n]] for n in NETS]
  sp = r["speedup"]
  out = [f"# Latency\n\n{r['device']}; batch-1 mean over {r['images']} images after "
         f"{r['warmup']} warm-up calls; throughput at batch {r['batch_size']}; "
         f"im2col={r['im2col']}; depthwise per-op={r['depthwise']['perop']}, "
         f"fused={r['depthwise']['fused']} (ran {r.get('depthwise_impl', {}).get('perop', '?')} / "
         f"{r.get('depthwise_impl', {}).get('fused', '?')}); fused channels padded to a multiple of "
         f"{r['pad_channels']}; dots={r['dots']} (XLA options {r['compiler_options']})"
         + (f"; fused engine {r['engine']['ran']} (latency.engine={r['engine']['option']}"
            + (f"; {r['engine']['vector_isa']} kernels" if r["engine"].get("vector_isa") else "")
            + f"{'; ' + r['engine']['why_not_native'] if r['engine']['why_not_native'] else ''})"
            if "engine" in r else "") + ".\n",
         "## Network\n",
         _table(["network", "M mult-adds", "M params", "per-op ms", "fused ms",
                 "per-op img/s", "fused img/s", "fused GFLOP/s", "floor ms"], rows),
         f"\nfp32 matmul peak {r['matmul_peak_gflops']:.1f} GFLOP/s; multiply-adds "
         f"-{100 * r['mac_reduction']:.1f}%; max |fused - per-op| logits {r['max_abs_diff']:.3g} "
         f"({r['max_rel_diff']:.2g} of the largest logit).\n",
         _table(["speed-up", "x"], [[k, v] for k, v in sp.items()]
                + [["pruned fused / floor", r["fused_over_floor"]["pruned"]]]),
         "\n## Breakdown (pruned network, ms; parts with a wait at each boundary; the fused "
         "parts are XLA-engine computations whatever the engine)\n",
         _table(["stem_conv part", "per-op ms", "fused ms"],
                [["conv", r["stages"]["stem_conv"]["perop_ms"]["conv"], ""],
                 ["bn", r["stages"]["stem_conv"]["perop_ms"]["bn"], ""],
                 ["total", r["stages"]["stem_conv"]["perop_ms"]["total"],
                  r["stages"]["stem_conv"]["fused_ms"]["total"]]]), ""]
  for key, label in (("stages", "pruned"), ("stages_baseline", "baseline")):
    l0 = r[key]["layer_0"]
    rows = [[p, l0["perop_ms"][p], l0["fused_ms"][p]] for p in CELL_PARTS + ("total",)]
    rows += [["sum of parts", l0["parts_sum_ms"]["perop"], l0["parts_sum_ms"]["fused"]],
             ["part-timed run", l0["synced_total_ms"]["perop"], l0["synced_total_ms"]["fused"]]]
    out += [f"layer_0 ({label})\n", _table(["part", "per-op ms", "fused ms"], rows), ""]
  if "runtimes" in r:
    out += [f"## Runtimes (batch 1, same images, interleaved; {r.get('threads', '?')} "
            "thread(s))\n", runtimes_lib.to_markdown(r["runtimes"], r["batch_size"]),
            f"\nLargest |logit| {r['max_abs_logit']:.4g}; max |runtime - fused| logits "
            + ", ".join(f"{k}: {v['pruned']['max_abs_diff_vs_fused']:.3g}"
                        for k, v in r["runtimes"].items()) + " (pruned). Chart: runtimes.png.\n"]
  if "accelerator" in r:
    from fp_jax.infer import placement   # pylint: disable=g-import-not-at-top
    out += [placement.to_markdown(r["accelerator"])]
  mem = r["memory_bytes"]
  out += ["## Memory (MiB)\n", _table(["what", "MiB"], [[k, v / 2 ** 20] for k, v in mem.items()]),
          f"\n{r['timing']}.\n"]
  return "\n".join(out)
