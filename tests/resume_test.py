"""Operability of the search stage: checkpoints, exact resume, SIGTERM, NaN, determinism, logs.

Every search here has the same compiled shapes (digits, 1 layer, F 8, batch 32, 4 steps per
epoch = 4 controller samples, so one controller sampler serves both), and the compilations
go to a persistent cache that the `python -m fp_jax.main` subprocesses read: compiling once
dominates this file's time.
"""
import functools
import glob
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import smoke
from fp_jax.run import checkpoint
from fp_jax.run import ckpt_layout
from fp_jax import data
from fp_jax.run import errors
from fp_jax.run import logs
from fp_jax.run import parallel
from fp_jax.run import preemption
from fp_jax.train import search
from fp_jax.train import search_state
from tests import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATIOS = tuple(smoke.get_config().search.ratio_choices)   # as main passes them
EPOCHS = 2
SPE = 4                        # supernet steps per epoch
PER_EPOCH = SPE + 2            # checkpoint numbers per epoch: supernet steps + controller updates
EVERY = 2                      # checkpoint every 2 supernet steps (and at every epoch end)
TIMING = ("images_per_sec", "step_time")
SETTINGS = dict(num_layers=1, out_filters=8, batch_size=32, eval_batch_size=32, epochs=EPOCHS,
                steps_per_epoch=SPE, controller_updates=2, controller_samples=4,
                num_candidates=2, final_eval_batches=1, uniform_child_epochs=1)


tiny_config = functools.partial(tiny.tiny_config, **SETTINGS, ckpt_every_steps=EVERY)


@pytest.fixture(scope="module")
def digits():
  return data.load("digits", 256)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """This module's compilations also go to a persistent cache that the subprocess test reads:
  the session's (tests/conftest.py), shared with the other files, or else one of its own.

  Only a speed-up (the subprocesses would otherwise compile everything again); the previous
  settings are put back afterwards.
  """
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    yield os.environ["JAX_COMPILATION_CACHE_DIR"]
    return
  from jax._src import compilation_cache as cc
  directory = str(tmp_path_factory.mktemp("jax_cache"))
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  old = {n: getattr(jax.config, n) for n in names}
  for n, v in zip(names, (directory, 0.0, -1)):
    jax.config.update(n, v)
  cc.reset_cache()
  yield directory
  for n, v in old.items():
    jax.config.update(n, v)
  cc.reset_cache()


def results(workdir):
  """(arch.json bytes, metrics lines without timing fields, samples.jsonl text)."""
  d = os.path.join(workdir, "search")
  with open(os.path.join(d, "arch.json"), "rb") as f:
    arch = f.read()
  with open(os.path.join(d, "metrics.jsonl")) as f:
    metrics = [{k: v for k, v in json.loads(l).items() if k not in TIMING} for l in f]
  with open(os.path.join(d, "samples.jsonl")) as f:
    samples = f.read()
  return arch, metrics, samples


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits):
  """An uninterrupted search: (workdir, results)."""
  assert search.Search.build(tiny_config(), digits, RATIOS).steps_per_epoch == SPE
  workdir = str(tmp_path_factory.mktemp("reference"))
  search.run(tiny_config(), workdir, digits, RATIOS)
  return workdir, results(workdir)


class Killed(Exception):
  """Stands in for SIGKILL: the run stops where it is, without saving anything."""


def _train_step_hook(monkeypatch, at_step, action):
  """Calls action() when the training batch of global supernet step `at_step` is made."""
  batch = search.Search._batch

  def patched(self, x, y, step, *args, **kwargs):
    if x is self.ds.x_train and step == at_step:
      action()
    return batch(self, x, y, step, *args, **kwargs)

  monkeypatch.setattr(search.Search, "_batch", patched)


