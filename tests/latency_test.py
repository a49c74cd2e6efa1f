"""The latency stage end to end: `python -m fp_jax.main --config.stages=latency` (CPU, tiny)."""
import json
import os
import subprocess
import sys

from fp_jax.infer import batching
from fp_jax.models import child
from fp_jax.models import space

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "--config=configs/smoke.py"
TINY = ["--config.final.num_layers=1", "--config.final.out_filters=4",
        "--config.latency.images=5", "--config.latency.batch_size=1",
        "--config.latency.warmup=1"]


def _run(*args, timeout=300):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "fp_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_latency_stage_random(tmp_path):
  proc = _run(SMOKE, f"--workdir={tmp_path}", "--config.stages=latency",
              "--config.latency.init=random", f"--config.final.arc={space.ENAS_ARC}",
              "--config.latency.threads=1",
              "--config.compress.ratios=0.5 0.5 0.5 0.5 0.5", *TINY)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "latency" / "latency.json") as f:
    r = json.load(f)
  assert r["device"].startswith("cpu") and r["batch_size"] == 1 and r["images"] == 5
  assert r["init"] == "random" and r["im2col"] is True and r["pad_channels"] == 8
  assert r["dots"] == "auto" and r["compiler_options"] == {
      "xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_multi_thread_eigen": False}
  plan = child.make_plan(space.parse_arc(space.ENAS_ARC), 1, 4, (8, 8, 1), 10)   # auto on CPU
  assert r["micro_batch"] == {"option": 0, "images_per_chunk": batching.CHUNK_BYTES_CPU // (
      batching.largest_activation_bytes(plan))}
  # widths 4 and 2 padded to 8: the fused path executes more multiply-adds than the count
  assert r["executed_macs_pruned_fused"] > r["macs"]["pruned"]
  for key in ("baseline_perop_ms", "baseline_fused_ms", "pruned_perop_ms", "pruned_fused_ms"):
    assert r["network"][key] > 0, key
  stem, layer = r["stages"]["stem_conv"], r["stages"]["layer_0"]
  assert set(stem["perop_ms"]) == {"conv", "bn", "total"} and stem["fused_ms"]["total"] > 0
  parts = {"calib_x", "calib_y", "layer_base", "ops_x", "ops_y", "combine", "total"}
  assert set(layer["perop_ms"]) == parts and set(layer["fused_ms"]) == parts
  assert 0 <= r["max_abs_diff"] <= 1e-4 * max(1.0, r["max_abs_diff_detail"]["pruned"]
                                               ["max_abs_logit"])
  assert r["macs"]["pruned"] < r["macs"]["baseline"] and 0 < r["mac_reduction"] < 1
  assert r["matmul_peak_gflops"] > 0 and r["floor_ms"]["pruned"] > 0
  assert all(v > 0 for v in r["throughput_images_per_s"].values())
  assert all(v > 0 for v in r["memory_bytes"].values())
  md = (tmp_path / "latency" / "latency.md").read_text()
  assert "| baseline |" in md and "layer_0" in md and "stem_conv" in md
  assert (tmp_path / "latency" / "pruned_fused.stablehlo").stat().st_size > 0
  assert "latency: per image baseline per-op" in proc.stdout
  # every runtime timed side by side, its logits equal to fused (random BN estimated: O(1))
  assert r["threads"] == 1 and set(r["runtime_threads"]) == {"perop", "fused", "onnxruntime",
                                                              "litert"}
  assert 0.01 < r["max_abs_logit"] < 100, r["max_abs_logit"]
  assert set(r["runtimes"]) == {"perop", "fused", "onnxruntime", "litert"}
  for rt, by_net in r["runtimes"].items():
    assert set(by_net) == {"baseline", "pruned"}, rt
    for net, v in by_net.items():
      assert v["mean_ms"] > 0 and v["median_ms"] > 0 and v["images_per_s"] > 0, (rt, net)
      assert v["max_abs_diff_vs_fused"] <= 1e-5 * r["max_abs_logit"], (rt, net, v)
  assert r["runtimes"]["fused"]["pruned"]["median_ms"] == r["network_detail"][
      "pruned_fused"]["median_ms"]
  for name in ("baseline.onnx", "pruned.onnx", "baseline.tflite", "pruned.tflite",
               "runtimes.png"):
    assert (tmp_path / "latency" / name).stat().st_size > 0, name
  assert "| ONNX Runtime (fp_jax's ONNX) |" in md and "| LiteRT (fp_jax's) |" in md
  assert r["cpu"]["model"] in r["device"] and all(i in r["device"] for i in r["cpu"]["isa"])
  rt = r["core_round_trip"]     # the first two usable CPUs' cache-line round trip
  assert rt is None or (len(rt["cpus"]) == 2 and rt["ns"] > 0)
  if r["engine"]["ran"] == "native":   # the kernels are built: measured wherever 2 CPUs are usable
    assert (rt is None) == (r["cpu"]["cores_usable"] < 2)
  assert "onnx_export" in r and r["onnx_export"]["batch"] == "symbolic"
  # a CPU host: no accelerator section; the artifacts are lowered for CPU
  assert "accelerator" not in r and "## Accelerator" not in md
  assert r["matmul_precision"] == "float32"
  import jax   # pylint: disable=g-import-not-at-top
  exported = jax.export.deserialize(
      bytearray((tmp_path / "latency" / "pruned_fused.stablehlo").read_bytes()))
  assert exported.platforms == ("cpu",)


