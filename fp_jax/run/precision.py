"""Mixed precision (`config.dtype`): compute in float32 or bfloat16.

As flax / big_vision codebases do: parameters, optimizer state, BN statistics
(running averages and the batch statistics themselves), losses and metrics stay in
float32; a step casts the parameters and the images to the compute dtype when it
enters the network (so gradients come back to the float32 parameters through the
cast) and the logits back to float32 before the loss. Batch-norm statistics are
reduced in float32 inside layers.batch_norm whatever the compute dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

DTYPES = ("float32", "bfloat16")
# config.matmul_precision: the passes of float32 convolutions and dots (jax's
# default_matmul_precision). auto: float32 on CPU (XLA:CPU computes float32 whatever the
# setting: same HLO, bitwise equal values) and on GPUs (no TF32, so the equalities the tests
# assert on CPU -- resume == unbroken, 1 == n devices -- hold to float32 rounding there too),
# bfloat16 on TPU (its native single pass; float32 costs 3-6 passes).
MATMUL_PRECISIONS = ("auto", "float32", "tensorfloat32", "bfloat16")
AUTO_MATMUL = {"cpu": "float32", "gpu": "float32", "cuda": "float32", "rocm": "float32",
               "tpu": "bfloat16"}


def resolve_matmul_precision(name, backend):
  """config.matmul_precision for `backend` (jax.default_backend()): auto -> AUTO_MATMUL."""
  if name not in MATMUL_PRECISIONS:
    raise ValueError(f"matmul_precision must be one of {MATMUL_PRECISIONS}, got {name!r}")
  return AUTO_MATMUL.get(backend, "float32") if name == "auto" else name


def set_matmul_precision(config):
  """Sets jax's default matmul precision from config.matmul_precision; returns a copy of
  `config` with the resolved value (what config.json and the result files record)."""
  value = resolve_matmul_precision(config.matmul_precision, jax.default_backend())
  jax.config.update("jax_default_matmul_precision", value)
  config = config.copy_and_resolve_references()
  config.matmul_precision = value
  return config


def matmul_precision():
  """The matmul precision in force (for result files): float32 when none was set."""
  return jax.config.jax_default_matmul_precision or "float32"


def dtype_of(name):
  """The jnp dtype of a config.dtype name."""
  if name not in DTYPES:
    raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
  return jnp.dtype(name)


def cast(tree, dtype):
  """Floating leaves of `tree` in `dtype` (others unchanged); identity for float32."""
  dtype = jnp.dtype(dtype)
  def f(a):
    return a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) and \
        jnp.result_type(a) != dtype else a
  return jax.tree.map(f, tree)


def compute(params, x, dtype):
  """(params, x) in the compute dtype, as a step's loss function passes them on."""
  return cast(params, dtype), cast(x, dtype)
