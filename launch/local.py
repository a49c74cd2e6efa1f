"""Local multi-process launcher: N CPU processes on this machine, one jax.distributed job.

  python -m launch.local --num_processes=2 -- --config=configs/smoke.py --workdir=runs/mp

starts N copies of `python -m fp_jax.main <args> --coordinator_address=127.0.0.1:PORT
--num_processes=N --process_id=I` (PORT: a free local port), each with
`--devices_per_process` forced CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count,
JAX_PLATFORMS=cpu), so the global mesh has N * devices_per_process devices and the
cross-process collectives run over gloo exactly as on a multi-host cluster. Their
stdout and stderr are streamed here, each line prefixed with `[I] `.

If a process fails (non-zero exit, or an `error:` line not followed by a clean exit
within --grace seconds — a failed process may wait for its peers at shutdown), the
others are killed and the launcher ends with one line `error: process I: ...` (that
process's own error line) and a non-zero status. --timeout bounds the whole run.
"""
from __future__ import annotations

import argparse
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")


def free_port(host="127.0.0.1"):
  """A TCP port nobody listens on right now (the OS's choice)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def child_env(devices_per_process, base=None):
  """The environment of one process: CPU only, `devices_per_process` devices, repo importable."""
  env = dict(os.environ if base is None else base)
  xla = _DEVICE_FLAG.sub("", env.get("XLA_FLAGS", "")).split()
  env["XLA_FLAGS"] = " ".join(xla + [f"--xla_force_host_platform_device_count="
                                     f"{devices_per_process}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  return env


def commands(args, num_processes, port, host="127.0.0.1", module="fp_jax.main"):
  """The command line of every process."""
  return [[sys.executable, "-m", module, *args, f"--coordinator_address={host}:{port}",
           f"--num_processes={num_processes}", f"--process_id={i}"]
          for i in range(num_processes)]


class _Proc:
  def __init__(self, index, cmd, env, events):
    self.index = index
    self.error = None       # its first `error:` line
    self.last_err = ""      # its last non-empty stderr line
    self.killed = False
    self.popen = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  errors="replace", bufsize=1, start_new_session=True)
    self._readers = [threading.Thread(target=self._read, args=(s, n, events), daemon=True)
                     for s, n in ((self.popen.stdout, "out"), (self.popen.stderr, "err"))]
    for t in self._readers:
      t.start()
    threading.Thread(target=self._wait, args=(events,), daemon=True).start()

  def _read(self, stream, name, events):
    for line in stream:
      events.put(("line", self.index, name, line.rstrip("\n")))
    stream.close()

  def _wait(self, events):
    rc = self.popen.wait()
    for t in self._readers:   # all its output first, then its exit
      t.join()
    events.put(("exit", self.index, rc, None))

  def kill(self, sig=signal.SIGKILL):
    """Signals the process group this launcher started for process `index`."""
    if self.popen.poll() is None:
      self.killed = True
      try:
        os.killpg(self.popen.pid, sig)
      except (ProcessLookupError, PermissionError):
        pass


def _describe(rc):
  if rc is None:
    return "did not finish"
  if rc < 0:
    try:
      return f"killed by {signal.Signals(-rc).name}"
    except ValueError:
      return f"killed by signal {-rc}"
  return f"exit status {rc}"


def launch(args, num_processes, *, devices_per_process=1, host="127.0.0.1", port=0,
           timeout=0.0, grace=10.0, module="fp_jax.main", out=None, err=None):
  """Runs the processes to the end; returns (status, error line or None).

  status 0 when every process exited 0; otherwise the failed process's exit
  status (1 if it had none or was killed).
  """
  out, err = out or sys.stdout, err or sys.stderr
  port = port or free_port(host)
  env = child_env(devices_per_process)
  events = queue.Queue()
  procs = []
  for i, cmd in enumerate(commands(args, num_processes, port, host, module)):
    procs.append(_Proc(i, cmd, env, events))
  running = set(range(num_processes))
  failed = None            # (index, status, message)
  deadline = time.monotonic() + timeout if timeout else None
  kill_at = None           # when to kill everything (grace after an `error:` line)

  def fail(i, status, message):
    nonlocal failed, kill_at
    if failed is None:
      failed = (i, status, message)
    kill_at = time.monotonic()

  try:
    while running:
      now = time.monotonic()
      wait = [t - now for t in (deadline, kill_at) if t is not None]
      try:
        kind, i, a, b = events.get(timeout=max(0.05, min(wait)) if wait else None)
      except queue.Empty:
        kind = None
      if kind == "line":
        p = procs[i]
        print(f"[{i}] {b}", file=out if a == "out" else err, flush=True)
        if a == "err" and b.strip():
          p.last_err = b.strip()
          if b.startswith("error:") and p.error is None and not p.killed:
            p.error = b[len("error:"):].strip()
            if kill_at is None:   # it is failing: give it `grace` seconds to exit on its own
              kill_at = time.monotonic() + grace
      elif kind == "exit":
        running.discard(i)
        p = procs[i]
        if a != 0 and not p.killed:
          fail(i, a if a > 0 else 1, p.error or (f"{_describe(a)}: {p.last_err}" if p.last_err
                                                 else _describe(a)))
        elif a == 0 and p.error is not None and failed is None and kill_at is not None \
            and not any(procs[j].error for j in running):
          kill_at = None   # an `error:` line, yet a clean exit: not a failure
      now = time.monotonic()
      if kill_at is not None and now >= kill_at and running:
        if failed is None:   # an `error:` line and no exit within the grace period
          first = min((p for p in procs if p.error is not None), key=lambda p: p.index)
          failed = (first.index, 1, first.error)
        for j in running:
          procs[j].kill()
      if deadline is not None and now >= deadline and running:
        if failed is None:
          failed = (min(running), 1, f"timed out after {timeout:g}s (--timeout); killed")
        for j in running:
          procs[j].kill()
        deadline = None
  except KeyboardInterrupt:
    for p in procs:
      p.kill()
    for p in procs:
      p.popen.wait()
    return 130, "interrupted"
  finally:
    for p in procs:   # nothing outlives the launcher
      p.kill()
  if failed is None:
    return 0, None
  i, status, message = failed
  return status, f"process {i}: {message}"


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  if "--" in argv:
    own, rest = argv[:argv.index("--")], argv[argv.index("--") + 1:]
  else:
    own, rest = argv, []
  parser = argparse.ArgumentParser(
      prog="python -m launch.local", description=__doc__.split("\n\n")[0],
      usage="%(prog)s [--num_processes=N] [options] -- ARGS_TO_FP_JAX_MAIN")
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=1,
                      help="forced CPU devices of each process")
  parser.add_argument("--host", default="127.0.0.1", help="coordinator host")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
  parser.add_argument("--timeout", type=float, default=0,
                      help="seconds before every process is killed (0: no limit)")
  parser.add_argument("--grace", type=float, default=10,
                      help="seconds a process that printed `error:` gets to exit on its own")
  parser.add_argument("--module", default="fp_jax.main", help=argparse.SUPPRESS)
  try:
    opts = parser.parse_args(own)
  except SystemExit as e:
    return int(e.code or 0)
  for name, lo in (("num_processes", 1), ("devices_per_process", 1)):
    if getattr(opts, name) < lo:
      print(f"error: --{name}={getattr(opts, name)}: must be >= {lo}", file=sys.stderr)
      return 2
  if not 0 <= opts.port < 65536:
    print(f"error: --port={opts.port}: must be in [0, 65536)", file=sys.stderr)
    return 2
  if opts.timeout < 0 or opts.grace < 0:
    print("error: --timeout and --grace must be >= 0", file=sys.stderr)
    return 2
  if not rest:
    print("error: no arguments for fp_jax.main; usage: python -m launch.local "
          "--num_processes=N -- --config=configs/smoke.py --workdir=DIR ...", file=sys.stderr)
    return 2
  for a in rest:
    if re.match(r"--(coordinator_address|num_processes|process_id)\b", a):
      print(f"error: {a.split('=')[0]} is set by the launcher; pass --num_processes before "
            f"`--`", file=sys.stderr)
      return 2
  def terminated(signum, frame):  # the processes are killed on the way out (launch's finally)
    raise SystemExit(128 + signum)
  signal.signal(signal.SIGTERM, terminated)
  status, message = launch(rest, opts.num_processes, devices_per_process=opts.devices_per_process,
                           host=opts.host, port=opts.port, timeout=opts.timeout,
                           grace=opts.grace, module=opts.module)
  if message:
    print(f"error: {message}", file=sys.stderr, flush=True)
  return status


if __name__ == "__main__":
  sys.exit(main())
