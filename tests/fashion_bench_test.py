"""The Fashion-MNIST benchmarks' own arithmetic: equal-cost comparison against the uniform
pruning curve, seed summaries, reward-quantile picks, rank statistics, resumed tables."""
import json
import os
import shutil
import sys

import numpy as np
import pytest

from bench import fashion_report
from bench import fashion_table
from bench import proxy_fidelity


def _rows():
  rows = []
  for seed, shift in ((0, 0.0), (1, 1.0)):
    rows.append({"setting": "enas", "seed": seed, "macs": 10e6, "test_error": 8.0 + shift})
    for ratio, macs, err in ((0.2, 7e6, 9.0), (0.4, 4e6, 11.0), (0.6, 2e6, 15.0)):
      rows.append({"setting": "enas_uniform", "seed": seed, "uniform_ratio": ratio,
                   "pruned_macs": macs, "test_error_finetuned": err + shift})
    rows.append({"setting": "fp_a0.02_b20", "seed": seed, "pruned_macs": 5.5e6,
                 "test_error_finetuned": 9.5 + shift})
  return rows


def test_uniform_curve_and_equal_cost_difference():
  rows = _rows()
  macs, errs = fashion_report.uniform_curve(rows, seed=1)
  assert macs == [2e6, 4e6, 7e6, 10e6] and errs == [16.0, 12.0, 10.0, 9.0]
  # seed 1's curve at 5.5M: halfway between (4M, 12) and (7M, 10) -> 11; fp: 10.5
  assert fashion_report.vs_curve(rows[-1], rows) == pytest.approx(-0.5)
  assert fashion_report.vs_curve(dict(rows[-1], pruned_macs=1e6), rows) is None
  mean_macs, mean_errs = fashion_report.uniform_curve(rows)
  assert mean_errs == [15.5, 11.5, 9.5, 8.5] and mean_macs[0] == 2e6


def test_summary_means_and_sample_spread():
  rows = _rows()
  for r in rows:
    r.setdefault("seconds", {"compress": 2.0})
    if r["setting"] == "fp_a0.02_b20":
      r["vs_enas_uniform"] = fashion_report.vs_curve(r, rows)
  s = fashion_report.summarise(rows, fashion_table.SETTINGS, fashion_table.STAGES)
  fp = s["fp_a0.02_b20"]
  assert fp["seeds"] == 2 and fp["test_error_finetuned"] == pytest.approx(10.0)
  assert fp["test_error_finetuned_sd"] == pytest.approx(np.std([9.5, 10.5], ddof=1))
  assert fp["vs_enas_uniform"] == pytest.approx(-0.5) and fp["vs_enas_uniform_sd"] == 0.0
  assert s["enas + uniform 0.4"]["test_error_finetuned"] == pytest.approx(11.5)
  assert s["enas + uniform 0.4"]["compress_s"] == 2.0


def test_reward_curves_average_over_seeds():
  rows = [{"setting": "random", "reward_per_epoch": [1.0, 2.0, 3.0],
           "entropy_per_epoch": [5.0, 5.0, 5.0]},
          {"setting": "random", "reward_per_epoch": [3.0, 4.0],
           "entropy_per_epoch": [5.0, 4.0]}]
  c = fashion_report.reward_curves(rows, "random")
  assert c == {"reward": [2.0, 3.0], "entropy": [5.0, 4.5], "seeds": 2}
  assert fashion_report.reward_curves(rows, "enas") is None


