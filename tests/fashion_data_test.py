"""data.name=fashion_mnist: IDX files (gzipped or not) checked by structure, count and MD5;
TFDS's prepared copy when there are none; one error line for every bad case."""
import gzip
import hashlib
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from fp_jax import data
from fp_jax import idx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (6, 5)
COUNTS = {"x_train": 14, "y_train": 14, "x_test": 6, "y_test": 6}


def _idx_bytes(array):
  array = np.asarray(array, np.uint8)
  return struct.pack(f">HBB{array.ndim}I", 0, 0x08, array.ndim, *array.shape) + array.tobytes()


def _arrays():
  rng = np.random.default_rng(3)
  return {"x_train": rng.integers(0, 256, (14,) + SHAPE, dtype=np.uint8),
          "y_train": (np.arange(14) % 10).astype(np.uint8),
          "x_test": rng.integers(0, 256, (6,) + SHAPE, dtype=np.uint8),
          "y_test": np.array([9, 0, 1, 2, 3, 4], np.uint8)}


def _write(directory, arrays, gz=("x_train", "x_test")):
  """Writes the four files (those in `gz` gzipped); returns {key: (md5 of .gz, md5 raw)}."""
  sums = {}
  for key, array in arrays.items():
    raw = _idx_bytes(array)
    name = getattr(idx.FASHION_MNIST, key).name
    if key in gz:
      stored = gzip.compress(raw, mtime=0)
      open(os.path.join(directory, name + ".gz"), "wb").write(stored)
      sums[key] = (hashlib.md5(stored).hexdigest(), hashlib.md5(raw).hexdigest())
    else:
      open(os.path.join(directory, name), "wb").write(raw)
      sums[key] = ("", hashlib.md5(raw).hexdigest())
  return sums


def _spec(sums, use=("gz", "raw")):
  """A small FASHION_MNIST-like spec with the given files' sums."""
  files = {}
  for key, spec in idx.FASHION_MNIST.files().items():
    files[key] = idx.IdxFile(spec.name, COUNTS[key], SHAPE if key[0] == "x" else (),
                             sums[key][0] if "gz" in use else "",
                             sums[key][1] if "raw" in use else "")
  return idx.IdxDataset("small", **files)


def test_round_trip_gz_and_raw(tmp_path, monkeypatch):
  arrays = _arrays()
  monkeypatch.setattr(idx, "FASHION_MNIST", _spec(_write(tmp_path, arrays)))
  ds = data.load("fashion_mnist", 0, idx_dir=str(tmp_path))
  np.testing.assert_array_equal(ds.x_train, arrays["x_train"][..., None])
  np.testing.assert_array_equal(ds.y_train, arrays["y_train"])
  np.testing.assert_array_equal(ds.x_test, arrays["x_test"][..., None])
  np.testing.assert_array_equal(ds.y_test, arrays["y_test"])
  assert ds.num_classes == 10 and ds.image_shape == SHAPE + (1,)
  assert ds.y_train.dtype == np.int32
  held = data.load("fashion_mnist", 4, idx_dir=str(tmp_path))
  assert len(held.x_train) == 10 and len(held.x_valid) == 4


def test_recompressed_gz_passes_by_its_contents(tmp_path, monkeypatch):
  """Debian re-gzips the files: another .gz MD5, the published contents' MD5."""
  arrays = _arrays()
  sums = _write(tmp_path, arrays)
  published = {k: ("0" * 32 if v[0] else "", v[1]) for k, v in sums.items()}
  monkeypatch.setattr(idx, "FASHION_MNIST", _spec(published))
  ds = data.load("fashion_mnist", 0, idx_dir=str(tmp_path))
  np.testing.assert_array_equal(ds.x_test, arrays["x_test"][..., None])


def _one_line_error(tmp_path, match):
  with pytest.raises(data.DataError) as e:
    data.load("fashion_mnist", 0, idx_dir=str(tmp_path), tfds_data_dir=str(tmp_path / "no"))
  text = str(e.value)
  assert "\n" not in text and text.startswith("data.idx_dir: "), text
  assert match in text, text
  return text