def _eval_hook(monkeypatch, at_call, action):
  """Calls action() at the at_call-th reward evaluation (1-based) of this run."""
  evaluate, calls = search.Search.evaluate_sample, [0]

  def patched(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == at_call:
      action()
    return evaluate(self, *args, **kwargs)

  monkeypatch.setattr(search.Search, "evaluate_sample", patched)


def _raise(exc):
  def action():
    raise exc
  return action


def _epoch_end_save_hook(monkeypatch, epoch):
  """Kills the run after epoch `epoch`'s metrics line is written, before its checkpoint."""
  save = search_state.Checkpoints.save

  def patched(self, state):
    if state.epoch == epoch and state.steps == 0 and state.updates == 0:
      raise Killed()
    return save(self, state)

  monkeypatch.setattr(search_state.Checkpoints, "save", patched)


KILLS = {
    # in the supernet steps of epoch 2: resumes from the checkpoint after its step 2
    "child_phase": lambda mp: _train_step_hook(mp, SPE + 3, _raise(Killed())),
    # in epoch 1's second controller update: samples.jsonl already holds update 1's lines
    "controller_phase": lambda mp: _eval_hook(mp, 6, _raise(Killed())),
    # after epoch 1's metrics line, before its checkpoint
    "epoch_end": lambda mp: _epoch_end_save_hook(mp, 1),
}


@pytest.mark.parametrize("where", sorted(KILLS))
def test_killed_run_resumes_to_the_same_result(tmp_path, digits, reference, monkeypatch,
                                               caplog, where):
  workdir = str(tmp_path)
  with monkeypatch.context() as mp:
    KILLS[where](mp)
    with pytest.raises(Killed):
      search.run(tiny_config(), workdir, digits, RATIOS)
  assert not os.path.exists(os.path.join(workdir, "search", "arch.json"))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "search", "ckpt"))
  killed_at = ckpt.latest_step()
  ckpt.close()
  assert killed_at is not None
  with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger="absl"):
    search.run(tiny_config(), workdir, digits, RATIOS)
  assert f"resuming from checkpoint {killed_at}" in caplog.text
  srch = search.Search.build(tiny_config(), digits, RATIOS)   # the (cached) compiled steps
  assert srch.supernet_step._cache_size() == 1 and srch.reward_eval._cache_size() == 1
  got, want = results(workdir), reference[1]
  assert got[0] == want[0]                      # arch.json, byte for byte
  assert got[1] == want[1]                      # metrics.jsonl (timing fields aside)
  assert got[2] == want[2]                      # samples.jsonl


SIGTERMS = {
    "child_phase": lambda mp: _train_step_hook(mp, SPE, lambda: os.kill(os.getpid(),
                                                                        signal.SIGTERM)),
    "controller_phase": lambda mp: _eval_hook(mp, 4 * 2 + 2, lambda: os.kill(os.getpid(),
                                                                             signal.SIGTERM)),
}


@pytest.mark.parametrize("where", sorted(SIGTERMS))
def test_sigterm_saves_and_the_rerun_continues(tmp_path, digits, reference, monkeypatch, where):
  workdir = str(tmp_path)
  handler = signal.getsignal(signal.SIGTERM)
  with monkeypatch.context() as mp:
    SIGTERMS[where](mp)
    with pytest.raises(preemption.Preempted) as stopped:
      search.run(tiny_config(), workdir, digits, RATIOS)
  assert stopped.value.code == 0                          # a clean exit for main
  assert "SIGTERM" in str(stopped.value) and "rerun" in str(stopped.value)
  assert signal.getsignal(signal.SIGTERM) == handler      # the handler is put back
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "search", "ckpt"))
  step = ckpt.latest_step()
  ckpt.close()
  # the checkpoint is where the signal arrived: after epoch 2's first step or after its first
  # controller update
  assert step == {"child_phase": PER_EPOCH + 1, "controller_phase": PER_EPOCH + SPE + 1}[where]
  assert f"checkpoint {step} " in str(stopped.value)
  assert not os.path.exists(os.path.join(workdir, "search", "arch.json"))
  search.run(tiny_config(), workdir, digits, RATIOS)
  assert results(workdir) == reference[1]


