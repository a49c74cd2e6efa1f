"""search.policy=random: uniform draws, nothing learned, the controller's budget, exact resume.

The searches are tiny (digits, 2 cells, F 8, batch 32, rewards on 64 images, 2 epochs) with
4 supernet steps per epoch = 4 samples per update (one controller sampler to compile).
"""
import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from scipy import stats

from configs import smoke
from fp_jax.run import checkpoint
from fp_jax import config as config_lib
from fp_jax.models import controller
from fp_jax import data
from fp_jax.models import space
from fp_jax.train import search
from fp_jax.train import search_state
from tests import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATIOS = (0.0, 0.2, 0.4, 0.6, 0.8)
SPE, UPDATES, SAMPLES = 4, 2, 4
N = 4000                      # draws per uniformity test
ALPHA = 0.01                  # family-wise level, split over the tests (Bonferroni)


SAMPLE_FIELDS = {"step", "update", "arc", "ratios", "train_acc", "prune_acc", "gap", "ratio",
                 "reward", "macs", "masked_macs"}
METRIC_FIELDS = {"step", "child_loss", "child_acc", "lr", "reward", "train_acc", "prune_acc",
                 "gap", "ratio", "baseline", "entropy"}


# the tiny search (tests/tiny.py) with 2 epochs of SPE steps, the controller from the start
tiny_config = functools.partial(tiny.tiny_config, epochs=2, steps_per_epoch=SPE,
                                controller_updates=UPDATES, controller_samples=SAMPLES,
                                uniform_child_epochs=0, ckpt_every_steps=2)


def pvalues(sampled, num_ratio_choices):
  """Chi-square p-values of uniformity: each input slot over its 0..k+1, each op slot over
  the ops, each stage's ratio index over the choices."""
  arc, ratio_idx = np.asarray(sampled["arc"]), np.asarray(sampled["ratio_idx"])
  out = {}
  for cell in range(2):
    for k in range(space.NUM_NODES):
      for s in range(2):
        i = cell * space.CELL_LEN + 4 * k + 2 * s
        out[f"input {i}"] = (arc[:, i], k + 2)
        out[f"op {i + 1}"] = (arc[:, i + 1], space.NUM_OPS)
  for stage in range(controller.NUM_STAGES):
    out[f"ratio {stage}"] = (ratio_idx[:, stage], num_ratio_choices)
  return {name: stats.chisquare(np.bincount(v, minlength=n)).pvalue if v.max() < n else 0.0
          for name, (v, n) in out.items()}


def _biased(kind, sampled, rng):
  """`sampled` with one deliberate bias, to show the test rejects it."""
  s = {k: v.copy() for k, v in sampled.items()}
  if kind == "inputs_off_by_one":    # node k's inputs over 0..k: the last one never drawn
    s["arc"][:, 16] = rng.integers(0, 5, N)
  elif kind == "ops_skewed":         # sep_conv3x3 at 0.25 instead of 0.2 in one slot
    s["arc"][:, 1] = rng.choice(space.NUM_OPS, N, p=[0.25] + [0.1875] * 4)
  elif kind == "ratios_skewed":      # the largest ratio a fifth less often
    s["ratio_idx"][:, 3] = rng.choice(len(RATIOS), N, p=[0.21] * 4 + [0.16])
  return s


def test_random_draws_are_uniform_and_a_biased_sampler_is_rejected():
  sampled = controller.sample_random(np.random.default_rng(0), N, len(RATIOS))
  for arc in sampled["arc"][:50]:
    space.validate_arc(arc)
  p = pvalues(sampled, len(RATIOS))
  assert len(p) == 45
  level = ALPHA / len(p)
  assert min(p.values()) > level, sorted(p.items(), key=lambda kv: kv[1])[:3]
  for kind in ("inputs_off_by_one", "ops_skewed", "ratios_skewed"):
    p = pvalues(_biased(kind, sampled, np.random.default_rng(1)), len(RATIOS))
    assert min(p.values()) < level, kind
  # a pure function of the generator's seed
  again = controller.sample_random(np.random.default_rng(0), N, len(RATIOS))
  assert all(np.array_equal(sampled[k], again[k]) for k in sampled)


def test_random_entropy_is_the_uniform_policys():
  decisions = [k + 2 for _ in range(2) for k in range(space.NUM_NODES) for _ in range(2)]
  decisions += [space.NUM_OPS] * 20 + [len(RATIOS)] * controller.NUM_STAGES
  want = sum(stats.entropy(np.ones(n)) for n in decisions)
  assert controller.random_entropy(len(RATIOS)) == pytest.approx(want, rel=1e-12)


def test_bad_policy_is_one_config_error():
  config = smoke.get_config()
  config.search.policy = "greedy"
  with pytest.raises(config_lib.ConfigError,
                     match=r"^search\.policy='greedy': must be one of controller, random$"):
    config_lib.validate(config)
  config.search.policy = "random"
  config_lib.validate(config)


