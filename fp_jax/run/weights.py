"""Trained network files: one .npz holding a pytree of arrays and a JSON header.

  DIR/final/weights.npz      the trained fixed network (meta: arc, sizes)
  DIR/compress/weights.npz   the compact pruned network (meta adds ratios, widths)

The tree is any nesting of dicts, lists and None over arrays (params and BN
stats of child.py); the header stores that nesting with leaves numbered, so a
reader needs no template. `meta` holds what rebuilds the plan:
arc_string, num_layers, out_filters, image_shape, num_classes (`load_network`).
"""
from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from fp_jax.models import child
from fp_jax.models import space

_HEADER = "__fp_jax_header__"


class WeightsError(ValueError):
  pass


def _encode(tree, leaves):
  if isinstance(tree, dict):
    return {"d": {k: _encode(v, leaves) for k, v in tree.items()}}
  if isinstance(tree, (list, tuple)):
    return {"l": [_encode(v, leaves) for v in tree]}
  if tree is None:
    return None
  leaves.append(np.asarray(tree))
  return {"a": len(leaves) - 1}


def _decode(node, arrays):
  if node is None:
    return None
  if "d" in node:
    return {k: _decode(v, arrays) for k, v in node["d"].items()}
  if "l" in node:
    return [_decode(v, arrays) for v in node["l"]]
  return arrays[f"a{node['a']}"]


def save(path, tree, meta):
  """Writes `tree` (e.g. {'params': ..., 'stats': ...}) and `meta` (JSON-able) to path.

  Written to a temporary name first, so an interrupted save never leaves a
  truncated file at `path`.
  """
  leaves = []
  structure = _encode(tree, leaves)
  header = json.dumps({"structure": structure, "meta": meta})
  tmp = path + ".tmp.npz"
  np.savez(tmp, **{f"a{i}": a for i, a in enumerate(leaves)},
           **{_HEADER: np.frombuffer(header.encode(), np.uint8)})
  os.replace(tmp, path)


def load(path):
  """(tree of numpy arrays, meta) from a file written by `save`; WeightsError if unusable."""
  if not os.path.exists(path):
    raise WeightsError(f"{path}: no such file")
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
    header = json.loads(arrays.pop(_HEADER).tobytes().decode())
    return _decode(header["structure"], arrays), header["meta"]
  except (OSError, KeyError, ValueError, zipfile.BadZipFile, json.JSONDecodeError) as e:
    raise WeightsError(f"{path}: not a readable fp_jax weights file ({type(e).__name__}: {e}); "
                       "rerun the stage that wrote it with --config.overwrite=True") from None


def load_network(path, field, advice):
  """(plan, arc, tree, meta) of a network file (final/ or compress/weights.npz): the child.py
  plan rebuilt from meta, the tree in numpy arrays. No file: WeightsError
  '{field}: {path} does not exist; {advice}' (the field that wanted it, what to run first)."""
  if not os.path.exists(path):
    raise WeightsError(f"{field}: {path} does not exist; {advice}")
  tree, meta = load(path)
  arc = space.parse_arc(meta["arc_string"])
  plan = child.make_plan(arc, meta["num_layers"], meta["out_filters"],
                         tuple(meta["image_shape"]), meta["num_classes"])
  return plan, arc, tree, meta
