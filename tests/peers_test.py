"""bench/latency's comparison with the strongest peers: the fastest-peer arithmetic, the CPU
record, and (where the bench-only torch is installed) the PyTorch peers computing fp_jax's
network."""
import os

import numpy as np
import pytest

from bench import latency as bench_latency
from fp_jax.infer import machine
from fp_jax.infer import networks
from fp_jax.infer import fused
from fp_jax.models import child
from fp_jax.models import space


def _rt(median, tput, ratio=None):
  return {"median_ms": median, "images_per_s": tput, "median_vs_fused": ratio,
          "block_ratio_vs_fused": {"median": ratio}}


def test_fastest_peer_picks_the_fastest_of_every_other_runtime():
  """fp_jax's own executors are never peers; the batch-1 and the throughput peer are chosen
  separately; the targets are the stated inequalities."""
  rts = {"perop": {"a": _rt(0.1, 9e9, 0.1)},            # faster, but fp_jax's own: not a peer
         "fused": {"a": _rt(2.0, 500.0, 1.0)},
         "onnxruntime": {"a": _rt(4.0, 400.0, 2.0)},
         "torch_onnxruntime": {"a": _rt(3.0, 600.0, 1.5)},
         "litert": {"a": _rt(5.0, 450.0, 2.5)}}
  got = bench_latency.fastest_peer(rts)["a"]
  assert got["fastest_peer"] == "torch_onnxruntime" and got["peer_median_ms"] == 3.0
  assert got["ratio_of_medians"] == 1.5 and got["met_1.5"]
  assert got["best_peer"] == "torch_onnxruntime" and got["best_peer_images_per_s"] == 600.0
  assert not got["met_throughput"]
  assert got["peers_ms"] == {"onnxruntime": 4.0, "torch_onnxruntime": 3.0, "litert": 5.0}
  rts["torch_onnxruntime"]["a"] = _rt(3.0, 300.0, 1.49)
  got = bench_latency.fastest_peer(rts)["a"]
  assert not got["met_1.5"] and got["best_peer"] == "litert" and got["met_throughput"]
  assert bench_latency.fastest_peer({"perop": rts["perop"], "fused": rts["fused"]}) == {}


def test_cpu_info_names_the_model_and_its_vector_extensions():
  info = machine.cpu_info()
  flags = open("/proc/cpuinfo").read().split("flags", 1)[1].split("\n", 1)[0].split()
  assert info["model"] and info["cores_usable"] >= 1
  assert ("AVX2" in info["isa"]) == ("avx2" in flags)
  assert ("AVX-512" in info["isa"]) == ("avx512f" in flags)
  assert ("AMX" in info["isa"]) == ("amx_tile" in flags)


def test_core_round_trip_between_two_usable_cpus():
  """A cache line's round trip between the first two usable CPUs: positive and finite (the
  CI machines have two); a CPU outside the affinity set cannot be pinned (None); the same
  CPU twice is refused."""
  from fp_jax.infer import kernels  # pylint: disable=g-import-not-at-top
  cpus = sorted(os.sched_getaffinity(0))
  rt = machine.core_round_trip()
  if len(cpus) < 2:
    assert rt is None
    return
  assert rt["cpus"] == cpus[:2] and 0 < rt["ns"] < 1e5
  outside = max(os.cpu_count(), max(cpus)) + 1
  assert kernels.core_round_trip_ns(cpus[0], outside, 100) is None
  with pytest.raises(ValueError, match="two different CPUs"):
    kernels.core_round_trip_ns(cpus[0], cpus[0])


def test_round_trip_line_names_both_samples():
  from bench import common  # pylint: disable=g-import-not-at-top
  a, b = {"cpus": [0, 1], "ns": 54.6}, {"cpus": [0, 1], "ns": 331.2}
  line = common.round_trip_line(a, b)
  assert "CPUs 0 and 1: 55 ns at the start, 331 ns at the end" in line
  assert common.round_trip_line(None, b) == common.round_trip_line(a, None) == ""


def test_torch_peers_compute_the_fused_network():
  """ONNX Runtime on the torch.onnx export and PyTorch eager, fed NHWC images, give the fused
  network's logits (a pruned arc with reduction cells, channels padded to 8, batch 1 and 3)."""
  pytest.importorskip("torch")
  pytest.importorskip("onnxscript")
  from bench import peers  # pylint: disable=g-import-not-at-top
  arc = space.parse_arc(space.ENAS_ARC)
  plan = child.make_plan(arc, 1, 4, (8, 8, 3), 10)
  params, stats = networks.random_init(plan, 0)
  params, stats = networks.prune(plan, params, stats, (0.5, 0.25, 0.5, 0.5, 0.75))
  stats = networks.estimate_bn(plan, params, stats, 0, batch=8)
  net = networks.Net(plan, arc, params, stats)
  runners, models = peers.build({"pruned": net}, (8, 8, 3), (1, 3), threads=1, log=lambda m: None,
                                peers=("torch_onnxruntime", "torch_eager"))
  assert set(runners) == {("pruned", "torch_onnxruntime"), ("pruned", "torch_eager")}
  import onnx  # pylint: disable=g-import-not-at-top
  model = onnx.load_from_string(models["pruned_torch.onnx"])
  dims = model.graph.input[0].type.tensor_type.shape.dim
  assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 8, 8]   # NCHW, any batch
  fu = fused.Fused(plan, params, stats)
  x = np.random.default_rng(1).standard_normal((3, 8, 8, 3)).astype(np.float32)
  for b in (1, 3):
    ref = np.asarray(fu(x[:b]))
    for key, run in runners.items():
      got = run(x[:b])
      assert got.shape == ref.shape
      assert np.max(np.abs(got - ref)) <= 1e-5 * np.max(np.abs(ref)), (key, b)