def test_accelerator_section_and_placement():
  """placement.section with the CPU device standing in for an accelerator: both networks
  timed, the same logits as the CPU reference (same device, same program: exactly); 'auto'
  depthwise resolves per platform."""
  import jax   # pylint: disable=g-import-not-at-top
  from fp_jax.infer import fused, networks, placement   # pylint: disable=g-import-not-at-top
  from fp_jax.models import child   # pylint: disable=g-import-not-at-top
  arc = space.parse_arc(space.ENAS_ARC)
  plan = child.make_plan(arc, 1, 4, (8, 8, 1), 10)
  params, stats = networks.random_init(plan, 0)
  nets = {"baseline": networks.Net(plan, arc, params, stats),
          "pruned": networks.Net(plan, arc, *networks.prune(plan, params, stats, [0.5] * 5))}
  calls = []
  acc = placement.section(nets, jax.devices("cpu")[0], images=4, batch_size=2,
                          opts=fused.Options(), timer=lambda f: calls.append(f()) or 0.5)
  assert acc["platform"] == "cpu" and acc["images"] == 4 and acc["batch_size"] == 2
  assert len(calls) == 2 * 4 + 2 * 5   # batch-1 images and 5 batches, per network
  for n in ("baseline", "pruned"):
    assert acc["batch1_ms"][n] == {"median_ms": 500.0, "mean_ms": 500.0}
    assert acc["throughput_images_per_s"][n] == 4.0 and acc["max_abs_diff_vs_cpu"][n] == 0.0
  assert acc["max_abs_logit"] > 0
  assert "## Accelerator: cpu: " in placement.to_markdown(acc)
  opts = fused.Options(depthwise="auto")
  assert placement.for_platform(opts, "gpu").depthwise == "xla"
  assert placement.for_platform(opts, "cpu").depthwise == fused.depthwise_impl("auto")
  assert placement.accelerator() is None and placement.cpu_device().platform == "cpu"


def test_missing_weights_error(tmp_path):
  proc = _run(SMOKE, f"--workdir={tmp_path}", "--config.stages=latency", *TINY)
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1, proc.stderr
  line = lines[0]
  assert "latency.init" in line and "final" in line and "--config.latency.init=random" in line
  assert not (tmp_path / "latency").exists()


def test_trained_networks_load(tmp_path):
  """latency.init=trained reads final/ and compress/ weights files (weights.py format)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from fp_jax import results  # pylint: disable=g-import-not-at-top
  from fp_jax.models import child, flops  # pylint: disable=g-import-not-at-top
  from fp_jax.run import weights  # pylint: disable=g-import-not-at-top
  from fp_jax.infer import networks  # pylint: disable=g-import-not-at-top

  arc = space.parse_arc(space.ENAS_ARC)
  plan = child.make_plan(arc, 1, 4, (8, 8, 1), 10)
  params, stats = networks.random_init(plan, 0)
  cp, cs = networks.prune(plan, params, stats, (0.5,) * 5)
  meta = {"arc_string": space.ENAS_ARC, "num_layers": 1, "out_filters": 4,
          "image_shape": [8, 8, 1], "num_classes": 10}
  for rel, p, s in ((results.FINAL_WEIGHTS, params, stats), (results.COMPRESS_WEIGHTS, cp, cs)):
    os.makedirs(os.path.dirname(tmp_path / rel), exist_ok=True)
    weights.save(str(tmp_path / rel), {"params": p, "stats": s}, dict(meta, ratios=[0.5] * 5))
  nets = networks.trained_networks(str(tmp_path))
  assert nets["baseline"].plan == plan and np.array_equal(nets["pruned"].arc, arc)
  for got, want in ((nets["baseline"].params, params), (nets["pruned"].stats, cs)):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
  widths = flops.widths_of_params(plan, nets["pruned"].params)
  assert widths["values"][plan.stem] == cp["blocks"]["stem"]["conv"].shape[-1] < plan.stem_channels
  assert flops.count(plan, widths)["params"] == flops.param_count(cp)


def test_latency_option_errors():
  """latency.pad_channels, latency.dots, latency.engine and latency.threads are checked with
  one-line messages."""
  import importlib.util
  import pytest
  from fp_jax import config as config_lib
  spec = importlib.util.spec_from_file_location("smoke", os.path.join(ROOT, "configs", "smoke.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cores = len(os.sched_getaffinity(0))
  for field, value, needle in (
      ("pad_channels", 0, "latency.pad_channels=0: must be an integer in 1..64"),
      ("dots", "mkl", "latency.dots='mkl': must be one of auto, xla, ynn"),
      ("engine", "fast", "latency.engine='fast': must be one of auto, native, xla"),
      ("threads", -1, "latency.threads=-1: must be an integer >= 0"),
      ("threads", cores + 1, f"latency.threads={cores + 1}: must be an integer in 0..{cores}")):
    config = mod.get_config()
    config.latency[field] = value
    with pytest.raises(config_lib.ConfigError) as e:
      config_lib.validate(config)
    assert needle in str(e.value)
