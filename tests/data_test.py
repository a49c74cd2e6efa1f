"""Tests for fp_jax.data: sources, splits, step-indexed batching, augmentation."""
import numpy as np
import pytest

from fp_jax import data


@pytest.fixture(scope="module")
def digits():
  return data.load("digits", 100)


def _toy(n=40, h=6, w=5, c=2):
  """uint8 [n, h, w, c] images whose pixels encode the index; labels = index."""
  x = (np.arange(n)[:, None, None, None] + np.zeros((1, h, w, c), np.int64)) % 200 + 50
  return x.astype(np.uint8), np.arange(n, dtype=np.int32)


def _kwargs(**kw):
  base = dict(batch_size=8, seed=3, stream=1, mean=np.zeros(2), std=np.ones(2))
  base.update(kw)
  return base


def test_digits_shapes_and_splits(digits):
  assert digits.image_shape == (8, 8, 1)
  assert digits.num_classes == 10
  assert digits.x_train.dtype == np.uint8 and digits.y_train.dtype == np.int32
  assert len(digits.x_test) == 1797 // 5
  assert len(digits.x_valid) == 100
  assert len(digits.x_train) == 1797 - 1797 // 5 - 100
  assert digits.x_train.max() == 255
  assert digits.mean.shape == (1,) and digits.mean.dtype == np.float32
  assert digits.std.shape == (1,) and digits.std.dtype == np.float32
  again = data.load("digits", 100)
  np.testing.assert_array_equal(again.x_valid, digits.x_valid)
  np.testing.assert_array_equal(again.y_test, digits.y_test)


def test_valid_split_is_held_out_from_train(tmp_path):
  x, y = _toy(50)
  path = tmp_path / "toy.npz"
  np.savez(path, x_train=x, y_train=y, x_test=x[:5], y_test=y[:5])
  ds = data.load(f"npz:{path}", 10)
  assert len(ds.y_valid) == 10 and len(ds.y_train) == 40
  assert sorted(np.concatenate([ds.y_train, ds.y_valid]).tolist()) == list(range(50))


def test_valid_size_errors(digits):
  with pytest.raises(data.DataError, match=r"^data\.valid_size:"):
    data.load("digits", 1797)
  with pytest.raises(data.DataError, match=r"^data\.valid_size:"):
    data.load("digits", -1)


def test_batch_determinism():
  x, y = _toy()
  a = data.train_batch(x, y, step=5, crop_pad=2, flip=True, cutout=3, **_kwargs())
  b = data.train_batch(x, y, step=5, crop_pad=2, flip=True, cutout=3, **_kwargs())
  c = data.train_batch(x, y, step=6, crop_pad=2, flip=True, cutout=3, **_kwargs())
  d = data.train_batch(x, y, step=5, crop_pad=2, flip=True, cutout=3,
                       **_kwargs(stream=2))
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert a[0].dtype == np.float32 and a[1].dtype == np.int32
  assert a[0].shape == (8, 6, 5, 2)
  assert not np.array_equal(a[1], c[1])
  assert not np.array_equal(a[1], d[1])


def test_epoch_visits_each_index_once():
  x, y = _toy(43)
  bpe = data.batches_per_epoch(43, 8)
  assert bpe == 5
  for epoch in range(2):
    seen = np.concatenate([
        data.train_batch(x, y, step=epoch * bpe + j, **_kwargs())[1] for j in range(bpe)])
    assert len(seen) == len(set(seen.tolist())) == 40
  first = [data.train_batch(x, y, step=j, **_kwargs())[1] for j in range(bpe)]
  second = [data.train_batch(x, y, step=bpe + j, **_kwargs())[1] for j in range(bpe)]
  assert not np.array_equal(np.concatenate(first), np.concatenate(second))


def test_process_slices_match_global_batch():
  x, y = _toy(64)
  kw = _kwargs(batch_size=16, crop_pad=2, flip=True, cutout=3)
  full_x, full_y = data.train_batch(x, y, step=7, **kw)
  parts = [data.train_batch(x, y, step=7, process_index=p, process_count=4, **kw)
           for p in range(4)]
  np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), full_x)
  np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), full_y)
  assert parts[0][0].shape == (4, 6, 5, 2)
  with pytest.raises(data.DataError, match=r"^batch_size:"):
    data.train_batch(x, y, step=0, process_count=3, **kw)


def test_batch_size_errors():
  with pytest.raises(data.DataError, match=r"^batch_size:"):
    data.batches_per_epoch(5, 8)
  with pytest.raises(data.DataError, match=r"^batch_size:"):
    data.batches_per_epoch(5, 0)


