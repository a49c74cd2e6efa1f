"""IDX files (the MNIST format) and the Fashion-MNIST files, checked against their sums.

An IDX file is a big-endian header -- two zero bytes, a type byte (0x08: uint8), the
number of dimensions -- then one uint32 per dimension and the data. Files may be gzipped
(`NAME.gz`) or not (`NAME`).

Fashion-MNIST (Xiao, Rasul, Vollgraf 2017): 60,000 train + 10,000 test 28x28 uint8
images, 10 classes. The dataset's README publishes the MD5 of each `.gz` file; Debian's
`dataset-fashion-mnist` re-compresses them (other gzip bytes, same contents), so a file
also passes when the MD5 of its decompressed bytes is that of the published file's
contents (the raw sums below: of the published archives, e.g. the labels' in the
dataset's own repository, and as listed by other loaders).
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import struct
import zlib

import numpy as np

UINT8 = 0x08


class IdxError(ValueError):
  """A missing, malformed or unexpected IDX file; the message names the file."""


@dataclasses.dataclass(frozen=True)
class IdxFile:
  """One file of a dataset: its name without `.gz`, shape after the count, checks."""
  name: str
  count: int             # images or labels expected
  shape: tuple           # trailing dims: (28, 28) for images, () for labels
  md5_gz: str = ""       # published MD5 of NAME.gz ("" : not checked)
  md5_raw: str = ""      # MD5 of the decompressed bytes ("" : not checked)


@dataclasses.dataclass(frozen=True)
class IdxDataset:
  """The four files of an MNIST-style dataset, by NPZ key."""
  name: str
  x_train: IdxFile
  y_train: IdxFile
  x_test: IdxFile
  y_test: IdxFile

  def files(self) -> dict:
    return {k: getattr(self, k) for k in ("x_train", "y_train", "x_test", "y_test")}


FASHION_MNIST = IdxDataset(
    "Fashion-MNIST",
    x_train=IdxFile("train-images-idx3-ubyte", 60000, (28, 28),
                    "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    y_train=IdxFile("train-labels-idx1-ubyte", 60000, (),
                    "25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
    x_test=IdxFile("t10k-images-idx3-ubyte", 10000, (28, 28),
                   "bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
    y_test=IdxFile("t10k-labels-idx1-ubyte", 10000, (),
                   "bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"))


def find(directory: str, spec: IdxFile) -> str | None:
  """Path of NAME.gz or NAME in `directory` (gzipped first), or None."""
  for name in (spec.name + ".gz", spec.name):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  return None


def parse(raw: bytes, path: str) -> np.ndarray:
  """The uint8 array [d0, d1, ...] of an IDX file's decompressed bytes."""
  if len(raw) < 4:
    raise IdxError(f"{path}: truncated: {len(raw)} bytes, shorter than the 4-byte IDX magic")
  zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
  if zero != 0 or dtype != UINT8 or not 1 <= ndim <= 4:
    raise IdxError(f"{path}: bad magic 0x{raw[:4].hex()}: not an IDX file of uint8 "
                   f"(expected 0x000008 then 1..4 dimensions)")
  head = 4 + 4 * ndim
  if len(raw) < head:
    raise IdxError(f"{path}: truncated: {len(raw)} bytes, shorter than its {head}-byte header")
  dims = struct.unpack(f">{ndim}I", raw[4:head])
  size = int(np.prod(dims, dtype=np.int64))
  if len(raw) - head != size:
    what = "truncated" if len(raw) - head < size else "has trailing bytes"
    raise IdxError(f"{path}: {what}: {len(raw) - head} data bytes, its header "
                   f"{'x'.join(map(str, dims))} says {size}")
  return np.frombuffer(raw, np.uint8, size, head).reshape(dims)


def read(path: str, spec: IdxFile) -> np.ndarray:
  """Reads and checks one file: IDX structure, count and shape, then its MD5 sums."""
  with open(path, "rb") as f:
    stored = f.read()
  if path.endswith(".gz"):
    try:
      raw = gzip.decompress(stored)
    except (OSError, EOFError, zlib.error) as e:
      raise IdxError(f"{path}: not a readable gzip file ({type(e).__name__}: {e}); "
                     f"truncated or damaged") from None
  else:
    raw = stored
  array = parse(raw, path)
  if array.shape[1:] != tuple(spec.shape):
    raise IdxError(f"{path}: shape {'x'.join(map(str, array.shape))}, expected N x "
                   f"{'x'.join(map(str, spec.shape)) or '(labels: 1-D)'}")
  if len(array) != spec.count:
    raise IdxError(f"{path}: {len(array)} entries, expected {spec.count}")
  if spec.md5_gz or spec.md5_raw:
    sums = {hashlib.md5(raw).hexdigest()}
    if path.endswith(".gz"):
      sums.add(hashlib.md5(stored).hexdigest())
    if not sums & {spec.md5_gz, spec.md5_raw} - {""}:
      raise IdxError(f"{path}: MD5 mismatch: {', '.join(sorted(sums))} is neither the "
                     f"published {spec.md5_gz} (.gz) nor {spec.md5_raw} (contents); the "
                     f"file is damaged or another dataset's")
  return array


def present(directory: str, dataset: IdxDataset) -> list:
  """Keys of the dataset's files found in `directory`."""
  return [k for k, spec in dataset.files().items() if find(directory, spec)]


def load(directory: str, dataset: IdxDataset) -> dict:
  """All four files as arrays (images uint8 [N, H, W], labels uint8 [N]), checked.

  Raises IdxError naming the first missing or bad file.
  """
  out = {}
  for key, spec in dataset.files().items():
    path = find(directory, spec)
    if path is None:
      raise IdxError(f"{os.path.join(directory, spec.name)}[.gz] does not exist")
    out[key] = read(path, spec)
  for split in ("train", "test"):
    if len(out[f"x_{split}"]) != len(out[f"y_{split}"]):
      raise IdxError(f"{directory}: {len(out[f'x_{split}'])} {split} images but "
                     f"{len(out[f'y_{split}'])} labels")
  return out
