"""Export of the fused (BN-folded) network: serialized StableHLO and a TF SavedModel.

The folded weights are baked into the exported computation as constants, so
the artifact needs only an image batch x [B,H,W,C] (B symbolic unless a batch
is given) and returns logits [B,classes] equal to fused.forward's.

  export_stablehlo(path, plan, arc, params, stats, image_shape)  -> jax.export.Exported
  load_stablehlo(path)                                           -> fn(x) -> logits
  export_savedmodel(directory, plan, arc, params, stats, image_shape)  (jax2tf, TensorFlow)
  load_savedmodel(directory)                                     -> fn(x) -> logits (numpy)
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fp_jax.infer import fused


def _fn(plan, arc, params, stats, opts):
  fp = fused.folded(plan, arc, params, stats, opts)
  return functools.partial(fused.forward, plan, np.asarray(arc), fp, opts=opts)


def _spec(image_shape, batch):
  h, w, c = image_shape
  dims = jax.export.symbolic_shape(f"b, {h}, {w}, {c}") if batch is None else (batch, h, w, c)
  return jax.ShapeDtypeStruct(dims, jnp.float32)


def export_stablehlo(path, plan, arc, params, stats, image_shape, opts=fused.Options(),
                     batch=None):
  """Writes the serialized jax.export artifact (StableHLO + calling convention) of the
  fused network to `path`; batch None: any batch size. Returns the Exported."""
  exported = jax.export.export(jax.jit(_fn(plan, arc, params, stats, opts)))(
      _spec(image_shape, batch))
  with open(path, "wb") as f:
    f.write(exported.serialize())
  return exported


def load_stablehlo(path):
  """fn(x [B,H,W,C] f32) -> logits, from a file written by export_stablehlo."""
  with open(path, "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  return exported.call


def export_savedmodel(directory, plan, arc, params, stats, image_shape, opts=fused.Options()):
  """A TF SavedModel at `directory` whose signature 'serving_default' (and attribute
  `logits`) maps images [None,H,W,C] f32 -> logits, via jax2tf (native serialization:
  the graph holds the StableHLO in an XlaCallModule op). Imports TensorFlow."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top

  h, w, c = image_shape
  tf_fn = jax2tf.convert(_fn(plan, arc, params, stats, opts),
                         polymorphic_shapes=[f"(b, {h}, {w}, {c})"], with_gradient=False)
  module = tf.Module()
  module.logits = tf.function(tf_fn, autograph=False, input_signature=[
      tf.TensorSpec([None, h, w, c], tf.float32, name="images")])
  tf.saved_model.save(module, directory,
                      signatures={"serving_default": module.logits.get_concrete_function()})
  return directory


def load_savedmodel(directory):
  """fn(x [B,H,W,C]) -> logits (numpy), from a SavedModel written by export_savedmodel."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  module = tf.saved_model.load(directory)
  return lambda x: module.logits(tf.constant(np.asarray(x, np.float32))).numpy()