def test_cutout_zeroes_a_square():
  x = np.full((64, 16, 16, 3), 200, np.uint8)
  y = np.zeros(64, np.int32)
  imgs, _ = data.train_batch(x, y, step=0, batch_size=64, seed=0, stream=0,
                             mean=np.zeros(3), std=np.ones(3), cutout=5)
  full = 0
  for img in imgs:
    hole = img[..., 0] == 0
    assert np.all((img == 0) == hole[..., None])  # All channels together.
    rows, cols = hole.any(1), hole.any(0)
    np.testing.assert_array_equal(hole, rows[:, None] & cols[None, :])  # Rectangle.
    r, c = np.flatnonzero(rows), np.flatnonzero(cols)
    assert 3 <= len(r) <= 5 and 3 <= len(c) <= 5
    assert np.all(np.diff(r) == 1) and np.all(np.diff(c) == 1)
    full += hole.sum() == 25
    np.testing.assert_allclose(img[~hole], 200 / 255, rtol=1e-6)
  assert full > 0


def test_crop_pads_with_zeros_and_flip_mirrors():
  x = np.full((32, 8, 8, 1), 255, np.uint8)
  y = np.zeros(32, np.int32)
  imgs, _ = data.train_batch(x, y, step=1, batch_size=32, seed=0, stream=0,
                             mean=np.zeros(1), std=np.ones(1), crop_pad=2)
  counts = (imgs[..., 0] != 0).sum((1, 2))
  assert set(counts.tolist()) <= {a * b for a in (6, 7, 8) for b in (6, 7, 8)}
  assert len(set(counts.tolist())) > 1
  for img in imgs[..., 0]:  # Kept pixels form one contiguous rectangle.
    keep = img != 0
    np.testing.assert_array_equal(keep, keep.any(1)[:, None] & keep.any(0)[None, :])
  x = np.tile(np.arange(8, dtype=np.uint8)[None, None, :, None] * 30, (32, 8, 1, 1))
  imgs, _ = data.train_batch(x, y, step=0, batch_size=32, seed=0, stream=0,
                             mean=np.zeros(1), std=np.ones(1), flip=True)
  plain = x[0].astype(np.float32) / 255
  flipped = [np.array_equal(img, plain[:, ::-1]) for img in imgs]
  assert all(f or np.array_equal(img, plain) for f, img in zip(flipped, imgs))
  assert 0 < sum(flipped) < 32


def test_normalisation_zero_mean_unit_std(digits):
  imgs = [b[0][b[2] > 0] for b in data.eval_batches(
      digits.x_train, digits.y_train, batch_size=256, mean=digits.mean,
      std=digits.std)]
  imgs = np.concatenate(imgs)
  assert imgs.shape == digits.x_train.shape
  np.testing.assert_allclose(imgs.mean(), 0.0, atol=1e-4)
  np.testing.assert_allclose(imgs.std(), 1.0, atol=1e-4)


def test_eval_batches_pad_and_split():
  x, y = _toy(21)
  kw = dict(batch_size=8, mean=np.zeros(2), std=np.ones(2))
  batches = list(data.eval_batches(x, y, **kw))
  assert len(batches) == 3
  assert all(b[0].shape == (8, 6, 5, 2) for b in batches)
  weights = np.concatenate([b[2] for b in batches])
  assert weights.sum() == 21 and np.all(weights[21:] == 0)
  labels = np.concatenate([b[1] for b in batches])
  np.testing.assert_array_equal(labels[:21], y)
  np.testing.assert_array_equal(batches[-1][0][5:], 0)
  parts = [list(data.eval_batches(x, y, process_index=p, process_count=2, **kw))
           for p in range(2)]
  for i, b in enumerate(batches):
    for k in range(3):
      np.testing.assert_array_equal(
          np.concatenate([parts[0][i][k], parts[1][i][k]]), b[k])
  with pytest.raises(data.DataError, match=r"^batch_size:"):
    data.eval_batches(x, y, process_count=3, **kw)


def test_synthetic_is_deterministic_and_learnable():
  ds = data.load("synthetic", 24, synthetic_sizes=(200, 100))
  assert ds.image_shape == (32, 32, 3) and ds.num_classes == 10
  assert len(ds.x_train) == 176 and len(ds.x_valid) == 24 and len(ds.x_test) == 100
  np.testing.assert_array_equal(
      data.load("synthetic", 24, synthetic_sizes=(200, 100)).x_test, ds.x_test)
  # Nearest class mean of the channel-0 average classifies the test set.
  feat = lambda x: x[..., 0].mean((1, 2))
  centres = np.array([feat(ds.x_train[ds.y_train == k]).mean() for k in range(10)])
  pred = np.abs(feat(ds.x_test)[:, None] - centres[None]).argmin(1)
  assert (pred == ds.y_test).mean() > 0.9