def test_finished_rows_are_reused_not_rerun(tmp_path, monkeypatch):
  """A rerun completes only what is missing: rows with the same recipe key come back as they
  were, and --max_runs leaves the rest listed as missing."""
  out = tmp_path / "t.json"
  key = fashion_table.recipe_key("fp_a0.02_b20", 0, [])
  row = {"key": key, "setting": "fp_a0.02_b20", "seed": 0, "ratios": [0.1] * 5,
         "test_error": 9.0, "test_error_masked": 30.0, "test_error_finetuned": 9.5,
         "pruned_macs": 5e6, "pruned_params": 1e4, "macs": 8e6, "params": 2e4,
         "seconds": {"search": 1.0}, "reward_per_epoch": [1.0], "entropy_per_epoch": [2.0]}
  out.write_text(json.dumps({"rows": [row]}))
  monkeypatch.setattr(fashion_table, "run_stages",
                      lambda *a, **k: pytest.fail("a finished run was rerun"))
  common = ["--settings", "fp_a0.02_b20", "--out", str(out), "--workdir", str(tmp_path / "w"),
            "--keep", str(tmp_path / "k")]
  fashion_table.main(["--seeds", "0"] + common)
  result = json.loads(out.read_text())
  assert result["rows"][0]["test_error_finetuned"] == 9.5 and not result["missing"]
  assert os.path.exists(str(out)[:-5] + ".md") and os.path.exists(str(out)[:-5] + ".png")
  # seed 1 is new; --max_runs 0 runs nothing new and lists it as missing
  fashion_table.main(["--seeds", "0", "1", "--max_runs", "0"] + common)
  again = json.loads(out.read_text())
  assert again["rows"] == result["rows"]
  assert again["missing"] == [["fp_a0.02_b20", 1, None]]


def _stage_writer(workdir, ran):
  """cmd_of for run_stages: a process that writes the stage's outputs (their content names the
  stage) and appends the stage to `ran`."""
  def cmd_of(stage):
    rels = fashion_table.KEEP[stage]
    code = (f"import os\nfor rel in {rels!r}:\n"
            f"  p = os.path.join({str(workdir)!r}, rel)\n"
            f"  os.makedirs(os.path.dirname(p), exist_ok=True)\n"
            f"  open(p, 'w').write('{stage}:' + rel)\n"
            f"open({str(ran)!r}, 'a').write('{stage}\\n')\n")
    return [sys.executable, "-c", code]
  return cmd_of


def test_finished_stages_are_kept_and_restored_on_another_machine(tmp_path):
  """Each finished stage's outputs go to --keep; a work directory lost with its machine is
  restored from there and only the stages never finished run again."""
  work, keep, ran = tmp_path / "w" / "enas_seed0_k", tmp_path / "keep", tmp_path / "ran.txt"
  times = fashion_table.run_stages(_stage_writer(work, ran), str(work), ("search", "final"),
                                   str(keep))
  assert set(times) == {"search", "final", "cpu_s", "cpu_model"}
  assert times["cpu_model"] == {"search": fashion_table.cpu_model(),
                                "final": fashion_table.cpu_model()}
  assert ran.read_text().split() == ["search", "final"]
  # CPU seconds of each stage's process: positive, and no more than its wall time allows
  assert set(times["cpu_s"]) == {"search", "final"}
  assert all(0 < times["cpu_s"][s] <= 2 * times[s] for s in ("search", "final"))
  kept = keep / work.name
  for stage in ("search", "final"):
    for rel in fashion_table.KEEP[stage]:
      assert (kept / rel).read_text() == f"{stage}:{rel}"
  assert json.loads((kept / "bench_times.json").read_text()) == times
  shutil.rmtree(tmp_path / "w")                     # the machine is gone; the repository stays
  ran.unlink()
  times2 = fashion_table.run_stages(_stage_writer(work, ran), str(work), keep_dir=str(keep))
  assert ran.read_text().split() == ["compress"]    # search and final were restored, not rerun
  assert (work / "final" / "weights.npz").read_text() == "final:final/weights.npz"
  assert times2["search"] == times["search"] and times2["final"] == times["final"]
  assert (kept / "compress" / "result.json").read_text() == "compress:compress/result.json"
  # a stage finished before keeping existed is kept when the run is next visited
  other, keep2 = tmp_path / "w2" / "r", tmp_path / "keep2"
  fashion_table.run_stages(_stage_writer(other, ran), str(other), ("search",))
  fashion_table.run_stages(lambda st: pytest.fail("rerun"), str(other), ("search",), str(keep2))
  assert (keep2 / "r" / "search" / "arch.json").read_text() == "search:search/arch.json"
  assert (keep2 / "r" / "bench_times.json").read_text() == (other / "bench_times.json").read_text()