def test_bad_policy_is_one_error_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "fp_jax.main", "--config=configs/smoke.py",
       f"--workdir={tmp_path}", "--config.stages=profile", "--config.search.policy=Random"],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"),
      capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
  assert [l for l in proc.stderr.splitlines() if l.startswith("error:")] == [
      "error: search.policy='Random': must be one of controller, random"], proc.stderr
  assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def digits():
  return data.load("digits", 256)


def _results(workdir):
  """(arch.json, metrics lines without timing fields, samples.jsonl rows)."""
  d = os.path.join(workdir, "search")
  metrics = [{k: v for k, v in json.loads(l).items() if k not in ("images_per_sec", "step_time")}
             for l in open(os.path.join(d, "metrics.jsonl"))]
  samples = [json.loads(l) for l in open(os.path.join(d, "samples.jsonl"))]
  return json.load(open(os.path.join(d, "arch.json"))), metrics, samples


@pytest.fixture(scope="module")
def random_run(tmp_path_factory, digits):
  workdir = str(tmp_path_factory.mktemp("random"))
  search.run(tiny_config(policy="random"), workdir, digits, RATIOS)
  return workdir, _results(workdir)


def test_random_search_learns_nothing_with_the_controllers_budget(tmp_path, digits, random_run):
  workdir, (arch, metrics, samples) = random_run
  config = tiny_config(policy="random")
  srch = search.Search.build(config, digits, RATIOS)
  # the final checkpoint's controller is its initial state, leaf for leaf
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "search", "ckpt"))
  state = search_state.restore(srch, ckpt, ckpt.latest_step())
  ckpt.close()
  init = srch.init_state().controller
  assert jax.tree.structure(state.controller) == jax.tree.structure(init)
  for got, want in zip(jax.tree.leaves(state.controller), jax.tree.leaves(init)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert all(m["baseline"] == 0.0 for m in metrics)
  assert all(m["entropy"] == controller.random_entropy(len(RATIOS)) for m in metrics)
  # the controller's budget (its count: tests/search_test.py), DESIGN §3's fields, the formula
  assert len(samples) == 2 * UPDATES * SAMPLES and len(metrics) == 2
  assert all(set(r) == SAMPLE_FIELDS for r in samples), set(samples[0]) ^ SAMPLE_FIELDS
  assert all(METRIC_FIELDS <= set(m) for m in metrics)
  assert {"normal", "reduce", "arc_string", "ratios", "train_acc", "prune_acc",
          "reward"} <= set(arch)
  a, b = config.search.alpha, config.search.beta
  allowed = {float(x) for x in np.float32(RATIOS)}
  for r in samples:
    assert r["reward"] == a * r["ratio"] * (1 + b * (r["prune_acc"] - r["train_acc"])) \
        + r["train_acc"]
    space.validate_arc(r["arc"])
    assert set(r["ratios"]) <= allowed
    assert [r["ratios"][s] for s in search.empty_stages(srch.plan)] == [0.0] * 3
  assert len({tuple(r["arc"]) for r in samples}) == len(samples)   # fresh draws
  # no samples: choose() takes one random draw, the same every time
  fallback = [srch.choose(state, []) for _ in range(2)]
  assert fallback[0] == fallback[1] and fallback[0]["candidates_evaluated"] == 1
  space.parse_arc(fallback[0]["arc_string"])
  assert set(fallback[0]["ratios"]) <= allowed


class Killed(Exception):
  """Stands in for SIGKILL: the run stops where it is, without saving anything."""


def test_killed_random_search_resumes_to_the_same_result(tmp_path, digits, random_run,
                                                         monkeypatch):
  """Killed in epoch 2's second update: resumes from the checkpoint after epoch 2's second
  supernet step, 2 updates in (the controller's step, still 0, does not count them), so
  samples.jsonl keeps epoch 1's rows and drops epoch 2's."""
  evaluate, calls = search.Search.evaluate_sample, [0]

  def killing(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == UPDATES * SAMPLES + SAMPLES + 2:
      raise Killed()
    return evaluate(self, *args, **kwargs)

  with monkeypatch.context() as mp:
    mp.setattr(search.Search, "evaluate_sample", killing)
    with pytest.raises(Killed):
      search.run(tiny_config(policy="random"), str(tmp_path), digits, RATIOS)
  with open(os.path.join(tmp_path, "search", "samples.jsonl")) as f:
    assert len(f.readlines()) == UPDATES * SAMPLES + SAMPLES
  search.run(tiny_config(policy="random"), str(tmp_path), digits, RATIOS)
  assert _results(str(tmp_path)) == random_run[1]


def test_a_random_checkpoint_does_not_resume_as_controller(tmp_path, digits, random_run):
  workdir = str(tmp_path / "run")
  shutil.copytree(random_run[0], workdir)
  with pytest.raises(checkpoint.CheckpointError,
                     match="written with search.policy='random', this run has 'controller'"):
    search.run(tiny_config(policy="controller"), workdir, digits, RATIOS)