def _copy_unfinished(reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  os.remove(os.path.join(workdir, "search", "arch.json"))
  return workdir


def _snapshot(directory):
  out = {}
  for path in sorted(glob.glob(os.path.join(directory, "**"), recursive=True)):
    if os.path.isfile(path):
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


def test_corrupt_checkpoint_is_an_error_and_overwrite_starts_afresh(tmp_path, digits,
                                                                    reference):
  workdir = _copy_unfinished(reference, tmp_path)
  ckpt_dir = os.path.join(workdir, "search", "ckpt")
  latest = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  data_files = glob.glob(os.path.join(ckpt_dir, str(latest), "arrays", "d", "*"))
  assert data_files
  for path in data_files:   # truncate the array data
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  before = _snapshot(workdir)
  with pytest.raises(checkpoint.CheckpointError) as e:
    search.run(tiny_config(), workdir, digits, RATIOS)
  message = str(e.value)
  assert isinstance(e.value, errors.RunError) and "\n" not in message
  assert ckpt_dir in message and "unreadable" in message
  assert "--config.overwrite=True" in message and f"delete {ckpt_dir}" in message
  assert _snapshot(workdir) == before            # nothing deleted or rewritten

  # overwrite=True: checkpoints cleared, jsonl files restarted, same result as the reference
  config = tiny_config()
  config.overwrite = True
  search.run(config, workdir, digits, RATIOS)
  assert results(workdir) == reference[1]
  steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  assert steps == [PER_EPOCH + 2, 2 * PER_EPOCH]   # keep=2: epoch 2's step 2, then its end


def _first_format(state, srch):
  """`state` (a SearchState) in the checkpoint layout the search has written since the first
  format (the dict state of c0c2f92: 'child' is the supernet, 'pos' its steps done), spelled
  out here rather than taken from search_state.to_checkpoint."""
  ctrl = state.controller
  return {"child": {"params": state.supernet.params, "opt_state": state.supernet.opt_state},
          "controller": jax.tree.map(np.asarray, jax.device_get(
              {"params": ctrl.params, "opt_state": ctrl.opt_state, "baseline": ctrl.baseline,
               "step": ctrl.step})),
          "epoch": state.epoch, "pos": state.steps, "updates": state.updates,
          "losses": state.losses, "accs": state.accs,
          "entropy": float("nan") if state.entropy is None else state.entropy,
          "samples": json.dumps(list(state.samples)),
          "last_samples": json.dumps(list(state.last_samples)),
          "settings": json.dumps(search_state.settings(srch), sort_keys=True)}


def _meta(ckpt_dir, step):
  with open(os.path.join(ckpt_dir, str(step), "meta", "metadata")) as f:
    meta = json.load(f)
  return meta["arrays"], sorted(meta["leaves"])


def test_checkpoint_in_the_first_format_resumes_to_the_same_result(tmp_path, digits,
                                                                   reference):
  """A mid-epoch checkpoint with the dict state's keys ('child', 'pos') restores into the
  SearchState and resumes to the uninterrupted run's files; the search still writes that
  layout (same array paths and values)."""
  workdir = _copy_unfinished(reference, tmp_path)
  ckpt_dir = os.path.join(workdir, "search", "ckpt")
  mid = PER_EPOCH + 2                        # epoch 2, after its supernet step 2
  srch = search.Search.build(tiny_config(), digits, RATIOS)
  ckpt = checkpoint.Checkpointer(ckpt_dir, keep=2)
  state = search_state.restore(srch, ckpt, mid)
  written = _meta(ckpt_dir, mid)
  for step in ckpt.all_steps():              # only the first-format checkpoint is left
    shutil.rmtree(os.path.join(ckpt_dir, str(step)))
  ckpt.close()
  ckpt = checkpoint.Checkpointer(ckpt_dir, keep=2)
  ckpt.save(mid, _first_format(state, srch))
  ckpt.close()
  assert _meta(ckpt_dir, mid) == written     # the search writes the first format's layout
  assert written[1] == sorted(["epoch", "pos", "updates", "entropy", "samples", "last_samples",
                               "settings"])
  assert {p.split("/")[0] for p in written[0]} == {"child", "controller", "losses", "accs"}
  assert (state.epoch, state.steps, state.updates) == (1, 2, 0)
  search.run(tiny_config(), workdir, digits, RATIOS)
  assert results(workdir) == reference[1]


def test_checkpoint_of_another_model_or_seed_is_an_error(tmp_path, digits, reference):
  workdir = _copy_unfinished(reference, tmp_path)
  ckpt_dir = os.path.join(workdir, "search", "ckpt")
  before = _snapshot(workdir)
  with pytest.raises(checkpoint.CheckpointError) as e:
    search.run(tiny_config(out_filters=4), workdir, digits, RATIOS)
  message = str(e.value)
  assert "does not match" in message and "shape" in message and ckpt_dir in message
  assert "--config.overwrite=True" in message
  with pytest.raises(checkpoint.CheckpointError) as e:
    search.run(tiny_config(seed=1), workdir, digits, RATIOS)
  assert "seed=0" in str(e.value) and "--config.overwrite=True" in str(e.value)
  with pytest.raises(checkpoint.CheckpointError) as e:   # the checkpoint is past epoch 1
    search.run(tiny_config(epochs=1), workdir, digits, RATIOS)
  assert "search.epochs=1" in str(e.value)
  assert _snapshot(workdir) == before


def test_nan_loss_stops_with_an_error_and_keeps_the_last_good_checkpoint(tmp_path, digits,
                                                                        monkeypatch):
  workdir = str(tmp_path)
  train_batch = data.train_batch

  def poisoned(x, y, **kwargs):
    xb, yb = train_batch(x, y, **kwargs)
    if kwargs["stream"] == 0 and kwargs["step"] >= SPE + 3:   # from epoch 2's step 4 on
      xb = np.full_like(xb, np.nan)
    return xb, yb

  monkeypatch.setattr(data, "train_batch", poisoned)
  with pytest.raises(errors.RunError) as e:
    search.run(tiny_config(), workdir, digits, RATIOS)
  message = str(e.value)
  assert "child loss is nan" in message and f"epoch 2, step 4 of {SPE}" in message
  ckpt_dir = os.path.join(workdir, "search", "ckpt")
  good = PER_EPOCH + 2                       # after epoch 2's step 2
  assert f"last good checkpoint ({good})" in message and ckpt_dir in message
  assert not os.path.exists(os.path.join(workdir, "search", "arch.json"))
  srch = search.Search.build(tiny_config(), digits, RATIOS)
  ckpt = checkpoint.Checkpointer(ckpt_dir)
  assert ckpt.latest_step() == good
  state = search_state.restore(srch, ckpt, good)
  ckpt.close()
  assert search_state._all_finite((state.supernet, state.controller))
  assert (state.epoch, state.steps, state.updates) == (1, 2, 0)
  assert "resumed" not in message
  # rerun: it resumes from that checkpoint (verified) and meets the NaN again; the message
  # says the checkpoint was verified, not only that the learning rate may be too high
  with pytest.raises(errors.RunError) as e:
    search.run(tiny_config(), workdir, digits, RATIOS)
  assert str(e.value).endswith(f"(this run resumed from checkpoint {good}: its arrays "
                               "matched the checksums written with them)"), str(e.value)


def test_a_flipped_byte_in_a_checkpoint_is_detected_and_the_earlier_one_resumes(
    tmp_path, digits, reference):
  """One byte flipped in the latest checkpoint's array data (same size, still readable):
  one error naming the array and the earlier checkpoint, nothing changed; deleting the
  damaged checkpoint as the error says resumes from the earlier one, as an unbroken run."""
  workdir = _copy_unfinished(reference, tmp_path)
  ckpt_dir = os.path.join(workdir, "search", "ckpt")
  steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  data_files = glob.glob(os.path.join(ckpt_dir, str(steps[-1]), "arrays", "**", "d", "*"),
                         recursive=True)
  path = max(data_files, key=os.path.getsize)   # the array chunks, not an index node
  with open(path, "r+b") as f:
    raw = bytearray(f.read())
    raw[len(raw) // 2] ^= 0x40
    f.seek(0)
    f.write(raw)
  before = _snapshot(workdir)
  with pytest.raises(checkpoint.CheckpointError) as e:
    search.run(tiny_config(), workdir, digits, RATIOS)
  message = str(e.value)
  assert f"checkpoint {steps[-1]} in {ckpt_dir} is damaged: " in message, message
  assert "does not match the checksum written with it" in message
  damaged = os.path.join(ckpt_dir, str(steps[-1]))
  assert f"delete {damaged} to resume from checkpoint {steps[-2]}" in message
  assert _snapshot(workdir) == before            # nothing deleted or rewritten
  shutil.rmtree(damaged)
  search.run(tiny_config(), workdir, digits, RATIOS)
  assert results(workdir) == reference[1]


def test_same_seed_same_arch_json_other_seed_differs(tmp_path, digits, reference):
  again = str(tmp_path / "again")
  search.run(tiny_config(ckpt_every_steps=0), again, digits, RATIOS)
  assert results(again) == reference[1]     # arch.json bit-identical, same metrics and samples
  other = str(tmp_path / "other")
  search.run(tiny_config(seed=1), other, digits, RATIOS)
  arch, metrics, samples = results(other)
  assert metrics[0]["child_loss"] != reference[1][1][0]["child_loss"]   # init and data order
  assert samples != reference[1][2]                                     # controller samples
  assert json.loads(arch)["arc_string"] != json.loads(reference[1][0])["arc_string"]


# ---- the modules on their own


def test_checkpointer_round_trip_keep_and_mismatch(tmp_path):
  mesh = parallel.make_mesh()
  replicated = NamedSharding(mesh, P())
  state = {"params": jax.device_put({"w": jnp.arange(6.0).reshape(2, 3)}, replicated),
           "ctrl": (jnp.ones(3, jnp.int32), np.float32(2.5)),
           "losses": np.linspace(0, 1, 4).astype(np.float32),
           "epoch": 3, "lr": 0.1, "done": False, "samples": json.dumps([{"r": 0.1}])}
  directory = str(tmp_path / "ckpt")
  ckpt = checkpoint.Checkpointer(directory, keep=2)
  assert ckpt.latest_step() is None
  for step in (1, 2, 3):
    ckpt.save(step, {**state, "epoch": step})
  assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
  # an abstract template (shapes and shardings) is enough for the arrays
  template = {**state, "params": {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32,
                                                            sharding=replicated)}}
  got = ckpt.restore(3, template)
  ckpt.close()
  assert got["params"]["w"].sharding.is_equivalent_to(replicated, 2)
  np.testing.assert_array_equal(got["params"]["w"], state["params"]["w"])
  assert isinstance(got["ctrl"][1], np.float32) and got["ctrl"][1] == 2.5
  assert isinstance(got["losses"], np.ndarray)
  assert (got["epoch"], got["lr"], got["done"], got["samples"]) == (3, 0.1, False,
                                                                     state["samples"])
  # a save killed midway leaves a temporary directory: ignored (and removed on open)
  partial = os.path.join(directory, "4.orbax-checkpoint-tmp-123")
  shutil.copytree(os.path.join(directory, "3"), partial)
  for path in glob.glob(os.path.join(partial, "**", "*"), recursive=True):
    if os.path.isfile(path):
      open(path, "w").close()
  ckpt = checkpoint.Checkpointer(directory)
  assert ckpt.latest_step() == 3
  assert ckpt.restore(3, state)["epoch"] == 3
  for bad, needle in (({**state, "losses": np.zeros(5, np.float32)}, "losses has shape"),
                      ({**state, "losses": np.zeros(4, np.int32)}, "losses has dtype"),
                      ({**state, "extra": 1}, "missing from it (e.g. extra)"),
                      ({k: v for k, v in state.items() if k != "ctrl"}, "does not have"),
                      ({**state, "epoch": "3"}, "epoch is a int")):
    with pytest.raises(checkpoint.CheckpointError, match="does not match") as e:
      ckpt.restore(3, bad)
    assert needle in str(e.value) and directory in str(e.value)
  ckpt.close()
  checkpoint.clear(directory)
  assert not os.path.exists(directory)


def test_checkpointer_restores_each_array_by_its_path(tmp_path):
  """A template whose leaves flatten in another order than the saved state's (a dict saved,
  a dataclass with the same names restored) gets every array from its own path."""
  import flax.struct

  @flax.struct.dataclass
  class Pair:
    zeta: jax.Array
    alpha: jax.Array

  saved = {"pair": {"alpha": np.zeros(3, np.float32), "zeta": np.ones(3, np.float32)}, "n": 1}
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(1, saved)
  got = ckpt.restore(1, {"pair": Pair(zeta=np.full(3, 7, np.float32),
                                      alpha=np.full(3, 7, np.float32)), "n": 0})
  ckpt.close()
  np.testing.assert_array_equal(got["pair"].alpha, saved["pair"]["alpha"])
  np.testing.assert_array_equal(got["pair"].zeta, saved["pair"]["zeta"])
  assert got["n"] == 1


def _tb_scalars(directory):
  """{tag: [(step, value)]} and the purge steps (SessionLog START) of TensorBoard event files."""
  from tensorboardX.proto import event_pb2
  scalars, starts = {}, []
  for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      blob = f.read()
    i = 0
    while i < len(blob):
      (n,) = struct.unpack("<Q", blob[i:i + 8])
      event = event_pb2.Event.FromString(blob[i + 12:i + 12 + n])
      i += 12 + n + 4
      if event.HasField("session_log") and event.session_log.status == 1:
        starts.append(event.step)
      for v in event.summary.value:
        scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
  return scalars, starts


def _mixed_state():
  return {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((), jnp.bfloat16),
          "mask": np.array([True, False, True]), "i": jnp.arange(4, dtype=jnp.int32),
          "empty": np.zeros((0, 3), np.float32), "s": np.float32(2.5), "v": np.full(5, 7.0),
          "n": 2}


@pytest.mark.parametrize("packed_when_saved", [True, False])
def test_checkpoint_layouts_restore_every_dtype_exactly(tmp_path, monkeypatch,
                                                        packed_when_saved):
  """Format 2 packs the arrays' bytes into one item (byte offsets, shapes and dtypes in the
  JSON part); a format-1 checkpoint (one item per array) restores the same values, checksums
  verified either way."""
  state = _mixed_state()
  if not packed_when_saved:
    del state["empty"]                 # orbax cannot write an empty array as an item
  monkeypatch.setattr(checkpoint, "PACKED", packed_when_saved)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(1, state)
  ckpt.close()
  meta = json.loads((tmp_path / "ckpt" / "1" / "meta" / "metadata").read_text())
  if packed_when_saved:                # leaves in key order: b empty i mask n s v w
    assert meta["format"] == 2 and meta["packed"] == {"packed": 2 + 16 + 3 + 4 + 40 + 24}
    assert dict(zip(meta["arrays"], meta["layout"])) == {
        "b": ["packed", 0], "empty": ["packed", 2], "i": ["packed", 2], "mask": ["packed", 18],
        "s": ["packed", 21], "v": ["packed", 25], "w": ["packed", 65]}
    assert meta["shapes"][meta["arrays"].index("empty")] == [0, 3]
    assert meta["dtypes"] == ["bfloat16", "float32", "int32", "bool", "float32", "float64",
                              "float32"]
  else:
    assert meta["format"] == 1 and "layout" not in meta
  monkeypatch.setattr(checkpoint, "PACKED", True)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
  got = ckpt.restore(1, state)
  assert ckpt.verified
  ckpt.close()
  for k in state:
    if k == "n":
      assert got[k] == 2
      continue
    assert type(got[k]) is type(state[k]) or isinstance(got[k], jax.Array), k
    assert np.asarray(got[k]).dtype == np.asarray(state[k]).dtype, k
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(state[k]), err_msg=k)
  assert isinstance(got["w"], jax.Array) and isinstance(got["s"], np.float32)