def test_cifar10_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=60):
    ds = data.load("cifar10", 12)
  assert ds.image_shape == (32, 32, 3)
  assert ds.num_classes == 10
  assert len(ds.x_train) == 48 and len(ds.x_valid) == 12 and len(ds.x_test) == 60
  assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32


def test_unknown_name_errors():
  with pytest.raises(data.DataError, match=r"^data\.name:.*npz:PATH"):
    data.load("no_such_dataset_xyz", 0)


def test_npz_round_trip(tmp_path):
  rng = np.random.default_rng(1)
  x = rng.integers(0, 256, (30, 12, 20, 2), dtype=np.uint8)
  y = rng.integers(0, 4, 30).astype(np.int64)
  path = tmp_path / "d.npz"
  np.savez(path, x_train=x[:20], y_train=y[:20], x_test=x[20:], y_test=y[20:])
  ds = data.load(f"npz:{path}", 5)
  assert ds.image_shape == (12, 20, 2) and ds.num_classes == int(y.max()) + 1
  np.testing.assert_array_equal(ds.x_test, x[20:])
  assert ds.y_test.dtype == np.int32
  np.testing.assert_array_equal(np.sort(np.concatenate([ds.y_train, ds.y_valid])),
                                np.sort(y[:20].astype(np.int32)))
  np.testing.assert_allclose(ds.mean, (ds.x_train / 255).mean((0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(ds.std, (ds.x_train / 255).std((0, 1, 2)), rtol=1e-4)
  gray = tmp_path / "g.npz"
  np.savez(gray, x_train=x[:20, ..., 0], y_train=y[:20], x_test=x[20:, ..., 0],
           y_test=y[20:])
  assert data.load(f"npz:{gray}", 0).image_shape == (12, 20, 1)


def _good():
  x = np.zeros((10, 6, 4, 3), np.uint8)
  y = np.arange(10) % 3
  return dict(x_train=x, y_train=y, x_test=x[:4], y_test=y[:4])


@pytest.mark.parametrize("change,match", [
    (dict(x_train=None), "missing keys x_train"),
    (dict(x_train=np.zeros((10, 6, 4, 3), np.float32)), "x_train must be uint8"),
    (dict(x_test=np.zeros((4, 6), np.uint8)), r"x_test must have shape \[N, H, W, C\]"),
    (dict(y_train=np.zeros((10, 1), np.int64)), "y_train must be 1-D"),
    (dict(y_test=np.zeros(4, np.float32)), "y_test must be integer"),
    (dict(y_train=np.zeros(9, np.int64)), "9 labels but x_train has 10 images"),
    (dict(x_test=np.zeros((4, 6, 5, 3), np.uint8)), "differ in shape"),
    (dict(y_test=-np.ones(4, np.int64)), "labels must be in"),
    (dict(x_test=np.zeros((0, 6, 4, 3), np.uint8), y_test=np.zeros(0, np.int64)),
     "x_test has no images"),
])
def test_npz_errors(tmp_path, change, match):
  arrays = {**_good(), **change}
  path = tmp_path / "bad.npz"
  np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
  with pytest.raises(data.DataError, match=r"^data\.name: npz file .*" + match):
    data.load(f"npz:{path}", 0)


def test_npz_file_errors(tmp_path):
  with pytest.raises(data.DataError, match=r"^data\.name: .*does not exist"):
    data.load(f"npz:{tmp_path / 'missing.npz'}", 0)
  text = tmp_path / "text.npz"
  text.write_text("not an archive")
  with pytest.raises(data.DataError, match=r"^data\.name: .*not a readable \.npz"):
    data.load(f"npz:{text}", 0)
  single = tmp_path / "one.npy"
  np.save(single, np.zeros(3))
  with pytest.raises(data.DataError, match=r"^data\.name: .*single array"):
    data.load(f"npz:{single}", 0)
  pickled = tmp_path / "obj.npz"
  np.savez(pickled, **{**_good(), "y_test": np.array([1, "a", None, 2], object)})
  with pytest.raises(data.DataError, match=r"^data\.name: .*could not read y_test"):
    data.load(f"npz:{pickled}", 0)
