"""data.input=device: batches built inside the compiled step equal the host's bitwise, and a
final stage trained on them equals one trained on host batches (metrics and weights), as does
a search (its supernet steps: metrics, samples and arch.json)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp_jax import augment
from fp_jax import config as config_lib
from fp_jax import data
from fp_jax.models import layers
from fp_jax.models import space
from fp_jax.run import weights
from fp_jax.train import final
from fp_jax.train.streams import Stream


@pytest.fixture(autouse=True, scope="module")
def _xla_depthwise():
  """XLA's grouped-conv depthwise compiles faster on CPU (as in final_test)."""
  old, layers.DEPTHWISE_IMPL = layers.DEPTHWISE_IMPL, "xla"
  yield
  layers.DEPTHWISE_IMPL = old


@pytest.mark.parametrize("aug", [(2, True, 3), (0, False, 0), (1, False, 4)])
def test_augment_in_jit_equals_host_batches(aug):
  crop_pad, flip, cutout = aug
  rng = np.random.default_rng(1)
  x = rng.integers(0, 256, (40, 9, 7, 3), dtype=np.uint8)
  y = rng.integers(0, 10, 40).astype(np.int32)
  mean, std = np.float32([0.4, 0.5, 0.3]), np.float32([0.2, 0.25, 0.3])
  on_device = jax.jit(lambda x, p, lut: augment.augment(
      x, p, lut, crop_pad=crop_pad, flip=flip, cutout=cutout, xp=jnp))
  x_dev = jnp.asarray(x)
  for seed, stream, step in [(0, 1, 0), (0, 1, 3), (3, 5, 4), (7, 2, 11)]:
    for pi, pc in [(0, 1), (0, 2), (1, 2)]:
      host_x, host_y = data.train_batch(x, y, step=step, batch_size=12, seed=seed, stream=stream,
                                        mean=mean, std=std, crop_pad=crop_pad, flip=flip,
                                        cutout=cutout, process_index=pi, process_count=pc)
      per = 12 // pc
      p = augment.plan(40, 9, 7, step=step, batch_size=12, seed=seed, stream=stream,
                       crop_pad=crop_pad, local=slice(pi * per, (pi + 1) * per))
      dev_x = np.asarray(on_device(x_dev, p, augment.table(mean, std)))
      assert dev_x.dtype == np.float32 and dev_x.shape == host_x.shape == (per, 9, 7, 3)
      assert dev_x.tobytes() == host_x.tobytes(), (seed, stream, step, pi)
      np.testing.assert_array_equal(y[p["idx"]], host_y)
  if cutout:   # the test sees cutout holes and flips (not only the identity)
    assert np.any(host_x == 0.0)


def _config(input_mode):
  from configs import smoke
  config = smoke.get_config()
  config.stages = "final"
  config.data.input = input_mode
  config.data.crop_pad, config.data.flip = 2, True
  f = config.final
  f.arc, f.num_layers, f.out_filters, f.epochs, f.batch_size = space.ENAS_ARC, 1, 4, 2, 16
  f.steps_per_epoch, f.lr_t0, f.cutout = 3, 2, 3
  config_lib.validate(config)
  return config


def _trained(config, workdir, ds):
  result = final.run(config, str(workdir), ds)
  tree, _ = weights.load(str(workdir / "final" / "weights.npz"))
  rows = [json.loads(l) for l in (workdir / "final" / "metrics.jsonl").read_text().splitlines()]
  rows = [{k: v for k, v in r.items() if k not in ("images_per_sec", "step_time")} for r in rows]
  return result, jax.tree.leaves(tree), rows



def _info_spy(monkeypatch):
  """The messages absl logging.info is called with from here on (whatever handlers earlier
  tests left on the loggers)."""
  from absl import logging as absl_logging   # pylint: disable=g-import-not-at-top
  seen, info = [], absl_logging.info
  def spy(msg, *args, **kwargs):
    seen.append(msg % args if args else msg)
    return info(msg, *args, **kwargs)
  monkeypatch.setattr(absl_logging, "info", spy)
  return seen


def test_final_stage_device_input_equals_host(tmp_path, monkeypatch):
  ds = data.load("digits", 64)
  host = _trained(_config("host"), tmp_path / "host", ds)
  device = _trained(_config("device"), tmp_path / "device", ds)
  monkeypatch.setattr(augment, "DEVICE_LIMIT_BYTES", 0)   # over the limit: prefetch thread
  messages = _info_spy(monkeypatch)
  fallback = _trained(_config("device"), tmp_path / "fallback", ds)
  assert len(host[2]) == 2 and host[2][-1]["loss"] > 0
  for other in (device, fallback):
    assert other[0] == host[0] and other[2] == host[2]
    assert len(other[1]) == len(host[1])
    for a, b in zip(other[1], host[1]):
      np.testing.assert_array_equal(a, b)
  assert sum("data.input=device" in m and "prefetch thread" in m
             for m in messages) == 1


def test_bad_input_is_one_error_naming_the_field():
  config = _config("host")
  config.data.input = "gpu"
  with pytest.raises(config_lib.ConfigError, match=r"^data.input='gpu': must be one of host, "
                                                   r"device$"):
    config_lib.validate(config)


def _search_config(input_mode):
  from tests.tiny import tiny_config
  # resume_test's search settings (one controller update): its host step, reward evaluation
  # and controller programs are that file's, compiled once in the session's cache
  config = tiny_config(num_layers=1, out_filters=8, batch_size=32, eval_batch_size=32,
                       epochs=2, steps_per_epoch=4, controller_updates=1, controller_samples=4,
                       num_candidates=2, uniform_child_epochs=1)
  config.data.input = input_mode
  config.data.crop_pad, config.data.flip = 2, True
  config_lib.validate(config)
  return config


def _searched(config, workdir, ds):
  from fp_jax.train import search
  search.run(config, str(workdir), ds, (0.0, 0.2, 0.4, 0.6, 0.8))
  d = workdir / "search"
  rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
  rows = [{k: v for k, v in r.items() if k not in ("images_per_sec", "step_time")} for r in rows]
  return rows, (d / "samples.jsonl").read_text(), (d / "arch.json").read_text()


def test_search_device_input_equals_host(tmp_path, monkeypatch):
  ds = data.load("digits", 64)
  host = _searched(_search_config("host"), tmp_path / "host", ds)
  streams, train_batch = [], data.train_batch
  def recorded(*args, **kwargs):
    streams.append(kwargs["stream"])
    return train_batch(*args, **kwargs)
  monkeypatch.setattr(data, "train_batch", recorded)
  device = _searched(_search_config("device"), tmp_path / "device", ds)
  assert streams and int(Stream.SUPERNET) not in streams   # only reward batches from the host
  monkeypatch.setattr(data, "train_batch", train_batch)
  monkeypatch.setattr(augment, "DEVICE_LIMIT_BYTES", 0)   # over the limit: prefetch thread
  messages = _info_spy(monkeypatch)
  fallback = _searched(_search_config("device"), tmp_path / "fallback", ds)
  assert len(host[0]) == 2 and host[0][-1]["child_loss"] > 0 and host[1] and host[2]
  assert device == host and fallback == host
  assert sum("data.input=device" in m and "prefetch thread" in m
             for m in messages) == 1
