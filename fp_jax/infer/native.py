"""The folded network as one program for network.cc, fp_jax's CPU network executor.

`build(plan, fp)` lowers the graph (graph.py) with the folded, channel-padded weights
(folding.folded) to instructions over one image's activation buffers, the way
fused.forward computes it: a conv node is a GEMM (1x1, at its stride) or an im2col conv
(the stem); a factorized reduction two GEMMs writing the two halves of its output; a
sep_conv [DW, GEMM, DW, GEMM] (the first pointwise conv's folded bias added by its GEMM);
pools and the classifier one instruction each; an add is the last GEMM of its later input
adding the other input (where that input is a sep_conv or 1x1 conv read by the add alone),
else an instruction. A concat costs nothing where it can: a part that only the concat
reads is written by its producer straight into the concat's channel slice; other parts
are copied. Instructions are grouped in waves that read nothing their own wave writes
(`_levels`), whose chunks threads share. Buffers share an arena: each gets the lowest
offset free over its lifetime (first to last wave touching it), so the activations of a
15-layer network at batch 1 stay within a few of its largest tensors.

`network(prog, x, threads, min_chunk, isa)` runs a built program inside a jitted
computation: one custom call, x [B,H,W,C] f32 -> logits [B, classes] (network.cc's header
says how ops are split over threads; the result is the same for any thread count and
either set of kernels, AVX2 or AVX-512: `vector_isa`).
"""
from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from fp_jax.infer import batching
from fp_jax.infer import kernels
from fp_jax.infer import machine
from fp_jax.models import layers

ENGINES = ("auto", "native", "xla")       # fused.Options.engine
MAGIC, VERSION, HEADER, FIELDS = 0x66706e65, 3, 8, 16   # 3: GEMMs carry kw
OPS = {"gemm": 1, "convk": 2, "dw": 3, "pool": 4, "add": 5, "copy": 6, "class": 7}
F = {"op": 0, "in0": 1, "in1": 2, "out": 3, "w": 4, "b": 5, "relu": 6, "k": 7, "stride": 8,
     "oh": 9, "ow": 10, "coff": 11, "n": 12, "kind": 13, "kw": 14}
ALIGN = 16                     # floats: every buffer and weight block starts on 64 bytes
MIN_CHUNK = 1 << 14            # multiply-adds (or element ops) below which an op is not split
WINDOW = 16                    # instructions a wave may reach ahead (_levels)
PANEL = 16                     # columns of a packed GEMM weight panel (gemm.h's kPanel)
ISAS = {"auto": 0, "avx2": 1, "avx512": 2}   # network.cc's kernels (auto: vector_isa decides)


def vector_isa(isa="auto"):
  """Which kernels (GEMM, depthwise) a call with `isa` runs here: 'avx512' or 'avx2'.
  'auto' is 'avx512' where the CPU reports AVX-512F and VL and executes 512-bit FMAs at full
  width, i.e. not on AMD family 25 (Zen 4 splits each into two 256-bit halves: the AVX-512
  kernels were no faster than the AVX2 ones there); ValueError for an unknown isa or
  'avx512' on a CPU without it."""
  if isa not in ISAS:
    raise ValueError(f"isa must be one of {tuple(ISAS)}, got {isa!r}")
  info = machine.proc_cpuinfo()
  has = {"avx512f", "avx512vl"} <= info["flags"]
  if isa == "avx512" and not has:
    raise ValueError("isa 'avx512': this CPU does not report AVX-512F and AVX-512VL")
  half_width = info.get("vendor_id") == "AuthenticAMD" and info.get("cpu family") == "25"
  return "avx512" if isa == "avx512" or (isa == "auto" and has and not half_width) else "avx2"


@dataclasses.dataclass(frozen=True)
class Program:
  prog: np.ndarray             # int32: header, buffers [n, 4], instructions [m, FIELDS],
                               # waves [w] (each wave's end: instructions that read nothing
                               # an instruction of their own wave writes; `parse`)
  weights: np.ndarray          # float32
  image: tuple                 # (H, W, C)
  classes: int
  arena_floats: int            # one image's activations (per thread)


class Unsupported(ValueError):
  """The network has a tensor the executor does not handle (a width not a multiple of 8)."""


