"""Metrics files (JSON lines + TensorBoard) and progress bars for the training loops.

  writer = logs.MetricsWriter(os.path.join(workdir, "search"), "metrics",
                              enabled=jax.process_index() == 0)
  writer.truncate_after(restored_step)   # on resume: the file then equals an unkilled run's
  writer.write({"step": 100, "loss": 0.5, ...})
  writer.close()

  bar = logs.Progress(total=steps, desc="epoch 3", initial=done)
  bar.update(1, loss=0.5)
  bar.close()
"""
from __future__ import annotations

import json
import math
import numbers
import os
import sys
import time

from absl import logging


class MetricsWriter:
  """Appends records to DIR/<name>.jsonl and their numeric fields to TensorBoard (DIR/tb/<name>).

  A record's "step" is its TensorBoard step (records without one only go to the
  jsonl file; tensorboard=False: none do). Each line is written and closed at
  once, so a killed run loses nothing it logged. Disabled writers (processes
  other than 0) do nothing. reset() empties both for a fresh run.
  """

  def __init__(self, directory: str, name: str = "metrics", enabled: bool = True,
               tensorboard: bool = True):
    self.path = os.path.join(directory, f"{name}.jsonl")
    self.tb_dir = os.path.join(directory, "tb", name)
    self.enabled = enabled
    self.tensorboard = tensorboard
    self._tb = None
    self._purge_step = None
    if enabled:
      os.makedirs(directory, exist_ok=True)
      open(self.path, "a").close()

  def reset(self) -> None:
    """Empties the jsonl file and removes the TensorBoard events (a fresh run)."""
    if not self.enabled:
      return
    self._close_tb()
    open(self.path, "w").close()
    if os.path.isdir(self.tb_dir):
      for f in os.listdir(self.tb_dir):
        if f.startswith("events.out.tfevents"):
          os.remove(os.path.join(self.tb_dir, f))

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    step = record.get("step")
    if step is None or not self.tensorboard:
      return
    tb = self._writer()
    for key, value in record.items():
      if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool) \
          and math.isfinite(value):
        tb.add_scalar(key, float(value), global_step=int(step))
    tb.flush()

  def truncate_after(self, step: int, key: str = "step") -> None:
    """Drops the lines whose `key` field is > `step` (a resumed run rewrites them).

    TensorBoard events of those steps are purged too (tensorboardX purge_step).
    """
    if not self.enabled:
      return
    kept, dropped = [], 0
    with open(self.path) as f:
      for line in f:
        try:
          value = json.loads(line).get(key)
        except ValueError:   # a line cut short by a kill
          dropped += 1
          continue
        if value is not None and value > step:
          dropped += 1
        else:
          kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(kept)
      os.replace(tmp, self.path)
      logging.info("%s: dropped %d lines after %s %d (resuming)", self.path, dropped, key, step)
    if key == "step":
      self._close_tb()
      self._purge_step = int(step) + 1

  def _writer(self):
    if self._tb is None:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(self.tb_dir, purge_step=self._purge_step, flush_secs=30)
    return self._tb

  def _close_tb(self):
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def close(self) -> None:
    self._close_tb()


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _fmt(v):
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


class Progress:
  """A tqdm bar with ETA on a terminal; about 10 absl log lines per loop otherwise (CI, files)."""

  def __init__(self, total: int, desc: str, initial: int = 0, unit: str = "step",
               enabled: bool = True, tty: bool | None = None):
    self.total, self.desc, self.unit = int(total), desc, unit
    self.n = self._start_n = int(initial)
    self.enabled = enabled
    if tty is None:
      tty = sys.stdout.isatty() and sys.stderr.isatty()
    self._bar = None
    self._t0 = time.perf_counter()
    self._every = max(1, math.ceil(self.total / 10))
    self._next = (self.n // self._every + 1) * self._every
    if enabled and tty:
      from tqdm import tqdm
      self._bar = tqdm(total=self.total, desc=desc, initial=self.n, unit=unit,
                       dynamic_ncols=True, leave=False)

  def update(self, n: int = 1, **postfix) -> None:
    self.n += n
    if not self.enabled:
      return
    if self._bar is not None:
      if postfix:
        self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)
      self._bar.update(n)
      return
    if self.n >= self._next or self.n >= self.total:
      self._next = (self.n // self._every + 1) * self._every
      elapsed = time.perf_counter() - self._t0
      done = self.n - self._start_n
      rate = done / elapsed if elapsed > 0 else float("inf")
      eta = (self.total - self.n) / rate if rate > 0 else float("inf")
      extra = "".join(f" {k} {_fmt(v)}" for k, v in postfix.items())
      logging.info("%s: %d/%d %s (%.0f%%) %.3g %s/s elapsed %s ETA %s%s", self.desc, self.n,
                   self.total, self.unit, 100.0 * self.n / max(self.total, 1), rate, self.unit,
                   _duration(elapsed), _duration(eta), extra)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
