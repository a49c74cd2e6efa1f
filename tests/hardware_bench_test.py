"""bench/hardware_table.py without training: fake work directories and a fake stage runner."""
import json
import os
import subprocess
import types

import pytest

from bench import fashion_table as ft
from bench import hardware_table as hw


def _write(root, rel, obj):
  path = os.path.join(root, rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    if rel.endswith(".jsonl"):
      f.write("".join(json.dumps(o) + "\n" for o in obj))
    elif rel.endswith(".npz"):
      f.write(str(obj))
    else:
      json.dump(obj, f)


def _latency(base_med, pruned_med):
  return {"device": "Test CPU", "images": 300, "executed_macs_pruned_fused": 21e6,
          "network": {"baseline_fused_ms": base_med + 0.5, "pruned_fused_ms": pruned_med + 0.5,
                      "baseline_perop_ms": 9.0, "pruned_perop_ms": 8.0},
          "network_detail": {"baseline_fused": {"median_ms": base_med},
                             "pruned_fused": {"median_ms": pruned_med},
                             "baseline_perop": {"median_ms": 8.5},
                             "pruned_perop": {"median_ms": 7.5}}}


def _stage_outputs(stage, finetuned=15.0, round_to=1, distill=False):
  """{rel: object} a finished stage writes."""
  if stage == "search":
    return {"search/arch.json": {"arc_string": "0 " * 40, "ratios": [0.3, 0, 0.2, 0.3, 0],
                                 "reward": 0.5, "train_acc": 0.6, "prune_acc": 0.5,
                                 "latency_ms": 2.0, "masked_latency_ms": 1.5},
            "search/metrics.jsonl": [{"reward": 0.4, "entropy": 1.0},
                                     {"reward": 0.5, "entropy": 0.9}]}
  if stage == "final":
    return {"final/result.json": {"test_error": 13.0, "macs": 27e6, "params_no_aux": 2e5},
            "final/weights.npz": "final-weights"}
  if stage == "compress":
    return {"compress/result.json": {"ratios": [0.3, 0, 0.2, 0.3, 0], "test_error_masked": 27.0,
                                     "test_error_finetuned": finetuned, "pruned_macs": 20e6,
                                     "pruned_params_no_aux": 1.7e5, "round_to": round_to,
                                     "distill": distill},
            "compress/weights.npz": "compress-weights"}
  return {hw.LATENCY_JSON: _latency(2.0, 1.5)}


def _fill(root, stages, **kw):
  for st in stages:
    for rel, obj in _stage_outputs(st, **kw).items():
      _write(root, rel, obj)

XLA = "--config.latency.engine=xla"   # every run's latency stage: the engine the table models


@pytest.fixture
def fake_runner(monkeypatch):
  """subprocess.run as fashion_table calls it: records (workdir name, stage, overrides) and
  writes the stage's outputs (compress: round_to / distill from the overrides)."""
  calls = []

  def run(cmd, **unused_kw):
    arg = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in cmd if a.startswith("--")}
    work, stage = arg["--workdir"], arg["--config.stages"]
    calls.append((os.path.basename(work).split("_seed")[0], stage,
                   sorted(a for a in cmd if a.startswith("--config.") and "stages" not in a
                          and "seed" not in a)))
    _fill(work, [stage], round_to=8 if "--config.compress.round_to=8" in cmd else 1,
          distill="--config.compress.distill=True" in cmd)
    _write(work, "config.json", {"search": {"ratio_measure": arg.get(
        "--config.search.ratio_measure", "layers")}})
    return types.SimpleNamespace(returncode=0)

  monkeypatch.setattr(subprocess, "run", run)
  return calls


def _args(tmp_path, source):
  return types.SimpleNamespace(
      workdir=str(tmp_path / "work"), keep=str(tmp_path / "keep"), set=[],
      layers_source=str(source) + "_seed{seed}_*", fashion_keep=str(tmp_path / "fkeep"),
      max_runs=-1, out=str(tmp_path / "out" / "hardware_table.json"), seeds=[0],
      settings=list(hw.SETTINGS))


