"""The native engine (native.py, network.cc): one custom call for the whole folded network."""
import dataclasses

import jax
import numpy as np
import pytest

from bench import native_parts
from fp_jax.infer import fused
from fp_jax.infer import kernels
from fp_jax.infer import machine
from fp_jax.infer import native
from fp_jax.infer import networks
from fp_jax.models import child
from fp_jax.models import flops
from fp_jax.models import space

pytestmark = pytest.mark.skipif(not kernels.available(), reason="fp_jax kernels not built here")

HW = 8
X = np.random.default_rng(0).standard_normal((5, HW, HW, 3)).astype(np.float32)
# num_layers 1: cells reduce, reduce, normal (strided sep_convs, pools and factorized
# reductions, whose halves of 4 channels end in a masked GEMM panel); 2 layers: a normal
# cell at the input size too
CASES = {"enas_pruned": (space.parse_arc(space.ENAS_ARC), 1, (0.5, 0.25, 0.5, 0.5, 0.75)),
         "uniform4_pruned": (space.sample_uniform(np.random.default_rng(4)), 2,
                             (0.25, 0.5, 0.75, 0.5, 0.25))}
_NETS = {}


def _net(name):
  if name not in _NETS:
    arc, layers, ratios = CASES[name]
    plan = child.make_plan(arc, layers, 4, (HW, HW, 3), 10)
    params, stats = networks.random_init(plan, len(name))
    params, stats = networks.prune(plan, params, stats, ratios)
    stats = networks.estimate_bn(plan, params, stats, 0, batch=8)
    xla = fused.Fused(plan, params, stats, fused.Options(engine="xla"))
    ref = np.asarray(jax.jit(lambda p, s, x: child.forward(plan, p, s, x, False,
                                                            with_aux=False)[0])(params, stats, X))
    _NETS[name] = (plan, params, stats, xla, ref)
  return _NETS[name]


def _run(prog, x, **kw):
  return np.asarray(jax.jit(lambda x: native.network(prog, x, **kw))(x))


@pytest.mark.parametrize("name", list(CASES))
def test_native_equals_xla_fused_and_child(name):
  """Logits of the native engine equal the XLA-compiled fused network's and child.forward's
  to float rounding, at batch 1 and 5; 'auto' picks it on CPU."""
  plan, params, stats, xla, ref = _net(name)
  assert {n.kind for n in plan.nodes if n.stride == 2} >= {"fr", "max"}
  if name == "enas_pruned":      # strided sep_convs and pools in the reduction cells
    assert {n.kind for n in plan.nodes if n.stride == 2} >= {"sep", "avg", "max", "fr"}
  nat = fused.Fused(plan, params, stats)
  assert (nat.engine, xla.engine) == ("native", "xla")
  assert kernels.NETWORK_TARGET in nat.network(X[:1]).as_text()
  assert kernels.NETWORK_TARGET not in xla.network(X[:1]).as_text()
  tol = 1e-5 * max(1.0, float(np.max(np.abs(ref))))
  for x in (X[:1], X):
    got, want = np.asarray(nat(x)), np.asarray(xla(x))
    assert np.max(np.abs(got - want)) <= tol
    assert np.max(np.abs(got - ref[:len(x)])) <= tol
  assert nat.memory_bytes(X[:1]) >= 4 * nat.program.arena_floats + nat.program.weights.nbytes


def test_any_thread_count_and_chunking_gives_the_same_bits():
  """Ops cut into chunks of rows over 1-7 threads (every op split: min_chunk 1; 5 and 7
  threads on fewer cores own uneven parts of the rows and take each other's), or the batch
  split by images: the same logits bit for bit."""
  plan, params, stats, xla, _ = _net("enas_pruned")
  prog = native.build(plan, xla.fp)
  want = _run(prog, X, threads=1)
  for threads, min_chunk in ((2, 1), (3, 1), (5, 1), (7, 1), (2, 10 ** 9)):
    np.testing.assert_array_equal(_run(prog, X, threads=threads, min_chunk=min_chunk), want)
    np.testing.assert_array_equal(_run(prog, X[:1], threads=threads, min_chunk=min_chunk),
                                  want[:1])
  assert native.arenas(5, 2) == 2 and native.arenas(3, 2) == 1 and native.arenas(64, 1) == 1


