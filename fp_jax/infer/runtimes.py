"""Other runtimes of the exported networks (ONNX Runtime, LiteRT) and the thread count.

Runners take numpy images x [B,H,W,C] f32 and return numpy logits [B,classes]:
ONNX Runtime one session of the ONNX model (onnx_export.py, any batch size),
LiteRT one interpreter per batch size (its models have static shapes, export.py),
picked by x.shape[0].

Threads (`latency.threads`, 0 = every core this process may use):
- XLA:CPU (fp_jax fused and per-op): no per-call setting; `use_cores(n)` pins
  every thread of the process to the first n usable cores (sched_setaffinity
  on each task; threads created later inherit it), so XLA's intra-op pool, which
  was sized when the CPU client started, runs on n cores. bench/latency.py pins
  before JAX starts, so the pool is also sized n.
- ONNX Runtime: SessionOptions.intra_op_num_threads = n, inter_op 1, sequential
  execution, and no spin-waiting of idle workers
  (session.intra_op.allow_spinning=0): spinning workers would steal the cores of
  the runtime timed next in the interleaved comparison.
- LiteRT: Interpreter(num_threads=n) (its default XNNPACK delegate takes the
  same count).
"""
from __future__ import annotations

import os

import numpy as np

from fp_jax.run import errors

RUNTIMES = ("onnxruntime", "litert")
PEERS = ("torch_onnxruntime", "torch_compile", "torch_eager")   # bench/peers.py (torch)
ALL = ("perop", "fused") + RUNTIMES + PEERS
LABELS = {"perop": "fp_jax per-op", "fused": "fp_jax fused",
          "onnxruntime": "ONNX Runtime (fp_jax's ONNX)", "litert": "LiteRT (fp_jax's)",
          "torch_onnxruntime": "ONNX Runtime (torch.onnx export)",
          "torch_compile": "torch.compile (inductor)", "torch_eager": "PyTorch eager"}
THREADS = {  # how each runtime's thread count is set (latency.json runtime_threads)
    "perop": "XLA:CPU intra-op pool; the process pinned to the first n cores",
    "fused": "XLA:CPU intra-op pool; the process pinned to the first n cores",
    "onnxruntime": "SessionOptions intra_op_num_threads=n, inter_op 1, sequential, no spinning",
    "litert": "Interpreter(num_threads=n), XNNPACK delegate",
    "torch_onnxruntime": "as onnxruntime",
    "torch_compile": "torch.set_num_threads(n), libgomp's default wait policy",
    "torch_eager": "torch.set_num_threads(n), libgomp's default wait policy"}


def usable_cores():
  return sorted(os.sched_getaffinity(0))


def use_cores(threads):
  """Pins every thread of this process to the first `threads` usable cores (0: all);
  returns the core count n in use."""
  cores = usable_cores()
  if threads < 0 or threads > len(cores):
    raise ValueError(f"threads={threads}: must be in 0..{len(cores)} (usable cores)")
  if threads == 0:
    return len(cores)
  keep = set(cores[:threads])
  for tid in os.listdir("/proc/self/task"):
    try:
      os.sched_setaffinity(int(tid), keep)
    except (ProcessLookupError, PermissionError):      # a thread that just ended
      pass
  return threads


def _need(module, package):
  """The module, or errors.RunError (main prints one `error:` line) if it is missing."""
  try:
    return __import__(module, fromlist=["_"])
  except ImportError as e:
    raise errors.RunError(f"latency: {package} is not installed, so its runtime cannot be "
                          f"timed (pip install -r requirements.txt): {e}") from e


def _by_batch(models, x):
  m = models.get(x.shape[0])
  if m is None:
    raise ValueError(f"no model for batch {x.shape[0]}; exported batches {sorted(models)}")
  return m


class OnnxRuntime:
  """An ONNX Runtime CPU session of one model (bytes), `threads` intra-op threads."""

  def __init__(self, model, threads, input_name="images"):
    ort = _need("onnxruntime", "onnxruntime")
    self.input_name = input_name
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    self.session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])

  def __call__(self, x):
    return self.session.run(["logits"], {self.input_name: x})[0]


class LiteRT:
  """LiteRT interpreters {batch: Interpreter} (ai_edge_litert), `threads` threads."""

  def __init__(self, models, threads):
    interp = _need("ai_edge_litert.interpreter", "ai-edge-litert")
    self.interpreters = {}
    for b, m in models.items():
      it = interp.Interpreter(model_content=m, num_threads=threads)
      it.allocate_tensors()
      self.interpreters[b] = (it, it.get_input_details()[0]["index"],
                              it.get_output_details()[0]["index"])

  def __call__(self, x):
    it, i, o = _by_batch(self.interpreters, x)
    it.set_tensor(i, x)
    it.invoke()
    return it.get_tensor(o)


def versions():
  """Versions of the runtimes and converters (import errors raise)."""
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  return {p: md.version(p) for p in ("jax", "onnxruntime", "ai-edge-litert", "tensorflow-cpu",
                                     "onnx")}


