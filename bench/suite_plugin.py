"""pytest plugin for bench/suite_profile.py: where each test's time goes.

Loaded with `-p bench.suite_plugin` when FP_JAX_SUITE_PROFILE_DIR names a directory; each
pytest process (the xdist workers, or the one process) writes <worker>.json there at its
end: per test its wall seconds (setup, call and teardown), the start and end times, the phase
that failed if one did, and the seconds JAX reports through jax.monitoring in that process
(XLA backend compiles and their count, tracing and lowering, persistent-cache reads, orbax
checkpoint writes), and per program name its backend compiles: [count, seconds]. Subprocesses
a test starts are in its wall time only.
"""
from __future__ import annotations

import collections
import json
import os
import time

ENV = "FP_JAX_SUITE_PROFILE_DIR"
EVENTS = {   # jax.monitoring duration event -> the name in the profile
    "/jax/core/compile/backend_compile_duration": "compile_s",
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/compilation_cache/cache_retrieval_time_sec": "cache_read_s",
    "/jax/orbax/write/blocking_duration_secs": "checkpoint_blocking_s",
}

_tests: dict = {}
_current = [None]
_active = [False]   # a process that runs tests (not the xdist controller) and ENV is set
_worker = ["main"]  # this process's xdist worker id (not the environment's: a pytest started
                    # by a test inherits its worker's PYTEST_XDIST_WORKER)


def _listener(event, duration, fun_name=None, **_):
  name = EVENTS.get(event)
  if name is None or _current[0] is None:
    return
  rec = _tests[_current[0]]
  rec[name] = rec.get(name, 0.0) + duration
  if name == "compile_s":
    rec["compiles"] = rec.get("compiles", 0) + 1
    prog = rec.setdefault("programs", {}).setdefault(str(fun_name), [0, 0.0])
    prog[0] += 1
    prog[1] += duration


def pytest_configure(config):
  controller = bool(getattr(config.option, "numprocesses", None)) and not hasattr(
      config, "workerinput")
  _active[0] = bool(os.environ.get(ENV)) and not controller
  _worker[0] = getattr(config, "workerinput", {}).get("workerid", "main")
  if _active[0]:
    import jax.monitoring  # pylint: disable=g-import-not-at-top
    jax.monitoring.register_event_duration_secs_listener(_listener)


def pytest_runtest_logstart(nodeid, location):
  del location
  if not _active[0]:
    return
  _current[0] = nodeid
  _tests[nodeid] = collections.OrderedDict(start=time.time(), wall_s=0.0)


def pytest_runtest_logreport(report):
  if report.nodeid in _tests:
    _tests[report.nodeid]["wall_s"] += report.duration
    if report.failed:
      _tests[report.nodeid]["failed"] = report.when   # setup, call or teardown


def pytest_runtest_logfinish(nodeid, location):
  del location
  if nodeid in _tests:
    _tests[nodeid]["end"] = time.time()
  _current[0] = None


def pytest_sessionfinish(session):
  del session
  out = os.environ.get(ENV)
  if not _active[0] or not _tests:
    return
  worker = _worker[0]
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, f"{worker}.json"), "w") as f:
    json.dump({"worker": worker, "tests": _tests}, f)