def test_batches_beyond_the_pools_task_limit():
  """A batch of more images than the pool has task slots (2^20 - 1) split by images: every
  image computed, the same bits as one thread."""
  rng = np.random.default_rng(7)
  w = rng.standard_normal((8, 8)).astype(np.float32)
  prog = _gemm_program(w, None, (1, 1))
  x = rng.standard_normal(((1 << 20) + 3, 1, 1, 8)).astype(np.float32)
  got = _run(prog, x, threads=2)
  np.testing.assert_array_equal(got[-5:], _run(prog, x[-5:], threads=1))
  np.testing.assert_allclose(got, np.maximum(x[:, 0, 0] @ w, 0), rtol=1e-5, atol=1e-5)


def test_program_shares_the_arena_and_writes_concat_parts_in_place():
  """Buffers whose lifetimes do not overlap share arena space; a concat part read by the
  concat alone is written into its slice (no copy); the program's layout is its header's."""
  plan, _, _, xla, _ = _net("uniform4_pruned")
  p = native.build(plan, xla.fp)
  head, bufs, ins, waves = native.parse(p.prog)
  nb, ni = head[2], head[3]
  assert head[0] == native.MAGIC and len(p.prog) == native.HEADER + 4 * nb + native.FIELDS * ni + head[5]
  # waves: no instruction reads what its own or a later wave writes; buffers whose wave
  # lifetimes overlap get disjoint arena ranges
  wave = np.searchsorted(waves, np.arange(ni), side="right")
  assert waves[-1] == ni and len(waves) < ni / 2 and np.all(np.diff(wave) >= 0)
  reads = lambda r: ([r[1], r[2]] if r[0] == native.OPS["add"] or (
      r[0] == native.OPS["gemm"] and r[native.F["kind"]] == 1) else [r[1]])
  writes = lambda r: [] if r[0] == native.OPS["class"] else [r[3]]
  life = {}
  for t, r in enumerate(ins):
    for b in reads(r) + writes(r):
      lo, hi = life.get(b, (wave[t], wave[t]))
      life[b] = (min(lo, wave[t]), max(hi, wave[t]))
    assert all(wave[u] < wave[t] for u, q in enumerate(ins) if set(writes(q)) & set(reads(r)))
  span = lambda b: (bufs[b][0], bufs[b][0] + int(np.prod(bufs[b][1:])))
  for a in life:
    for b in life:
      if 0 < a < b and life[a][0] <= life[b][1] and life[b][0] <= life[a][1]:
        assert span(a)[1] <= span(b)[0] or span(b)[1] <= span(a)[0], (a, b)
  sizes = [int(np.prod(b[1:])) for b in bufs[1:]]
  assert p.arena_floats < sum(sizes) / 2 and p.arena_floats >= max(sizes)
  assert bufs[0][0] == -1 and tuple(bufs[0][1:]) == (HW, HW, 3)
  assert all(b[0] % native.ALIGN == 0 for b in bufs[1:])
  parts = sum(len(n.inputs) for n in plan.nodes if n.kind == "concat")
  copies = int(np.sum(ins[:, 0] == native.OPS["copy"]))
  assert parts > 0 and copies < parts
  assert ins[-1, 0] == native.OPS["class"] and p.classes == 10
  # its instructions span exactly the padded network's multiply-adds (bench/native_parts.py);
  # the GEMMs skip the trailing padded input channels: fewer, but no fewer than unpadded
  macs, counts = native_parts.macs_by_kind(p, weighted=False)
  fc = int(np.size(xla.fp["fc"]["w"]))
  params, stats = _net("uniform4_pruned")[1:3]
  net = networks.Net(plan, None, params, stats)
  assert macs["gemm"] + macs["dw"] + macs["convk"] + fc == networks.padded_macs(net, 8)
  assert counts["copy"] == copies and counts["dw"] == 2 * sum(n.kind == "sep" for n in plan.nodes)
  run = native_parts.macs_by_kind(p)[0]
  unpadded = flops.count(plan, flops.widths_of_params(plan, params))["macs"]
  assert unpadded < run["gemm"] + run["dw"] + run["convk"] + fc and run["gemm"] < macs["gemm"]