def test_merge_takes_rows_of_parallel_parts(tmp_path):
  """Parts of the table run in parallel write their own JSONs; --merge joins them, a merged
  row replacing the same key's."""
  def row(setting, err):
    return {"key": fashion_table.recipe_key(setting, 0, []), "setting": setting, "seed": 0,
            "ratios": [0.1] * 5, "test_error": err, "test_error_masked": 30.0,
            "test_error_finetuned": err + 1, "pruned_macs": 5e6, "pruned_params": 1e4,
            "macs": 8e6, "params": 2e4, "seconds": {}, "reward_per_epoch": [1.0],
            "entropy_per_epoch": [2.0]}
  out, a, b = tmp_path / "t.json", tmp_path / "a.json", tmp_path / "b.json"
  out.write_text(json.dumps({"rows": [row("enas", 13.0)]}))
  a.write_text(json.dumps({"rows": [row("enas", 12.0)]}))
  b.write_text(json.dumps({"rows": [row("random", 11.0)]}))
  fashion_table.main(["--seeds", "0", "--settings", "enas", "random", "--uniform", "0.2",
                      "--max_runs", "0", "--out", str(out), "--merge", str(a), str(b),
                      "--workdir", str(tmp_path / "w"), "--keep", str(tmp_path / "k")])
  got = json.loads(out.read_text())
  assert [(r["setting"], r["test_error"]) for r in got["rows"]] == [("enas", 12.0),
                                                                     ("random", 11.0)]
  assert got["missing"] == [["enas_uniform", 0, 0.2]]


def test_recipe_key_changes_with_overrides_and_seed():
  a = fashion_table.recipe_key("enas", 0, [])
  assert a == fashion_table.recipe_key("enas", 0, [])
  assert a != fashion_table.recipe_key("enas", 1, [])
  assert a != fashion_table.recipe_key("enas", 0, ["search.epochs=2"])
  assert a != fashion_table.recipe_key("enas", 0, [], "0.4")
  assert a != fashion_table.recipe_key("fp_a0.02_b20", 0, [])   # another variant's values


