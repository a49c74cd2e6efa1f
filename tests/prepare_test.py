"""Tests for fp_jax.prepare, offline: TFDS's own cifar10 generation from a small fake archive
in --manual_dir, read back by fp_jax.data; bad input as one `error:` line."""
import io
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import checksums

from fp_jax import data
from fp_jax import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
ARCHIVE = "cifar-10-binary.tar.gz"


def _write_fake_cifar(path, sizes=(3, 3, 3, 3, 3, 4), seed=0):
  """A cifar-10-binary.tar.gz laid out as the real one: cifar-10-batches-bin/ with
  data_batch_{1..5}.bin and test_batch.bin of 3073-byte records (label, then the image as
  1024 red, 1024 green, 1024 blue bytes, rows in order) and batches.meta.txt.

  Returns:
    x_train, y_train, x_test, y_test (uint8 [N, 32, 32, 3], int [N]) and the class names.
  """
  rng = np.random.default_rng(seed)
  names = [f"class_{k}" for k in range(10)]
  files = {"batches.meta.txt": ("\n".join(names) + "\n\n").encode()}
  xs, ys = [], []
  for i, n in enumerate(sizes):
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, n, dtype=np.uint8)
    planes = x.transpose(0, 3, 1, 2).reshape(n, 3072)
    name = f"data_batch_{i + 1}.bin" if i < 5 else "test_batch.bin"
    files[name] = np.concatenate([y[:, None], planes], axis=1).tobytes()
    xs.append(x)
    ys.append(y)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with tarfile.open(path, "w:gz") as tar:
    for name, content in files.items():
      info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
      info.size = len(content)
      tar.addfile(info, io.BytesIO(content))
  return (np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], ys[5], names)


def _rows(x, y):
  """(label, image bytes) pairs, sorted: TFDS stores examples in its own shuffled order."""
  return sorted(zip(np.asarray(y).tolist(), [im.tobytes() for im in x]))


def _run(*args):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", "fp_jax.prepare", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)


def _error_line(proc):
  """The single `error:` line of a failed run; asserts the failure is clean."""
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1, proc.stderr
  return lines[0]


def test_cifar10_from_manual_dir_reads_back(tmp_path, monkeypatch):
  manual, data_dir = tmp_path / "manual", tmp_path / "tfds"
  x_train, y_train, x_test, y_test, names = _write_fake_cifar(str(manual / ARCHIVE))
  cifar10 = tfds.builder_cls("cifar10")
  assert CIFAR_URL in cifar10.url_infos  # The URL and file name TFDS registers for cifar10.
  assert cifar10.url_infos[CIFAR_URL].filename == ARCHIVE
  # The one bypass: TFDS checks the archive in manual_dir against cifar10's registered size and
  # sha256 (the real 170 MB file's). Register the fake archive's own instead, for this builder
  # class only: TFDS still hashes the file and compares (test_wrong_archive_... shows it).
  monkeypatch.setattr(cifar10, "url_infos",
                      {CIFAR_URL: checksums.compute_url_info(manual / ARCHIVE)})
  path, existed = prepare.prepare("cifar10", data_dir=str(data_dir), manual_dir=str(manual))
  assert not existed and path == str(data_dir / "cifar10" / "3.0.2")
  assert prepare.prepare("cifar10", data_dir=str(data_dir), manual_dir=str(manual))[1]
  assert tfds.builder("cifar10", data_dir=str(data_dir)).info.features["label"].names == names

  ds = data.load("cifar10", 0, tfds_data_dir=str(data_dir))
  assert ds.num_classes == 10 and ds.image_shape == (32, 32, 3)
  assert _rows(ds.x_train, ds.y_train) == _rows(x_train, y_train)
  assert _rows(ds.x_test, ds.y_test) == _rows(x_test, y_test)


def test_wrong_archive_in_manual_dir_fails_the_checksum(tmp_path):
  manual = tmp_path / "manual"
  _write_fake_cifar(str(manual / ARCHIVE))  # Not the published file.
  with pytest.raises(prepare.PrepareError,
                     match=r"^--manual_dir: NonMatchingChecksumError: .*wrong checksum.*"
                     r"Expected: .*c4a38c50a1bc.*download it again"):
    prepare.prepare("cifar10", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
  assert not os.path.exists(tmp_path / "tfds" / "cifar10" / "3.0.2")


def test_unreachable_host_fails_at_once(monkeypatch):
  for key in list(os.environ):
    if key.lower().endswith("_proxy"):
      monkeypatch.delenv(key)
  with pytest.raises(prepare.PrepareError,
                     match=r"^NAME: cannot reach fp-jax-test\.invalid .*--manual_dir DIR"):
    prepare.check_hosts([("https://fp-jax-test.invalid/a.tar.gz", "a.tar.gz")])


def test_unknown_dataset_error_line(tmp_path):
  line = _error_line(_run("no_such_dataset_xyz", f"--data_dir={tmp_path}"))
  assert line.startswith("error: NAME: unknown TFDS dataset 'no_such_dataset_xyz'"), line
  assert "cifar10" in line


def test_missing_archive_error_line(tmp_path):
  (tmp_path / "empty").mkdir()
  line = _error_line(_run("cifar10", f"--data_dir={tmp_path / 'tfds'}",
                          f"--manual_dir={tmp_path / 'empty'}"))
  assert line.startswith("error: --manual_dir:"), line
  assert f"has no {ARCHIVE} (download it from {CIFAR_URL})" in line
  line = _error_line(_run("cifar10", f"--data_dir={tmp_path / 'tfds'}",
                          f"--manual_dir={tmp_path / 'nowhere'}"))
  assert line.startswith("error: --manual_dir:") and "is not a directory" in line, line
