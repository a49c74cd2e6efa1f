"""Tests for summary.md and the plots, from hand-written result files."""
import json

import numpy as np

from fp_jax.models import child
from fp_jax.pruning import compaction
from fp_jax.models import flops
from fp_jax.models import space
from fp_jax import summary


def _workdir(tmp_path):
  from configs import smoke
  (tmp_path / "search").mkdir()
  (tmp_path / "config.json").write_text(smoke.get_config().to_json_best_effort())
  rng = np.random.default_rng(0)
  samples = [dict(step=i, arc=space.sample_uniform(rng).tolist(), ratios=[0.1 * (i % 5)] * 5,
                  train_acc=0.5, prune_acc=0.4 + 0.01 * i, gap=-0.1, ratio=1.0, reward=0.3)
             for i in range(12)]
  (tmp_path / "search" / "samples.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in samples))
  (tmp_path / "search" / "metrics.jsonl").write_text("".join(
      json.dumps(dict(step=i, reward=0.1 * i, ratio=1.0, gap=-0.1)) + "\n" for i in range(4)))
  chosen = samples[3]
  normal, reduce = space.split(np.asarray(chosen["arc"]))
  (tmp_path / "search" / "arch.json").write_text(json.dumps(dict(
      normal=normal.tolist(), reduce=reduce.tolist(),
      arc_string=space.arc_to_string(chosen["arc"]),
      ratios=[float(np.float32(r)) for r in (0.2, 0.7, 0, 0, 0)], train_acc=0.5,
      prune_acc=0.43, reward=0.3)))
  return samples


def test_sample_costs_are_the_masked_counts(tmp_path):
  samples = _workdir(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  costs = summary.sample_costs(config, samples[:3])
  for r, c in zip(samples[:3], costs):
    arc = np.asarray(r["arc"])
    plan = child.make_plan(arc, 3, 16, (8, 8, 1), 10)       # smoke's search size
    assert c == flops.count(plan, compaction.ratio_widths(plan, r["ratios"]))["macs"]
  assert costs[1] < summary.sample_costs(config, [{**samples[1], "ratios": [0.0] * 5}])[0]
  # rows with the searched network's own count (samples.jsonl since ratio_measure) use it
  rows = [{**r, "masked_macs": 1000 + i} for i, r in enumerate(samples[:3])]
  assert summary.sample_costs(config, rows).tolist() == [1000, 1001, 1002]


def test_summary_table_and_plots(tmp_path):
  _workdir(tmp_path)
  (tmp_path / "final").mkdir()
  (tmp_path / "compress").mkdir()
  (tmp_path / "final" / "result.json").write_text(json.dumps(dict(
      test_error=3.5, test_acc=0.965, macs=751_000_000, params=5_000_000,
      params_no_aux=4_600_000, epochs=630)))
  compress = dict(
      ratios=[float(np.float32(0.6))] * 4 + [0.3], mode="finetune", finetune_epochs=20,
      macs=751_000_000, params=5_000_000, params_no_aux=4_600_000, pruned_macs=306_000_000,
      pruned_params=2_100_000, pruned_params_no_aux=1_700_000, bn_batches=32,
      test_error_masked=40.0, test_error_masked_stale_bn=88.5, test_error_finetuned=3.85,
      max_abs_diff_masked_vs_compact=1e-6)
  (tmp_path / "compress" / "result.json").write_text(json.dumps(compress))
  text = summary.write(str(tmp_path))
  assert text == (tmp_path / "summary.md").read_text()
  assert "- ratios per stage: 0.2 0.7 0 0 0\n" in text     # arch.json holds float32 values
  table = [l for l in text.splitlines() if l.startswith("| ")][1:]
  assert table == [
      "| final network (unpruned) | 3.50 | 751.000 | 4.600 |",
      "| masked, ratios 0.6 0.6 0.6 0.6 0.3, stale BN statistics, no fine-tuning | 88.50 | "
      "306.000 | 1.700 |",
      "| masked, ratios 0.6 0.6 0.6 0.6 0.3, BN re-estimated (32 batches), no fine-tuning | "
      "40.00 | 306.000 | 1.700 |",
      "| compact, fine-tuned (20 epochs) | 3.85 | 306.000 | 1.700 |"]
  assert "Multiply-adds 59.3% fewer, params 63.0% fewer" in text
  for name in ("search_samples.png", "search_curves.png"):
    png = (tmp_path / "plots" / name).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert f"![plots/{name}](plots/{name})" in text


def test_summary_rows_of_older_and_scratch_results():
  """A compress result from before BN re-estimation holds only the stale figure (as
  test_error_masked); scratch mode says it retrained."""
  old = dict(ratios=[0.5] * 5, mode="scratch", finetune_epochs=7, pruned_macs=2e6,
             pruned_params_no_aux=1e5, test_error_masked=89.1, test_error_finetuned=2.8)
  assert summary.table_rows(None, old) == [
      ("masked, ratios 0.5 0.5 0.5 0.5 0.5, stale BN statistics, no fine-tuning", 89.1, 2e6,
       1e5),
      ("compact, retrained from scratch (7 epochs)", 2.8, 2e6, 1e5)]
  new = dict(old, mode="finetune", round_to=8, distill=True, distill_weight=0.5,
             distill_temperature=4.0, test_error_masked_stale_bn=90.0, bn_batches=16)
  assert [r[0] for r in summary.table_rows(None, new)] == [
      "masked, ratios 0.5 0.5 0.5 0.5 0.5, kept channels rounded up to multiples of 8, stale "
      "BN statistics, no fine-tuning",
      "masked, ratios 0.5 0.5 0.5 0.5 0.5, kept channels rounded up to multiples of 8, BN "
      "re-estimated (16 batches), no fine-tuning",
      "compact, fine-tuned, distilled from the unpruned network (weight 0.5, temperature 4) "
      "(7 epochs)"]


def test_summary_latency_runtimes(tmp_path):
  """summary.md's latency rows: every runtime's batch-1 mean / median and its median over
  fused, from latency.json's `runtimes` section."""
  (tmp_path / "latency").mkdir()
  entry = lambda mean, med: dict(mean_ms=mean, median_ms=med, p10_ms=med, p90_ms=med,
                                 images_per_s=100.0, max_abs_diff_vs_fused=0.0)
  rts = {"perop": {"baseline": entry(30.0, 29.0), "pruned": entry(12.0, 11.0)},
         "fused": {"baseline": entry(8.0, 7.5), "pruned": entry(3.0, 2.5)},
         "onnxruntime": {"baseline": entry(10.0, 9.0), "pruned": entry(4.0, 3.75)},
         "litert": {"baseline": entry(9.0, 8.25), "pruned": entry(3.5, 3.0)}}
  (tmp_path / "latency" / "latency.json").write_text(json.dumps(dict(
      device="cpu: test", threads=1, max_abs_logit=4.0, max_abs_diff=1e-6,
      network=dict(baseline_perop_ms=30.0, baseline_fused_ms=8.0, pruned_perop_ms=12.0,
                   pruned_fused_ms=3.0), runtimes=rts)))
  text = summary.write(str(tmp_path))
  assert "| network | per-op | fused | ONNX Runtime | LiteRT |" in text
  assert "| unpruned | 30.000 / 29.000 | 8.000 / 7.500 | 10.000 / 9.000 | 9.000 / 8.250 |" in text
  assert "| pruned | 12.000 / 11.000 | 3.000 / 2.500 | 4.000 / 3.750 | 3.500 / 3.000 |" in text
  assert "ONNX Runtime 1.20x unpruned, 1.50x pruned" in text
  assert "LiteRT 1.10x unpruned, 1.20x pruned" in text
  assert "1 thread(s)" in text and "![latency/runtimes.png](latency/runtimes.png)" in text
  # the fused column names the engine that ran (latency.json's `engine`, since it exists)
  data = json.loads((tmp_path / "latency" / "latency.json").read_text())
  data["engine"] = {"option": "auto", "ran": "native", "why_not_native": ""}
  (tmp_path / "latency" / "latency.json").write_text(json.dumps(data))
  assert "| network | per-op | fused (native) | ONNX Runtime | LiteRT |" in summary.write(
      str(tmp_path))
