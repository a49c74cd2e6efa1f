"""Fused inference: BN folded into the convolutions, cells and network as XLA computations.

Every conv+BN of child.py is one conv with a bias (folding.py: the stem, the 1x1
calibrations and layer_base convs, both halves of a factorized reduction, each
sep_conv's pointwise convs). ReLUs, adds, pools and the concat are left to XLA to fuse:
`forward` runs the graph (graph.py) as one traced function, `Fused` compiles it
with `jax.jit(...).lower(...).compile()` as one computation for the whole
network, and also one per cell (its graph nodes), with the folded weights baked in as
constants (a call passes only the images: no per-call argument handling of
hundreds of weight arrays). Pools are separable shifted sums (XLA:CPU's
reduce_window is several times slower). `Options.im2col` runs every non-depthwise
kxk convolution (k > 1: the stem) as explicit patch extraction + `jnp.dot`
(the paper's im2col + sgemm); 1x1 convolutions are GEMMs either way.
`Options.pad_channels` zero-pads every channel group to a multiple of the SIMD
width (padding.py: pruned widths such as 22 or 43 leave scalar remainders in
every vectorized row), and `Options.dots` picks XLA:CPU's GEMM emitter
(`compiler_options`). On CPU the depthwise convolutions run as fp_jax's own
kernel, an XLA custom call inside the same computation (`depthwise` 'kernel':
kernels.py, depthwise.cc) that also absorbs the ReLU, the zero padding and the
bias of the pointwise conv before it; XLA's loop fusion for them was a third of
the network's time at ~15 GMAC/s. Exported artifacts use 'shift' (export.py). The aux
head is training-only and not part of inference.

`Options.engine` picks what runs the whole network (`Fused.__call__` / `network`): 'xla'
compiles `forward` as above; 'native' (the CPU default where it runs: native.resolve) runs
the same graph with the same folded, padded weights as one custom call, fp_jax's own
executor (native.py, network.cc), whose ops are split over every usable core at batch 1.
The options above (im2col, depthwise, dots, micro_batch) are the XLA engine's; `run_cells`
and `cell_by_parts` (the latency breakdown) always compile XLA pieces. Logits equal
`child.forward(plan, params, stats, x, train=False, with_aux=False)[0]`
up to float rounding, for full and compact (compaction.py) networks alike.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from fp_jax.models import layers
from fp_jax.infer import batching
from fp_jax.infer import folding
from fp_jax.infer import kernels
from fp_jax.infer import native
from fp_jax.models.pools import avg_pool3x3, max_pool3x3  # pylint: disable=unused-import

DEPTHWISE_IMPLS = ("auto", "kernel", "flat", "shift", "xla")
DOT_LIBRARIES = ("auto", "xla", "ynn")
ENGINES = native.ENGINES
MAX_PAD = 2                     # k // 2 of the largest depthwise kernel (5x5)
CPU_DOT_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "",   # XLA's own dot emitter
                   "xla_cpu_multi_thread_eigen": False}          # on the calling thread


@dataclasses.dataclass(frozen=True)
class Options:
  im2col: bool = False          # kxk convs (k > 1) as im2col + GEMM instead of XLA's conv
  depthwise: str = "auto"       # kernel | shift | flat | xla | auto (see depthwise_impl)
  pad_channels: int = 8         # zero-pad channel groups to a multiple of this (padding.py)
  dots: str = "auto"            # XLA:CPU GEMMs: xla (its own emitter) | ynn (YNNPACK) | auto: xla
  dtype: str = "float32"        # compute dtype (config.dtype): Fused folds BN in float32, then
                                # casts the weights; images enter and logits leave as float32
  micro_batch: int = 0          # a larger batch runs as a loop over chunks of at most this many
                                # images; -1: the whole batch at once; 0 = auto (CPU: chunks
                                # sized to the caches, else whole; batching.py)
  engine: str = "auto"          # the whole network: native (native.py / network.cc: one custom
                                # call, ops split over every core) | xla (`forward` compiled by
                                # XLA) | auto: native where native.resolve allows, else xla


def compiler_options(opts):
  """XLA options of every compilation for `opts` (a dict, or None for XLA's defaults).

  jax 0.10's XLA:CPU hands dots to YNNPACK by default; at batch 1 the GEMMs are
  small ([1024, 24] x [24, 24] for a pruned 32x32 cell) and YNNPACK's per-call
  overhead makes the network about 7% slower than XLA's own dot emitter, so
  dots='auto' (and 'xla') turns that off (per compilation, not process-wide) on CPU,
  and runs each of those dots on the calling thread (xla_cpu_multi_thread_eigen off):
  handing a GEMM this small to Eigen's thread pool costs more than it computes (3 layers /
  F 8, batch 1, one core: 1.3-1.7x faster, bench/results/latency_smoke_amd_ab; at 15 layers /
  F 36 no change measured, at batch 1 or 64, on one core or two).
  """
  if opts.dots not in DOT_LIBRARIES:
    raise ValueError(f"dots must be one of {DOT_LIBRARIES}, got {opts.dots!r}")
  if jax.default_backend() == "cpu" and opts.dots in ("auto", "xla"):
    return dict(CPU_DOT_OPTIONS)
  return None


# ---------------------------------------------------------------- operators (traced)


def depthwise_impl(impl="auto", k=5, dtype="float32", platform=None):
  """The implementation `depthwise` runs for `impl`: 'auto' is 'kernel' on CPU when
  fp_jax's kernel is available (kernels.py) and handles k and the dtype (float32 only),
  else 'shift' on CPU and 'xla' elsewhere. platform: the one lowered for (default: JAX's
  backend; run/lowering.py lowers for others)."""
  if impl != "auto":
    return impl
  if (platform or jax.default_backend()) != "cpu":
    return "xla"
  usable = k in kernels.KERNELS and jnp.dtype(dtype) == jnp.float32
  return "kernel" if usable and kernels.available() else "shift"


def depthwise(x, w, impl="auto", pad=None, relu=False, bias=None, stride=1):
  """x [B,H,W,C], w [k,k,1,C] -> [B,ceil(H/s),ceil(W/s),C], SAME (TF's padding), on x
  (+ bias [C], the producing conv's, so the kernel can fold it in), ReLU'd when relu.
  The strided result is the stride-1 one subsampled (layers.subsample); the kernel
  computes only those outputs.

  pad >= k // 2 (shift and flat): pad x by this much and start the taps at
  pad - k // 2, so every depthwise of one tensor pads it alike and XLA computes
  the (ReLU'd) padded tensor once for all of them.

  impl 'kernel': fp_jax's register-blocked CPU kernel, an XLA custom call with
  the ReLU and padding folded in (kernels.py, depthwise.cc; ~2x 'shift');
  'shift': a sum of k*k shifted, scaled copies of x (layers.py's CPU
  choice); 'flat': the same sum in the [B,H,W*C] view, where a shift along W is
  an offset of j*C into the contiguous minor dimension (faster alone, not inside
  the network, where XLA fuses the [B*H*W,C] view of the consumer dot into it);
  'xla': a grouped convolution (fast on GPU/TPU, 5-10x slower on XLA:CPU);
  'auto': depthwise_impl.
  """
  impl = depthwise_impl(impl, np.shape(w)[0], x.dtype)
  k, hw = np.shape(w)[0], x.shape[1:3]
  if impl == "kernel":
    offset = (0, 0) if stride == 1 else tuple(layers.same_offset(n, k, stride) for n in hw)
    return kernels.depthwise(x, w, relu, bias, stride, offset)
  return layers.subsample(_depthwise_stride1(x, w, impl, pad, relu, bias), hw, k, stride)


def _depthwise_stride1(x, w, impl, pad, relu, bias):
  """`depthwise` at stride 1 by the implementations other than the kernel."""
  if bias is not None:
    x = x + bias
  if relu:
    x = jax.nn.relu(x)
  if impl == "xla":
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=x.shape[-1])
  k, (b, h, wd, c) = w.shape[0], x.shape
  p = k // 2 if pad is None else pad
  o = p - k // 2
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  if impl == "shift":
    return sum(xp[:, o + i:o + i + h, o + j:o + j + wd, :] * w[i, j, 0]
               for i in range(k) for j in range(k))
  xp = xp.reshape(b, h + 2 * p, (wd + 2 * p) * c)
  tile = np.tile if isinstance(w, np.ndarray) else jnp.tile     # constant weights: on the host
  wt = tile(w[:, :, 0, :], (1, 1, wd))                 # [k, k, W*C]
  out = sum(xp[:, o + i:o + i + h, (o + j) * c:(o + j) * c + wd * c] * wt[i, j]
            for i in range(k) for j in range(k))
  return out.reshape(b, h, wd, c)


def _same_pads(n, k, stride):
  out = -(-n // stride)
  total = max((out - 1) * stride + k - n, 0)
  return out, (total // 2, total - total // 2)


def im2col(x, k, stride=1, padding="SAME"):
  """x [B,H,W,I] -> patches [B,H',W',k*k*I]; patch channel (i*k + j)*I + c matches an
  HWIO kernel reshaped to [k*k*I, O]. Padding and output size as lax.conv's."""
  _, h, w, _ = x.shape
  if padding == "SAME":
    ho, ph = _same_pads(h, k, stride)
    wo, pw = _same_pads(w, k, stride)
    x = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
  elif padding == "VALID":
    ho, wo = (h - k) // stride + 1, (w - k) // stride + 1
  else:
    raise ValueError(f"padding must be SAME or VALID, got {padding!r}")
  cols = [x[:, i:i + (ho - 1) * stride + 1:stride, j:j + (wo - 1) * stride + 1:stride, :]
          for i in range(k) for j in range(k)]
  return jnp.concatenate(cols, axis=-1)


def conv(x, w, b=None, stride=1, padding="SAME", use_im2col=False):
  """x [B,H,W,I], w [k,k,I,O], b [O] -> [B,H',W',O]. 1x1: a strided slice + GEMM;
  k > 1: XLA's convolution, or im2col + GEMM when use_im2col."""
  k = w.shape[0]
  if k == 1:
    y = jnp.dot(x[:, ::stride, ::stride], w[0, 0])
  elif use_im2col:
    p = im2col(x, k, stride, padding)
    y = jnp.dot(p.reshape(-1, p.shape[-1]), w.reshape(-1, w.shape[-1]))
    y = y.reshape(p.shape[:3] + (w.shape[-1],))
  else:
    y = lax.conv_general_dilated(x, w, (stride, stride), padding,
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y if b is None else y + b


def producer(fb, node, x, opts=Options()):
  """A conv node ([ReLU], kxk conv + folded BN) or a factorized reduction ([ReLU], two
  strided 1x1 paths, the second offset by a pixel, folded BN halves)."""
  if node.relu:
    x = jax.nn.relu(x)
  if "w" in fb:
    return conv(x, fb["w"], fb["b"], use_im2col=opts.im2col)
  a = conv(x, fb["w1"], fb["b1"], stride=node.stride)
  shifted = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))[:, 1:, 1:]
  return jnp.concatenate([a, conv(shifted, fb["w2"], fb["b2"], stride=node.stride)], axis=-1)


def sep_conv(fs, x, stride=1, opts=Options()):
  """2 x [ReLU, depthwise kxk, pointwise 1x1 + folded BN], the first depthwise at
  `stride`: [B,H,W,C] -> [B,ceil(H/s),ceil(W/s),C]."""
  # the first depthwise pads by MAX_PAD: sep convs of one input share its padded ReLU
  y = depthwise(x, fs["dw1"], opts.depthwise, MAX_PAD, relu=True, stride=stride)
  y = conv(y, fs["pw1"])                # its bias b1 is added by the next depthwise
  return conv(depthwise(y, fs["dw2"], opts.depthwise, relu=True, bias=fs["b1"]), fs["pw2"],
              fs["b2"])


def pool(kind, x, stride=1):
  y = avg_pool3x3(x) if kind == "avg" else max_pool3x3(x)
  return layers.subsample(y, x.shape[1:3], 3, stride)


def apply_node(fb, node, ins, opts=Options()):
  """One graph node on the folded weights `fb` of its block (None if it has none)."""
  if node.kind in ("conv", "fr"):
    return producer(fb, node, ins[0], opts)
  if node.kind == "sep":
    return sep_conv(fb, ins[0], node.stride, opts)
  if node.kind in ("avg", "max"):
    return pool(node.kind, ins[0], node.stride)
  if node.kind == "add":
    return ins[0] + ins[1]
  if node.kind == "concat":
    return jnp.concatenate(ins, axis=-1)
  raise ValueError(f"unknown node kind {node.kind!r}")


def part_of(node):
  """The latency breakdown part of a cell's node (latency.CELL_PARTS)."""
  tail = node.name.split("/")[2:]
  if tail[0] in ("calib_x", "calib_y"):
    return tail[0]
  if tail[0] == "base":
    return "layer_base"
  if len(tail) == 2 and tail[0].startswith("node"):
    return "ops_x" if tail[1] == "a" else "ops_y"
  return "combine"


def _direct(part, key, fn, *args):
  del part, key
  return fn(*args)


def cell(plan, fp, i, x0, x1, opts=Options(), step=_direct):
  """Cell i with its calibrations: x0 = h(i-2), x1 = h(i-1) -> the cell's output.

  `step(part, key, fn, *args)` runs each node (default: call it;
  `Fused.cell_by_parts` compiles and times each), part as `part_of`.
  """
  spec = plan.cells[i]
  vals = {spec.inputs[0]: x0, spec.inputs[1]: x1}
  for j, n in enumerate(plan.nodes):
    if n.cell != i:
      continue
    fb = fp["blocks"].get(n.name)
    vals[j] = step(part_of(n), n.name, functools.partial(apply_node, fb, n, opts=opts),
                   [vals[k] for k in n.inputs])
  return vals[spec.out]


def classifier(ffc, x):
  """ReLU, global average pool, linear (no bias): [B,H,W,C] -> [B,classes]."""
  return jnp.dot(jnp.mean(jax.nn.relu(x), axis=(1, 2)), ffc["w"])


def stem(plan, fp, x, opts=Options()):
  """x [B,H,W,C] -> [B,H,W,S]: 3x3 conv with BN folded (no ReLU)."""
  return producer(fp["blocks"]["stem"], plan.nodes[plan.stem], x, opts)


def forward(plan, fp, x, opts=Options()):
  """Logits [B,classes] of the folded network `fp` (from `folded`) on x [B,H,W,C]."""
  vals = {}
  for j, n in enumerate(plan.nodes):
    vals[j] = x if n.kind == "image" else apply_node(fp["blocks"].get(n.name), n,
                                                    [vals[k] for k in n.inputs], opts)
  return classifier(fp["fc"], vals[plan.out])


# ---------------------------------------------------------------- executor


class Fused:
  """The folded network, its weights baked into compiled computations as constants.

  Computations are compiled once per (piece, activation shapes) and take only
  activations: `__call__(x)` runs the whole network as one computation;
  `run_cells(x)` as a sequence (stem, one computation per cell, classifier);
  `cell_by_parts` runs a cell piece by piece for the latency breakdown.
  """

  def __init__(self, plan, params, stats, opts=Options()):
    if opts.depthwise not in DEPTHWISE_IMPLS:
      raise ValueError(f"depthwise must be one of {DEPTHWISE_IMPLS}, got {opts.depthwise!r}")
    if opts.pad_channels < 1:
      raise ValueError(f"pad_channels must be >= 1, got {opts.pad_channels}")
    self.plan, self.opts = plan, opts
    self.compiler_options = compiler_options(opts)          # also checks opts.dots
    self.micro_batch = batching.micro_batch_size(           # also checks opts.micro_batch
        opts.micro_batch, batching.largest_activation_bytes(plan, opts.dtype))
    self.fp = folding.folded(plan, params, stats, opts.pad_channels)   # numpy: constants
    self.dtype = jnp.dtype(opts.dtype)
    if self.dtype != jnp.float32:
      self.fp = jax.tree.map(lambda a: np.asarray(a).astype(self.dtype), self.fp)
    self.engine, self.engine_note, self.program = native.resolve(opts.engine, opts.dtype, plan,
                                                                 self.fp)
    self.cache = {}

  def compiled(self, key, fn, *xs):
    """jax.jit(fn).lower(*xs).compile(), cached per (key, shapes of the activations xs)."""
    k = (key,) + tuple(x.shape for x in xs)
    c = self.cache.get(k)
    if c is None:
      c = self.cache[k] = jax.jit(fn).lower(*xs).compile(compiler_options=self.compiler_options)
    return c

  def network(self, x):
    """The compiled whole network for x's shape: call it as c(x) (x and the logits
    float32; the network computes in opts.dtype). Engine 'native': one custom call
    (native.network) that runs the images one after another, each op split over every
    usable core. Engine 'xla': a batch above micro_batch_size images is one computation
    that loops over chunks of that size (batching.chunked)."""
    if self.engine == "native":
      return self.compiled("network", functools.partial(native.network, self.program), x)
    run = functools.partial(forward, self.plan, self.fp, opts=self.opts)
    return self.compiled("network", lambda x: batching.chunked(
        lambda c: run(c.astype(self.dtype)).astype(jnp.float32), x, self.micro_batch), x)

  def __call__(self, x):
    return self.network(x)(x)

  def _cell_fn(self, i):
    return functools.partial(cell, self.plan, self.fp, i, opts=self.opts)

  def stem(self, x):
    run = functools.partial(stem, self.plan, self.fp, opts=self.opts)
    return self.compiled("stem", lambda x: run(x.astype(self.dtype)), x)(x)

  def cell(self, i, x0, x1):
    return self.compiled(f"cell{i}", self._cell_fn(i), x0, x1)(x0, x1)

  def classifier(self, x):
    return self.compiled("classifier",
                         lambda x: classifier(self.fp["fc"], x).astype(jnp.float32), x)(x)

  def run_cells(self, x):
    """Logits via one computation per piece: stem, each cell, classifier."""
    vals = {self.plan.stem: self.stem(x)}
    for spec in self.plan.cells:
      vals[spec.out] = self.cell(spec.index, vals[spec.inputs[0]], vals[spec.inputs[1]])
    return self.classifier(vals[self.plan.out])

  def cell_by_parts(self, i, x0, x1, mark=None):
    """Cell i with every piece of `cell` its own computation; mark(part, value) after each."""
    def step(part, key, fn, ins):
      out = self.compiled((f"cell{i}", key), lambda *xs: fn(list(xs)), *ins)(*ins)
      if mark is not None:
        mark(part, out)
      return out

    return self._cell_fn(i)(x0, x1, step=step)

  def weight_bytes(self):
    return int(sum(np.asarray(a).nbytes for a in jax.tree.leaves(self.fp)))

  def memory_bytes(self, x):
    """Weights (constants) + arguments + outputs + temporaries of the whole-network
    computation for x's shape (native: + the activation arenas of the threads it uses)."""
    m = self.network(x).memory_analysis()
    own = 0
    if self.engine == "native":   # its weights are packed anew; each thread's arena is its own
      own = self.program.prog.nbytes + self.program.weights.nbytes - self.weight_bytes()
      own += 4 * self.program.arena_floats * native.arenas(x.shape[0])
    return int(self.weight_bytes() + own + m.argument_size_in_bytes + m.output_size_in_bytes
               + m.temp_size_in_bytes)
