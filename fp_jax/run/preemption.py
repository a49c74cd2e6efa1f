"""Graceful stop on SIGTERM (preemption, `kill`, a scheduler's time limit).

  with preemption.Preemption() as preempt:
    for step in ...:
      train_step()
      if preempt.requested:          # finish the step, then
        ckpt.save(step, state)       # checkpoint and leave
        raise preemption.Preempted(f"saved checkpoint {step} in {dir}; rerun the same "
                                   "command to resume")

The handler only sets a flag: the loop decides where it is safe to stop. A second
SIGTERM while the first is being handled runs the previous handler (by default:
terminate at once). `Preempted` is a SystemExit with status 0, so main (which
catches only its error types) exits cleanly with the message logged; the next
run of the same command resumes from the checkpoint.

Multi-process runs: `requested` is then agreed by all processes (any process
signalled -> True everywhere), so every process must read it at the same points
of the loop. Only every `sync_every`-th read is a small all-gather (the reads
between return the last agreed value, and True stays True), so a loop reading it
once per step pays one cross-host collective per `sync_every` steps and stops at
the same step everywhere, at most that many steps after the signal; single-process
reads are free and see a signal at once.
"""
from __future__ import annotations

import signal
import threading

from absl import logging
import jax
import numpy as np


class Preempted(SystemExit):
  """A clean stop after a checkpoint: exit status 0, `message` says how to resume."""

  def __init__(self, message: str):
    super().__init__(0)
    self.message = message
    logging.warning("%s", message)

  def __str__(self):
    return self.message


class Preemption:
  """Context manager that turns SIGTERM into `requested = True` (main thread only)."""

  def __init__(self, signals=(signal.SIGTERM,), sync_every=1):
    self._signals = tuple(signals)
    self._old = {}
    self._local = False
    self._agreed = False   # multi-process: the last agreed value
    self._reads = 0        # multi-process: reads so far (the same count in every process)
    self.sync_every = max(1, int(sync_every))
    self.syncs = 0         # all-gathers done (multi-process)
    self.signal_name = None

  def _handle(self, signum, frame):
    if self._local:   # a second signal: do what would have been done without us
      old = self._old.get(signum, signal.SIG_DFL)
      signal.signal(signum, old if old is not None else signal.SIG_DFL)
      if callable(old):
        old(signum, frame)
      else:
        signal.raise_signal(signum)
      return
    self._local = True
    self.signal_name = signal.Signals(signum).name
    logging.warning("%s received: finishing the current step, then checkpointing and "
                    "stopping", self.signal_name)

  @property
  def requested(self) -> bool:
    if jax.process_count() == 1:
      return self._local
    self._reads += 1
    if not self._agreed and self._reads % self.sync_every == 0:
      from jax.experimental import multihost_utils
      flags = multihost_utils.process_allgather(np.asarray(self._local, np.int32))
      self.syncs += 1
      self._agreed = bool(np.any(flags))
      if self._agreed and not self._local:
        logging.warning("another process received a stop signal: finishing the current "
                        "step, then checkpointing and stopping")
    return self._agreed

  @requested.setter
  def requested(self, value: bool):   # tests and callers may request a stop directly
    self._local = bool(value)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in self._signals:
        self._old[s] = signal.signal(s, self._handle)
    else:
      logging.warning("Preemption: not on the main thread; SIGTERM is not handled")
    return self

  def __exit__(self, *exc):
    for s, old in self._old.items():
      signal.signal(s, old if old is not None else signal.SIG_DFL)
    self._old = {}
    return False