def test_an_array_this_process_does_not_hold_whole_is_an_item_of_its_own(tmp_path,
                                                                       monkeypatch):
  """An array sharded over processes (here: _host says so) is written alone, as orbax
  writes it; the others stay packed, and both restore."""
  state = _mixed_state()
  host = ckpt_layout.host
  monkeypatch.setattr(ckpt_layout, "host", lambda a: None if a is state["i"] else host(a))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(1, state)
  meta = json.loads((tmp_path / "ckpt" / "1" / "meta" / "metadata").read_text())
  i = meta["arrays"].index("i")
  assert meta["layout"][i] == [f"a{i}", None] and meta["crc32"][i] is None
  assert meta["packed"] == {"packed": 2 + 3 + 4 + 40 + 24}   # all but i's 16 bytes
  monkeypatch.setattr(ckpt_layout, "host", host)
  got = ckpt.restore(1, state)
  ckpt.close()
  np.testing.assert_array_equal(got["i"], state["i"])
  np.testing.assert_array_equal(got["w"], state["w"])


def test_metrics_writer_tensorboard_and_truncate(tmp_path):
  directory = str(tmp_path)
  w = logs.MetricsWriter(directory, "metrics")
  records = [{"step": s, "loss": 1.0 / s, "acc": s / 10, "arc": [1, 2], "none": None}
             for s in range(1, 6)]
  for r in records:
    w.write(r)
  w.close()
  path = os.path.join(directory, "metrics.jsonl")
  full = open(path).read()
  assert [json.loads(l) for l in full.splitlines()] == records
  scalars, _ = _tb_scalars(os.path.join(directory, "tb", "metrics"))
  assert sorted(scalars) == ["acc", "loss"]
  assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4, 5]
  np.testing.assert_allclose([v for _, v in scalars["acc"]], [0.1, 0.2, 0.3, 0.4, 0.5])

  w = logs.MetricsWriter(directory, "metrics")        # a resumed run
  with open(path, "a") as f:
    f.write('{"step": 6, "lo')                        # a line cut short by a kill
  w.truncate_after(3)
  assert [json.loads(l)["step"] for l in open(path)] == [1, 2, 3]
  for r in records[3:]:
    w.write(r)
  w.close()
  assert open(path).read() == full
  _, starts = _tb_scalars(os.path.join(directory, "tb", "metrics"))
  assert 4 in starts                                  # TensorBoard hides the old steps 4, 5

  off = logs.MetricsWriter(str(tmp_path / "other"), "metrics", enabled=False)
  off.write({"step": 1, "loss": 1.0})
  assert not os.path.exists(tmp_path / "other")


