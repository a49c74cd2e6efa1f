"""Config validation from one table: FIELDS maps every field of configs/default.py to what it
allows: Int and Float ranges, a Choice (its values from the module that implements them), or
a Parsed value (a flag, a folder, or a syntax of its own: stages, ratio lists, an arc).

`validate` checks a whole config (every table field present, no field outside the table,
every value allowed); a bad one is one ConfigError naming the field and what is allowed.
"""
from __future__ import annotations

import dataclasses
import numbers
import os
import re
from typing import Callable

from fp_jax import augment
from fp_jax import data
from fp_jax.infer import fused
from fp_jax.models import slot_ops
from fp_jax.models import controller
from fp_jax.models import space
from fp_jax.models import supernet
from fp_jax.models import supernet_flops
from fp_jax.pruning import importance
from fp_jax.run import precision

STAGES = ("search", "final", "compress", "latency", "profile")


class ConfigError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class Int:
  lo: int
  hi: int | None = None

  @property
  def allowed(self):
    return f"an integer >= {self.lo}" if self.hi is None else f"an integer in {self.lo}..{self.hi}"

  def check(self, path, v):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
      raise ConfigError(f"{path}={v!r}: must be an integer")
    if v < self.lo or (self.hi is not None and v > self.hi):
      raise ConfigError(f"{path}={v}: must be {self.allowed}")
    return v


@dataclasses.dataclass(frozen=True)
class Float:
  lo: float
  hi: float | None = None
  lo_open: bool = False          # v > lo instead of v >= lo

  @property
  def allowed(self):
    low = f"> {self.lo}" if self.lo_open else f">= {self.lo}"
    return low + (f" and <= {self.hi}" if self.hi is not None else "")

  def check(self, path, v):
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
      raise ConfigError(f"{path}={v!r}: must be a number")
    if v < self.lo or (self.lo_open and v == self.lo) or (self.hi is not None and v > self.hi):
      raise ConfigError(f"{path}={v}: must be {self.allowed}")
    return float(v)


@dataclasses.dataclass(frozen=True)
class Choice:
  values: tuple

  @property
  def allowed(self):
    return f"one of {', '.join(self.values)}"

  def check(self, path, v):
    if v not in self.values:
      raise ConfigError(f"{path}={v!r}: must be {self.allowed}")
    return v


@dataclasses.dataclass(frozen=True)
class Parsed:
  """A value with its own syntax: parse(path, v) returns it parsed or raises ConfigError."""
  parse: Callable
  allowed: str

  def check(self, path, v):
    return self.parse(path, v)


def _of(kind, allowed):
  """A value of one type, taken as it is."""
  def parse(path, v):
    if not isinstance(v, kind):
      raise ConfigError(f"{path}={v!r}: must be {allowed}")
    return v
  return Parsed(parse, allowed)


BOOL = _of(bool, "True or False")
FOLDER = _of(str, "a folder path (a string)")


def _stages(path, v):
  names = [s.strip() for s in str(v).split(",") if s.strip()]
  if not names:
    raise ConfigError(f"{path}={v!r}: name at least one of {', '.join(STAGES)}")
  for n in names:
    if n not in STAGES:
      raise ConfigError(f"{path}: unknown stage {n!r}; allowed: {', '.join(STAGES)} "
                        "(comma-separated)")
  return sorted(set(names), key=STAGES.index)


def _data_name(path, v):
  if not isinstance(v, str) or not v or (v.startswith("npz:") and len(v) == 4):
    raise ConfigError(f"{path}={v!r}: must be {data.ALLOWED}")
  return v


def _ratio_choices(path, v):
  if isinstance(v, str):
    v = [t for t in v.replace(",", " ").split()]
  try:
    values = [float(x) for x in v]
  except (TypeError, ValueError):
    raise ConfigError(f"{path}={v!r}: must be a list of numbers in [0, 1)") from None
  if not values or any(not 0.0 <= x < 1.0 for x in values):
    raise ConfigError(f"{path}={v!r}: must be a non-empty list of numbers in [0, 1)")
  return tuple(values)