def _fashion_run(tmp_path, compress_weights=True):
  src = tmp_path / "fashion" / "fp_a0.02_b20"
  run = str(src) + "_seed0_abc"
  _fill(run, ("search", "final", "compress"))
  if not compress_weights:
    os.remove(os.path.join(run, hw.COMPRESS_W))
  _write(run, "bench_times.json", {"search": 2500.0, "final": 1000.0, "compress": 300.0})
  return src, run


def test_latency_figures_and_reduction():
  f = hw.latency_figures(_latency(2.0, 1.5))
  assert f["baseline_fused_ms"] == 2.0 and f["pruned_fused_ms"] == 1.5      # medians
  assert f["baseline_fused_mean_ms"] == 2.5
  assert f["latency_reduction_pct"] == pytest.approx(25.0)
  assert f["executed_macs_pruned_fused"] == 21e6


def test_row_reads_the_right_files(tmp_path):
  work = str(tmp_path / "w")
  _fill(work, ("search", "final", "compress", "latency"), finetuned=14.25, round_to=8)
  _write(work, "config.json", {"search": {"ratio_measure": "latency", "round_to": 8}})
  times = {"latency": 60.0, "latency_load": {"min": 2.0, "max": 3.0}, "cpu_model": {
      "latency": "Test CPU"}}
  row = hw.row_of(work, "latency_r8", 0, times, "full")
  assert row["test_error"] == 13.0 and row["test_error_finetuned"] == 14.25
  assert row["pruned_macs"] == 20e6 and row["ratios"] == [0.3, 0, 0.2, 0.3, 0]
  assert row["baseline_fused_ms"] == 2.0 and row["pruned_fused_ms"] == 1.5
  assert row["latency_reduction_pct"] == pytest.approx(25.0)
  assert row["predicted_latency_ms"] == 2.0 and row["predicted_masked_latency_ms"] == 1.5
  assert row["ratio_measure"] == "latency" and row["search_round_to"] == 8
  assert row["compress_round_to"] == 8 and row["latency_load"]["max"] == 3.0
  # a compress-only run's search is its base's: no prediction, no reward curve of its own
  row = hw.row_of(work, "layers+c8", 0, times, "from", "layers")
  assert row["predicted_latency_ms"] is None and row["reward_per_epoch"] == []


def test_layers_reused_then_compress_only_runs_from_its_final(tmp_path, fake_runner):
  src, run = _fashion_run(tmp_path)
  args = _args(tmp_path, src)
  layers = hw.run_one(args, "layers", 0, [])
  assert fake_runner == [("layers", "latency", [XLA])]        # search/final/compress copied
  assert layers["test_error_finetuned"] == 15.0 and layers["seconds"]["final"] == 1000.0
  assert layers["latency_load"]["n"] >= 2 and layers["seconds"]["latency"] >= 0
  _, _, work = hw.workdir_of(args, "layers", 0)
  keep = os.path.join(args.keep, os.path.basename(work))
  assert os.path.exists(os.path.join(keep, hw.LATENCY_JSON))
  assert os.path.exists(os.path.join(keep, hw.FINAL_W))        # base of layers+c8 / distill
  assert not os.path.exists(os.path.join(keep, hw.COMPRESS_W))  # latency done: not needed
  assert "latency_load" in json.load(open(os.path.join(keep, "bench_times.json")))

  c8 = hw.run_one(args, "layers+c8", 0, [layers])
  assert fake_runner[1:] == [("layers+c8", "compress", ["--config.compress.round_to=8", XLA]),
                             ("layers+c8", "latency", ["--config.compress.round_to=8", XLA])]
  assert c8["compress_round_to"] == 8 and c8["base"] == "layers"
  _, _, w8 = hw.workdir_of(args, "layers+c8", 0)
  with open(os.path.join(w8, hw.FINAL_W)) as f:
    assert f.read() == "final-weights"                         # layers' final network
  k8 = os.path.join(args.keep, os.path.basename(w8))
  assert not os.path.exists(os.path.join(k8, hw.FINAL_W))       # a copy: not kept
  for rel in ("search/arch.json", "search/metrics.jsonl", "final/result.json",
              "compress/result.json", hw.LATENCY_JSON, "bench_times.json"):
    assert os.path.exists(os.path.join(k8, rel)), rel          # the row from the keep alone
  assert not os.path.exists(os.path.join(k8, hw.COMPRESS_W))
  dist = hw.run_one(args, "layers+distill", 0, [layers, c8])
  assert dist["distill"] and fake_runner[-1][2] == ["--config.compress.distill=True", XLA]


