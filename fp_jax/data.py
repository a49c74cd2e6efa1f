"""Datasets (TFDS, digits, Fashion-MNIST IDX, synthetic, npz) and step-indexed batching.

Every batch is a pure function of (arrays, seed, stream, step), so resuming is
exact and all processes agree on the global batch; each process materialises
only its own rows [p * B / P, (p + 1) * B / P).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import numpy as np

from fp_jax import augment
from fp_jax import idx

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
ALLOWED = "a TFDS name (e.g. cifar10), digits, fashion_mnist, synthetic, or npz:PATH"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"   # Debian: dataset-fashion-mnist
PREPARE = "python -m fp_jax.prepare"


class DataError(ValueError):
  """Bad data input; message starts with the config field, e.g. 'data.name: ...'."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """Images uint8 [N, H, W, C], labels int32 [N]; valid is held out of train."""
  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_valid: np.ndarray
  y_valid: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  mean: np.ndarray  # float32 [C], per-channel mean of x_train / 255.
  std: np.ndarray  # float32 [C], per-channel std of x_train / 255.

  @property
  def image_shape(self) -> tuple:
    """(H, W, C)."""
    return tuple(self.x_train.shape[1:])


def load(name: str, valid_size: int, *, tfds_data_dir: str = "",
         idx_dir: str = FASHION_MNIST_DIR, synthetic_sizes=(1024, 256)) -> Dataset:
  """Loads `name` and holds out `valid_size` training images for validation.

  Nothing is downloaded: TFDS datasets must be prepared first (`python -m fp_jax.prepare`).

  Args:
    name: a TFDS name, 'digits', 'fashion_mnist', 'synthetic' or 'npz:PATH'.
    valid_size: images moved from train to valid (0 <= valid_size < N).
    tfds_data_dir: TFDS data directory ('' = the TFDS default).
    idx_dir: folder of the Fashion-MNIST IDX files (gzipped or not); when it holds none,
      TFDS's prepared fashion_mnist is used.
    synthetic_sizes: (train, test) sizes of the synthetic dataset.

  Returns:
    A Dataset; mean and std are computed on the remaining train images.
  """
  if not isinstance(name, str) or not name.strip():
    raise DataError(f"data.name: got {name!r}; allowed: {ALLOWED}")
  if (isinstance(valid_size, bool) or not isinstance(valid_size, (int, np.integer))
      or valid_size < 0):
    raise DataError(f"data.valid_size: must be an integer >= 0, got {valid_size!r}")
  num_classes = None
  if name == "digits":
    x_train, y_train, x_test, y_test = _load_digits()
  elif name == "fashion_mnist":
    x_train, y_train, x_test, y_test, num_classes = _load_fashion_mnist(idx_dir, tfds_data_dir)
  elif name == "synthetic":
    x_train, y_train, x_test, y_test = _load_synthetic(synthetic_sizes)
  elif name.startswith("npz:"):
    x_train, y_train, x_test, y_test = _load_npz(name[len("npz:"):])
  else:
    x_train, y_train, x_test, y_test, num_classes = _load_tfds(name, tfds_data_dir)
  if num_classes is None:
    num_classes = int(max(y_train.max(), y_test.max())) + 1
  x_train, y_train, x_valid, y_valid = _split_valid(x_train, y_train, int(valid_size))
  mean, std = _channel_stats(x_train)
  return Dataset(name, x_train, y_train, x_valid, y_valid, x_test, y_test,
                 int(num_classes), mean, std)


def _load_digits():
  """scikit-learn 8x8 digits as uint8 [N, 8, 8, 1]; fixed 20% test split."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  x = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  y = digits.target.astype(np.int32)
  perm = np.random.default_rng(0).permutation(len(x))
  n_test = len(x) // 5
  test, train = np.sort(perm[:n_test]), np.sort(perm[n_test:])
  return x[train], y[train], x[test], y[test]


