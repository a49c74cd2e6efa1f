"""Multi-host: jax.distributed over local CPU processes (gloo), the launcher, bad flags.

Two processes with one CPU device each must reproduce one process with two
devices (same global batch, same seed); a failing process must end the whole
launch with its `error:` line and a non-zero status, without hanging.
"""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from fp_jax import config as config_lib
from fp_jax.run import parallel
from launch import local
from tests import quick_compile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny search: 2 epochs (a uniform one, then controller-sampled arcs), one controller
# update of 3 architectures per epoch (3 = steps_per_epoch: one controller sampler compile).
TINY = ["--config=configs/smoke.py", "--config.stages=search", "--config.search.epochs=2",
        "--config.search.steps_per_epoch=3", "--config.search.num_layers=1",
        "--config.search.out_filters=4", "--config.search.batch_size=8",
        "--config.search.eval_batch_size=8", "--config.search.controller_updates=1",
        "--config.search.controller_samples=3", "--config.search.uniform_child_epochs=1",
        "--config.search.num_candidates=1", "--config.search.final_eval_batches=1"]
TIMEOUT = 480   # seconds; the two runs take ~2-4 minutes together on 2 busy cores


def _env(devices):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env["XLA_FLAGS"] = quick_compile.xla_flags(devices)   # the runs compared share the flags
  return env


def _launcher(*args, launcher_args=(), env=None, num_processes=2):
  cmd = [sys.executable, "-m", "launch.local", f"--num_processes={num_processes}",
         f"--timeout={TIMEOUT - 30}", "--grace=5", *launcher_args, "--", *args]
  return subprocess.Popen(cmd, cwd=ROOT, env=env or _env(1), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=TIMEOUT):
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.terminate()   # the launcher kills its processes on SIGTERM
    try:
      out, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
      proc.kill()
      out, err = proc.communicate()
    pytest.fail(f"no result within {timeout}s:\n{err[-3000:]}")
  return proc.returncode, out, err


def _jsonl(path):
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def _close(a, b, what):
  if a is None or b is None:
    assert a == b, what
  else:
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=what)