def resolve(engine, dtype="float32", plan=None, fp=None, platform=None):
  """(the engine fused.Fused runs for `engine`: 'native' or 'xla', why not native or '',
  the built Program when native and fp is given, else None).

  'native' needs a CPU platform (None: batching.current_platform(); a `jax.default_device`
  CPU on a GPU host is CPU), fp_jax's kernels (kernels.available()), float32, and a network
  `build` takes (fp given: the folded weights, with channel widths padded to multiples of
  8). 'auto' is 'native' when all hold, else 'xla'; an explicit 'native' that cannot run
  raises ValueError naming the reason."""
  if engine not in ENGINES:
    raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
  if engine == "xla":
    return "xla", "", None
  why, program = "", None
  if (platform or batching.current_platform()) != "cpu":
    why = "it runs on CPU only"
  elif np.dtype(jax.numpy.dtype(dtype)) != np.float32:
    why = f"it computes in float32 only (dtype {dtype})"
  elif not kernels.available():
    why = "fp_jax's kernels are not available here (kernels.available())"
  elif fp is not None:
    try:
      program = build(plan, fp)
    except Unsupported as e:
      why = str(e)
  if why and engine == "native":
    raise ValueError(f"engine 'native' cannot run this network: {why}")
  return ("xla" if why else "native"), why, program


def _pack_gemm(w):
  """w [K, N] -> [ceil(N/16), K, 16]: one 16-column panel after another (the last
  zero-padded; gemm.h reads a panel as one AVX-512 vector or two AVX2 ones)."""
  k, n = w.shape
  w = np.pad(np.asarray(w, np.float32), ((0, 0), (0, -n % PANEL)))
  return np.ascontiguousarray(w.reshape(k, -1, PANEL).transpose(1, 0, 2))


class _Builder:
  def __init__(self):
    self.bufs = []             # [H, W, C]
    self.instrs = []
    self.weights = []
    self.size = 0              # floats of weights so far

  def buf(self, h, w, c):
    self.bufs.append((int(h), int(w), int(c)))
    return len(self.bufs) - 1

  def w(self, a):
    """Offset of weight block a (float32, flattened) in the weights array."""
    a = np.asarray(a, np.float32).ravel()
    off = self.size
    pad = -len(a) % ALIGN
    self.weights.append(np.concatenate([a, np.zeros(pad, np.float32)]) if pad else a)
    self.size += len(a) + pad
    return off

  def emit(self, op, **fields):
    r = [0] * FIELDS
    r[F["op"]] = OPS[op]
    r[F["b"]] = -1
    for k, v in fields.items():
      r[F[k]] = int(v)
    self.instrs.append(r)


def _gemm(bd, src, dst, w, b, relu=False, stride=1, start=0, coff=0, res=None):
  """A GEMM instruction; res: a buffer [H, W, n] added to its result (a fused ADD)."""
  k, n = np.shape(w)[-2:]
  if bd.bufs[src][2] != k:
    raise ValueError(f"gemm: input has {bd.bufs[src][2]} channels, weights {np.shape(w)}")
  if res is not None and (bd.bufs[res][2] != n or n % 8 or bd.bufs[res][:2] != bd.bufs[dst][:2]):
    raise ValueError(f"gemm: residual {bd.bufs[res]} does not match the output's {n} channels")
  w = np.reshape(w, (k, n))
  kw = _weighted_rows(w)
  bd.emit("gemm", in0=src, out=dst, w=bd.w(_pack_gemm(w[:kw])),
          b=-1 if b is None else bd.w(b), relu=relu, stride=stride, oh=start, ow=start,
          coff=coff, n=n, in1=0 if res is None else res, kind=int(res is not None), kw=kw)


def _weighted_rows(w):
  """Rows of w [K, N] up to its last nonzero one (at least 1): the input channels a GEMM
  reads. The rest are the zero weights of padded channels (latency.pad_channels) or of
  input channels no output uses; skipping them leaves every sum bitwise the same up to the
  sign of an exact zero (x * 0 adds +-0), except that an inf or NaN in a skipped channel no
  longer reaches the output (x * 0 would be NaN)."""
  nonzero = np.flatnonzero(np.any(np.asarray(w) != 0, axis=1))
  return int(nonzero[-1]) + 1 if nonzero.size else 1


