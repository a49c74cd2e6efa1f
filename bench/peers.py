"""The strongest peers a user would deploy the same network with, beside fp_jax's fused path.

  runners, models = build(nets, image_shape, batch_sizes, threads, pad_channels)

For each network {name: fp_jax.infer.networks.Net} the same weights go into the PyTorch
network of bench/torch_peer.py (NCHW, eval-mode BN with the running statistics, BN not
folded; channel groups zero-padded to `pad_channels` as the fused path and fp_jax's exports
run them, so every peer computes the same widths), and run as

  torch_onnxruntime  ONNX Runtime on torch.onnx.export(dynamo=True) of that module (a
                     symbolic batch): the native PyTorch -> ONNX route
  torch_compile      torch.compile (inductor, the default mode), one compilation per batch
  torch_eager        the module itself under torch.inference_mode

Runners take numpy images [B,H,W,C] (the program's layout) and return numpy logits; the
NCHW transpose of the input is part of their time (fp_jax's ONNX model does it inside).
Threads: torch.set_num_threads(n), its OpenMP pool (libgomp) left as a user gets it (it spins
briefly after a parallel region, then sleeps; OMP_WAIT_POLICY=PASSIVE made its 2-thread runs
3-4x slower than 1-thread ones on a 2-core Xeon); ONNX Runtime as
fp_jax.infer.runtimes.OnnxRuntime. torch is a bench-only dependency (bench/requirements.txt).
"""
from __future__ import annotations

import io
import warnings

import numpy as np

from fp_jax.infer import padding
from fp_jax.infer import runtimes

PEERS = runtimes.PEERS


def _torch_model(net, pad_channels):
  from bench import torch_peer  # pylint: disable=g-import-not-at-top
  params, stats = padding.pad_channels(net.plan, net.params, net.stats, pad_channels)
  return torch_peer.Net(net.plan, params).load_stats(stats).inference()


def onnx_bytes(module, image_shape):
  """torch.onnx.export (dynamo) of module: x [batch, C, H, W] -> logits, batch symbolic."""
  import torch  # pylint: disable=g-import-not-at-top
  h, w, c = image_shape
  x = torch.zeros(2, c, h, w)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    prog = torch.onnx.export(module, (x,), dynamo=True, input_names=["images_nchw"],
                             output_names=["logits"],
                             dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
  buf = io.BytesIO()
  prog.save(buf)
  return buf.getvalue()


def build(nets, image_shape, batch_sizes, threads, pad_channels=8, log=print,
          peers=PEERS):
  """({(name, peer): fn(numpy x [B,H,W,C]) -> numpy logits}, {f'{name}_torch.onnx': bytes}).
  torch_compile is compiled for every batch size here, so no compilation is timed."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  runners, models = {}, {}
  nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  for name, net in nets.items():
    module = _torch_model(net, pad_channels)
    if "torch_onnxruntime" in peers:
      onx = models[f"{name}_torch.onnx"] = onnx_bytes(module, image_shape)
      sess = runtimes.OnnxRuntime(onx, threads, input_name="images_nchw")
      runners[name, "torch_onnxruntime"] = (
          lambda x, s=sess: s(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
      log(f"peers: {name} exported by torch.onnx ({len(onx) / 2**20:.1f} MiB)")
    if "torch_eager" in peers:
      def eager(x, m=module):
        with torch.inference_mode():
          return m(nchw(x)).numpy()
      runners[name, "torch_eager"] = eager
    if "torch_compile" in peers:
      compiled = torch.compile(module, dynamic=False)

      def comp(x, m=compiled):
        with torch.inference_mode():
          return m(nchw(x)).numpy()
      for b in sorted(set(batch_sizes)):
        comp(np.zeros((b,) + tuple(image_shape), np.float32))
      runners[name, "torch_compile"] = comp
      log(f"peers: {name} compiled by torch.compile at batches {sorted(set(batch_sizes))}")
  return runners, models


def versions():
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  return {p: md.version(p) for p in ("torch", "onnxscript")}
