"""What each stage reads from the work directory (DESIGN §3), or takes from config.

  DIR/search/arch.json       arc_string, ratios      (or final.arc, compress.ratios)
  DIR/final/weights.npz      trained network         (weights.py)
  DIR/compress/weights.npz   compact pruned network  (weights.py)
"""
from __future__ import annotations

import json
import os

from fp_jax import config as config_lib
from fp_jax.models import space

FINAL_WEIGHTS = os.path.join("final", "weights.npz")
COMPRESS_WEIGHTS = os.path.join("compress", "weights.npz")


def read_json(workdir, relpath):
  """The JSON object at DIR/relpath, or None when the file does not exist."""
  path = os.path.join(workdir, relpath)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def read_jsonl(workdir, relpath):
  path = os.path.join(workdir, relpath)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _arch(workdir, field, wanted):
  arch = read_json(workdir, os.path.join("search", "arch.json"))
  if arch is None:
    raise config_lib.ConfigError(
        f"{field}: empty and {os.path.join(workdir, 'search', 'arch.json')} does not exist; "
        f"give --config.{field}={wanted} or run the search stage first")
  return arch


def configured_arc(config, workdir):
  """final.arc, else DIR/search/arch.json's arc: int [40]."""
  if config.final.arc:
    return space.parse_arc(config.final.arc)
  return space.parse_arc(_arch(workdir, "final.arc", "'40 ints'")["arc_string"])


def configured_ratios(config, workdir):
  """compress.ratios, else DIR/search/arch.json's ratios: 5 floats (one per stage)."""
  ratios = config_lib.compress_ratios(config)
  if ratios is not None:
    return ratios
  arch = _arch(workdir, "compress.ratios", "'r0 r1 r2 r3 r4'")
  return tuple(round(float(r), 6) for r in arch["ratios"])   # arch.json holds float32 values
