"""The native engine (native.py, network.cc): one custom call for the whole folded network."""
import jax
import numpy as np
import pytest

from bench import native_parts
from fp_jax.infer import fused
from fp_jax.infer import kernels
from fp_jax.infer import native
from fp_jax.infer import networks
from fp_jax.models import child
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
  """Ops cut into chunks of rows over 1-3 threads (every op split: min_chunk 1), or the
  batch split by images: the same logits bit for bit."""
  plan, params, stats, xla, _ = _net("enas_pruned")
  prog = native.build(plan, xla.fp)
  want = _run(prog, X, threads=1)
  for threads, min_chunk in ((2, 1), (3, 1), (2, 10 ** 9)):
    np.testing.assert_array_equal(_run(prog, X, threads=threads, min_chunk=min_chunk), want)
    np.testing.assert_array_equal(_run(prog, X[:1], threads=threads, min_chunk=min_chunk),
                                  want[:1])
  assert native.arenas(5, 2) == 2 and native.arenas(3, 2) == 1 and native.arenas(64, 1) == 1


def test_program_shares_the_arena_and_writes_concat_parts_in_place():
  """Buffers whose lifetimes do not overlap share arena space; a concat part read by the
  concat alone is written into its slice (no copy); the program's layout is its header's."""
  plan, _, _, xla, _ = _net("uniform4_pruned")
  p = native.build(plan, xla.fp)
  head = p.prog[:native.HEADER]
  nb, ni = head[2], head[3]
  assert head[0] == native.MAGIC and len(p.prog) == native.HEADER + 4 * nb + native.FIELDS * ni
  bufs = p.prog[native.HEADER:native.HEADER + 4 * nb].reshape(nb, 4)
  ins = p.prog[native.HEADER + 4 * nb:].reshape(ni, native.FIELDS)
  sizes = [int(np.prod(b[1:])) for b in bufs[1:]]
  assert p.arena_floats < sum(sizes) / 2 and p.arena_floats >= max(sizes)
  assert bufs[0][0] == -1 and tuple(bufs[0][1:]) == (HW, HW, 3)
  assert all(b[0] % native.ALIGN == 0 for b in bufs[1:])
  parts = sum(len(n.inputs) for n in plan.nodes if n.kind == "concat")
  copies = int(np.sum(ins[:, 0] == native.OPS["copy"]))
  assert parts > 0 and copies < parts
  assert ins[-1, 0] == native.OPS["class"] and p.classes == 10
  # its instructions do exactly the padded network's multiply-adds (bench/native_parts.py)
  macs, counts = native_parts.macs_by_kind(p)
  fc = int(np.size(xla.fp["fc"]["w"]))
  net = networks.Net(plan, None, *_net("uniform4_pruned")[1:3])
  assert macs["gemm"] + macs["dw"] + macs["convk"] + fc == networks.padded_macs(net, 8)
  assert counts["copy"] == copies and counts["dw"] == 2 * sum(n.kind == "sep" for n in plan.nodes)


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