def test_progress_logs_lines_with_eta_when_not_a_tty(caplog):
  with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger="absl"):
    bar = logs.Progress(total=50, desc="unit test", tty=False)
    for _ in range(50):
      bar.update(1, loss=0.25)
    bar.close()
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("unit test")]
  assert len(lines) == 10, lines
  assert lines[0].startswith("unit test: 5/50 step (10%)") and "ETA" in lines[0]
  assert "step/s" in lines[0] and "loss 0.25" in lines[0]
  assert lines[-1].startswith("unit test: 50/50 step (100%)")
  caplog.clear()
  with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger="absl"):
    bar = logs.Progress(total=50, desc="resumed", initial=40, tty=False)
    for _ in range(10):
      bar.update()
  assert [r.getMessage().split(" (")[0] for r in caplog.records
          if r.getMessage().startswith("resumed")] == ["resumed: 45/50 step", "resumed: 50/50 step"]


def test_preemption_flag_and_handler_restored():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.Preemption() as p:
    assert not p.requested
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(100):   # delivered to the main thread between bytecodes
      if p.requested:
        break
      time.sleep(0.01)
    assert p.requested and p.signal_name == "SIGTERM"
  assert signal.getsignal(signal.SIGTERM) == before
  e = preemption.Preempted("saved; rerun to resume")
  assert isinstance(e, SystemExit) and e.code == 0 and str(e) == "saved; rerun to resume"


