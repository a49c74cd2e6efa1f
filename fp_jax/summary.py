"""DIR/summary.md and DIR/plots/*.png, written from the run's own result files.

The table follows the paper's (method, error %, multiply-adds M, params M):
the unpruned final network, the same network masked with the chosen ratios
(stale BN statistics, and BN statistics re-estimated; no training), and the
compact network after fine-tuning (or retraining). Params are those of
the inference network (the aux head is training-only). A profile stage's counts
(profile.json) get a section of their own. Plots:

  plots/search_samples.png  validation accuracy (masked) vs multiply-adds of every
                            rewarded architecture at search size, the chosen one marked
  plots/search_curves.png   reward, Ratio and Gap over the search
"""
from __future__ import annotations

import os

import numpy as np

from fp_jax.models import child
from fp_jax.pruning import compaction
from fp_jax.models import flops
from fp_jax import profile
from fp_jax import results
from fp_jax.models import space


def _mega(n):
  return f"{n / 1e6:.3f}" if n is not None else "-"


def _pct(v):
  return f"{v:.2f}" if v is not None else "-"


def ratios_text(ratios):
  """Per-stage ratios as the choices they are: [0.20000000298023224, 0.7, 0, ...] -> '0.2 0.7 0'."""
  return " ".join(f"{float(r):g}" for r in ratios)


def table_rows(final, compress):
  """[(method, error %, macs, params)] from final/result.json and compress/result.json.

  Rows: the unpruned network; the masked network with no training, with the unpruned
  network's (stale) BN statistics and with BN statistics re-estimated on training
  batches (compress results older than re-estimation hold only the stale figure, as
  test_error_masked); the compact network after fine-tuning or retraining.
  """
  rows = []
  if final:
    rows.append(("final network (unpruned)", final["test_error"], final["macs"],
                 final["params_no_aux"]))
  if compress:
    pruned = (compress["pruned_macs"], compress["pruned_params_no_aux"])
    rounded = (f", kept channels rounded up to multiples of {compress['round_to']}"
               if compress.get("round_to", 1) > 1 else "")
    masked = f"masked, ratios {ratios_text(compress['ratios'])}{rounded}"
    if "test_error_masked_stale_bn" in compress:
      rows.append((f"{masked}, stale BN statistics, no fine-tuning",
                   compress["test_error_masked_stale_bn"], *pruned))
      rows.append((f"{masked}, BN re-estimated ({compress['bn_batches']} batches), "
                   "no fine-tuning", compress["test_error_masked"], *pruned))
    else:
      rows.append((f"{masked}, stale BN statistics, no fine-tuning",
                   compress["test_error_masked"], *pruned))
    how = "fine-tuned" if compress["mode"] == "finetune" else "retrained from scratch"
    if compress.get("distill"):
      how += (f", distilled from the unpruned network (weight {compress['distill_weight']:g}, "
              f"temperature {compress['distill_temperature']:g})")
    rows.append((f"compact, {how} ({compress['finetune_epochs']} epochs)",
                 compress["test_error_finetuned"], *pruned))
  return rows


def latency_rows(latency):
  """summary.md lines of latency/latency.json: batch-1 mean ms per image of every runtime
  timed (per-op and fused; ONNX Runtime and LiteRT when latency.json has `runtimes`)."""
  n, rts = latency["network"], latency.get("runtimes")
  if not rts:
    return ["## Latency (batch 1, ms per image)", "", "| network | per-op | fused |", "|---|---|---|",
            f"| unpruned | {n['baseline_perop_ms']:.3f} | {n['baseline_fused_ms']:.3f} |",
            f"| pruned | {n['pruned_perop_ms']:.3f} | {n['pruned_fused_ms']:.3f} |", "",
            f"On {latency['device']}; details in latency/latency.md.", ""]
  names = [r for r in ("perop", "fused", "onnxruntime", "litert") if r in rts]
  low = latency.get("dtype", "float32") != "float32"   # fp_jax's executors in bfloat16
  fused = [e for e in (latency.get("engine", {}).get("ran"),) if e] + ([latency["dtype"]] if low
                                                                      else [])
  labels = {"perop": f"per-op ({latency.get('dtype')})" if low else "per-op",
            "fused": f"fused ({', '.join(fused)})" if fused else "fused",
            "onnxruntime": "ONNX Runtime", "litert": "LiteRT"}
  lines = ["## Latency (batch 1, ms per image, mean / median)", "",
           "| network | " + " | ".join(labels[r] for r in names) + " |",
           "|---|" + "---|" * len(names)]
  for net, label in (("baseline", "unpruned"), ("pruned", "pruned")):
    lines.append(f"| {label} | " + " | ".join(
        f"{rts[r][net]['mean_ms']:.3f} / {rts[r][net]['median_ms']:.3f}" for r in names) + " |")
  ratio = lambda r, net: rts[r][net]["median_ms"] / rts["fused"][net]["median_ms"]
  lines += ["", "Median over fused: " + "; ".join(
      f"{labels[r]} {ratio(r, 'baseline'):.2f}x unpruned, {ratio(r, 'pruned'):.2f}x pruned"
      for r in names if r != "fused") + f". Interleaved on the same images, "
      f"{latency.get('threads', '?')} thread(s), on {latency['device']}; largest |logit| "
      f"{latency.get('max_abs_logit', float('nan')):.3g}, max |fused - per-op| "
      f"{latency['max_abs_diff']:.2e}; details in latency/latency.md.", "",
      "![latency/runtimes.png](latency/runtimes.png)", ""]
  return lines