RATIOS_ALLOWED = ("5 numbers in [0, 1), one per stage (3 normal stages and 2 reduction "
                  "cells), separated by spaces or commas, optionally in () or [], "
                  "e.g. '0.5 0.3 0.5 0.3 0.5' or '(0.5,0.3,0.5,0.3,0.5)'")


def _ratio_tokens(v):
  """The items of a ratios value (str, tuple or list), or None when it has no such form."""
  if isinstance(v, (tuple, list)):
    return list(v)
  if not isinstance(v, str):
    return None
  text = v.strip()
  if text[:1] + text[-1:] in ("()", "[]"):
    text = text[1:-1].strip()
  tokens = re.split(r"\s*,\s*|\s+", text)
  return None if "" in tokens else tokens


def _stage_ratios(path, v):
  """5 floats in [0, 1), or None when empty. Accepts '0.5 0.3 0.5 0.3 0.5', '0.5,0.3,...',
  '(0.5, 0.3, ...)', '[...]' and a tuple or list of numbers."""
  if isinstance(v, str) and not v.strip():
    return None
  values = None
  tokens = _ratio_tokens(v)
  if tokens is not None and not any(isinstance(t, bool) for t in tokens):
    try:
      values = [float(t) for t in tokens]
    except (TypeError, ValueError):
      values = None
  if values is None or len(values) != 5 or any(not 0.0 <= x < 1.0 for x in values):
    raise ConfigError(f"{path}={v!r}: must be {RATIOS_ALLOWED}")
  return tuple(values)


def _arc(path, v):
  if not v:
    return None
  try:
    return space.parse_arc(v)
  except ValueError as e:
    raise ConfigError(f"{path}: {e}") from None


def _threads(path, v):
  cores = len(os.sched_getaffinity(0))
  if Int(0).check(path, v) > cores:
    raise ConfigError(f"{path}={v}: must be an integer in 0..{cores} (0: all {cores} usable "
                      "cores)")
  return v


def _table_dir(path, v):
  if not isinstance(v, str):
    raise ConfigError(f"{path}={v!r}: must be a folder path (a string; empty: no latency table)")
  if v and os.path.exists(os.path.expanduser(v)) and not os.path.isdir(os.path.expanduser(v)):
    raise ConfigError(f"{path}={v!r}: must be a folder, not a file")
  return v


# what the search child and the final network both have: size, batches, the SGD recipe
NETWORK = {
    "num_layers": Int(1, 60), "out_filters": Int(2, 1024), "batch_size": Int(1),
    "eval_batch_size": Int(1), "epochs": Int(0), "steps_per_epoch": Int(0),
    "lr_max": Float(0.0, lo_open=True), "lr_min": Float(0.0), "lr_t0": Int(1), "lr_tmul": Int(1),
    "momentum": Float(0.0, 1.0), "l2": Float(0.0), "aux_weight": Float(0.0),
    "grad_clip": Float(0.0, lo_open=True), "keep_prob": Float(0.0, 1.0, lo_open=True),
}
CRITERIA = Choice(importance.CRITERIA)   # the criteria registry's live names