def test_layers_without_compress_weights_compresses_again(tmp_path, fake_runner):
  src, _ = _fashion_run(tmp_path, compress_weights=False)
  hw.run_one(_args(tmp_path, src), "layers", 0, [])
  assert [c[1] for c in fake_runner] == ["compress", "latency"]


def test_resume_skips_finished_stages_and_restores_from_keep(tmp_path, fake_runner):
  src, _ = _fashion_run(tmp_path)
  args = _args(tmp_path, src)
  _, _, work = hw.workdir_of(args, "latency", 0)
  _fill(work, ("search", "final"))               # killed during compress
  _write(work, "bench_times.json", {"search": 10.0, "final": 5.0})
  row = hw.run_one(args, "latency", 0, [])
  assert [c[1] for c in fake_runner] == ["compress", "latency"]
  assert fake_runner[0][2] == [XLA, "--config.search.ratio_measure=latency"]
  assert row["seconds"]["search"] == 10.0 and row["predicted_latency_ms"] == 2.0
  hw.run_one(args, "latency", 0, [])            # all done: nothing runs
  assert len(fake_runner) == 2
  import shutil
  shutil.rmtree(work)                           # another machine: restored from the keep dir
  row2 = hw.run_one(args, "latency", 0, [])
  assert len(fake_runner) == 2 and row2["pruned_fused_ms"] == row["pruned_fused_ms"]
  assert os.path.exists(os.path.join(work, hw.FINAL_W))
  assert not os.path.exists(os.path.join(work, hw.COMPRESS_W))   # not kept once measured


def test_best_distill_waits_for_the_whole_pipelines(tmp_path, fake_runner):
  rows = [{"setting": s, "seed": 0, "test_error_finetuned": e}
          for s, e in zip(hw.FULL, (15.0, 14.0, 16.0, 13.5, 15.5))]
  assert hw.best_base(rows[:-1], 0) is None
  assert hw.best_base(rows, 0) == "macs_r8"
  assert hw.best_base(rows, 1) is None
  src, _ = _fashion_run(tmp_path)
  args = _args(tmp_path, src)
  _, _, base = hw.workdir_of(args, "macs_r8", 0)
  _fill(base, ("search", "final", "compress", "latency"))
  row = hw.run_one(args, "best+distill", 0, rows)
  assert row["base"] == "macs_r8" and row["distill"]
  assert fake_runner[0][2] == ["--config.compress.distill=True", "--config.compress.round_to=8",
                               XLA, "--config.search.ratio_measure=macs",
                               "--config.search.round_to=8"]


def _row(setting, err, base_ms, pruned_ms, mode="full", seed=0):
  return {"setting": setting, "seed": seed, "key": f"{setting}{seed}", "mode": mode,
          "base": None, "ratios": [0.3, 0.0, 0.2, 0.3, 0.0], "test_error": 13.0,
          "test_error_finetuned": err, "pruned_macs": 20.1e6, "baseline_fused_ms": base_ms,
          "pruned_fused_ms": pruned_ms, "macs": 27e6, "executed_macs_pruned_fused": 25.4e6,
          "pruned_fused_p10_p90_ms": [pruned_ms - 0.1, pruned_ms + 0.3],
          "latency_reduction_pct": 100 * (1 - pruned_ms / base_ms),
          "predicted_latency_ms": 2.1 if mode == "full" else None,
          "predicted_masked_latency_ms": 1.6 if mode == "full" else None,
          "latency_load": {"min": 2.5, "max": 3.5}}


