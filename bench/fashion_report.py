"""bench/fashion_table.py's report: the ENAS uniform-pruning curve, each run against it, the
means and spreads over seeds, the controller's reward curves, the table and the plot.

Pure functions of the table's rows (dicts as fashion_table.row_of / uniform_row write them).
"""
from __future__ import annotations

import statistics

import numpy as np


def _mean_sd(values):
  values = [v for v in values if v is not None]
  if not values:
    return None, None
  return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def uniform_curve(rows, seed=None):
  """(macs ascending, fine-tuned error) of the ENAS uniform-pruning points (one seed, or the
  mean over seeds at each ratio), the unpruned ENAS network (ratio 0) included."""
  pts = {}
  for r in rows:
    if seed is not None and r["seed"] != seed:
      continue
    if r["setting"] == "enas_uniform":
      pts.setdefault(r["uniform_ratio"], []).append((r["pruned_macs"], r["test_error_finetuned"]))
    elif r["setting"] == "enas":
      pts.setdefault(0.0, []).append((r["macs"], r["test_error"]))
  curve = sorted((statistics.mean(m for m, _ in v), statistics.mean(e for _, e in v))
                 for v in pts.values())
  return [m for m, _ in curve], [e for _, e in curve]


def vs_curve(row, rows):
  """Fine-tuned error minus the same seed's ENAS uniform curve at the row's pruned
  multiply-adds (linear interpolation; None outside the curve's range)."""
  macs, errs = uniform_curve(rows, row["seed"])
  if len(macs) < 2 or not macs[0] <= row["pruned_macs"] <= macs[-1]:
    return None
  return row["test_error_finetuned"] - float(np.interp(row["pruned_macs"], macs, errs))


def summarise(rows, settings, stages):
  """Mean and spread (sample std) over seeds of each setting's figures (settings: their
  names in table order; stages: the timed stages)."""
  out = {}
  keys = ("test_error", "test_error_masked", "test_error_finetuned", "pruned_macs",
          "pruned_params", "macs", "params", "vs_enas_uniform")
  for setting in list(settings) + ["enas_uniform"]:
    groups = {}
    for r in rows:
      if r["setting"] == setting:
        groups.setdefault(r.get("uniform_ratio"), []).append(r)
    for ratio, rs in sorted(groups.items(), key=lambda kv: kv[0] or 0):
      name = setting if ratio is None else f"enas + uniform {ratio:g}"
      s = {"seeds": len(rs)}
      for k in keys:
        s[k], s[k + "_sd"] = _mean_sd([r.get(k) for r in rs])
      for stage in stages:
        s[f"{stage}_s"], _ = _mean_sd([r["seconds"].get(stage) for r in rs])
        s[f"{stage}_cpu_s"], _ = _mean_sd([r["seconds"].get("cpu_s", {}).get(stage) for r in rs])
      out[name] = s
  return out


def reward_curves(rows, setting):
  """Mean over seeds of the per-epoch mean reward and entropy of one setting's searches."""
  rs = [r for r in rows if r["setting"] == setting and r.get("reward_per_epoch")]
  if not rs:
    return None
  n = min(len(r["reward_per_epoch"]) for r in rs)
  mean = lambda k: [statistics.mean(r[k][i] for r in rs) for i in range(n)]
  return {"reward": mean("reward_per_epoch"), "entropy": mean("entropy_per_epoch"),
          "seeds": len(rs)}


def _fmt(m, sd, scale=1.0, digits=2):
  if m is None:
    return "-"
  return f"{m / scale:.{digits}f} ± {sd / scale:.{digits}f}"