# ---- the real thing: python -m fp_jax.main, SIGKILL and SIGTERM


def _main(workdir, epochs, cache):
  args = [f"--config.search.{k}={v}" for k, v in {**SETTINGS, "epochs": epochs}.items()]
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  return subprocess.Popen(
      [sys.executable, "-m", "fp_jax.main", "--config=configs/smoke.py", f"--workdir={workdir}",
       "--config.stages=search", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)


def _read_until(proc, needle, timeout=400):
  """Output lines of `proc` up to the first one containing `needle`."""
  lines, start = [], time.time()
  for line in proc.stdout:
    lines.append(line)
    if needle in line:
      return "".join(lines)
    assert time.time() - start < timeout, "".join(lines)
  proc.wait()
  raise AssertionError(f"{needle!r} not in the output:\n{''.join(lines)}")


def test_main_sigterm_then_sigkill_then_resume_gives_the_same_result(tmp_path, digits,
                                                                     compilation_cache):
  """python -m fp_jax.main: SIGTERM exits 0 after saving; SIGKILL later; the rerun finishes."""
  epochs = 5
  workdir = str(tmp_path / "run")
  first = _main(workdir, epochs, compilation_cache)
  _read_until(first, f"search epoch 1/{epochs}: 1/{SPE} step")   # compiled, one step done
  first.send_signal(signal.SIGTERM)
  out = first.communicate(timeout=300)[0]
  assert first.returncode == 0, out
  assert "Traceback" not in out and "error:" not in out
  assert "search: stopped by SIGTERM after saving checkpoint" in out, out
  assert "rerun the same command to resume" in out
  assert not os.path.exists(os.path.join(workdir, "search", "arch.json"))

  second = _main(workdir, epochs, compilation_cache)
  out = _read_until(second, "search: resuming from checkpoint")
  out += _read_until(second, f"search epoch 3/{epochs}: 1/{SPE} step")
  second.send_signal(signal.SIGKILL)
  second.communicate(timeout=60)
  assert second.returncode == -signal.SIGKILL
  assert not os.path.exists(os.path.join(workdir, "search", "arch.json"))

  # finish in this process (same settings; checkpoints are portable between processes)
  search.run(tiny_config(epochs=epochs, ckpt_every_steps=0), workdir, digits, RATIOS)
  reference = str(tmp_path / "reference")                    # never interrupted
  search.run(tiny_config(epochs=epochs, ckpt_every_steps=0), reference, digits, RATIOS)
  assert results(workdir) == results(reference)


def test_orbax_errors_are_logged_without_their_tracebacks():
  """A failed save (e.g. a full disk) ends in one CheckpointError line: orbax's writer
  threads' error records keep their message but lose the traceback; other records keep it."""
  try:
    raise OSError("No space left on device")
  except OSError:
    exc = sys.exc_info()
  orbax = logging.LogRecord("absl", logging.ERROR, "/x/orbax/checkpoint/_src/futures/future.py",
                              387, "raised an exception", (), exc)
  other = logging.LogRecord("absl", logging.ERROR, "/x/fp_jax/run/checkpoint.py", 1, "m",
                              (), exc)
  info = logging.LogRecord("absl", logging.INFO, "/x/orbax/checkpoint/manager.py", 1, "i",
                             (), None)
  quiet = checkpoint._QuietOrbax()
  assert quiet.filter(orbax) and orbax.exc_info is None and orbax.getMessage()
  assert quiet.filter(other) and other.exc_info is exc
  assert not quiet.filter(info)
