"""The hardware table's report: bench/results/hardware_table.md's table and the PNG of
fine-tuned test error against measured fused latency (bench/hardware_table.py's rows)."""
from __future__ import annotations

COLUMNS = ("| setting | seed | ratios | final error % | fine-tuned error % "
           "| MMACs final / compressed / executed | fused ms baseline | fused ms compressed "
           "(p10-p90) | latency reduction % "
           "| predicted ms (baseline / compressed) | load during latency (min-max) |")


def _f(v, fmt):
  return "-" if v is None else format(v, fmt)


def markdown(rows, env, missing, order):
  """The table's markdown; rows sorted by setting (`order`, the settings' names) and seed."""
  lines = ["# Fashion-MNIST: Ratio measures, channel rounding and distillation, measured", "",
           f"Machine: {env['cpu']}, {env['cores']} cores shared with other jobs; load average "
           f"{env['loadavg']} when this table was written. Recipe configs/fashion.py:a0.02_b20 "
           "(short), one pipeline per setting and seed. Latency: the latency stage's fused "
           "executor at batch 1, median over latency.images=300 interleaved images, "
           "unpruned final network (baseline) and compressed network.", "",
           COLUMNS, "|" + "---|" * (COLUMNS.count("|") - 1)]
  for r in sorted(rows, key=lambda r: (order.index(r["setting"]), r["seed"])):
    load = r.get("latency_load") or {}
    pred = ("-" if r.get("predicted_latency_ms") is None else
            f"{r['predicted_latency_ms']:.3f} / {r['predicted_masked_latency_ms']:.3f}")
    name = r["setting"] + (f" ({r['base']})" if r["setting"] == "best+distill" else "")
    q = r.get("pruned_fused_p10_p90_ms")
    spread = f" ({q[0]:.2f}-{q[1]:.2f})" if q else ""
    lines.append(
        f"| {name} | {r['seed']} | {' '.join(f'{x:g}' for x in r['ratios'])} | "
        f"{r['test_error']:.2f} | {r['test_error_finetuned']:.2f} | "
        f"{_f(r.get('macs') and r['macs'] / 1e6, '.2f')} / {r['pruned_macs'] / 1e6:.2f} / "
        f"{_f(r.get('executed_macs_pruned_fused') and r['executed_macs_pruned_fused'] / 1e6, '.2f')}"
        f" | {r['baseline_fused_ms']:.3f} | {r['pruned_fused_ms']:.3f}{spread} | "
        f"{r['latency_reduction_pct']:.1f} | {pred} | "
        f"{_f(load.get('min'), '.1f')}-{_f(load.get('max'), '.1f')} |")
  lines += ["", "Final error: the chosen arc trained as the final network, unpruned (test set, "
            "10,000 images). Fine-tuned: the compressed network after fine-tuning. MMACs: "
            "multiply-adds per image of the final (unpruned) network, of the compressed network, and "
            "those the fused path executes for the compressed one (its channel groups padded to "
            "multiples of 8, latency.pad_channels). Fused ms: median "
            "batch-1 wall time per image of the fused executor (latency/latency.json "
            "network_detail). Predicted: the search's latency table's prediction for the chosen "
            "network (arch.json latency_ms / masked_latency_ms; only searches with a table). "
            "Load: the 1-minute load average sampled every 5 s while the latency stage ran "
            "(its own process included). layers+c8, layers+distill, layers+recompress and "
            "best+distill compress "
            "the base run's final network again: their final error and baseline network are "
            "the base's."]
  if missing:
    lines += ["", f"Not run yet ({len(missing)}): {missing}"]
  return "\n".join(lines) + "\n"


MARKERS = {"layers": ("o", "tab:blue"), "layers+c8": ("s", "tab:cyan"),
           "layers+distill": ("D", "tab:purple"), "layers+recompress": ("o", "tab:gray"), "latency": ("^", "tab:red"),
           "macs": ("v", "tab:green"), "layers_r8": ("P", "tab:blue"),
           "macs_r8": ("X", "tab:green"), "latency_r8": ("*", "tab:red"),
           "best+distill": ("h", "tab:orange")}


def plot(rows, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7.5, 5))
  for setting, (marker, color) in MARKERS.items():
    rs = [r for r in rows if r["setting"] == setting]
    if not rs:
      continue
    ax.scatter([r["pruned_fused_ms"] for r in rs], [r["test_error_finetuned"] for r in rs],
               marker=marker, color=color, s=60, label=f"{setting} (compressed)")
    ax.scatter([r["baseline_fused_ms"] for r in rs], [r["test_error"] for r in rs],
               marker=marker, facecolors="none", edgecolors=color, s=60)
  ax.scatter([], [], marker="o", facecolors="none", edgecolors="k",
             label="unpruned final network (hollow),\nmeasured in that run's latency stage")
  ax.set_xlabel("measured fused latency, batch 1 (ms per image, median)")
  ax.set_ylabel("test error (%)")
  ax.set_title("Fashion-MNIST a0.02_b20: test error vs measured fused latency\n"
               f"(seeds {sorted({r['seed'] for r in rows})}; batch-1 latency on a shared CPU: "
               "noisy)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
