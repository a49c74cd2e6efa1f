"""The search's batches: host batches (reward evaluations, and supernet steps under
data.input=host) and the supernet steps' inputs under data.input=device (fp_jax/augment.py:
the uint8 train set placed on every device once per Search, each step sent only its plan).
Both give the supernet step bitwise the same batch.
"""
from __future__ import annotations

import contextlib

from absl import logging
import jax
import numpy as np

from fp_jax import augment
from fp_jax import data
from fp_jax.run import parallel
from fp_jax.train import search_steps
from fp_jax.train.streams import Stream


def build(config, ds, plan, mesh, dispatch, host_step):
  """The SearchBatches of a Search of `plan` (its supernet step `host_step`, dispatch
  resolved), with a device supernet step of the same settings when data.input=device."""
  s, c = config.search, config.data
  device_step = None if c.input != "device" else search_steps.compiled_device_step(
      plan, mesh, search_steps.optimizer_settings(s), s.aux_weight,
      float(s.keep_prob), config.dtype, dispatch, (c.crop_pad, bool(c.flip)))
  return SearchBatches(config, ds, mesh, host_step, device_step)


class SearchBatches:
  """Batches of one Search: `host` (one sharded batch), `supernet` (a step's inputs)."""

  def __init__(self, config, ds, mesh, host_step, device_step=None):
    self.config, self.ds, self.mesh = config, ds, mesh
    self.host_step = host_step       # search_steps.make_supernet_step, compiled
    self.device_step = device_step   # search_steps.make_device_supernet_step (data.input=device)
    self.placed = None               # device copies of (x_train, y_train, augment.table)
    self.fallback_noted = False

  def _host(self, x, y, step, batch_size, stream, augmented):
    c = self.config.data
    return data.train_batch(   # called through the module: tests patch data.train_batch
        x, y, step=step, batch_size=batch_size, seed=self.config.seed, stream=int(stream),
        mean=self.ds.mean, std=self.ds.std, crop_pad=c.crop_pad if augmented else 0,
        flip=c.flip and augmented, process_index=jax.process_index(),
        process_count=jax.process_count())

  def host(self, x, y, step, batch_size, stream, augment):   # pylint: disable=redefined-outer-name
    """Batch `step` of (x, y) on data stream `stream`, split over `data` (augment: with
    data.crop_pad and data.flip)."""
    return parallel.shard(self.mesh, self._host(x, y, step, batch_size, stream, augment))

  def supernet(self, search, steps):
    """Yields (supernet step, its data arguments) for each global supernet step in `steps`
    (search.batch_size, stream SUPERNET): host batches for the host step (data.input=host:
    search._batch's, as before; device with the train set over augment.DEVICE_LIMIT_BYTES:
    built one ahead by a thread), or the placed uint8 set and the split plan for the device
    step (device)."""
    x, y, c = self.ds.x_train, self.ds.y_train, self.config.data
    batch_size, stream = self.config.search.batch_size, Stream.SUPERNET
    if self.device_step is not None and augment.fits_on_device(x):
      if self.placed is None:
        self.placed = parallel.replicate(self.mesh, (x, np.asarray(y, np.int32),
                                                     augment.table(self.ds.mean, self.ds.std)))
      pi, pc = jax.process_index(), jax.process_count()
      per = batch_size // pc
      for step in steps:
        p = augment.plan(len(x), *x.shape[1:3], step=step, batch_size=batch_size,
                         seed=self.config.seed, stream=int(stream), crop_pad=c.crop_pad,
                         local=slice(pi * per, (pi + 1) * per))
        yield self.device_step, self.placed + parallel.shard(
            self.mesh, (p["idx"], p["offsets"], p["flips"], p["centres"]))
      return
    if self.device_step is None:
      for step in steps:
        yield self.host_step, search._batch(x, y, step, batch_size, stream, True)
      return
    if not self.fallback_noted:
      logging.info("data.input=device: the train set (%.2f GB) is over %.2f GB; the "
                   "search's batches are built on the host by a prefetch thread",
                   x.nbytes / 1e9, augment.DEVICE_LIMIT_BYTES / 1e9)
      self.fallback_noted = True
    batches = augment.prefetch(lambda step: self._host(x, y, step, batch_size, stream, True),
                               steps)
    with contextlib.closing(batches):
      for xb, yb in batches:
        yield self.host_step, parallel.shard(self.mesh, (xb, yb))
