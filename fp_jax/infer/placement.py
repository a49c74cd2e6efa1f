"""Where the latency stage runs: its CPU figures always on a CPU device, and, on a GPU or TPU
host, a separately labelled accelerator section (the fused network only).

On an accelerator host JAX's default device is the GPU / TPU, so without care the fp_jax
executors would be timed there while ONNX Runtime and LiteRT run on the CPU, and 'auto'
choices (fused.depthwise_impl) would follow the accelerator. `on_cpu` pins the stage's
CPU work to the CPU backend; `for_platform` resolves 'auto' for the device that runs it.

  cpu = cpu_device()
  with jax.default_device(cpu):
    ... CPU figures, exports ...
  if (accel := accelerator()) is not None:
    result["accelerator"] = section(nets, accel, images, batch_size, opts)
"""
from __future__ import annotations

import dataclasses
import statistics

import jax
import numpy as np

from fp_jax.infer import fused
from fp_jax.run import errors

NETS = ("baseline", "pruned")


def cpu_device():
  """JAX's first CPU device; RunError when JAX_PLATFORMS leaves the CPU backend out."""
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:
    raise errors.RunError(
        "latency: the CPU figures need JAX's CPU backend, which JAX_PLATFORMS leaves out "
        "here; add cpu to it (e.g. JAX_PLATFORMS=cuda,cpu)") from None


def accelerator():
  """The first GPU / TPU device when JAX's default backend is one, else None."""
  return None if jax.default_backend() == "cpu" else jax.devices()[0]


def for_platform(opts, platform):
  """fused.Options with depthwise 'auto' resolved for `platform` (cpu, gpu, tpu)."""
  return dataclasses.replace(opts, depthwise=fused.depthwise_impl(
      opts.depthwise, dtype=opts.dtype, platform=platform))


def section(nets, device, images, batch_size, opts, seed=0, warmup=3, timer=None):
  """The fused network of nets {'baseline', 'pruned'} on `device`: batch-1 latency (median
  and mean over `images` random images, the two networks interleaved) and throughput at
  `batch_size` (median of 5 batches), with the largest |logit| difference from the same
  network on the CPU. timer(fn) -> seconds (default: wall time waiting for the result)."""
  from fp_jax.infer import latency   # pylint: disable=g-import-not-at-top  (its timers)
  timer = timer or latency.timed
  opts = for_platform(opts, device.platform)
  plan = nets["baseline"].plan
  rng = np.random.default_rng(seed)
  shape = plan.image_hw + (plan.in_channels,)
  xs = rng.standard_normal((images,) + shape).astype(np.float32)
  xb = rng.standard_normal((batch_size,) + shape).astype(np.float32)
  with jax.default_device(device):
    ex = {n: fused.Fused(nets[n].plan, nets[n].params, nets[n].stats, opts) for n in NETS}
    singles = [jax.device_put(xs[i:i + 1], device) for i in range(images)]
    xbd = jax.device_put(xb, device)
    for n in NETS:
      for i in range(warmup):
        latency.block(ex[n](singles[i % images]))
      latency.block(ex[n](xbd))
    lat = latency.interleave({n: (lambda f: lambda i: timer(lambda: f(singles[i])))(ex[n])
                              for n in NETS}, images, block=latency.LATENCY_BLOCK)
    tput = latency.interleave({n: (lambda f: lambda i: timer(lambda: f(xbd)))(ex[n])
                               for n in NETS}, 5)
    logits = {n: np.asarray(ex[n](xbd)) for n in NETS}
  cpu = cpu_device()
  with jax.default_device(cpu):
    cpu_opts = for_platform(opts, "cpu")
    ref = {n: np.asarray(fused.Fused(nets[n].plan, nets[n].params, nets[n].stats, cpu_opts)(
        jax.device_put(xb, cpu))) for n in NETS}
  return {
      "device": f"{device.platform}: {getattr(device, 'device_kind', '?')}",
      "platform": device.platform, "depthwise_impl": opts.depthwise, "images": images,
      "batch_size": batch_size,
      "batch1_ms": {n: {"median_ms": 1e3 * statistics.median(lat[n]),
                        "mean_ms": 1e3 * float(np.mean(lat[n]))} for n in NETS},
      "throughput_images_per_s": {n: batch_size / statistics.median(tput[n]) for n in NETS},
      "max_abs_diff_vs_cpu": {n: float(np.max(np.abs(logits[n] - ref[n]))) for n in NETS},
      "max_abs_logit": max(float(np.max(np.abs(ref[n]))) for n in NETS),
  }


def to_markdown(acc):
  """The accelerator section of latency.md."""
  rows = [f"| {n} | {acc['batch1_ms'][n]['median_ms']:.4g} | {acc['batch1_ms'][n]['mean_ms']:.4g}"
          f" | {acc['throughput_images_per_s'][n]:.4g} | {acc['max_abs_diff_vs_cpu'][n]:.3g} |"
          for n in NETS]
  return "\n".join([
      f"## Accelerator: {acc['device']} (fused network only; not comparable with the CPU "
      "tables above)\n",
      f"| network | batch-1 median ms | batch-1 mean ms | img/s at batch {acc['batch_size']} | "
      "max abs diff vs CPU |", "|---|---|---|---|---|", *rows,
      f"\nBatch-1 over {acc['images']} images, the two networks interleaved; depthwise "
      f"{acc['depthwise_impl']}; largest |logit| {acc['max_abs_logit']:.4g}.\n"])