def sample_costs(config, samples):
  """Multiply-adds of each sampled (arc, ratios), masked: the searched network's
  `masked_macs` that samples.jsonl records; for rows of runs before that field, the fixed
  network's at the search size, masked at the ratios (compaction.ratio_widths)."""
  if samples and all("masked_macs" in r for r in samples):
    return np.asarray([r["masked_macs"] for r in samples])
  shape, classes = profile.KNOWN_SHAPES.get(config["data"]["name"], (None, None))
  if shape is None:
    return None
  s = config["search"]
  out = []
  for r in samples:
    arc = np.asarray(r["arc"])
    plan = child.make_plan(arc, s["num_layers"], s["out_filters"], shape, classes)
    out.append(flops.count(plan, compaction.ratio_widths(plan, r["ratios"],
                                                         s.get("round_to", 1)))["macs"])
  return np.asarray(out)


def _plots(workdir, config, samples, metrics, arch):
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
  made = []
  costs = sample_costs(config, samples) if samples and config else None
  if costs is not None:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    steps = [r["step"] for r in samples]
    sc = ax.scatter(costs / 1e6, [r["prune_acc"] for r in samples], c=steps, s=10, cmap="viridis",
                    alpha=0.7)
    fig.colorbar(sc, ax=ax, label="search step")
    if arch:
      chosen = sample_costs(config, [{"arc": arch["normal"] + arch["reduce"],
                                      "ratios": arch["ratios"],
                                      **({"masked_macs": arch["masked_macs"]}
                                         if "masked_macs" in arch else {})}])[0]
      ax.scatter([chosen / 1e6], [arch["prune_acc"]], marker="*", s=250, c="red",
                 edgecolors="black", label="chosen")
      ax.legend()
    ax.set_xlabel("multiply-adds (M) of the searched network, masked"
                  if all("masked_macs" in r for r in samples) else
                  "multiply-adds (M), masked, fixed network at search size")
    ax.set_ylabel("validation accuracy, masked (PruneAcc)")
    ax.set_title("sampled architectures")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "plots", "search_samples.png"), dpi=100)
    plt.close(fig)
    made.append("plots/search_samples.png")
  rows = [m for m in metrics if m.get("reward") is not None]
  if rows:
    fig, axes = plt.subplots(3, 1, figsize=(6, 7), sharex=True)
    steps = [m["step"] for m in rows]
    for ax, key, label in zip(axes, ("reward", "ratio", "gap"), ("reward", "Ratio", "Gap")):
      ax.plot(steps, [m[key] for m in rows], marker=".")
      ax.set_ylabel(label)
      ax.grid(alpha=0.3)
    axes[-1].set_xlabel("search step")
    axes[0].set_title("controller samples, mean per epoch")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "plots", "search_curves.png"), dpi=100)
    plt.close(fig)
    made.append("plots/search_curves.png")
  return made


def write(workdir):
  """Writes DIR/summary.md (and plots) from whatever result files DIR holds."""
  config = results.read_json(workdir, "config.json")
  arch = results.read_json(workdir, os.path.join("search", "arch.json"))
  final = results.read_json(workdir, os.path.join("final", "result.json"))
  compress = results.read_json(workdir, os.path.join("compress", "result.json"))
  latency = results.read_json(workdir, os.path.join("latency", "latency.json"))
  samples = results.read_jsonl(workdir, os.path.join("search", "samples.jsonl"))
  metrics = results.read_jsonl(workdir, os.path.join("search", "metrics.jsonl"))
  lines = [f"# fp_jax results: {os.path.abspath(workdir)}", ""]
  if config:
    s = config["search"]
    lines += [f"data `{config['data']['name']}`, seed {config['seed']}, reward a={s['alpha']:g} "
              f"b={s['beta']:g}", ""]
  if arch:
    lines += ["## Search", "", f"- chosen arc: `{arch['arc_string']}`",
              f"- ratios per stage: {ratios_text(arch['ratios'])}",
              f"- reward {arch['reward']:.4f}, TrainAcc {arch['train_acc']:.4f}, "
              f"PruneAcc {arch['prune_acc']:.4f}", "", "```",
              space.render_arc(np.asarray(arch["normal"] + arch["reduce"])), "```", ""]
  prof = results.read_json(workdir, "profile.json")
  if prof:
    h, w, c = prof["image_shape"]
    lines += ["## Profile (no data)", "", f"- arc: `{prof['arc_string']}`",
              f"- final network: {prof['num_layers']} layers, F {prof['out_filters']}, "
              f"{h}x{w}x{c} images, {prof['num_classes']} classes",
              f"- multiply-adds per image: {_mega(prof['macs'])} M (aux head, training only: "
              f"{_mega(prof['aux_macs'])} M more)",
              f"- params: {_mega(prof['params_no_aux'])} M for inference, "
              f"{_mega(prof['params'])} M with the aux head", ""]
  rows = table_rows(final, compress)
  if rows:
    lines += ["## Results (test split)", "",
              "| method | error % | multiply-adds (M) | params (M) |", "|---|---|---|---|"]
    lines += [f"| {m} | {_pct(e)} | {_mega(c)} | {_mega(p)} |" for m, e, c, p in rows]
    lines.append("")
    if compress:
      lines += [f"Multiply-adds {100 * (1 - compress['pruned_macs'] / compress['macs']):.1f}% "
                f"fewer, params {100 * (1 - compress['pruned_params_no_aux'] / compress['params_no_aux']):.1f}% "
                f"fewer; masked vs compact logits max abs diff "
                f"{compress['max_abs_diff_masked_vs_compact']:.2e}.", ""]
  if latency:
    lines += latency_rows(latency)
  plots = _plots(workdir, config, samples, metrics, arch)
  if plots:
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
  with open(os.path.join(workdir, "summary.md"), "w") as f:
    f.write("\n".join(lines))
  return "\n".join(lines)
