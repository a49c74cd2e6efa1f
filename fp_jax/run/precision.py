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
