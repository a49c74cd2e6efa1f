"""Checkpoints of a stage's whole state: an orbax CheckpointManager behind a small API.

  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "search", "ckpt"))
  if (step := ckpt.latest_step()) is not None:
    state = ckpt.restore(step, template)      # template: a state with the right structure
  ...
  ckpt.save(step, state)                      # durable when it returns
  ckpt.close()

A state is any pytree of jax arrays (e.g. replicated on a mesh: restored with the
template's shardings; a template may give jax.ShapeDtypeStruct(shape, dtype,
sharding=...) instead of arrays), numpy arrays and scalars, and Python ints,
floats, bools and strings (variable-length data, e.g. a JSON list, goes in a
string). Arrays are written by orbax (`arrays/`, tensorstore; their bytes packed, see
ckpt_layout.py), the Python leaves, the arrays' pytree paths and where each lies as one JSON
file (`meta/`); checkpoints of the earlier layout (one orbax item per array) restore too.
Saving is synchronous. Orbax writes each step to a temporary directory and renames it when
complete, so a process killed mid-save leaves the earlier checkpoints usable; in
multi-process runs every process calls save/restore and orbax coordinates them
(process 0 writes the JSON and finalises). Restoring checks the checkpoint's
structure, shapes and dtypes against the template first: a checkpoint of a
different model, or an unreadable one, raises CheckpointError (one line that
says how to start afresh) and its files are left as they are. Every save also
writes a CRC-32 of each array's bytes into the JSON part, and restoring
compares the arrays read back with them: a damaged checkpoint (a flipped byte
that leaves the file readable) raises CheckpointError naming the array and the
earlier checkpoint to resume from, never restores wrong values silently.
(Checkpoints written before the checksums restore unverified: `verified` says so.)
"""
from __future__ import annotations

import contextlib
import gc
import logging as pylogging
import os
import shutil

from absl import logging
import jax
import numpy as np

from fp_jax.run import ckpt_layout
from fp_jax.run import errors

PACKED = True        # False writes the format-1 layout (tests of restoring it)


class CheckpointError(errors.RunError):
  pass


class _QuietOrbax(pylogging.Filter):
  """Drops orbax's INFO chatter (about ten lines per save) from the absl log; keeps its
  warnings and errors, without the tracebacks its writer threads attach (a failed save,
  e.g. a full disk, ends in one CheckpointError line of ours)."""

  def filter(self, record):
    if f"{os.sep}orbax{os.sep}" not in record.pathname:
      return True
    if record.exc_info:
      record.exc_info, record.exc_text = None, None
    return record.levelno >= pylogging.WARNING


_QUIET = _QuietOrbax()