# ... then the final and compress stages, which read what process 0 wrote (search/arch.json,
# final/weights.npz): tiny recipes, one fine-tuning epoch
PIPELINE = TINY + ["--config.stages=search,final,compress", "--config.final.num_layers=1",
                   "--config.final.out_filters=4", "--config.final.epochs=1",
                   "--config.final.steps_per_epoch=3", "--config.final.batch_size=8",
                   "--config.compress.finetune_epochs=1", "--config.compress.steps_per_epoch=2",
                   "--config.compress.batch_size=8", "--config.compress.bn_batches=2"]


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
  """One process with two devices: the search, final and compress stages (PIPELINE)."""
  one = tmp_path_factory.mktemp("unbroken")
  rc, _, err = _finish(subprocess.Popen(
      [sys.executable, "-m", "fp_jax.main", *PIPELINE, f"--workdir={one}"], cwd=ROOT,
      env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  assert rc == 0, err[-3000:]
  assert re.search(r"search: .*\b2 devices", err), err[-2000:]
  return one


def _same_search(one, two):
  m1, m2 = _jsonl(one / "search" / "metrics.jsonl"), _jsonl(two / "search" / "metrics.jsonl")
  assert [m["epoch"] for m in m1] == [m["epoch"] for m in m2] == [1, 2]   # written once
  for a, b in zip(m1, m2):
    for key in ("child_loss", "child_acc", "reward", "train_acc", "prune_acc", "gap", "ratio",
                "baseline", "entropy", "lr"):
      _close(a[key], b[key], f"epoch {a['epoch']} {key}")
  assert m1[0]["child_loss"] != m1[1]["child_loss"]

  s1, s2 = _jsonl(one / "search" / "samples.jsonl"), _jsonl(two / "search" / "samples.jsonl")
  assert len(s1) == len(s2) == 2 * 3
  for a, b in zip(s1, s2):
    assert (a["arc"], a["ratios"], a["step"]) == (b["arc"], b["ratios"], b["step"])
    for key in ("reward", "train_acc", "prune_acc", "gap", "ratio"):
      _close(a[key], b[key], f"sample {key}")

  with open(one / "search" / "arch.json") as f1, open(two / "search" / "arch.json") as f2:
    a1, a2 = json.load(f1), json.load(f2)
  assert (a1["arc_string"], a1["ratios"]) == (a2["arc_string"], a2["ratios"])
  assert a1["matmul_precision"] == a2["matmul_precision"] == "float32"
  _close(a1["reward"], a2["reward"], "arch reward")
  return a1


def _wait_for(proc, pattern, lines, timeout):
  """Reads proc's stderr into `lines` until a line matches `pattern`."""
  end = time.monotonic() + timeout
  for line in proc.stderr:
    lines.append(line)
    if re.search(pattern, line):
      return
    if time.monotonic() > end:
      break
  pytest.fail(f"no line matching {pattern!r}:\n{''.join(lines)[-3000:]}")


def _sigterm_to_process_1(args):
  """Starts 2 processes of fp_jax.main `args`, sends SIGTERM to process 1 only in its first
  search step (compiling: handled); both must agree (every 2 steps, one all-gather), save
  the same checkpoint and exit 0 without a traceback."""
  cmds = local.commands(args, 2, local.free_port())
  procs = [subprocess.Popen(c, cwd=ROOT, env=local.child_env(1, _env(1)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for c in cmds]
  lines = []
  try:
    _wait_for(procs[1], r"search: 2 epochs x 3 steps", lines, TIMEOUT / 2)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=TIMEOUT / 2) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  errs = ["".join(lines) + outs[1][1] if i == 1 else outs[0][1] for i in range(2)]
  for i, p in enumerate(procs):
    assert p.returncode == 0, errs[i][-3000:]
    assert "Traceback" not in errs[i], errs[i][-3000:]
    assert re.search(r"search: .*\b2 devices", errs[i]), errs[i][-2000:]   # one 2-device mesh
  assert "SIGTERM received" in errs[1] and "another process received a stop signal" in errs[0]
  saved = [re.findall(r"search: stopped by (\w+) after saving checkpoint (\d+)", e)
           for e in errs]
  assert saved[1] == [("SIGTERM", saved[1][0][1])] and saved[0] == [("request", saved[1][0][1])]


def test_two_processes_stop_resume_and_run_the_pipeline_as_one_process_with_two_devices(
    tmp_path, unbroken):
  """Preemption: SIGTERM to process 1 only stops both at the same step with the same
  checkpoint; the launcher's rerun of the same command resumes. Stage hand-off: process 1's
  final and compress read what process 0 wrote. Everything equals the unbroken run of one
  process with two devices."""
  one, two = unbroken, tmp_path / "two"
  args = PIPELINE + ["--config.preemption_sync_steps=2", f"--workdir={two}"]
  _sigterm_to_process_1(args)
  assert not (two / "search" / "arch.json").exists()   # stopped part-way

  rc2, _, err2 = _finish(_launcher(*args))
  assert rc2 == 0, err2[-3000:]
  assert re.search(r"search: resuming from checkpoint \d+", err2), err2[-2000:]
  arch = _same_search(one, two)
  with open(two / "config.json") as f:
    config = json.load(f)
  assert config["search"]["batch_size"] == 8 and config["matmul_precision"] == "float32"

  for stage in ("final", "compress"):
    r1, r2 = (json.loads((d / stage / "result.json").read_text()) for d in (one, two))
    assert r1["arc_string"] == r2["arc_string"] == arch["arc_string"]   # read arch.json
    for key in ("macs", "params"):
      assert r1[key] == r2[key], (stage, key)
    for key in ("test_error",) if stage == "final" else (
        "test_error_masked", "test_error_finetuned", "pruned_macs", "pruned_params"):
      _close(r1[key], r2[key], f"{stage} {key}")
  assert json.loads((two / "compress" / "result.json").read_text())["ratios"] == [
      round(r, 6) for r in arch["ratios"]]   # arch.json's float32 values, as compress reads them
  for stage in ("final", "compress"):
    w1, w2 = (np.load(d / stage / "weights.npz") for d in (one, two))
    assert sorted(w1.files) == sorted(w2.files)
    for k in w1.files:
      if w1[k].dtype.kind == "f":
        _close(w1[k], w2[k], f"{stage} {k}")


STUB = textwrap.dedent("""\
    # process `--fail` fails after a cross-process collective; the other one then
    # waits in the next collective (and the failing one at jax's shutdown barrier)
    import sys
    from fp_jax.run import parallel
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if "=" in a)
    parallel.init_distributed(args["coordinator_address"], int(args["num_processes"]),
                              int(args["process_id"]))
    import jax
    import numpy as np
    mesh = parallel.make_mesh()
    total = parallel.data_parallel(lambda x: jax.lax.psum(x, parallel.AXIS), mesh,
                                   (parallel.BATCH,), parallel.REPLICATED)
    x = parallel.shard(mesh, np.full((1,), 1.0 + jax.process_index(), np.float32))
    print("psum", float(total(x)[0]), flush=True)
    if jax.process_index() == int(args["fail"]):
      print("error: this process cannot go on", file=sys.stderr, flush=True)
      sys.exit(3)
    print("second psum", float(total(x)[0]), flush=True)
    """)


@pytest.mark.parametrize("fail", [-1, 1])
def test_a_failing_process_ends_the_launch(tmp_path, fail):
  (tmp_path / "stub_main.py").write_text(STUB)
  env = _env(1)
  env["PYTHONPATH"] = os.pathsep.join([ROOT, str(tmp_path)])
  t = time.perf_counter()
  rc, out, err = _finish(_launcher(f"--fail={fail}", launcher_args=["--module=stub_main"],
                                   env=env), timeout=180)
  elapsed = time.perf_counter() - t
  assert "[0] psum 3.0" in out and "[1] psum 3.0" in out, out + err   # gloo collectives ran
  if fail < 0:
    assert rc == 0, err
    assert "[0] second psum 3.0" in out and "[1] second psum 3.0" in out
    return
  assert rc != 0, out + err
  lines = [l for l in err.splitlines() if l.startswith("error:")]
  assert lines == ["error: process 1: this process cannot go on"], err
  assert err.splitlines()[-1] == lines[0]
  assert "second psum" not in out   # process 0 was stuck in the collective: killed
  assert elapsed < 150, elapsed


BUG_STUB = textwrap.dedent("""\
    # fp_jax.main with a stage that has a bug in process 0 (an unexpected exception after a
    # cross-process collective) while process 1 goes on into the next collective
    import numpy as np
    from absl import app
    from fp_jax import main as fp_main
    from fp_jax.run import parallel

    def run(config, workdir):
      F = fp_main.FLAGS
      parallel.init_distributed(F.coordinator_address, F.num_processes, F.process_id)
      import jax
      mesh = parallel.make_mesh()
      total = parallel.data_parallel(lambda x: jax.lax.psum(x, parallel.AXIS), mesh,
                                     (parallel.BATCH,), parallel.REPLICATED)
      x = parallel.shard(mesh, np.ones((1,), np.float32))
      print("psum", float(total(x)[0]), flush=True)
      if jax.process_index() == 0:
        raise RuntimeError("a bug in a stage")
      print("second psum", float(total(x)[0]), flush=True)

    fp_main.run = run
    app.run(fp_main.main, flags_parser=fp_main.parse_flags)
    """)


def test_a_bug_in_one_process_ends_the_launch_with_its_traceback(tmp_path):
  """An unexpected exception (not an error: line) in a multi-process run: its traceback, and
  the process leaves at once instead of waiting 5 minutes at jax's shutdown barrier for a
  peer stuck in a collective; the launcher then ends the peer."""
  (tmp_path / "bug_main.py").write_text(BUG_STUB)
  env = _env(1)
  env["PYTHONPATH"] = os.pathsep.join([ROOT, str(tmp_path)])
  t = time.perf_counter()
  rc, out, err = _finish(_launcher("--config=configs/smoke.py", f"--workdir={tmp_path}",
                                   launcher_args=["--module=bug_main"], env=env), timeout=240)
  elapsed = time.perf_counter() - t
  # process 0 got through the collective (so both joined it); process 1 may not print its
  # own result before process 0's exit takes the coordination service down with it
  assert "[0] psum 2.0" in out, out + err
  assert rc != 0 and "second psum" not in out, out + err
  assert "[0] Traceback (most recent call last)" in err and \
      "[0] RuntimeError: a bug in a stage" in err, err[-3000:]
  assert err.strip().splitlines()[-1].startswith("error: process 0:"), err[-3000:]
  assert elapsed < 150, elapsed      # jax's shutdown barrier would hold it for 300 s


def test_bad_config_fails_every_process_with_one_error_line(tmp_path):
  # 9 rows cannot be split over the 2 devices of the 2 processes
  rc, _, err = _finish(_launcher(*TINY, "--config.search.batch_size=9",
                                 f"--workdir={tmp_path}"), timeout=300)
  assert rc != 0, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert re.fullmatch(r"error: process [01]: search\.batch_size=9 must be divisible by the "
                      r"device count \(2\)", last), err[-3000:]
  assert not (tmp_path / "search" / "metrics.jsonl").exists() or \
      not (tmp_path / "search" / "metrics.jsonl").read_text()


@pytest.mark.parametrize("flags,needles", [
    (dict(num_processes=0), ["--num_processes=0", ">= 1"]),
    (dict(process_id=-1), ["--process_id=-1", ">= 0"]),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2),
     ["--process_id=2", "[0, 2)"]),
    (dict(coordinator_address="127.0.0.1:1234", process_id=0),
     ["--coordinator_address=127.0.0.1:1234", "needs --num_processes"]),
    (dict(coordinator_address="127.0.0.1:1234"), ["--num_processes and --process_id"]),
    (dict(num_processes=2, process_id=0), ["--num_processes=2", "needs --coordinator_address"]),
    (dict(process_id=1), ["--process_id=1", "needs --coordinator_address"]),
    (dict(coordinator_address="nohost", num_processes=2, process_id=0), ["HOST:PORT"]),
    (dict(coordinator_address="h:99999", num_processes=2, process_id=0), ["HOST:PORT"]),
])
def test_bad_distributed_flags(flags, needles):
  with pytest.raises(config_lib.ConfigError) as e:
    parallel.init_distributed(**flags)
  for needle in needles:
    assert needle in str(e.value), (needle, str(e.value))


def test_single_process_starts_nothing():
  assert parallel.init_distributed("", None, None) is False
  assert parallel.init_distributed("", 1, 0) is False


def test_bad_flags_on_the_command_line(tmp_path):
  env = {k: v for k, v in _env(1).items()   # no cluster for --coordinator_address=auto to find
         if not k.startswith(("SLURM_", "OMPI_", "PMI_", "KUBERNETES_", "TPU_", "MEGASCALE_"))}
  for flags, needle in ((["--num_processes=0"], "error: --num_processes=0: must be an integer"),
                        (["--coordinator_address=auto"],
                         "error: --coordinator_address=auto: no cluster environment detected")):
    proc = subprocess.run([sys.executable, "-m", "fp_jax.main", "--config=configs/smoke.py",
                           f"--workdir={tmp_path}", "--config.stages=profile", *flags],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(needle), proc.stderr


def test_launcher_usage_errors(capsys):
  assert local.main(["--num_processes=2"]) == 2   # nothing to run
  assert local.main(["--num_processes=0", "--", "--config=configs/smoke.py"]) == 2
  assert local.main(["--", "--config=configs/smoke.py", "--process_id=1"]) == 2
  err = capsys.readouterr().err.splitlines()
  assert [l.split(":")[0] for l in err] == ["error"] * 3, err
  assert "--num_processes=0" in err[1] and "--process_id is set by the launcher" in err[2]


def test_child_environment():
  env = local.child_env(3, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --foo",
                            "PYTHONPATH": "/x"})
  assert env["XLA_FLAGS"].split() == ["--foo", "--xla_force_host_platform_device_count=3"]
  assert env["JAX_PLATFORMS"] == "cpu"
  assert env["PYTHONPATH"].split(os.pathsep) == [local.ROOT, "/x"]
  cmds = local.commands(["--workdir=w"], 2, 1234)
  assert [c[-3:] for c in cmds] == [
      ["--coordinator_address=127.0.0.1:1234", "--num_processes=2", "--process_id=0"],
      ["--coordinator_address=127.0.0.1:1234", "--num_processes=2", "--process_id=1"]]