def _load_synthetic(sizes):
  """Random uint8 [N, 32, 32, 3], 10 classes; channel 0 is offset by 12 * label."""
  if (len(sizes) != 2 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer))
                             or s < 1 for s in sizes)):
    raise DataError(f"data.name: synthetic sizes must be two integers >= 1 "
                    f"(train, test), got {sizes!r}")
  n_train, n_test = int(sizes[0]), int(sizes[1])
  rng = np.random.default_rng(0)
  y = rng.integers(0, 10, n_train + n_test).astype(np.int32)
  x = rng.integers(0, 256 - 12 * 9, (n_train + n_test, 32, 32, 3), dtype=np.uint8)
  x[..., 0] += (12 * y).astype(np.uint8)[:, None, None]
  return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def _load_npz(path: str):
  """Reads and validates an .npz with keys NPZ_KEYS."""
  src = f"data.name: npz file {path!r}"
  if not path:
    raise DataError(f"data.name: npz:PATH needs a path, got {'npz:' + path!r}")
  if not os.path.isfile(path):
    raise DataError(f"{src} does not exist")
  try:
    archive = np.load(path, allow_pickle=False)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"{src} is not a readable .npz archive: {_reason(e)}") from e
  if not isinstance(archive, np.lib.npyio.NpzFile):
    raise DataError(f"{src} holds a single array (.npy), not an .npz archive with "
                    f"keys {', '.join(NPZ_KEYS)}")
  with archive:
    missing = [k for k in NPZ_KEYS if k not in archive.files]
    if missing:
      raise DataError(f"{src} is missing keys {', '.join(missing)} (has: "
                      f"{', '.join(archive.files) or 'none'}; needs "
                      f"{', '.join(NPZ_KEYS)})")
    arrays = {}
    for k in NPZ_KEYS:
      try:
        arrays[k] = archive[k]
      except Exception as e:  # pylint: disable=broad-except
        raise DataError(f"{src}: could not read {k}: {_reason(e)}") from e
  return _check_arrays(src, arrays["x_train"], arrays["y_train"],
                       arrays["x_test"], arrays["y_test"])


def _load_fashion_mnist(idx_dir: str, tfds_data_dir: str):
  """The IDX files in idx_dir (checked against the published sums), else TFDS's copy."""
  found = idx.present(idx_dir, idx.FASHION_MNIST) if os.path.isdir(idx_dir) else []
  if found:
    try:
      arrays = idx.load(idx_dir, idx.FASHION_MNIST)
    except (idx.IdxError, OSError) as e:
      raise DataError(f"data.idx_dir: {e}") from None
    if max(arrays["y_train"].max(), arrays["y_test"].max()) > 9:
      raise DataError(f"data.idx_dir: {idx_dir}: labels outside 0..9")
    src = f"data.idx_dir: Fashion-MNIST in {idx_dir!r}"
    return _check_arrays(src, *(arrays[k] for k in NPZ_KEYS)) + (10,)
  if _tfds_prepared("fashion_mnist", tfds_data_dir):
    return _load_tfds("fashion_mnist", tfds_data_dir)
  names = ", ".join(f"{spec.name}[.gz]" for spec in idx.FASHION_MNIST.files().values())
  raise DataError(
      f"data.idx_dir: no Fashion-MNIST IDX files in {idx_dir!r} ({names}) and TFDS has no "
      f"prepared fashion_mnist; install them with `apt-get install dataset-fashion-mnist` "
      f"(into {FASHION_MNIST_DIR}), or set data.idx_dir to a folder holding them")


