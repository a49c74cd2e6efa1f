"""Tests for the final and compress stages: regularisation, masks held through fine-tuning,
the stages end to end on digits, summary.md and the paper config variants."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp_jax.models import child
from fp_jax.pruning import compaction
from fp_jax import data
from fp_jax.models import flops
from fp_jax.models import layers
from fp_jax.models import space
from fp_jax.run import weights
from fp_jax.train import compress
from fp_jax.train import final
from fp_jax.train import trainer as trainer_lib
from fp_jax.pruning import masks as masks_lib
from fp_jax.train.streams import Stream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARC = space.parse_arc(space.ENAS_ARC)


@pytest.fixture(autouse=True, scope="module")
def _xla_depthwise():
  """Grouped-conv depthwise: XLA:CPU compiles it in about half the time of the k*k shifts
  (tests here are compile-bound; the two are exactly equal, see compaction_test)."""
  old, layers.DEPTHWISE_IMPL = layers.DEPTHWISE_IMPL, "xla"
  yield
  layers.DEPTHWISE_IMPL = old


def test_drop_path_schedule():
  keep = lambda i, t: float(child.path_keep_prob(0.6, i, 5, t))
  assert keep(4, 0.0) == 1.0 and keep(0, 0.0) == 1.0          # ramped in from 1
  assert keep(4, 1.0) == pytest.approx(0.6)                   # last cell: the configured keep
  assert keep(0, 1.0) == pytest.approx(1 - 0.4 / 5)           # scaled by depth
  assert keep(4, 0.5) == pytest.approx(0.8)
  assert keep(4, 3.0) == pytest.approx(0.6)                   # clipped at the end of training


def test_drop_path_drops_whole_examples():
  x = jnp.ones((64, 4, 4, 3))
  y = np.asarray(layers.drop_path(x, jax.random.key(0), 0.5))
  per_example = y.reshape(64, -1)
  assert set(np.unique(per_example)) <= {0.0, 2.0}
  assert np.all(per_example.min(1) == per_example.max(1))     # all or nothing per example
  assert 10 < np.sum(per_example[:, 0] == 0) < 54


def _tiny(num_layers=1, f=4, seed=0):
  plan = child.make_plan(ARC, num_layers, f, (8, 8, 1), 10)
  params, stats = child.init(jax.random.key(seed), plan)
  return plan, params, stats


def test_regularisation_off_is_the_plain_forward():
  plan, params, stats = _tiny()
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
  reg = {"key": jax.random.key(2), "keep_prob": 1.0, "drop_path_keep_prob": 1.0, "progress": 1.0}
  plain = child.forward(plan, params, stats, x, True)[0]
  off = child.forward(plan, params, stats, x, True, reg=reg)[0]
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(off))
  on = child.forward(plan, params, stats, x, True,
                     reg={**reg, "keep_prob": 0.5, "drop_path_keep_prob": 0.5})[0]
  assert np.max(np.abs(np.asarray(on) - np.asarray(plain))) > 1e-3


def _digits():
  return data.load("digits", 64)


def _recipe(epochs=2, spe=3, **kw):
  """configs/smoke.py's final recipe at batch 32 (_tiny_config's: the tests share its compiled
  steps), shortened."""
  base = dict(epochs=epochs, steps_per_epoch=spe, batch_size=32, eval_batch_size=512,
              lr_max=0.05, lr_min=0.001, lr_t0=epochs, lr_tmul=1, momentum=0.9, l2=2e-4,
              grad_clip=5.0, aux_weight=0.4, keep_prob=0.8, drop_path_keep_prob=0.6, cutout=2,
              crop_pad=0, flip=False)
  return trainer_lib.Recipe(**{**base, **kw})


def test_finetune_keeps_masks_exact(tmp_path):
  """Masks held in optimizer state: pruned weights stay exactly zero through training,
  the kept ones move, and the compacted network still gives the masked logits."""
  ds = _digits()
  plan, params, stats = _tiny(num_layers=1, f=6)
  ratios = np.float32([0.5, 0.3, 0.5, 0.5, 0.6])
  masks = jax.device_get(masks_lib.child_masks(plan, params, ratios))
  apply = lambda p, m: masks_lib.apply_child_masks(plan, p, m)
  masked = apply(params, masks)
  trainer = trainer_lib.FixedTrainer.build(plan, _recipe(), 0, 20, ds.mean, ds.std, masks=masks)
  state = trainer_lib.train(trainer, lambda: trainer.init_state(masked, stats), ds.x_train,
                            ds.y_train, str(tmp_path), "test")
  tuned = jax.device_get(state["net"]["params"])
  remasked = jax.device_get(apply(tuned, masks))
  for a, b in zip(jax.tree.leaves(tuned), jax.tree.leaves(remasked)):
    np.testing.assert_array_equal(a, b)                       # pruned entries are exactly 0
  moved = [np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(tuned),
                                                  jax.tree.leaves(jax.device_get(masked)))]
  assert max(moved) > 1e-3
  tuned_stats = jax.device_get(state["net"]["stats"])
  _, cp, cs = compaction.compact(plan, tuned, tuned_stats, masks)
  x = jnp.asarray(next(data.eval_batches(ds.x_test, ds.y_test, batch_size=32, mean=ds.mean,
                                         std=ds.std))[0])
  diff = compress.max_abs_diff(plan, tuned, tuned_stats, cp, cs, x)
  assert diff < 1e-4
  assert flops.param_count(cp) == flops.count(plan, compaction.widths_of(plan, masks))["params"]


def _run(*args, timeout=600):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  return subprocess.run([sys.executable, "-m", "fp_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _tiny_config(**compress):
  """smoke.py shrunk: final 1 layer, F 6 on digits (the network of _tiny(f=6))."""
  from configs import smoke
  config = smoke.get_config()
  config.stages = "final,compress"
  f = config.final
  f.arc, f.num_layers, f.out_filters, f.epochs, f.batch_size = space.ENAS_ARC, 1, 6, 4, 32
  f.steps_per_epoch, f.lr_t0 = 15, 4
  k = config.compress
  k.ratios, k.finetune_epochs, k.steps_per_epoch = "0.5 0.4 0.4 0.5 0.5", 2, 10
  k.batch_size = f.batch_size   # fine-tuning runs the final stage's compiled step
  for key, value in compress.items():
    k[key] = value
  return config


def test_final_and_compress_stages(tmp_path, monkeypatch):
  """The stages in process (sharing compiled steps with the tests above), then the CLI's
  refusal to redo a finished stage. The compress stage's fine-tuning runs the final stage's
  compiled train step (the final network trains with masks of all ones)."""
  from fp_jax import summary
  built, build = [], trainer_lib.FixedTrainer.build
  monkeypatch.setattr(trainer_lib.FixedTrainer, "build", classmethod(
      lambda cls, *a, **kw: built.append(build(*a, **kw)) or built[-1]))
  workdir = tmp_path / "run"
  config = _tiny_config()
  ds = _digits()
  fin = final.run(config, str(workdir), ds)
  compiled = built[0].train_step._cache_size()
  com = compress.run(config, str(workdir), ds)
  assert len(built) == 2 and built[0].train_step is built[1].train_step
  assert built[0].train_step._cache_size() == compiled        # nothing compiled for compress
  assert np.all(built[0].masks["units"] == 1) and not np.all(built[1].masks["units"] == 1)
  summary.write(str(workdir))
  assert fin == json.loads((workdir / "final" / "result.json").read_text())
  assert com == json.loads((workdir / "compress" / "result.json").read_text())
  plan = child.make_plan(ARC, 1, 6, (8, 8, 1), 10)
  counts = flops.count(plan)
  assert (fin["macs"], fin["params"], fin["params_no_aux"]) == (
      counts["macs"], counts["params"], counts["params_no_aux"])
  assert fin["test_error"] < 50.0                              # chance is 90%
  assert fin["test_error"] == pytest.approx(100 * (1 - fin["test_acc"]))
  for key in ("ratios", "macs", "params", "pruned_macs", "pruned_params", "test_error_masked",
              "test_error_masked_stale_bn", "test_error_finetuned",
              "max_abs_diff_masked_vs_compact"):
    assert key in com, key
  assert com["bn_batches"] == 32
  # the unpruned network's BN statistics are stale once channels are masked (here about
  # 82% error); re-estimating them on training batches recovers much of it (about 70%)
  assert com["test_error_masked"] < com["test_error_masked_stale_bn"]
  assert com["pruned_macs"] < com["macs"] and com["pruned_params"] < com["params"]
  assert com["max_abs_diff_masked_vs_compact"] < 1e-4
  assert com["test_error_finetuned"] <= com["test_error_masked"]
  tree, meta = weights.load(str(workdir / "compress" / "weights.npz"))
  assert flops.param_count(tree["params"]) == com["pruned_params"]
  assert meta["ratios"] == [0.5, 0.4, 0.4, 0.5, 0.5] and meta["arc_string"] == space.ENAS_ARC
  text = (workdir / "summary.md").read_text()
  assert f"| {fin['test_error']:.2f} | {fin['macs'] / 1e6:.3f} |" in text
  assert f"| {com['test_error_finetuned']:.2f} | {com['pruned_macs'] / 1e6:.3f} |" in text
  assert (f"BN re-estimated (32 batches), no fine-tuning | {com['test_error_masked']:.2f} |"
          in text)
  assert f"stale BN statistics, no fine-tuning | {com['test_error_masked_stale_bn']:.2f} |" in text
  args = ["--config=configs/smoke.py", "--config.stages=final,compress",
          f"--config.final.arc={space.ENAS_ARC}", f"--workdir={workdir}"]
  again = _run(*args, timeout=120)                           # finished: refused, nothing lost
  assert again.returncode != 0 and "error: stage final already finished" in again.stderr
  assert json.loads((workdir / "final" / "result.json").read_text()) == fin


def _finished_final(tmp_path, seed):
  """(digits, plan, params, stats, DIR) with a tiny 1-layer F 6 network as DIR's final."""
  plan, params, stats = _tiny(num_layers=1, f=6, seed=seed)
  workdir = tmp_path / "run"
  os.makedirs(workdir / "final")
  weights.save(str(workdir / "final" / "weights.npz"), {"params": params, "stats": stats},
               final.meta_of(plan, ARC, 1, 6))
  return _digits(), plan, params, stats, workdir