def _corrupt(tmp_path, key, change):
  spec = getattr(idx.FASHION_MNIST, key)
  path = idx.find(str(tmp_path), spec)
  stored = open(path, "rb").read()
  raw = gzip.decompress(stored) if path.endswith(".gz") else stored
  raw = change(raw)
  open(path, "wb").write(gzip.compress(raw) if path.endswith(".gz") else raw)
  return path


@pytest.mark.parametrize("key,change,match", [
    ("y_test", lambda r: b"\x00\x00\x0c\x01" + r[4:], "bad magic 0x00000c01"),
    ("x_train", lambda r: r[:-7], "truncated: 413 data bytes, its header 14x6x5 says 420"),
    ("y_train", lambda r: r[:4] + struct.pack(">I", 13) + r[8:-1], "13 entries, expected 14"),
    ("x_test", lambda r: r[:-1] + bytes([r[-1] ^ 1]), "MD5 mismatch"),
    ("y_test", lambda r: r[:3], "truncated: 3 bytes"),
])
def test_bad_files_are_one_error_line_naming_the_file(tmp_path, monkeypatch, key, change,
                                                      match):
  monkeypatch.setattr(idx, "FASHION_MNIST", _spec(_write(tmp_path, _arrays())))
  path = _corrupt(tmp_path, key, change)
  assert path in _one_line_error(tmp_path, match)


def test_damaged_gzip_and_missing_file(tmp_path, monkeypatch):
  monkeypatch.setattr(idx, "FASHION_MNIST", _spec(_write(tmp_path, _arrays())))
  path = idx.find(str(tmp_path), idx.FASHION_MNIST.x_test)
  head = open(path, "rb").read()[:40]
  open(path, "wb").write(head)
  assert "not a readable gzip file" in _one_line_error(tmp_path, path)
  os.remove(path)
  _one_line_error(tmp_path, "t10k-images-idx3-ubyte[.gz] does not exist")


def test_published_sums_reject_other_contents(tmp_path):
  """The real spec: right structure and count is not enough, the MD5 must match too."""
  labels = (np.arange(10000) % 10).astype(np.uint8)
  path = tmp_path / "t10k-labels-idx1-ubyte"
  path.write_bytes(_idx_bytes(labels))
  with pytest.raises(idx.IdxError, match="MD5 mismatch.*bb300cfdad3c16e7a12a480ee83cd310"):
    idx.read(str(path), idx.FASHION_MNIST.y_test)
  with pytest.raises(idx.IdxError, match="9999 entries, expected 10000"):
    path.write_bytes(_idx_bytes(labels[:-1]))
    idx.read(str(path), idx.FASHION_MNIST.y_test)


def test_neither_idx_nor_tfds_names_field_path_and_package(tmp_path):
  text = _one_line_error(tmp_path, "apt-get install dataset-fashion-mnist")
  assert repr(str(tmp_path)) in text and "TFDS has no prepared fashion_mnist" in text


def test_tfds_copy_when_no_idx_files(tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  monkeypatch.setattr(data, "_tfds_prepared", lambda name, d: name == "fashion_mnist")
  with tfds.testing.mock_data(num_examples=20):
    ds = data.load("fashion_mnist", 4, idx_dir=str(tmp_path))
  assert ds.image_shape == (28, 28, 1) and ds.num_classes == 10
  assert len(ds.x_train) == 16 and len(ds.x_valid) == 4


def test_cli_error_line_and_exit_status(tmp_path):
  """A truncated real-named file through the program: one `error:` line, exit 2."""
  (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 5)
  cmd = [sys.executable, "-m", "fp_jax.main", "--config=configs/smoke.py",
         f"--workdir={tmp_path / 'w'}", "--config.data.name=fashion_mnist",
         f"--config.data.idx_dir={tmp_path}", "--config.stages=search"]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert lines[-1].startswith("error: data.idx_dir: ") and "truncated" in lines[-1], lines[-3:]
  assert "Traceback" not in r.stderr