def test_weighted_rows():
  """A GEMM reads its input channels up to the last with a nonzero weight (at least one)."""
  w = np.ones((8, 3), np.float32)
  w[5:] = 0
  w[2] = 0
  assert native._weighted_rows(w) == 5
  assert native._weighted_rows(np.zeros((8, 3))) == 1
  assert native._weighted_rows(np.ones((8, 3))) == 8


def test_gemms_skip_padded_input_channels_with_the_same_bits(monkeypatch):
  """GEMMs whose trailing input channels are padding read only the others (`kw` < K): the
  logits equal the program that reads every channel bit for bit, on 1 and 3 threads."""
  for name in CASES:
    plan, _, _, xla, _ = _net(name)
    prog = native.build(plan, xla.fp)
    _, bufs, ins, _ = native.parse(prog.prog)
    gemm = ins[ins[:, 0] == native.OPS["gemm"]]
    k, kw = bufs[gemm[:, native.F["in0"]], 3], gemm[:, native.F["kw"]]
    assert np.all((kw >= 1) & (kw <= k)) and np.any(kw < k)
    monkeypatch.setattr(native, "_weighted_rows", lambda w: w.shape[0])
    every = native.build(plan, xla.fp)
    monkeypatch.undo()
    assert np.array_equal(native.parse(every.prog)[2][ins[:, 0] == native.OPS["gemm"], native.F["kw"]], k)
    for threads in (1, 3):
      for x in (X[:1], X):
        np.testing.assert_array_equal(_run(prog, x, threads=threads, min_chunk=1),
                                      _run(every, x, threads=threads, min_chunk=1))


def test_fused_adds_give_the_same_bits():
  """An ADD fused into its later input's last GEMM (build's fuse_adds) gives the unfused
  program's logits bit for bit, on 1 and 2 threads, at batch 1 and 5."""
  for name in CASES:
    plan, _, _, xla, _ = _net(name)
    fused_p, plain = native.build(plan, xla.fp), native.build(plan, xla.fp, fuse_adds=False)
    ops = lambda p: native.parse(p.prog)[2]
    adds = lambda p: int(np.sum(ops(p)[:, 0] == native.OPS["add"]))
    res = int(np.sum((ops(fused_p)[:, 0] == native.OPS["gemm"]) & (ops(fused_p)[:, native.F["kind"]] == 1)))
    assert res > 0 and adds(fused_p) == adds(plain) - res
    assert adds(plain) == sum(n.kind == "add" for n in plan.nodes)
    for threads in (1, 2):
      np.testing.assert_array_equal(_run(fused_p, X, threads=threads, min_chunk=1),
                                    _run(plain, X, threads=threads, min_chunk=1))
      np.testing.assert_array_equal(_run(fused_p, X[:1], threads=threads, min_chunk=1),
                                    _run(plain, X[:1], threads=threads, min_chunk=1))


def test_engine_choice_and_errors():
  """'auto' falls back to xla (with the reason) where native cannot run; 'native' there is a
  ValueError; unknown engines and wrong image shapes are refused."""
  plan, params, stats, xla, ref = _net("enas_pruned")
  odd = fused.Fused(plan, params, stats, fused.Options(pad_channels=1))   # widths such as 6
  assert odd.engine == "xla" and "multiples of 8" in odd.engine_note
  tol = 1e-5 * max(1.0, float(np.max(np.abs(ref))))
  assert np.max(np.abs(np.asarray(odd(X)) - ref)) <= tol
  with pytest.raises(ValueError, match="engine 'native' cannot run"):
    fused.Fused(plan, params, stats, fused.Options(pad_channels=1, engine="native"))
  with pytest.raises(ValueError, match="engine must be one of"):
    fused.Fused(plan, params, stats, fused.Options(engine="fast"))
  assert native.resolve("auto", platform="gpu") == ("xla", "it runs on CPU only", None)
  assert native.resolve("auto", "bfloat16")[0] == "xla" and native.resolve("auto")[0] == "native"
  with pytest.raises(ValueError, match="CPU only"):
    native.resolve("native", platform="tpu")
  with pytest.raises(ValueError, match="images must be"):
    native.network(native.build(plan, xla.fp), np.zeros((1, HW + 1, HW, 3), np.float32))



