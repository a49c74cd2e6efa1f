"""Config validation: every bad value becomes one ConfigError naming the field."""
from __future__ import annotations

import numbers
import os
import re

from fp_jax.models import space
from fp_jax.models import supernet
from fp_jax.pruning.importance import CRITERIA as IMPORTANCE   # the criteria registry's names

STAGES = ("search", "final", "compress", "latency", "profile")
RATIO_MEASURES = ("layers", "macs")              # supernet_flops.MEASURES
COMPRESS_MODES = ("finetune", "scratch")
LATENCY_DOTS = ("auto", "xla", "ynn")     # fused.DOT_LIBRARIES (kept import-light)
LATENCY_INIT = ("trained", "random")
DTYPES = ("float32", "bfloat16")          # precision.DTYPES (kept import-light)
POLICIES = ("controller", "random")       # search.policy (train/search.py)


class ConfigError(ValueError):
  pass


def _get(config, path):
  node = config
  for part in path.split("."):
    if part not in node:
      raise ConfigError(f"{path}: missing from the config")
    node = node[part]
  return node


def _int(config, path, lo, hi=None):
  v = _get(config, path)
  if isinstance(v, bool) or not isinstance(v, numbers.Integral):
    raise ConfigError(f"{path}={v!r}: must be an integer")
  if v < lo or (hi is not None and v > hi):
    allowed = f">= {lo}" if hi is None else f"in {lo}..{hi}"
    raise ConfigError(f"{path}={v}: must be an integer {allowed}")
  return v


def _float(config, path, lo, hi=None, lo_open=False):
  v = _get(config, path)
  if isinstance(v, bool) or not isinstance(v, numbers.Real):
    raise ConfigError(f"{path}={v!r}: must be a number")
  if v < lo or (lo_open and v == lo) or (hi is not None and v > hi):
    low = f"> {lo}" if lo_open else f">= {lo}"
    raise ConfigError(f"{path}={v}: must be {low}" + (f" and <= {hi}" if hi is not None else ""))
  return float(v)


def _choice(config, path, allowed):
  v = _get(config, path)
  if v not in allowed:
    raise ConfigError(f"{path}={v!r}: must be one of {', '.join(allowed)}")
  return v


def stages(config):
  names = [s.strip() for s in str(config.stages).split(",") if s.strip()]
  if not names:
    raise ConfigError(f"stages={config.stages!r}: name at least one of {', '.join(STAGES)}")
  for n in names:
    if n not in STAGES:
      raise ConfigError(f"stages: unknown stage {n!r}; allowed: {', '.join(STAGES)} "
                        "(comma-separated)")
  return sorted(set(names), key=STAGES.index)


def ratio_choices(config):
  v = _get(config, "search.ratio_choices")
  if isinstance(v, str):
    v = [t for t in v.replace(",", " ").split()]
  try:
    values = [float(x) for x in v]
  except (TypeError, ValueError):
    raise ConfigError(f"search.ratio_choices={v!r}: must be a list of numbers in [0, 1)") from None
  if not values or any(not 0.0 <= x < 1.0 for x in values):
    raise ConfigError(f"search.ratio_choices={v!r}: must be a non-empty list of numbers in [0, 1)")
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


def compress_ratios(config):
  """compress.ratios as 5 floats in [0, 1), or None when empty (take search/arch.json).

  Accepts '0.5 0.3 0.5 0.3 0.5', '0.5,0.3,...', '(0.5, 0.3, ...)', '[...]' and a
  tuple or list of numbers; anything else is a ConfigError.
  """
  v = _get(config, "compress.ratios")
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
    raise ConfigError(f"compress.ratios={v!r}: must be {RATIOS_ALLOWED}")
  return tuple(values)


