"""A training batch as a plan (host RNG draws) and its augmentation, for numpy or jnp.

`plan` draws, from numpy RNGs seeded by (seed, stream, epoch) and (seed, stream, step, 7),
the rows, crop offsets, flips and cutout centres of global batch `step` and keeps this
process's rows (tiny int arrays). `augment` gathers, normalises, pad-crops, flips and cuts
out with the same float32 ops in the same order under xp=np (the host: data.train_batch)
and xp=jnp (inside a compiled step: data.input=device), so both give the same bits.

data.input: `host` builds float32 batches in numpy on the main thread; `device` puts the
uint8 train set on every device once (replicated: a global batch may pick any row) and
sends only the plan. Train sets over DEVICE_LIMIT_BYTES stay on the host, their batches
built one ahead by a background thread (`prefetch`).
"""
from __future__ import annotations

import concurrent.futures

import numpy as np

INPUTS = ("host", "device")
DEVICE_LIMIT_BYTES = 2 << 30   # uint8 train set replicated on every device: CIFAR-10 is 150 MB


def plan(n: int, h: int, w: int, *, step: int, batch_size: int, seed: int, stream: int,
         crop_pad: int, local: slice) -> dict:
  """This process's rows of global batch `step` over n images of h x w.

  The draws are made for the whole global batch, always in this order, then sliced.

  Returns:
    {"idx": int32 [b] rows, "offsets": int32 [b, 2] crop (row, col), "flips": bool [b],
     "centres": int32 [b, 2] cutout centre (row, col)}, b = local's length.
  """
  bpe = n // batch_size
  epoch, j = divmod(int(step), bpe)
  perm = np.random.default_rng([seed, stream, epoch]).permutation(n)
  idx = perm[j * batch_size:(j + 1) * batch_size]
  rng = np.random.default_rng([seed, stream, int(step), 7])
  offsets = rng.integers(0, 2 * crop_pad + 1, (batch_size, 2))
  flips = rng.random(batch_size) < 0.5
  centres = np.stack([rng.integers(0, h, batch_size), rng.integers(0, w, batch_size)], axis=1)
  return {"idx": idx[local].astype(np.int32), "offsets": offsets[local].astype(np.int32),
          "flips": flips[local], "centres": centres[local].astype(np.int32)}


def table(mean, std) -> np.ndarray:
  """float32 [256, C]: (v / 255 - mean) / std of every uint8 value v, computed in numpy.

  Normalising is a lookup in it on host and device alike: XLA turns divisions into
  multiplications by reciprocals (not IEEE division), a lookup is exact everywhere."""
  v = np.arange(256, dtype=np.uint8)[:, None].astype(np.float32)
  return (v / np.float32(255.0) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def augment(x, p: dict, lut, *, crop_pad: int = 0, flip: bool = False, cutout: int = 0,
            xp=np):
  """Images of plan p from x uint8 [N, H, W, C] -> float32 [b, H, W, C].

  lut[x[idx]] (table(mean, std): normalised), zero-padded by crop_pad and cropped to
  H x W at offsets, mirrored where flips (if flip), a cutout x cutout square (clipped)
  around centres set to 0 (if cutout). xp: np or jax.numpy (traceable under jit).
  """
  h, w, c = x.shape[1:4]
  f32 = xp.float32
  images = lut[xp.take(x, p["idx"], axis=0).astype(xp.int32), xp.arange(c)]
  b = images.shape[0]
  if crop_pad:
    q = crop_pad
    padded = xp.pad(images, ((0, 0), (q, q), (q, q), (0, 0)))
    rows = p["offsets"][:, :1] + xp.arange(h)  # [b, H]
    cols = p["offsets"][:, 1:] + xp.arange(w)  # [b, W]
    images = padded[xp.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
  if flip:
    images = xp.where(p["flips"][:, None, None, None], images[:, :, ::-1], images)
  if cutout:
    y0 = p["centres"][:, :1] - cutout // 2
    x0 = p["centres"][:, 1:] - cutout // 2
    in_rows = (xp.arange(h) >= y0) & (xp.arange(h) < y0 + cutout)  # [b, H]
    in_cols = (xp.arange(w) >= x0) & (xp.arange(w) < x0 + cutout)  # [b, W]
    hole = in_rows[:, :, None, None] & in_cols[:, None, :, None]
    images = xp.where(hole, f32(0.0), images)
  return images


def fits_on_device(x) -> bool:
  """Whether data.input=device may place x (uint8 [N, H, W, C]) on every device."""
  return x.nbytes <= DEVICE_LIMIT_BYTES


def prefetch(make, steps):
  """Yields make(s) for s in steps, each built by a background thread while the caller
  uses the previous one (numpy releases the GIL in its copies)."""
  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fp_jax_batches") as pool:
    steps = iter(steps)
    ahead = next(steps, None)
    future = None if ahead is None else pool.submit(make, ahead)
    while future is not None:
      ahead = next(steps, None)
      result = future.result()
      future = None if ahead is None else pool.submit(make, ahead)
      yield result