def markdown(summary, rows, curves, env, stages):
  lines = ["# Fashion-MNIST: fake pruning against ENAS + uniform pruning and random search",
           "", f"Machine: {env['cpu']}, load average {env['loadavg']}; recipe "
           "configs/fashion.py (short); means ± sample std over seeds.", "",
           "| method | seeds | final error % | masked error % (BN re-est.) | fine-tuned error % "
           "| MMACs (compressed) | params K (compressed) | vs ENAS uniform at equal MACs (pts) "
           "| search / final / compress wall s | CPU s |", "|---|---|---|---|---|---|---|---|---|---|"]
  for name, s in summary.items():
    secs = " / ".join("-" if s[f"{st}_s"] is None else f"{s[f'{st}_s']:.0f}" for st in stages)
    secs += " | " + " / ".join("-" if s.get(f"{st}_cpu_s") is None else
                               f"{s[f'{st}_cpu_s']:.0f}" for st in stages)
    lines.append(
        f"| {name} | {s['seeds']} | {_fmt(s['test_error'], s['test_error_sd'])} | "
        f"{_fmt(s['test_error_masked'], s['test_error_masked_sd'])} | "
        f"{_fmt(s['test_error_finetuned'], s['test_error_finetuned_sd'])} | "
        f"{_fmt(s['pruned_macs'], s['pruned_macs_sd'], 1e6, 3)} | "
        f"{_fmt(s['pruned_params'], s['pruned_params_sd'], 1e3, 1)} | "
        f"{_fmt(s['vs_enas_uniform'], s['vs_enas_uniform_sd'])} | {secs} |")
  lines += ["", "Final error: the chosen arc trained as the final network, unpruned (for "
            "`enas + uniform r` rows: the ENAS network's). Masked: that network masked at the "
            "ratios (the searched ones; uniform r for the curve), BN statistics re-estimated, "
            "no fine-tuning. Fine-tuned: after fine-tuning with the masks held, channels "
            "removed. vs ENAS uniform: fine-tuned error minus the same seed's ENAS "
            "uniform-pruning curve interpolated at the run's compressed multiply-adds "
            "(negative: better than uniform pruning at equal cost). Wall seconds include other "
            "load and any time the run was paused; CPU seconds (user + system of the stage's "
            "process, recorded since the table's second session) do not.", "",
            "## Search: mean reward per epoch (mean over seeds)", ""]
  for setting, c in curves.items():
    if c:
      lines.append(f"- {setting} ({c['seeds']} seeds): reward "
                   f"{' '.join(f'{v:.3f}' for v in c['reward'])}; entropy "
                   f"{' '.join(f'{v:.2f}' for v in c['entropy'])}")
  lines += ["", "## Per run", "", "| setting | seed | ratios | final % | masked % | "
            "fine-tuned % | MMACs | vs uniform |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    v = r.get("vs_enas_uniform")
    lines.append(
        f"| {r['setting']}{'' if 'uniform_ratio' not in r else ' ' + str(r['uniform_ratio'])}"
        f" | {r['seed']} | {' '.join(f'{x:g}' for x in r['ratios'])} | "
        f"{r.get('test_error', float('nan')):.2f} | {r['test_error_masked']:.2f} | "
        f"{r['test_error_finetuned']:.2f} | {r['pruned_macs'] / 1e6:.3f} | "
        f"{'-' if v is None else f'{v:+.2f}'} |")
  return "\n".join(lines) + "\n"


def plot(rows, curves, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
  colors = {"enas": "tab:gray", "random": "tab:green", "fp_a0.02_b0": "tab:blue",
            "fp_a0.02_b20": "tab:red", "fp_a0.5_b20": "tab:purple"}
  seeds = sorted({r["seed"] for r in rows})
  for seed in seeds:
    m, e = uniform_curve(rows, seed)
    if m:
      ax[0].plot(np.array(m) / 1e6, e, color="k", alpha=0.35, lw=1, marker=".")
  m, e = uniform_curve(rows)
  if m:
    ax[0].plot(np.array(m) / 1e6, e, color="k", lw=2, label="ENAS arc + uniform pruning")
  for setting, color in colors.items():
    rs = [r for r in rows if r["setting"] == setting]
    if rs:
      ax[0].scatter([r["pruned_macs"] / 1e6 for r in rs],
                    [r["test_error_finetuned"] for r in rs], color=color, s=30, label=setting)
      ax[0].scatter([r["macs"] / 1e6 for r in rs], [r["test_error"] for r in rs],
                    facecolors="none", edgecolors=color, s=30)
  ax[0].set_xlabel("multiply-adds per image (M)")
  ax[0].set_ylabel("test error (%)")
  ax[0].set_title("fine-tuned compressed networks (filled), unpruned (hollow)")
  ax[0].legend(fontsize=8)
  for setting, c in curves.items():
    if c:
      ax[1].plot(range(1, len(c["reward"]) + 1), c["reward"], color=colors[setting],
                 marker="o", label=f"{setting} reward")
  ax[1].set_xlabel("search epoch")
  ax[1].set_ylabel("mean reward of the epoch's samples")
  ax[1].set_title("controller vs random search, same budget")
  ax[1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