class Checkpointer:
  """Keeps the `keep` latest checkpoints of one stage in `directory` (e.g. DIR/search/ckpt)."""

  def __init__(self, directory: str, keep: int = 2):
    import orbax.checkpoint as ocp   # slow import: only when checkpointing
    self._ocp = ocp
    absl_logger = pylogging.getLogger("absl")
    if _QUIET not in absl_logger.filters:
      absl_logger.addFilter(_QUIET)
    self.directory = os.path.abspath(directory)
    self.verified = None   # the last restore: True (checksums matched), False (none written)
    try:
      self._mgr = ocp.CheckpointManager(
          self.directory,
          item_handlers={"arrays": ocp.StandardCheckpointHandler(),
                         "meta": ocp.JsonCheckpointHandler()},
          options=ocp.CheckpointManagerOptions(
              max_to_keep=keep, create=True, enable_async_checkpointing=False,
              cleanup_tmp_directories=True))
    except Exception as e:  # unwritable directory, a file in the way, ...
      raise CheckpointError(f"cannot open checkpoint directory {self.directory}: "
                            f"{_reason(e)}") from e

  def _fresh_hint(self):
    return (f"to start this stage afresh delete {self.directory} or pass "
            "--config.overwrite=True")

  def resume_note(self, step):
    """What a non-finite loss after resuming from `step` should say of that checkpoint
    ('' when the run did not resume)."""
    if step is None:
      return ""
    how = ("its arrays matched the checksums written with them" if self.verified else
           "it was written without checksums and may be damaged")
    return f" (this run resumed from checkpoint {step}: {how})"

  def _earlier_hint(self, step):
    earlier = [s for s in self.all_steps() if s < step]
    if earlier:
      return (f"delete {os.path.join(self.directory, str(step))} to resume from checkpoint "
              f"{earlier[-1]}, or {self._fresh_hint()}")
    return self._fresh_hint()

  def all_steps(self) -> list[int]:
    return sorted(self._mgr.all_steps())

  def latest_step(self) -> int | None:
    try:
      self._mgr.reload()
      return self._mgr.latest_step()
    except Exception as e:
      raise CheckpointError(f"cannot read checkpoints in {self.directory}: {_reason(e)}; "
                            f"{self._fresh_hint()}") from e

  def save(self, step: int, state) -> None:
    """Writes `state` as checkpoint `step`; synchronous, so durable when this returns."""
    step = int(step)
    arrays, python = ckpt_layout.split(state)
    if step in self._mgr.all_steps():
      logging.info("checkpoint %d already in %s: not written again", step, self.directory)
      return
    ocp = self._ocp
    items, meta = ckpt_layout.layout(arrays) if PACKED else (ckpt_layout.flat(arrays), {
        "format": 1, "crc32": [ckpt_layout.checksum(a) for _, a in arrays]})
    meta.update({"arrays": [p for p, _ in arrays], "leaves": python})
    try:
      self._mgr.save(step, args=ocp.args.Composite(
          arrays=ocp.args.StandardSave(items), meta=ocp.args.JsonSave(meta)))
      self._mgr.wait_until_finished()
    except Exception as e:
      raise CheckpointError(f"cannot write checkpoint {step} in {self.directory}: "
                            f"{_reason(e)}") from e

  def restore(self, step: int, template):
    """The state saved as `step`, with `template`'s structure, shardings and leaf types."""
    ocp, step = self._ocp, int(step)
    where = f"checkpoint {step} in {self.directory}"

    def unreadable(e):
      return CheckpointError(f"{where} is unreadable ({_reason(e)}); {self._earlier_hint(step)}")

    arrays_t, python_t = ckpt_layout.split(template)
    try:
      meta = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      saved = self._mgr.item_metadata(step)["arrays"]
      saved = saved.tree if hasattr(saved, "tree") else saved
    except Exception as e:
      raise unreadable(e) from e
    problem = ckpt_layout.layout_problem(meta, saved)
    if problem:
      raise unreadable(problem)
    if meta["format"] == 1:
      shapes = [saved.get(f"a{i}") for i in range(len(meta["arrays"]))]
    else:
      shapes = [ckpt_layout.Spec(s, d) for s, d in zip(meta["shapes"], meta["dtypes"])]
    problem = (ckpt_layout.compare(meta["arrays"], shapes, arrays_t)
               or ckpt_layout.compare_python(meta["leaves"], python_t))
    if problem:
      raise CheckpointError(f"{where} does not match this run: {problem}; {self._fresh_hint()}")
    # saved array i is read by its path, so a state whose leaves flatten in another order
    # (e.g. a dict now a dataclass) restores too
    index = {path: i for i, path in enumerate(meta["arrays"])}
    if meta["format"] == 1:
      want = {f"a{index[p]}": a for p, a in arrays_t}
    else:
      alone = {p: a for p, a in arrays_t if meta["layout"][index[p]][1] is None}
      want = {f"a{index[p]}": a for p, a in alone.items()}
      # read as jax arrays on one local device: a failed numpy read leaves tensorstore
      # callbacks aimed at orbax's closed event loop (a traceback printed later)
      reader = ckpt_layout.reader_sharding()
      want.update({key: jax.ShapeDtypeStruct((int(n),), np.uint8, sharding=reader)
                   for key, n in meta["packed"].items()})
    with _quiet_asyncio():
      try:
        restored = self._mgr.restore(step, args=ocp.args.Composite(
            arrays=ocp.args.StandardRestore(want)))["arrays"] if want else {}
      except Exception as e:
        error = unreadable(e)
        gc.collect()   # orbax's failed read tasks log their tracebacks when collected
        raise error from e
    values = {}     # path -> the restored array (format 2: a host array cut from its item)
    packed = {}     # format 2: item -> its bytes on the host
    for path, i in index.items():
      if meta["format"] == 1 or meta["layout"][i][1] is None:
        values[path] = restored[f"a{i}"]
      else:
        key, offset = meta["layout"][i]
        shape, dtype = tuple(meta["shapes"][i]), meta["dtypes"][i]
        if key not in packed:
          packed[key] = np.asarray(restored[key]) if key in restored else np.zeros(0, np.uint8)
        values[path] = ckpt_layout.unpack(packed[key], offset, shape, dtype)
    self.verified = isinstance(meta.get("crc32"), list)
    if self.verified:
      for i, path in enumerate(meta["arrays"]):
        want_crc = meta["crc32"][i] if i < len(meta["crc32"]) else None
        got = ckpt_layout.checksum(values[path]) if want_crc is not None else None
        if got is not None and got != want_crc:
          raise CheckpointError(
              f"{where} is damaged: {path} does not match the checksum written with it; "
              f"{self._earlier_hint(step)}")
    # Reassemble in the template's order; numpy leaves come back as numpy, Python from JSON.
    out = []
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(template)[0]:
      if ckpt_layout.is_python(leaf):
        value = meta["leaves"][ckpt_layout.path_of(keypath)]
        out.append(float(value) if isinstance(leaf, float) else value)
        continue
      value = values[ckpt_layout.path_of(keypath)]
      if isinstance(leaf, np.generic):
        value = leaf.dtype.type(np.asarray(value))
      elif isinstance(leaf, np.ndarray):
        value = np.asarray(value)         # format 2's values are already copies
      elif isinstance(value, np.ndarray):     # a packed array: placed as the template says
        value = ckpt_layout.place(value, getattr(leaf, "sharding", None))
      out.append(value)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), out)

  def close(self) -> None:
    try:
      self._mgr.wait_until_finished()
    finally:
      self._mgr.close()


@contextlib.contextmanager
def _quiet_asyncio():
  """Silences asyncio's 'Task exception was never retrieved' tracebacks (orbax read errors)."""
  log = pylogging.getLogger("asyncio")
  level = log.level
  log.setLevel(pylogging.CRITICAL)
  try:
    yield
  finally:
    log.setLevel(level)


def _reason(e):
  text = " ".join(str(e).split()) or type(e).__name__
  text = text.split(" [tensorstore_spec=")[0].split(" See full TensorStore details")[0]
  return text if len(text) <= 300 else text[:297] + "..."


def clear(directory: str) -> None:
  """Removes a stage's checkpoints (process 0; every process waits for it)."""
  if jax.process_index() == 0 and os.path.lexists(directory):
    logging.info("removing checkpoints in %s", directory)
    if os.path.isdir(directory) and not os.path.islink(directory):
      shutil.rmtree(directory)
    else:
      os.remove(directory)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"fp_jax.run.checkpoint.clear:{directory}")