def test_a_program_of_another_version_is_refused():
  """Version 3 (GEMMs carry kw); a version-2 program (which had no kw) is an error, not a
  silent run."""
  plan, _, _, xla, _ = _net("enas_pruned")
  prog = native.build(plan, xla.fp)
  assert prog.prog[1] == native.VERSION == 3
  old = dataclasses.replace(prog, prog=prog.prog.copy())
  old.prog[1] = 2
  with pytest.raises(Exception, match=r"not a native.py program \(version 3\)"):
    _run(old, X[:1])

_WIDE = {"avx512f", "avx512vl"} <= machine.proc_cpuinfo()["flags"]
needs_avx512 = pytest.mark.skipif(not _WIDE, reason="this CPU has no AVX-512 (gemm.h's Gemm16)")


def _gemm_program(w, b, hw, relu=False, stride=1, start=0):
  """A program of one GEMM on the image (hw + (K,)) and the classifier (identity)."""
  bd = native._Builder()
  k, n = w.shape
  img = bd.buf(*hw, k)
  h, wd = [-(-d // stride) for d in hw]
  out = bd.buf(h, wd, n)
  native._gemm(bd, img, out, w, b, relu=relu, stride=stride, start=start)
  return native._finish(bd, out, np.eye(n, dtype=np.float32))


@needs_avx512
@pytest.mark.parametrize("n", [4, 8, 12, 16, 24, 28, 40, 56, 64, 72, 88, 120, 136])
def test_avx512_gemm_equals_avx2_bitwise(n):
  """Every column blocking of gemm.h's AVX-512 GEMM (4/3/2/1 16-column vectors, a masked one,
  an 8-column tail, masked or not) and every row remainder (35 pixels) gives the AVX2 GEMM's
  bits, on the rows as they are and on gathered ReLU'd strided rows, with and without bias;
  both equal numpy's mean of ReLU(x @ w + b) to rounding."""
  rng = np.random.default_rng(n)
  for k, relu, stride, start, bias in ((40, False, 1, 0, True), (24, True, 2, 1, False)):
    w = rng.standard_normal((k, n)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    prog = _gemm_program(w, b, (5 * stride, 7 * stride), relu, stride, start)
    x = rng.standard_normal((2, 5 * stride, 7 * stride, k)).astype(np.float32)
    got = {isa: _run(prog, x, threads=1, isa=isa) for isa in ("avx2", "avx512")}
    np.testing.assert_array_equal(got["avx512"], got["avx2"])
    np.testing.assert_array_equal(_run(prog, x, threads=2, min_chunk=1), got["avx2"])
    u = x[:, start::stride, start::stride]
    u = np.maximum(u, 0) if relu else u
    want = np.maximum(u @ w + (0 if b is None else b), 0).mean(axis=(1, 2))
    np.testing.assert_allclose(got["avx512"], want, rtol=1e-5, atol=1e-5)


@needs_avx512
def test_avx512_network_equals_avx2_bitwise():
  """Whole networks (stem, pointwise convs, factorized reductions, depthwise) on either set of
  kernels: the same logits bit for bit, at batch 1 and 5, and with 'auto'."""
  for name in CASES:
    plan, _, _, xla, _ = _net(name)
    prog = native.build(plan, xla.fp)
    for x in (X[:1], X):
      want = _run(prog, x, isa="avx2")
      np.testing.assert_array_equal(_run(prog, x, isa="avx512"), want)
      np.testing.assert_array_equal(_run(prog, x), want)


def test_vector_isa_choice():
  """vector_isa: 'auto' is AVX-512 where the CPU has it at full width (not on Zen 4); an
  unknown isa, or 'avx512' where the CPU lacks it, is a ValueError."""
  assert native.vector_isa("avx2") == "avx2"
  info = machine.proc_cpuinfo()
  zen4 = info.get("vendor_id") == "AuthenticAMD" and info.get("cpu family") == "25"
  assert native.vector_isa() == ("avx512" if _WIDE and not zen4 else "avx2")
  with pytest.raises(ValueError, match="isa must be one of"):
    native.vector_isa("sse")
  if not _WIDE:
    with pytest.raises(ValueError, match="does not report AVX-512"):
      native.vector_isa("avx512")