def build(nets, image_shape, batch_sizes, threads, pad_channels=8, log=print):
  """Exports every net {name: infer.networks.Net} to ONNX (onnx_export.py: NCHW, any
  batch) and to LiteRT at every batch size (export.RUNTIME_OPTS), channels padded to a
  multiple of pad_channels. Returns ({(name, runtime): runner},
  {f'{name}.onnx' / f'{name}.tflite' (batch 1): model bytes})."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from fp_jax.infer import export  # pylint: disable=g-import-not-at-top
  from fp_jax.infer import onnx_export  # pylint: disable=g-import-not-at-top
  opts = dataclasses.replace(export.RUNTIME_OPTS, pad_channels=pad_channels)
  runners, files = {}, {}
  for name, net in nets.items():
    onx = onnx_export.to_onnx(net.plan, net.params, net.stats, pad_channels)
    fn = export.network_fn(net.plan, net.params, net.stats, opts)
    tfl = {b: export.to_tflite(fn, (b,) + tuple(image_shape))
           for b in sorted(set(batch_sizes) | {1})}
    log(f"latency: {name} exported to ONNX (any batch) and LiteRT at batches {sorted(tfl)}")
    files[f"{name}.onnx"], files[f"{name}.tflite"] = onx, tfl[1]
    runners[name, "onnxruntime"] = OnnxRuntime(onx, threads)
    runners[name, "litert"] = LiteRT(tfl, threads)
  return runners, files


def block_ratios(a_s, b_s, block):
  """Per-block ratios mean(a) / mean(b) of two interleaved series of per-image seconds
  (block consecutive images of each per repeat; latency.interleave): the spread of
  a / b over the repeats, as {min, q1, median, q3, max, blocks}."""
  n = min(len(a_s), len(b_s)) // block * block
  if n == 0:
    return {}
  a = np.asarray(a_s[:n]).reshape(-1, block).mean(1)
  b = np.asarray(b_s[:n]).reshape(-1, block).mean(1)
  r = a / b
  q = np.percentile(r, [0, 25, 50, 75, 100])
  return dict(zip(("min", "q1", "median", "q3", "max"), map(float, q)), blocks=int(len(r)))


def section(latency_s, throughput, diffs, nets, names=ALL, block=1):
  """The latency.json `runtimes` section: {runtime: {net: {mean_ms, median_ms, p10_ms,
  p90_ms (batch 1), images_per_s (batch throughput), max_abs_diff_vs_fused,
  median_vs_fused (this runtime's median ms / fused's), block_ratio_vs_fused (the
  spread of that ratio over the interleaved repeats of `block` images, block_ratios)}}}
  from per-variant batch-1 seconds {f'{net}_{runtime}': [s]}, images/s and logit diffs."""
  out = {}
  for rt in names:
    out[rt] = {}
    for n in nets:
      ms = 1e3 * np.asarray(latency_s[f"{n}_{rt}"])
      fu = 1e3 * np.asarray(latency_s[f"{n}_fused"])
      out[rt][n] = {"mean_ms": float(ms.mean()), "median_ms": float(np.median(ms)),
                    "p10_ms": float(np.percentile(ms, 10)),
                    "p90_ms": float(np.percentile(ms, 90)),
                    "images_per_s": float(throughput[f"{n}_{rt}"]),
                    "max_abs_diff_vs_fused": float(diffs[n][rt]),
                    "median_vs_fused": float(np.median(ms) / np.median(fu)),
                    "block_ratio_vs_fused": block_ratios(latency_s[f"{n}_{rt}"],
                                                         latency_s[f"{n}_fused"], block)}
  return out


def to_markdown(rts, batch_size):
  """The runtimes section as a table (ms per image at batch 1, images/s at batch_size,
  median / fused with the spread [q1, q3] and [min, max] of the per-repeat ratios)."""
  nets = list(rts["fused"])
  head = ["runtime"] + [f"{n} {k}" for n in nets for k in ("mean ms", "median ms")] + [
      f"{n} img/s (batch {batch_size})" for n in nets] + [
      f"{n} median / fused [q1, q3] {{min, max}} over repeats" for n in nets]

  def ratio(r, n):
    b = r[n].get("block_ratio_vs_fused") or {}
    med = r[n]["median_ms"] / rts["fused"][n]["median_ms"]
    if not b:
      return f"{med:.2f}"
    return f"{med:.2f} [{b['q1']:.2f}, {b['q3']:.2f}] {{{b['min']:.2f}, {b['max']:.2f}}}"

  rows = []
  for rt in [r for r in ALL if r in rts]:
    r = rts[rt]
    rows.append([LABELS[rt]] + [f"{r[n][k]:.3f}" for n in nets for k in ("mean_ms", "median_ms")]
                + [f"{r[n]['images_per_s']:.1f}" for n in nets] + [ratio(r, n) for n in nets])
  return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                   + ["| " + " | ".join(row) + " |" for row in rows])


def plot(rts, path, title):
  """Bar chart of batch-1 ms per image (median) per runtime, one group per network."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  nets = list(rts["fused"])
  fig, ax = plt.subplots(figsize=(7, 4.5))
  names = [r for r in ALL if r in rts]
  width = 0.8 / len(names)
  for i, rt in enumerate(names):
    xs = np.arange(len(nets)) + (i - (len(names) - 1) / 2) * width
    ys = [rts[rt][n]["median_ms"] for n in nets]
    bars = ax.bar(xs, ys, width, label=LABELS[rt])
    ax.bar_label(bars, fmt="%.2f", fontsize=7)
  ax.set_xticks(np.arange(len(nets)), nets)
  ax.set_ylabel("ms per image, batch 1 (median)")
  ax.set_title(title, fontsize=9)
  ax.legend()
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
