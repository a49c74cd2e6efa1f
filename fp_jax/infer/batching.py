"""A large batch as a loop over chunks of it: how many images a chunk holds, and the loop.

`fused.Fused` runs a batch above `micro_batch_size` images as one computation that maps the
network over equal chunks (`chunked`), so each chunk's activations stay in the caches.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

CHUNK_BYTES_CPU = 6 << 20


def largest_activation_bytes(plan, dtype="float32"):
  """Bytes of the network's largest activation (graph node output) for one image, at the
  plan's full widths."""
  return max(n.hw[0] * n.hw[1] * n.channels for n in plan.nodes) * jnp.dtype(dtype).itemsize


def micro_batch_size(micro_batch, image_bytes, platform=None):
  """Images per chunk when `Fused` runs a larger batch, or None (the whole batch at once).

  micro_batch (fused.Options.micro_batch, latency.micro_batch) n >= 1: n; -1: None; 0 (auto):
  on CPU as many images as keep the largest activation of a chunk within CHUNK_BYTES_CPU
  (image_bytes: largest_activation_bytes), on GPU / TPU None. platform: the one that runs
  it (default: `current_platform()`).

  On CPU a batch of 64 ENAS-size images (15 layers / F 36, 32x32: 0.7 MB of cell output an
  image) makes each of the network's ~650 kernels stream its operands from memory; a loop
  over chunks of 8 reuses one chunk's buffers, which stay in the caches. AMD EPYC, batch 64,
  unpruned / pruned: 1.32 / 1.37x the whole batch's throughput on one core, 1.24 / 1.18x on
  two (bench/results/latency_amd{,_2cores}.md, "Fused throughput at batch 64"). A network
  whose whole batch fits (the digits smoke network: 10 KB an image) runs whole: there chunks
  of 8 were about 15 % slower (12.2k against 10.3k img/s, one core, interleaved).
  """
  if micro_batch < -1:
    raise ValueError(f"micro_batch must be >= 1, -1 (the whole batch) or 0 (auto), got "
                     f"{micro_batch}")
  if micro_batch:
    return None if micro_batch == -1 else micro_batch
  if (platform or current_platform()) != "cpu":
    return None
  return max(1, CHUNK_BYTES_CPU // image_bytes)


def current_platform():
  """The platform computations compile for here: jax.default_device's (set by
  `with jax.default_device(...)`, as the latency stage's CPU figures on a GPU host), else
  JAX's default backend."""
  d = jax.config.jax_default_device
  if d is None:
    return jax.default_backend()
  return d if isinstance(d, str) else d.platform


def chunk_shape(b, size):
  """(number of chunks, images per chunk) for a batch of b at most `size` images a chunk:
  n = ceil(b / size) equal chunks of ceil(b / n)."""
  n = -(-b // size)
  return n, -(-b // n)


def chunked(run, x, size):
  """run(x [B,...]) as a loop over equal chunks of at most `size` images: lax.map over
  [n, B'/n, ...] with n = ceil(B / size) chunks (x zero-padded to B' = n * ceil(B / n), the
  padding's outputs dropped). Each chunk is the network on its images alone, so every
  image's result is run's on its chunk."""
  b = x.shape[0]
  if size is None or b <= size:
    return run(x)
  n, per = chunk_shape(b, size)
  xp = jnp.pad(x, [(0, n * per - b)] + [(0, 0)] * (x.ndim - 1))
  y = lax.map(run, xp.reshape((n, per) + x.shape[1:]))
  return y.reshape((n * per,) + y.shape[2:])[:b]
