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
string). Arrays are written by orbax (`arrays/`, tensorstore, one flat item per
array), the Python leaves and the arrays' pytree paths as one JSON file (`meta/`).
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
import zlib

from absl import logging
import jax
import numpy as np

from fp_jax.run import errors

_FORMAT = 1


class CheckpointError(errors.RunError):
  pass


def _is_array(x):
  return isinstance(x, (jax.Array, jax.ShapeDtypeStruct, np.ndarray, np.generic))


def _is_python(x):
  return x is None or isinstance(x, (bool, int, float, str))


def _key_str(k):
  for attr in ("key", "idx", "name"):   # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _path(keypath):
  return "/".join(_key_str(k) for k in keypath) or "<root>"


def _split(tree):
  """([(path, array)], {path: Python leaf}) of a state pytree, in flattening order."""
  arrays, python = [], {}
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    path = _path(keypath)
    if _is_python(leaf):
      python[path] = leaf
    elif _is_array(leaf):
      arrays.append((path, np.asarray(leaf) if isinstance(leaf, np.generic) else leaf))
    else:
      raise TypeError(f"checkpoint: unsupported leaf {path} of type {type(leaf).__name__} "
                      "(use arrays, numbers or strings)")
  return arrays, python


def _host(a):
  """A host copy of array `a` (one replica of a replicated global array), or None when this
  process does not hold all of it."""
  if isinstance(a, jax.Array):
    if a.is_fully_addressable:
      return np.asarray(a)
    if a.is_fully_replicated:
      return np.asarray(a.addressable_data(0))
    return None
  return np.asarray(a)


def checksum(a):
  """CRC-32 of array `a`'s bytes (C order), or None (not all of it is on this process)."""
  h = _host(a)
  return None if h is None else zlib.crc32(np.ascontiguousarray(h).reshape(-1).view(np.uint8))


def _flat(arrays):
  """The dict orbax writes: one key per array (names are kept in the JSON part)."""
  return {f"a{i}": a for i, (_, a) in enumerate(arrays)}


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
    arrays, python = _split(state)
    if step in self._mgr.all_steps():
      logging.info("checkpoint %d already in %s: not written again", step, self.directory)
      return
    ocp = self._ocp
    meta = {"format": _FORMAT, "arrays": [p for p, _ in arrays], "leaves": python,
            "crc32": [checksum(a) for _, a in arrays]}
    try:
      self._mgr.save(step, args=ocp.args.Composite(
          arrays=ocp.args.StandardSave(_flat(arrays)), meta=ocp.args.JsonSave(meta)))
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

    arrays_t, python_t = _split(template)
    try:
      meta = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      saved = self._mgr.item_metadata(step)["arrays"]
      saved = saved.tree if hasattr(saved, "tree") else saved
    except Exception as e:
      raise unreadable(e) from e
    if (not isinstance(meta, dict) or meta.get("format") != _FORMAT
        or not isinstance(meta.get("leaves"), dict) or not isinstance(meta.get("arrays"), list)
        or not isinstance(saved, dict) or len(saved) != len(meta["arrays"])):
      raise unreadable("its meta/metadata and arrays/ disagree")
    problem = (_compare(meta["arrays"], [saved.get(f"a{i}") for i in range(len(saved))],
                        arrays_t) or _compare_python(meta["leaves"], python_t))
    if problem:
      raise CheckpointError(f"{where} does not match this run: {problem}; {self._fresh_hint()}")
    # saved array i is item a{i}: read each template array from its path's item, so a
    # state whose leaves flatten in another order (e.g. a dict now a dataclass) restores too
    item = {path: f"a{i}" for i, path in enumerate(meta["arrays"])}
    with _quiet_asyncio():
      try:
        restored = self._mgr.restore(step, args=ocp.args.Composite(
            arrays=ocp.args.StandardRestore({item[p]: a for p, a in arrays_t})))["arrays"]
      except Exception as e:
        error = unreadable(e)
        gc.collect()   # orbax's failed read tasks log their tracebacks when collected
        raise error from e
    self.verified = isinstance(meta.get("crc32"), list)
    if self.verified:
      for i, path in enumerate(meta["arrays"]):
        want = meta["crc32"][i] if i < len(meta["crc32"]) else None
        got = checksum(restored[f"a{i}"]) if want is not None else None
        if got is not None and got != want:
          raise CheckpointError(
              f"{where} is damaged: {path} does not match the checksum written with it; "
              f"{self._earlier_hint(step)}")
    # Reassemble in the template's order; numpy leaves come back as numpy, Python from JSON.
    out = []
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(template)[0]:
      if _is_python(leaf):
        value = meta["leaves"][_path(keypath)]
        out.append(float(value) if isinstance(leaf, float) else value)
        continue
      value = restored[item[_path(keypath)]]
      if isinstance(leaf, np.generic):
        value = leaf.dtype.type(np.asarray(value))
      elif isinstance(leaf, np.ndarray):
        value = np.asarray(value)
      out.append(value)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), out)

  def close(self) -> None:
    try:
      self._mgr.wait_until_finished()
    finally:
      self._mgr.close()


def _compare(saved_paths, saved_meta, template_arrays):
  """'' when the saved arrays have the template's paths, shapes and dtypes, else the first problem."""
  want = dict(template_arrays)
  saved = dict(zip(saved_paths, saved_meta))
  missing = [p for p in want if p not in saved]
  extra = [p for p in saved if p not in want]
  if missing or extra:
    parts = []
    if missing:
      parts.append(f"{len(missing)} arrays missing from it (e.g. {missing[0]})")
    if extra:
      parts.append(f"{len(extra)} arrays this run does not have (e.g. {extra[0]})")
    return ", ".join(parts)
  for path, a in template_arrays:
    m = saved[path]
    shape, dtype = getattr(m, "shape", None), getattr(m, "dtype", None)
    if shape is None or tuple(shape) != tuple(np.shape(a)):
      return f"{path} has shape {shape} in the checkpoint, {tuple(np.shape(a))} in this run"
    if dtype is not None and np.dtype(dtype) != np.dtype(a.dtype):
      return f"{path} has dtype {np.dtype(dtype)} in the checkpoint, {a.dtype} in this run"
  return ""


def _compare_python(saved, want):
  missing = sorted(set(want) - set(saved))
  extra = sorted(set(saved) - set(want))
  if missing:
    return f"{len(missing)} values missing from it (e.g. {missing[0]})"
  if extra:
    return f"{len(extra)} values this run does not have (e.g. {extra[0]})"
  for path, t in want.items():
    v = saved[path]
    ok = (isinstance(v, bool) if isinstance(t, bool) else
          (isinstance(v, (int, float)) and not isinstance(v, bool)) if isinstance(t, float) else
          (isinstance(v, int) and not isinstance(v, bool)) if isinstance(t, int) else
          isinstance(v, str) if isinstance(t, str) else v is None)
    if not ok:
      return (f"{path} is a {type(v).__name__} in the checkpoint, a {type(t).__name__} "
              "in this run")
  return ""


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
