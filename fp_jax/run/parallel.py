"""Device mesh, data-parallel step mapping and multi-host start-up.

Steps are written per device with collectives over axis `data` and mapped
over every device of every process with `jax.shard_map` on a 1-D mesh
(pmap semantics). Inside such a step, take gradients of the *pmean* of the
per-device loss: with replicated parameters JAX then returns the exact
global-batch gradient, already identical on every device.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fp_jax import config as config_lib
from fp_jax.run import errors

AXIS = "data"
AUTO = "auto"   # --coordinator_address=auto: let jax.distributed detect the cluster


def init_distributed(coordinator_address="", num_processes=None, process_id=None):
  """Starts jax.distributed when asked to; returns whether it did.

  Call before any JAX computation (importing jax is fine). Three ways:

  - ``coordinator_address=""`` with ``num_processes`` unset or 1: one process, nothing
    to start (all local devices are used).
  - ``coordinator_address="HOST:PORT"`` with ``num_processes`` and ``process_id``:
    explicit start-up; process 0 runs the coordinator on HOST:PORT.
  - ``coordinator_address="auto"``: ``jax.distributed.initialize()`` detects the
    cluster (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes); ``num_processes``
    and ``process_id`` may still be given to override the detection.

  Bad combinations raise ConfigError naming the flag (main prints one `error:`
  line); a failed start-up raises errors.RunError.
  """
  addr = (coordinator_address or "").strip()
  for name, value, lo in (("num_processes", num_processes, 1), ("process_id", process_id, 0)):
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                              or value < lo):
      raise config_lib.ConfigError(f"--{name}={value}: must be an integer >= {lo}")
  if num_processes is not None and process_id is not None and process_id >= num_processes:
    raise config_lib.ConfigError(f"--process_id={process_id}: must be in [0, {num_processes}) "
                                 f"(--num_processes={num_processes})")
  if not addr:
    if (num_processes or 1) > 1 or (process_id or 0) > 0:
      what = (f"--num_processes={num_processes}" if (num_processes or 1) > 1
              else f"--process_id={process_id}")
      raise config_lib.ConfigError(f"{what} needs --coordinator_address=HOST:PORT (or "
                                   f"--coordinator_address={AUTO} on TPU pods, SLURM, Open MPI)")
    return False
  if addr.lower() == AUTO:
    addr = None
  else:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise config_lib.ConfigError(f"--coordinator_address={addr}: must be HOST:PORT "
                                   f"(e.g. 10.0.0.2:1234) or {AUTO}")
    missing = [f"--{n}" for n, v in (("num_processes", num_processes),
                                     ("process_id", process_id)) if v is None]
    if missing:
      raise config_lib.ConfigError(f"--coordinator_address={addr} needs "
                                   f"{' and '.join(missing)} (one process per host, ids "
                                   f"0..num_processes-1)")
  if jax.distributed.is_initialized():   # started already (e.g. a second run in one process)
    return True
  if _cpu_platform():  # cross-process collectives on CPU (gloo is JAX's default too)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(
        coordinator_address=addr,
        num_processes=None if num_processes is None else int(num_processes),
        process_id=None if process_id is None else int(process_id))
  except Exception as e:  # pylint: disable=broad-except
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    reason = lines[0] if lines else type(e).__name__
    if addr is None and "should be defined" in reason:
      raise config_lib.ConfigError(
          f"--coordinator_address={AUTO}: no cluster environment detected (Cloud TPU, "
          f"SLURM, Open MPI, Kubernetes); pass --coordinator_address=HOST:PORT "
          f"--num_processes=N --process_id=I") from None
    raise errors.RunError(f"--coordinator_address={coordinator_address}: "
                          f"jax.distributed.initialize failed: {reason}") from None
  return True


def _cpu_platform():
  """Whether JAX may run on CPU (judged from jax_platforms, without starting a backend)."""
  platforms = (jax.config.jax_platforms or "").lower()
  return not platforms or "cpu" in platforms.split(",")


def barrier(name):
  """Every process waits here until all have arrived (no-op in one process): after process
  0's writes of a stage's files (arch.json, weights.npz), before any process reads them."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils   # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"fp_jax:{name}")


def make_mesh(devices=None):
  """1-D mesh over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else devices
  return jax.sharding.Mesh(np.asarray(devices), (AXIS,))


def check_batch(batch_size, field, mesh=None):
  n = jax.device_count() if mesh is None else mesh.size
  if batch_size % n:
    raise config_lib.ConfigError(f"{field}={batch_size} must be divisible by the device count ({n})")


def replicate(mesh, tree):
  return jax.device_put(tree, NamedSharding(mesh, P()))


def shard(mesh, local_batch):
  """This process's rows of a global batch -> a global array split over `data`."""
  sharding = NamedSharding(mesh, P(AXIS))
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)),
                      local_batch)


def data_parallel(fn, mesh, in_specs, out_specs, donate_argnums=()):
  """jit(shard_map(fn)) with P() for replicated and P('data') for batch args."""
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs),
                 donate_argnums=donate_argnums)


BATCH = P(AXIS)
REPLICATED = P()