def validate(config):
  """Checks every field this program reads; raises ConfigError on the first bad one."""
  _int(config, "seed", 0)
  stages(config)
  _choice(config, "dtype", DTYPES)
  if not isinstance(_get(config, "overwrite"), bool):
    raise ConfigError(f"overwrite={config.overwrite!r}: must be True or False")
  name = _get(config, "data.name")
  if not isinstance(name, str) or not name or (name.startswith("npz:") and len(name) == 4):
    raise ConfigError(f"data.name={name!r}: must be a TFDS name (e.g. cifar10), digits, "
                      "fashion_mnist, synthetic or npz:PATH")
  for path in ("data.tfds_data_dir", "data.idx_dir"):
    if not isinstance(_get(config, path), str):
      raise ConfigError(f"{path}={_get(config, path)!r}: must be a folder path (a string)")
  _int(config, "data.valid_size", 0)
  _int(config, "data.crop_pad", 0, 16)
  for path in ("search", "final"):
    _int(config, f"{path}.num_layers", 1, 60)
    _int(config, f"{path}.out_filters", 2, 1024)
    _int(config, f"{path}.batch_size", 1)
    _int(config, f"{path}.epochs", 0)
    _int(config, f"{path}.steps_per_epoch", 0)
  _int(config, "search.eval_batch_size", 1)
  _float(config, "search.alpha", 0.0)
  _float(config, "search.beta", 0.0)
  ratio_choices(config)
  _choice(config, "search.importance", IMPORTANCE)
  _choice(config, "search.ratio_measure", RATIO_MEASURES)
  _int(config, "search.uniform_child_epochs", 0)
  _int(config, "search.controller_updates", 0)
  _int(config, "search.controller_samples", 1)
  _choice(config, "search.policy", POLICIES)
  for path in ("search", "final"):    # the SGD recipe of both networks
    _float(config, f"{path}.lr_max", 0.0, lo_open=True)
    _float(config, f"{path}.lr_min", 0.0)
    _int(config, f"{path}.lr_t0", 1)
    _int(config, f"{path}.lr_tmul", 1)
    _float(config, f"{path}.momentum", 0.0, 1.0)
    _float(config, f"{path}.l2", 0.0)
    _float(config, f"{path}.aux_weight", 0.0)
    _float(config, f"{path}.grad_clip", 0.0, lo_open=True)
  _float(config, "search.keep_prob", 0.0, 1.0, lo_open=True)
  _choice(config, "search.init_scale", supernet.INITS)
  _choice(config, "search.final_init", supernet.FINAL_INITS)
  if not isinstance(_get(config, "search.share_inputs"), bool):
    raise ConfigError(f"search.share_inputs={config.search.share_inputs!r}: must be True or False")
  _int(config, "search.num_candidates", 1)
  _int(config, "search.final_eval_batches", 1)
  _int(config, "search.ckpt_every_steps", 0)
  _int(config, "controller.lstm_size", 1)
  _float(config, "controller.temperature", 0.0, lo_open=True)
  _float(config, "controller.tanh_constant", 0.0, lo_open=True)
  _float(config, "controller.op_tanh_reduce", 0.0, lo_open=True)
  _float(config, "controller.entropy_weight", 0.0)
  _float(config, "controller.baseline_decay", 0.0, 1.0)
  _float(config, "controller.lr", 0.0, lo_open=True)
  _int(config, "final.cutout", 0, 1024)
  _int(config, "final.eval_batch_size", 1)
  _float(config, "final.keep_prob", 0.0, 1.0, lo_open=True)
  _float(config, "final.drop_path_keep_prob", 0.0, 1.0, lo_open=True)
  compress_ratios(config)
  _choice(config, "compress.importance", IMPORTANCE)
  _choice(config, "compress.mode", COMPRESS_MODES)
  _int(config, "compress.finetune_epochs", 0)
  _int(config, "compress.steps_per_epoch", 0)
  _int(config, "compress.batch_size", 1)
  _int(config, "compress.bn_batches", 1)
  _float(config, "compress.lr_max", 0.0, lo_open=True)
  _float(config, "compress.lr_min", 0.0)
  _choice(config, "latency.init", LATENCY_INIT)
  _int(config, "latency.images", 1)
  _int(config, "latency.batch_size", 1)
  _int(config, "latency.warmup", 0)
  _int(config, "latency.pad_channels", 1, 64)
  _choice(config, "latency.dots", LATENCY_DOTS)
  cores = len(os.sched_getaffinity(0))
  if _int(config, "latency.threads", 0) > cores:
    raise ConfigError(f"latency.threads={config.latency.threads}: must be an integer in "
                      f"0..{cores} (0: all {cores} usable cores)")
  if not isinstance(_get(config, "latency.im2col"), bool):
    raise ConfigError(f"latency.im2col={config.latency.im2col!r}: must be True or False")
  arc = _get(config, "final.arc")
  if arc:
    try:
      space.parse_arc(arc)
    except ValueError as e:
      raise ConfigError(f"final.arc: {e}") from None
