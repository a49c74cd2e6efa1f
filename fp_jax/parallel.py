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

AXIS = "data"


def init_distributed(coordinator_address="", num_processes=0, process_id=-1):
  """Starts jax.distributed when asked to (flags) or when the platform says so."""
  if coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return True
  return False


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