def hide_accelerators_from_tf():
  """GPUs and TPUs stay free for JAX (TensorFlow would take their memory)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except Exception:  # pylint: disable=broad-except
      pass  # No such device type, or TF devices were already initialised.


def _tfds():
  """tensorflow_datasets, with TensorFlow kept off the accelerators."""
  hide_accelerators_from_tf()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def _tfds_prepared(name: str, data_dir: str) -> bool:
  """Whether TFDS has `name` prepared in data_dir (no download, no preparation)."""
  try:
    return bool(_tfds().builder(name, data_dir=data_dir or None).is_prepared())
  except Exception:  # pylint: disable=broad-except  # not importable / unknown: not prepared
    return False


def _load_tfds(name: str, data_dir: str):
  """Loads TFDS 'train' and 'test' as numpy; never downloads; any failure raises DataError."""
  try:
    tfds = _tfds()
    (train, test), info = tfds.load(name, split=["train", "test"], as_supervised=True,
                                    with_info=True, data_dir=data_dir or None,
                                    download=False)
    arrays = []
    for ds in (train, test):
      # Chunked batching instead of batch_size=-1: the latter pads ragged images
      # silently and aborts the process when the split size is unknown (mock_data).
      chunks = list(tfds.as_numpy(ds.batch(10000)))
      arrays.append(np.concatenate([c[0] for c in chunks]) if chunks else None)
      arrays.append(np.concatenate([c[1] for c in chunks]) if chunks else None)
    label = info.features[info.supervised_keys[1]]
    num_classes = getattr(label, "num_classes", None)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(
        f"data.name: could not load TFDS dataset {name!r}: {_reason(e)}. Runs never "
        f"download: prepare it first ({PREPARE} {name}"
        f"{' --data_dir ' + data_dir if data_dir else ''}), or point data.tfds_data_dir at "
        f"a prepared copy, or use {ALLOWED}") from e
  src = f"data.name: TFDS dataset {name!r}"
  if any(a is None for a in arrays):
    raise DataError(f"{src} has an empty train or test split")
  x_train, y_train, x_test, y_test = _check_arrays(src, *arrays)
  if num_classes is not None:
    num_classes = max(int(num_classes), int(max(y_train.max(), y_test.max())) + 1)
  return x_train, y_train, x_test, y_test, num_classes


def _reason(e: Exception) -> str:
  """First line of an exception message, shortened."""
  lines = [l for l in str(e).splitlines() if l.strip()]
  text = f"{type(e).__name__}: {lines[0] if lines else ''}"
  return text if len(text) <= 300 else text[:297] + "..."


def _check_arrays(src, x_train, y_train, x_test, y_test):
  """Validates uint8 NHWC (or NHW) images and integer [N] labels of both splits."""
  out = []
  for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype != np.uint8:
      raise DataError(f"{src}: x_{split} must be uint8 images, got dtype {x.dtype}")
    if x.ndim == 3:
      x = x[..., None]
    if x.ndim != 4 or 0 in x.shape[1:]:
      raise DataError(f"{src}: x_{split} must have shape [N, H, W, C] (or [N, H, W]), "
                      f"got {x.shape}")
    if len(x) == 0:
      raise DataError(f"{src}: x_{split} has no images")
    if not np.issubdtype(y.dtype, np.integer):
      raise DataError(f"{src}: y_{split} must be integer labels, got dtype {y.dtype}")
    if y.ndim != 1:
      raise DataError(f"{src}: y_{split} must be 1-D [N], got shape {y.shape}")
    if len(y) != len(x):
      raise DataError(f"{src}: y_{split} has {len(y)} labels but x_{split} has "
                      f"{len(x)} images")
    if y.min() < 0 or y.max() >= 2**31:
      raise DataError(f"{src}: y_{split} labels must be in [0, 2^31), got "
                      f"{y.min()}..{y.max()}")
    out += [np.ascontiguousarray(x), y.astype(np.int32)]
  if out[0].shape[1:] != out[2].shape[1:]:
    raise DataError(f"{src}: train images {out[0].shape[1:]} and test images "
                    f"{out[2].shape[1:]} differ in shape (H, W, C)")
  return tuple(out)


def _split_valid(x, y, valid_size: int):
  """Last `valid_size` of a fixed rng(0) permutation -> valid; both kept in order."""
  n = len(x)
  if valid_size >= n:
    raise DataError(f"data.valid_size: {valid_size} must be smaller than the number "
                    f"of training images ({n})")
  perm = np.random.default_rng(0).permutation(n)
  train, valid = np.sort(perm[:n - valid_size]), np.sort(perm[n - valid_size:])
  return x[train], y[train], x[valid], y[valid]


def _channel_stats(x):
  """Per-channel mean and std of x / 255 (float32 [C]); std floored at 1/255."""
  c = x.shape[-1]
  pixels = x.reshape(-1, c)
  counts = np.zeros(256 * c, np.int64)  # Exact per-channel value histogram.
  for i in range(0, len(pixels), 1 << 20):  # Chunks bound the intp copy.
    chunk = pixels[i:i + (1 << 20)].astype(np.intp) * c + np.arange(c)
    counts += np.bincount(chunk.ravel(), minlength=256 * c)
  counts = counts.reshape(256, c).astype(np.float64)
  values = np.arange(256.0)[:, None] / 255.0
  mean = (counts * values).sum(0) / len(pixels)
  std = np.sqrt((counts * (values - mean)**2).sum(0) / len(pixels))
  # A constant channel normalises to 0 whatever its std; the floor avoids 0 / 0.
  return mean.astype(np.float32), np.maximum(std, 1.0 / 255.0).astype(np.float32)


def _normalize(x, mean, std) -> np.ndarray:
  """uint8 [..., C] -> float32 (x / 255 - mean) / std."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  return (x.astype(np.float32) / np.float32(255.0) - mean) / std