FIELDS = {
    "seed": Int(0),
    "stages": Parsed(_stages, f"comma-separated names of {', '.join(STAGES)}"),
    "overwrite": BOOL,
    "dtype": Choice(precision.DTYPES),
    "matmul_precision": Choice(precision.MATMUL_PRECISIONS),
    "preemption_sync_steps": Int(1),
    "data.name": Parsed(_data_name, data.ALLOWED),
    "data.valid_size": Int(0),
    "data.crop_pad": Int(0, 16),
    "data.flip": BOOL,
    "data.input": Choice(augment.INPUTS),
    "data.tfds_data_dir": FOLDER,
    "data.idx_dir": FOLDER,
    **{f"search.{k}": v for k, v in NETWORK.items()},
    "search.alpha": Float(0.0),
    "search.beta": Float(0.0),
    "search.ratio_choices": Parsed(_ratio_choices, "a non-empty list of numbers in [0, 1)"),
    "search.importance": CRITERIA,
    "search.ratio_measure": Choice(supernet_flops.MEASURES),
    "search.latency_table_dir": Parsed(_table_dir, "a folder path (empty: no latency table)"),
    "search.round_to": Int(1, 1024),
    "search.uniform_child_epochs": Int(0),
    "search.controller_updates": Int(0),
    "search.controller_samples": Int(1),
    "search.policy": Choice(controller.POLICIES),
    "search.init_scale": Choice(supernet.INITS),
    "search.final_init": Choice(supernet.FINAL_INITS),
    "search.share_inputs": BOOL,
    "search.dispatch": Choice(slot_ops.DISPATCHES),
    "search.num_candidates": Int(1),
    "search.final_eval_batches": Int(1),
    "search.ckpt_every_steps": Int(0),
    "controller.lstm_size": Int(1),
    "controller.temperature": Float(0.0, lo_open=True),
    "controller.tanh_constant": Float(0.0, lo_open=True),
    "controller.op_tanh_reduce": Float(0.0, lo_open=True),
    "controller.entropy_weight": Float(0.0),
    "controller.baseline_decay": Float(0.0, 1.0),
    "controller.lr": Float(0.0, lo_open=True),
    **{f"final.{k}": v for k, v in NETWORK.items()},
    "final.arc": Parsed(_arc, f"empty or {space.ARC_LEN} ints (the ENAS arc format: space.py)"),
    "final.cutout": Int(0, 1024),
    "final.drop_path_keep_prob": Float(0.0, 1.0, lo_open=True),
    "compress.ratios": Parsed(_stage_ratios, "empty or " + RATIOS_ALLOWED),
    "compress.importance": CRITERIA,
    "compress.mode": Choice(("finetune", "scratch")),
    "compress.finetune_epochs": Int(0),
    "compress.steps_per_epoch": Int(0),
    "compress.batch_size": Int(1),
    "compress.bn_batches": Int(1),
    "compress.lr_max": Float(0.0, lo_open=True),
    "compress.lr_min": Float(0.0),
    "compress.round_to": Int(1, 1024),
    "compress.distill": BOOL,
    "compress.distill_weight": Float(0.0),
    "compress.distill_temperature": Float(0.0, lo_open=True),
    "latency.init": Choice(("trained", "random")),
    "latency.images": Int(1),
    "latency.batch_size": Int(1),
    "latency.warmup": Int(0),
    "latency.im2col": BOOL,
    "latency.pad_channels": Int(1, 64),
    "latency.dots": Choice(fused.DOT_LIBRARIES),
    "latency.engine": Choice(fused.ENGINES),
    "latency.micro_batch": Int(-1),
    "latency.threads": Parsed(_threads, "an integer in 0..(usable cores); 0: all"),
}


def value(config, path):
  """config's field at dotted `path`, as it is (ConfigError when missing)."""
  node = config
  for part in path.split("."):
    if part not in node:
      raise ConfigError(f"{path}: missing from the config")
    node = node[part]
  return node


def fields(config, prefix=""):
  """{dotted path: value} of every leaf field of `config` (nested ConfigDicts are sections)."""
  out = {}
  for key, v in config.items():
    out.update(fields(v, f"{prefix}{key}.") if hasattr(v, "items") else {prefix + key: v})
  return out


def parse(config, path):
  """Field `path` of `config`, checked against FIELDS and parsed (e.g. stages as a list)."""
  return FIELDS[path].check(path, value(config, path))


def stages(config):
  return parse(config, "stages")


def ratio_choices(config):
  return parse(config, "search.ratio_choices")


def compress_ratios(config):
  """compress.ratios as 5 floats in [0, 1), or None when empty (take search/arch.json)."""
  return parse(config, "compress.ratios")


def validate(config):
  """Checks every field against FIELDS; raises ConfigError on the first bad one."""
  for path in fields(config):
    if path not in FIELDS:
      raise ConfigError(f"{path}: unknown field (the fields are configs/default.py's)")
  for path in FIELDS:
    parse(config, path)
  if config.search.ratio_measure == "latency" and not config.search.latency_table_dir:
    raise ConfigError("search.ratio_measure=latency needs a latency table: "
                      "search.latency_table_dir must name a folder")