def test_the_stored_rows_keys_survive_fields_added_since():
  """Every row of the committed table (written before ADDED_AFTER_FIRST_ROWS existed) is found
  by today's recipe_keys, and a new row is keyed by today's full recipe."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, "bench", "results", "fashion_table.json")) as f:
    rows = json.load(f)["rows"]
  assert len(rows) >= 16
  for r in rows:
    extra = "" if r.get("uniform_ratio") is None else f"{r['uniform_ratio']:g}"
    keys = fashion_table.recipe_keys(r["setting"], r["seed"], [], extra)
    assert r["key"] in keys and keys[0] == fashion_table.recipe_key(r["setting"], r["seed"], [],
                                                                    extra)
    assert r["key"] == keys[1] != keys[0]       # the first rows' form


def test_an_added_field_off_its_default_has_only_todays_key(monkeypatch):
  """A recipe that sets an added field (compress.round_to 8) cannot match a first-form row."""
  from configs import fashion
  get = fashion.get_config

  def rounded(variant=""):
    c = get(variant)
    c.compress.round_to = 8
    return c
  before = fashion_table.recipe_keys("enas", 0, [])
  monkeypatch.setattr(fashion, "get_config", rounded)
  after = fashion_table.recipe_keys("enas", 0, [])
  assert len(before) == 2 and len(after) == 1 and after[0] not in before


def test_a_field_added_after_the_stored_rows_keys_only_off_its_default(monkeypatch):
  """latency.micro_batch (ADDED_AFTER_STORED_ROWS) at its default leaves both keys as they
  were before the field existed; set to another value, the recipe has other keys."""
  from configs import fashion
  get = fashion.get_config
  assert {"latency.micro_batch", "latency.engine"} <= set(fashion_table.ADDED_AFTER_STORED_ROWS)
  before = fashion_table.recipe_keys("enas", 0, [])

  def chunked(variant=""):
    c = get(variant)
    c.latency.micro_batch = 4
    return c
  monkeypatch.setattr(fashion, "get_config", chunked)
  after = fashion_table.recipe_keys("enas", 0, [])
  assert len(after) == 2 and not set(after) & set(before)


def test_keys_do_not_depend_on_where_the_latency_tables_are_cached(monkeypatch):
  keys = fashion_table.recipe_keys("fp_a0.02_b20", 0, [])
  monkeypatch.setenv("FP_JAX_LATENCY_TABLE_DIR", "/somewhere/else")
  assert fashion_table.recipe_keys("fp_a0.02_b20", 0, []) == keys


def test_a_run_begun_under_an_earlier_key_resumes_in_its_directory(tmp_path):
  (tmp_path / "k" / "enas_seed0_old").mkdir(parents=True)
  path, key = fashion_table.run_dir(str(tmp_path / "w"), str(tmp_path / "k"), "enas_seed0_",
                                    ["new", "old"])
  assert (path, key) == (str(tmp_path / "w" / "enas_seed0_old"), "old")
  path, key = fashion_table.run_dir(str(tmp_path / "w"), str(tmp_path / "k"), "x_", ["new", "old"])
  assert (path, key) == (str(tmp_path / "w" / "x_new"), "new")


def test_each_finished_run_is_kept_before_the_next_starts(tmp_path, monkeypatch):
  """A session that ends mid-table keeps the runs it finished: the JSON is rewritten after
  every new row, before the next run starts."""
  out = tmp_path / "t.json"
  calls = []

  def fake_run(cmd_of, workdir, stages=fashion_table.STAGES, keep_dir=None):
    if calls:
      raise KeyboardInterrupt   # the session ends during the second run
    calls.append(workdir)
    return {"search": 1.0}

  def fake_row(workdir, setting, seed, times):
    return {"setting": setting, "seed": seed, "ratios": [0.2] * 5, "test_error": 9.0,
            "test_error_masked": 30.0, "test_error_finetuned": 9.5, "pruned_macs": 5e6,
            "pruned_params": 1e4, "macs": 8e6, "params": 2e4, "seconds": times,
            "reward_per_epoch": [1.0], "entropy_per_epoch": [2.0]}

  monkeypatch.setattr(fashion_table, "run_stages", fake_run)
  monkeypatch.setattr(fashion_table, "row_of", fake_row)
  with pytest.raises(KeyboardInterrupt):
    fashion_table.main(["--seeds", "0", "--settings", "fp_a0.02_b0", "fp_a0.02_b20",
                        "--out", str(out), "--workdir", str(tmp_path / "w"),
                        "--keep", str(tmp_path / "k")])
  kept = json.loads(out.read_text())
  assert [(r["setting"], r["seed"]) for r in kept["rows"]] == [("fp_a0.02_b0", 0)]
  assert kept["rows"][0]["key"] == fashion_table.recipe_key("fp_a0.02_b0", 0, [])
  assert kept["missing"] == [["fp_a0.02_b20", 0, None]]


def test_spread_by_reward_picks_quantiles():
  cands = [{"reward": float(r)} for r in np.random.default_rng(0).permutation(101)]
  picked = proxy_fidelity.spread_by_reward(cands, 5)
  assert [c["reward"] for c in picked] == [0.0, 25.0, 50.0, 75.0, 100.0]


def test_rank_stats_match_hand_values():
  x = [1, 2, 3, 4, 5, 6]
  y = [2, 1, 4, 3, 6, 5]           # 3 discordant pairs of 15: tau = (12 - 3) / 15
  st = proxy_fidelity.rank_stats(x, y, boot=300)
  assert st["kendall_tau"] == pytest.approx(0.6)
  assert st["spearman_rho"] == pytest.approx(1 - 6 * 6 / (6 * 35))
  lo, hi = st["kendall_tau_ci95"]
  assert -1 <= lo <= st["kendall_tau"] <= hi <= 1
  assert proxy_fidelity.rank_stats(x, x[::-1], boot=50)["kendall_tau"] == pytest.approx(-1)


def test_bootstrap_statistics_equal_scipys_per_resample():
  """The resamples' tau-b and rho, computed all at once, are scipy's (ties included); the
  interval is the percentiles of exactly those resamples that vary in x and in y."""
  from scipy import stats
  rng = np.random.default_rng(3)
  x = np.round(rng.normal(size=9), 1)
  y = np.round(x + rng.normal(size=9), 1)
  i = np.array([rng.integers(0, 9, 9) for _ in range(60)])
  xs, ys = x[i], y[i]
  keep = (np.ptp(xs, axis=1) > 0) & (np.ptp(ys, axis=1) > 0)
  xs, ys = xs[keep], ys[keep]
  np.testing.assert_allclose(proxy_fidelity._tau_b(xs, ys), [
      stats.kendalltau(a, b).statistic for a, b in zip(xs, ys)], rtol=0, atol=1e-12)
  np.testing.assert_allclose(proxy_fidelity._rho(xs, ys), [
      stats.spearmanr(a, b).statistic for a, b in zip(xs, ys)], rtol=0, atol=1e-12)
  st = proxy_fidelity.rank_stats([0, 0, 0, 1], [0, 1, 2, 3], boot=40, seed=1)
  boot = np.random.default_rng(1)
  taus = []
  for _ in range(40):
    j = boot.integers(0, 4, 4)
    a, b = np.array([0, 0, 0, 1])[j], np.arange(4)[j]
    if np.ptp(a) and np.ptp(b):
      taus.append(stats.kendalltau(a, b).statistic)
  assert st["kendall_tau_ci95"] == pytest.approx([np.percentile(taus, 2.5),
                                                  np.percentile(taus, 97.5)], abs=1e-12)


def test_proxy_fidelity_resumes_from_its_json_alone(tmp_path, monkeypatch):
  """A rerun on a machine without the work directories trains only the missing samples: the
  picks, the search's config and the finished rows come from the results JSON."""
  out = tmp_path / "p.json"
  cands = [{"arc": [0] * 40, "ratios": [0.1 * (i % 5)] * 5, "source": "search",
            "reward": float(i), "train_acc": 0.5 + i, "prune_acc": 0.4 - i, "gap": -0.1 * i,
            "ratio": 1.0, "macs": 1e6, "masked_macs": 5e5} for i in range(12)]
  trained = []

  def fake_standalone(c, i, args, config, variant):
    trained.append(i)
    v = 0.01 * c["reward"]
    return {"final_acc": 0.7 + v, "masked_acc": 0.5 - v, "finetuned_acc": 0.6 + v,
            "pruned_macs": 1, "seconds": {}, "standalone_gap": -0.2 - 2 * v,
            "standalone_reward": 0.7 + 0.01 * c["reward"]}

  monkeypatch.setattr(proxy_fidelity, "standalone", fake_standalone)
  monkeypatch.setattr(fashion_table, "run_stages", lambda *a, **k: {})
  monkeypatch.setattr(proxy_fidelity, "score_candidates", lambda *a, **k: cands)
  common = ["--samples", "4", "--out", str(out)]
  proxy_fidelity.main(common + ["--max_samples", "3", "--workdir", str(tmp_path / "w1")])
  first = json.loads(out.read_text())
  assert trained == [0, 1, 2] and len(first["picked"]) == 4 and len(first["rows"]) == 3
  monkeypatch.setattr(fashion_table, "run_stages", lambda *a, **k: pytest.fail("searched"))
  monkeypatch.setattr(proxy_fidelity, "score_candidates", lambda *a, **k: pytest.fail("scored"))
  proxy_fidelity.main(common + ["--workdir", str(tmp_path / "w2")])   # w1 gone, as it were
  again = json.loads(out.read_text())
  assert trained == [0, 1, 2, 3]
  assert [r["index"] for r in again["rows"]] == [0, 1, 2, 3]
  assert again["rows"][:3] == first["rows"] and again["picked"] == first["picked"]
  assert again["rank_correlation"]["train_acc~final_acc"]["kendall_tau"] == pytest.approx(1.0)


def test_search_dir_config_from_before_new_fields(tmp_path):
  """A finished search's config.json written before a field existed: its values over today's
  defaults (the new field keeps its default); a field today's config lacks: one error."""
  import argparse
  import ml_collections
  from configs import fashion
  stored = fashion.get_config("a0.02_b20").to_dict()
  del stored["search"]["dispatch"]
  stored["seed"], stored["search"]["lr_max"] = 3, 0.25
  (tmp_path / "config.json").write_text(json.dumps(stored))
  args = argparse.Namespace(search_dir=str(tmp_path), variant="a0.02_b20", seed=0, set=[])
  config, search_dir = proxy_fidelity.search_config(args, ml_collections, fashion)
  assert search_dir == str(tmp_path) and args.seed == config.seed == 3
  assert config.search.lr_max == 0.25 and config.search.dispatch == "auto"
  stored["search"]["gone"] = 1
  (tmp_path / "config.json").write_text(json.dumps(stored))
  with pytest.raises(SystemExit, match=r"unknown field search\.gone"):
    proxy_fidelity.search_config(args, ml_collections, fashion)