def test_markdown_and_png_from_rows(tmp_path, monkeypatch):
  out = tmp_path / "hardware_table.json"
  rows = [_row("latency", 14.5, 2.0, 1.5), _row("layers", 15.63, 2.2, 1.8, "reuse"),
          _row("layers+c8", 15.1, 2.2, 1.7, "from")]
  out.write_text(json.dumps({"rows": rows}))
  monkeypatch.setattr(hw, "run_one", lambda *a: pytest.fail("--max_runs 0 ran a stage"))
  monkeypatch.setattr(hw.ft, "recipe_key", lambda setting, seed, o, extra="": extra.split(":")[1]
                      + str(seed))
  hw.main(["--max_runs", "0", "--out", str(out), "--settings", "layers", "layers+c8",
           "latency", "macs"])
  md = (tmp_path / "hardware_table.md").read_text()
  lines = [l for l in md.splitlines() if l.startswith("| layers") or l.startswith("| latency")]
  assert [l.split(" | ")[0] for l in lines] == ["| layers", "| layers+c8", "| latency"]
  assert "| 15.63 | 27.00 / 20.10 / 25.40 | 2.200 | 1.800 (1.70-2.10) | 18.2 | - | 2.5-3.5 |" in md
  assert "| 2.100 / 1.600 |" in md
  assert "Not run yet (1): [['macs', 0]]" in md
  assert (tmp_path / "hardware_table.png").stat().st_size > 1000
  data = json.loads(out.read_text())
  assert len(data["rows"]) == 3 and data["missing"] == [["macs", 0]]
  assert ft.DONE == {"search": "search/arch.json", "final": "final/result.json",
                     "compress": "compress/result.json"}           # fashion_table untouched


def test_rewrite_reads_latency_figures_again(tmp_path, monkeypatch):
  """--max_runs 0 over a row written by an older harness: its figures from latency.json."""
  out = tmp_path / "hardware_table.json"
  old = _row("layers", 15.63, 9.0, 9.0, "reuse")
  del old["pruned_fused_p10_p90_ms"]
  out.write_text(json.dumps({"rows": [old]}))
  monkeypatch.setattr(hw.ft, "recipe_key", lambda setting, seed, o, extra="": extra.split(":")[1]
                      + str(seed))
  keep = tmp_path / "keep"
  _write(str(keep / "layers_seed0_layers0"), hw.LATENCY_JSON, _latency(2.0, 1.5))
  hw.main(["--max_runs", "0", "--out", str(out), "--settings", "layers", "--keep", str(keep),
           "--workdir", str(tmp_path / "none")])
  row = json.loads(out.read_text())["rows"][0]
  assert row["baseline_fused_ms"] == 2.0 and row["latency_reduction_pct"] == pytest.approx(25.0)
  assert row["pruned_fused_p10_p90_ms"] is None           # the fake latency.json has none


def test_the_stored_rows_keys_are_todays():
  """Every row of the committed hardware table is found by today's keys (a config field
  added since changes them: fashion_table.ADDED_AFTER_STORED_ROWS says how to keep them)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, "bench", "results", "hardware_table.json")) as f:
    rows = json.load(f)["rows"]
  assert len(rows) >= 16
  args = types.SimpleNamespace(set=[], workdir="w")
  for r in rows:
    base = r.get("base") if r["setting"] == "best+distill" else None
    assert r["key"] == hw.workdir_of(args, r["setting"], r["seed"], base)[0], r["setting"]