def _local_rows(batch_size: int, process_index: int, process_count: int) -> slice:
  """This process's rows of a global batch; validates the split."""
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
      or batch_size < 1:
    raise DataError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise DataError(f"process_index: {process_index} must be in [0, {process_count})")
  if batch_size % process_count:
    raise DataError(f"batch_size: {batch_size} must be divisible by the number of "
                    f"processes ({process_count})")
  per = batch_size // process_count
  return slice(process_index * per, (process_index + 1) * per)


def batches_per_epoch(n: int, batch_size: int) -> int:
  """Full batches in one pass over n examples (the remainder is dropped)."""
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
      or batch_size < 1:
    raise DataError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
  if n // batch_size < 1:
    raise DataError(f"batch_size: {batch_size} is larger than the {n} training "
                    f"images; at most {n} allowed")
  return n // batch_size


def train_batch(x, y, *, step: int, batch_size: int, seed: int, stream: int, mean, std,
                crop_pad: int = 0, flip: bool = False, cutout: int = 0,
                process_index: int = 0, process_count: int = 1):
  """This process's rows of augmented global training batch number `step`.

  Args:
    x: uint8 [N, H, W, C]; y: int [N].
    step: global batch number; epoch = step // batches_per_epoch(N, batch_size).
    batch_size: global batch size B (divisible by process_count).
    seed, stream: select the shuffling and augmentation streams.
    mean, std: float [C] normalisation.
    crop_pad: zero padding (after normalising) before a random HxW crop.
    flip: random horizontal flip with probability 0.5.
    cutout: side of a square (clipped at borders) set to 0 after normalising.
    process_index, process_count: which rows of the global batch to return.

  Returns:
    images float32 [B/P, H, W, C], labels int32 [B/P] (augment.plan, then augment.augment).
  """
  local = _local_rows(batch_size, process_index, process_count)
  if crop_pad < 0 or cutout < 0 or step < 0:
    raise DataError(f"step, crop_pad and cutout must be >= 0, got {step}, {crop_pad}, "
                    f"{cutout}")
  n, h, w = x.shape[:3]
  batches_per_epoch(n, batch_size)
  p = augment.plan(n, h, w, step=step, batch_size=batch_size, seed=seed, stream=stream,
                   crop_pad=crop_pad, local=local)
  images = augment.augment(x, p, augment.table(mean, std), crop_pad=crop_pad, flip=flip,
                           cutout=cutout)
  return np.ascontiguousarray(images, np.float32), np.asarray(y[p["idx"]], np.int32)


def eval_batches(x, y, *, batch_size: int, mean, std, process_index: int = 0,
                 process_count: int = 1
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Yields this process's rows of each global batch over x in order.

  The last partial global batch is zero-padded with weight 0, so every batch
  has the same shape.

  Yields:
    images float32 [B/P, H, W, C], labels int32 [B/P], weights float32 [B/P].
  """
  local = _local_rows(batch_size, process_index, process_count)
  return _eval_iter(x, y, batch_size, mean, std, local)


def _eval_iter(x, y, batch_size, mean, std, local):
  """Generator behind eval_batches (validation happens at call time)."""
  n = len(x)
  per = local.stop - local.start
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)[local]
    idx = idx[idx < n]
    images = np.zeros((per,) + x.shape[1:], np.float32)
    labels = np.zeros((per,), np.int32)
    weights = np.zeros((per,), np.float32)
    images[:len(idx)] = _normalize(x[idx], mean, std)
    labels[:len(idx)] = y[idx]
    weights[:len(idx)] = 1.0
    yield images, labels, weights