def test_scratch_mode_trains_the_thin_network(tmp_path):
  ds, plan, params, stats, workdir = _finished_final(tmp_path, seed=3)
  # 0 epochs: the loop is the fine-tuning one (tested above); scratch differs in its start
  config = _tiny_config(mode="scratch", ratios="0.5 0.5 0.5 0.5 0.5", finetune_epochs=0)
  result = compress.run(config, str(workdir), ds)
  tree, _ = weights.load(str(workdir / "compress" / "weights.npz"))
  assert flops.param_count(tree["params"]) == result["pruned_params"] < result["params"]
  _, thin_from_trained, _ = compaction.prune(plan, params, stats, np.full(5, 0.5))
  kernels = [(a, b) for a, b in zip(jax.tree.leaves(tree["params"]),
                                     jax.tree.leaves(thin_from_trained)) if a.ndim == 4]
  assert kernels and not any(np.array_equal(a, b) for a, b in kernels)   # a fresh start


def test_finetuning_starts_from_reestimated_statistics(tmp_path):
  """0 fine-tuning epochs: the compact network keeps the re-estimated statistics, which are
  the mean and variance of the stem's pre-BN activations over the stage's BN batches
  (training images, normalised, not augmented); it tests exactly as the masked network."""
  ds, plan, params, stats, workdir = _finished_final(tmp_path, seed=5)
  config = _tiny_config(ratios="0.5 0.5 0.5 0.5 0.5", finetune_epochs=0, bn_batches=3)
  config.data.crop_pad, config.data.flip, config.final.cutout = 2, True, 4   # must be ignored
  result = compress.run(config, str(workdir), ds)
  assert result["test_error_finetuned"] == result["test_error_masked"]
  assert result["test_error_masked"] != result["test_error_masked_stale_bn"]
  tree, meta = weights.load(str(workdir / "compress" / "weights.npz"))
  x, y = final.training_images(ds)
  images = np.concatenate(list(compress.bn_batches(config, x, y, ds.mean, ds.std)))
  assert images.shape == (3 * config.compress.batch_size, 8, 8, 1)
  np.testing.assert_array_equal(images[:4], data._normalize(
      x[np.random.default_rng([config.seed, Stream.BN_REESTIMATE, 0]).permutation(len(x))[:4]],
      ds.mean, ds.std))
  masks = jax.device_get(masks_lib.child_masks(plan, params, np.float32([0.5] * 5)))
  kept = np.flatnonzero(np.asarray(masks_lib.value_mask(plan, masks, plan.stem)) > 0.5)
  pre = np.asarray(jax.lax.conv_general_dilated(
      images, np.asarray(params["blocks"]["stem"]["conv"])[..., kept], (1, 1), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC")), np.float64)
  stem_stats = tree["stats"]["blocks"]["stem"]["bn"]
  np.testing.assert_allclose(stem_stats["mean"], pre.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stem_stats["var"], pre.var((0, 1, 2)), rtol=1e-5, atol=1e-6)


# DESIGN §1: the paper's CIFAR-10 experiments, (a, b) of the reward, each also with CutOut 16
PAPER = {"a0.02_b20": (0.02, 20.0), "a0.5_b20": (0.5, 20.0), "a0.02_b0": (0.02, 0.0),
         "a0.005_b5": (0.005, 5.0)}
PAPER_VARIANTS = [v + c for v in PAPER for c in ("", "_cutout")]


@pytest.mark.parametrize("variant", PAPER_VARIANTS)
def test_paper_variants(variant):
  """Each paper experiment is a documented configs/cifar.py variant that validates and
  differs from the paper's settings (configs/default.py) in exactly its a, b and cutout."""
  from configs import cifar
  from configs import default
  from fp_jax import config as config_lib
  config = cifar.get_config(variant)
  config_lib.validate(config)
  want = default.get_config()
  want.search.alpha, want.search.beta = PAPER[variant.removesuffix("_cutout")]
  want.final.cutout = 16 if variant.endswith("_cutout") else 0
  assert config.to_json(sort_keys=True) == want.to_json(sort_keys=True)
  assert (config.final.num_layers, config.final.out_filters) == (15, 36)
  assert f"--config=configs/cifar.py:{variant} --workdir=runs/{variant}\n" in cifar.__doc__


def test_paper_variants_are_the_variants():
  """configs/cifar.py holds exactly the paper's experiments, each documented; no variant
  is a0.02_b20."""
  import re
  from configs import cifar
  assert sorted(cifar.SWEEP.variants()) == sorted(PAPER_VARIANTS)
  documented = re.findall(r"--config=configs/cifar\.py:(\S+) ", cifar.__doc__)
  assert sorted(documented) == sorted(PAPER_VARIANTS)
  assert cifar.get_config().to_json() == cifar.get_config("a0.02_b20").to_json()


def test_unknown_variant_is_one_error_line(tmp_path):
  proc = _run("--config=configs/cifar.py:a0.3_b1", f"--workdir={tmp_path}", timeout=60)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "unknown variant" in lines[0] and "a0.005_b5" in lines[0]


def test_final_preempted_and_resumed_equals_unbroken(tmp_path, monkeypatch):
  """SIGTERM in the middle of an epoch: the step finishes, a checkpoint is saved, the run
  exits cleanly; rerunning resumes and ends with the same metrics, result and weights."""
  import signal
  from fp_jax.run import preemption
  config = _tiny_config()
  config.final.epochs, config.final.steps_per_epoch, config.final.lr_t0 = 2, 4, 2
  ds = _digits()
  unbroken = final.run(config, str(tmp_path / "a"), ds)
  original = trainer_lib.FixedTrainer.run_epoch
  calls = []

  def sigterm_in_second_epoch(self, state, x, y, stop=None):
    calls.append(state["epoch"])
    if len(calls) == 2:
      os.kill(os.getpid(), signal.SIGTERM)        # handled: the loop stops after one step
    return original(self, state, x, y, stop)

  monkeypatch.setattr(trainer_lib.FixedTrainer, "run_epoch", sigterm_in_second_epoch)
  with pytest.raises(preemption.Preempted) as stopped:
    final.run(config, str(tmp_path / "b"), ds)
  assert stopped.value.code == 0 and "rerun the same command" in str(stopped.value)
  assert not (tmp_path / "b" / "final" / "result.json").exists()
  monkeypatch.setattr(trainer_lib.FixedTrainer, "run_epoch", original)
  resumed = final.run(config, str(tmp_path / "b"), ds)
  assert resumed == unbroken
  timing = ("images_per_sec", "step_time")
  lines = [[{k: v for k, v in json.loads(l).items() if k not in timing}
            for l in (tmp_path / run / "final" / "metrics.jsonl").read_text().splitlines()]
           for run in ("a", "b")]
  assert lines[0] == lines[1] and len(lines[0]) == 2
  wa, _ = weights.load(str(tmp_path / "a" / "final" / "weights.npz"))
  wb, _ = weights.load(str(tmp_path / "b" / "final" / "weights.npz"))
  for a, b in zip(jax.tree.leaves(wa), jax.tree.leaves(wb)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("override,expected", [
    ("--config.compress.ratios=0.5 0.5", "compress.ratios="),
    ("--config.compress.mode=prune", "compress.mode='prune': must be one of finetune, scratch"),
    ("--config.compress.bn_batches=0", "compress.bn_batches=0: must be an integer >= 1"),
    ("--config.final.keep_prob=0", "final.keep_prob=0"),
    ("--config.stages=final,compres", "unknown stage 'compres'"),
])
def test_bad_stage_config_is_one_error_line(tmp_path, override, expected):
  proc = _run("--config=configs/smoke.py", f"--workdir={tmp_path}", override, timeout=120)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and expected in lines[0], proc.stderr[-2000:]
  assert not (tmp_path / "config.json").exists()


def test_compress_without_final_weights_is_one_error_line(tmp_path):
  proc = _run("--config=configs/smoke.py", f"--workdir={tmp_path}", "--config.stages=compress",
              "--config.compress.ratios=0.5 0.5 0.5 0.5 0.5", timeout=120)
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert len(lines) == 1 and "run the final stage first" in lines[0]