def _pads(n, k, stride):
  out = -(-n // stride)
  return max((out - 1) * stride + k - n, 0) // 2


def build(plan, fp, fuse_adds=True):
  """The Program of the folded network fp (folding.folded; float32) of `plan`. fuse_adds: an
  ADD whose later input is a sep_conv or 1x1 conv read by the ADD alone is that input's last
  GEMM adding the other input to its result (the same bits; no ADD instruction)."""
  bd = _Builder()
  h, w = plan.image_hw
  vals = {0: (bd.buf(h, w, plan.in_channels), 0)}       # node -> (buffer, channel offset)
  readers = {}
  for j, n in enumerate(plan.nodes):
    for i in n.inputs:
      readers.setdefault(i, []).append(j)
  widths = {0: plan.in_channels}
  direct = {}                  # concat part node -> (concat node, channel offset)
  for j, n in enumerate(plan.nodes):
    fb = fp["blocks"].get(n.name)
    if n.kind == "conv":
      widths[j] = np.shape(fb["w"])[-1]
    elif n.kind == "fr":
      widths[j] = np.shape(fb["w1"])[-1] + np.shape(fb["w2"])[-1]
    elif n.kind == "sep":
      widths[j] = np.shape(fb["pw2"])[-1]
    elif n.kind == "concat":
      widths[j] = sum(widths[i] for i in n.inputs)
      off = 0
      for i in n.inputs:
        if (readers[i] == [j] and plan.nodes[i].kind not in ("image", "concat")
            and i not in direct and n.inputs.count(i) == 1):
          direct[i] = (j, off)
        off += widths[i]
    elif n.kind in ("avg", "max", "add"):
      widths[j] = widths[n.inputs[0]]
    if j and widths[j] % 8:
      raise Unsupported(f"node {n.name} has {widths[j]} channels (the native executor needs "
                        "multiples of 8: latency.pad_channels=8)")
  into = {}                    # producer node -> the ADD node its last GEMM computes
  for j, n in enumerate(plan.nodes):
    p = max(n.inputs) if n.kind == "add" and len(set(n.inputs)) == 2 else None
    if (fuse_adds and p is not None and readers[p] == [j]
        and (plan.nodes[p].kind == "sep" or (plan.nodes[p].kind == "conv"
                                             and np.shape(fp["blocks"][plan.nodes[p].name]["w"])[0] == 1))):
      into[p] = j

  def out_of(j):               # (buffer, channel offset) node j writes, allocated on first use
    if j not in vals:
      if j in direct:
        c, off = direct[j]
        vals[j] = (out_of(c)[0], off)
      else:
        vals[j] = (bd.buf(*plan.nodes[j].hw, widths[j]), 0)
    return vals[j]

  for j, n in enumerate(plan.nodes):
    if n.kind == "image" or j in into.values():      # a fused ADD: computed by its GEMM
      continue
    fb = fp["blocks"].get(n.name)
    ho, wo = n.hw
    res = None
    if j in into:
      add = plan.nodes[into[j]]
      out, coff = out_of(into[j])
      res = vals[add.inputs[0] if add.inputs[1] == j else add.inputs[1]][0]
    else:
      out, coff = out_of(j)
    ins = [vals[i][0] for i in n.inputs]
    if n.kind == "conv" and np.shape(fb["w"])[0] > 1:
      k = np.shape(fb["w"])[0]
      cin, cout = np.shape(fb["w"])[2:]
      hi, wi = bd.bufs[ins[0]][:2]
      bd.emit("convk", in0=ins[0], out=out, w=bd.w(_pack_gemm(np.reshape(fb["w"], (k * k * cin, cout)))),
              b=bd.w(fb["b"]), k=k, stride=n.stride, oh=_pads(hi, k, n.stride),
              ow=_pads(wi, k, n.stride), coff=coff, n=cout)
      if n.relu:
        raise ValueError(f"{n.name}: a k x k conv with an input ReLU is not supported")
    elif n.kind == "conv":
      _gemm(bd, ins[0], out, fb["w"], fb["b"], relu=n.relu, stride=n.stride, coff=coff, res=res)
    elif n.kind == "fr":
      _gemm(bd, ins[0], out, fb["w1"], fb["b1"], relu=n.relu, stride=n.stride, coff=coff)
      _gemm(bd, ins[0], out, fb["w2"], fb["b2"], relu=n.relu, stride=n.stride, start=1,
            coff=coff + np.shape(fb["w1"])[-1])
    elif n.kind == "sep":
      hi, wi, c = bd.bufs[ins[0]]
      k = np.shape(fb["dw1"])[0]
      offs = [0, 0] if n.stride == 1 else [layers.same_offset(d, k, n.stride) for d in (hi, wi)]
      t1 = bd.buf(ho, wo, c)
      bd.emit("dw", in0=ins[0], out=t1, w=bd.w(np.reshape(fb["dw1"], (k * k, c))), relu=1, k=k,
              stride=n.stride, oh=offs[0], ow=offs[1])
      t2 = bd.buf(ho, wo, np.shape(fb["pw1"])[-1])
      _gemm(bd, t1, t2, fb["pw1"], fb["b1"])
      t3 = bd.buf(ho, wo, bd.bufs[t2][2])
      bd.emit("dw", in0=t2, out=t3, w=bd.w(np.reshape(fb["dw2"], (k * k, bd.bufs[t2][2]))),
              relu=1, k=k, stride=1)
      _gemm(bd, t3, out, fb["pw2"], fb["b2"], coff=coff, res=res)
    elif n.kind in ("avg", "max"):
      hi, wi, _ = bd.bufs[ins[0]]
      offs = [0, 0] if n.stride == 1 else [layers.same_offset(d, 3, n.stride) for d in (hi, wi)]
      bd.emit("pool", in0=ins[0], out=out, stride=n.stride, oh=offs[0], ow=offs[1], coff=coff,
              kind=0 if n.kind == "avg" else 1)
    elif n.kind == "add":
      bd.emit("add", in0=ins[0], in1=ins[1], out=out, coff=coff)
    elif n.kind == "concat":
      off = 0
      for i, b in zip(n.inputs, ins):
        if direct.get(i, (None,))[0] != j:
          bd.emit("copy", in0=b, out=out, coff=off)
        off += widths[i]
    else:
      raise ValueError(f"unknown node kind {n.kind!r}")
  return _finish(bd, vals[plan.out][0], fp["fc"]["w"])


def _finish(bd, last, fc):
  """The Program of builder bd's instructions, ended by the classifier fc [C, classes] on
  buffer `last` (buffer 0 is the image)."""
  classes = np.shape(fc)[-1]
  bd.emit("class", in0=last, out=last, w=bd.w(fc))
  level = _levels(bd.instrs)
  bd.instrs = [bd.instrs[t] for t in sorted(range(len(level)), key=lambda t: (level[t], t))]
  level = sorted(level)
  ends = [t + 1 for t in range(len(level)) if t + 1 == len(level) or level[t + 1] != level[t]]
  offsets, arena = _place(bd, level)
  head = [MAGIC, VERSION, len(bd.bufs), len(bd.instrs), arena, len(ends), classes, 0]
  table = [(o,) + b for o, b in zip(offsets, bd.bufs)]
  prog = np.concatenate([np.asarray(head, np.int64), np.asarray(table, np.int64).ravel(),
                         np.asarray(bd.instrs, np.int64).ravel(), np.asarray(ends, np.int64)])
  if prog.max() >= 2**31 or arena >= 2**31 or bd.size >= 2**31:
    raise Unsupported("the network is too large for the native executor's int32 program")
  return Program(prog.astype(np.int32), np.concatenate(bd.weights).astype(np.float32),
                 bd.bufs[0], int(classes), int(arena))


def _reads(r):
  """Buffers instruction r reads: in0, and in1 for an ADD or a GEMM with a fused ADD."""
  two = r[F["op"]] == OPS["add"] or (r[F["op"]] == OPS["gemm"] and r[F["kind"]] == 1)
  return (r[F["in0"]], r[F["in1"]]) if two else (r[F["in0"]],)


def _levels(instrs, window=WINDOW):
  """Wave of each instruction: list scheduling in build's order, each wave the instructions
  among the first `window` not yet scheduled whose inputs earlier waves wrote (the first is
  always ready: every writer of a buffer comes before its readers in build's order). The
  window keeps the order, and so the buffers' lifetimes, close to build's; concat parts
  write disjoint slices of one buffer, so writers of one wave never collide."""
  writers, deps = {}, []
  for t, r in enumerate(instrs):
    deps.append({u for b in _reads(r) for u in writers.get(b, ())})
    if r[F["op"]] != OPS["class"]:
      writers.setdefault(r[F["out"]], []).append(t)
  level, pending, wave = [None] * len(instrs), list(range(len(instrs))), 0
  while pending:
    take = [t for t in pending[:window]
            if all(level[u] is not None and level[u] < wave for u in deps[t])]
    for t in take:
      level[t] = wave
    pending = [t for t in pending if level[t] is None]
    wave += 1
  return level


def parse(prog):
  """(header [8], buffers [n, 4] (arena offset, H, W, C), instructions [m, FIELDS], wave ends
  [w]) of a Program's int32 array."""
  p = np.asarray(prog)
  nb, ni, nw = int(p[2]), int(p[3]), int(p[5])
  i = HEADER + 4 * nb
  return (p[:HEADER], p[HEADER:i].reshape(nb, 4), p[i:i + FIELDS * ni].reshape(ni, FIELDS),
          p[i + FIELDS * ni:i + FIELDS * ni + nw])


def _place(bd, level):
  """Arena offsets of the buffers (buffer 0, the image, gets -1) and the arena's size:
  each buffer the lowest aligned offset not used by a buffer whose lifetime (first to last
  wave touching it) overlaps."""
  first, last = {}, {}
  for t, r in zip(level, bd.instrs):
    for b in _reads(r) + (r[F["out"]],):
      first[b] = min(first.get(b, t), t)
      last[b] = max(last.get(b, t), t)
  size = lambda b: -(-int(np.prod(bd.bufs[b])) // ALIGN) * ALIGN
  offsets, placed, top = [-1] * len(bd.bufs), [], 0
  for b in sorted((b for b in first if b != 0), key=lambda b: first[b]):
    busy = sorted((o, o + size(c)) for o, c in placed if last[c] >= first[b])
    o = 0
    for lo, hi in busy:
      if o + size(b) <= lo:
        break
      o = max(o, hi)
    offsets[b] = o
    placed.append((o, b))
    top = max(top, o + size(b))
  return offsets, top


def arenas(batch, threads=0):
  """How many threads hold an activation arena in a call on `batch` images (network.cc:
  whole images per thread from 2 per thread on, else the caller's arena alone)."""
  n = len(os.sched_getaffinity(0)) if threads == 0 else min(threads, 64)
  return n if n > 1 and batch >= 2 * n else 1


def network(p, x, threads=0, min_chunk=MIN_CHUNK, skip=(), isa="auto"):
  """Logits [B, classes] f32 of Program p on x [B, H, W, C] f32 (p.image); traced. threads:
  how many threads take part (0: one per core this thread may run on; more than the cores
  only oversubscribes them, at most 64); skip: names of OPS whose
  instructions are not run (for timing the others; the logits are then meaningless); isa:
  the GEMM and depthwise kernels (ISAS, vector_isa: every choice gives the same bits); needs
  kernels.available()."""
  if not kernels.available():
    raise RuntimeError("fp_jax kernels are not available on this machine (kernels.available())")
  if tuple(x.shape[1:]) != tuple(p.image):
    raise ValueError(f"native network: images must be [B, {', '.join(map(str, p.image))}], "
                     f"got {tuple(x.shape)}")
  return jax.ffi.ffi_call(kernels.NETWORK_TARGET,
                          jax.ShapeDtypeStruct((x.shape[0], p.classes), np.float32))(
      x, p.prog, p.weights, threads=np.int64(threads), min_chunk=np.int64(min_chunk),
      skip=np.int64(sum(1 << OPS[o] for o in skip)), isa=np.int64(ISAS[vector_isa(isa)]))
