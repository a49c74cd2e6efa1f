"""Export of the fused (BN-folded) network: StableHLO, TF SavedModel and LiteRT (ONNX:
onnx_export.py, straight from the graph).

The folded weights are baked into the exported computation as constants, so
the artifact needs only an image batch x [B,H,W,C] (f32, normalised as the
program feeds its networks; B symbolic unless a batch is given) and returns
logits [B,classes] equal to fused.forward's.

  export_stablehlo(path, plan, params, stats, image_shape)  -> jax.export.Exported
  load_stablehlo(path)                                      -> fn(x) -> logits
  export_savedmodel(directory, plan, params, stats, image_shape)   (jax2tf, TensorFlow)
  load_savedmodel(directory)                                -> fn(x) -> logits (numpy)
  network_fn(plan, params, stats, opts=RUNTIME_OPTS)        -> jax fn(x) -> logits
  to_tflite(fn, input_shape)     -> LiteRT flatbuffer bytes (fixed shape, float32)

LiteRT takes any jax callable images -> logits (the fused executor's weights
closed over), so it does not depend on how the cells are built. The path:
jax2tf (native serialization: the TF graph is one XlaCallModule op holding the
StableHLO) -> TensorFlow's TFLite converter, which legalizes the StableHLO to
builtin TFLite ops (the path ai-edge-torch uses; TF 2.21 keeps the converter,
only tf.lite's interpreter is deprecated). Shapes are static (the converter does
not legalize the shape arithmetic of a symbolic batch), so a LiteRT model serves
one batch size; export one per batch. (ONNX once came from this model through
tf2onnx's TFLite reader; its NHWC layouts and transposes ran 1.5-2.8x slower in
ONNX Runtime than a native NCHW export, so onnx_export.py now builds the ONNX
graph itself.)

RUNTIME_OPTS is the graph handed to LiteRT: depthwise convolutions as grouped
convolutions (DEPTHWISE_CONV_2D rather than
fp_jax's 9 or 25 shifted multiply-adds on CPU), the stem as a plain conv, and
channel groups zero-padded to a multiple of 8 as the fused path pads them
(latency.pad_channels; onnx_export.py pads alike: ONNX Runtime's blocked NCHWc
CPU convolutions need such widths, and pruned widths such as 22 or 43 made its
pruned network 3x slower than the padded one, 22.7 vs 7.8 ms, 15 layers / F 36
pruned 60%, 1 core; LiteRT ran both alike, 9.6 / 9.7 ms).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from fp_jax.infer import folding
from fp_jax.infer import fused


RUNTIME_OPTS = fused.Options(im2col=False, depthwise="xla", pad_channels=8)


def portable(opts):
  """opts without fp_jax's custom-call kernels (an exported artifact must run without
  them): the 'kernel' depthwise (also what 'auto' picks on CPU) becomes 'shift'."""
  if opts.depthwise == "kernel" or (opts.depthwise == "auto"
                                    and fused.depthwise_impl("auto") == "kernel"):
    return dataclasses.replace(opts, depthwise="shift")
  return opts


def _fn(plan, params, stats, opts):
  opts = portable(opts)
  fp = folding.folded(plan, params, stats, opts.pad_channels)
  return functools.partial(fused.forward, plan, fp, opts=opts)


def network_fn(plan, params, stats, opts=RUNTIME_OPTS):
  """fn(x [B,H,W,C] f32) -> logits [B,classes]: fused.forward with the folded weights
  closed over (constants when traced)."""
  return _fn(plan, params, stats, opts)


def _spec(image_shape, batch):
  h, w, c = image_shape
  dims = jax.export.symbolic_shape(f"b, {h}, {w}, {c}") if batch is None else (batch, h, w, c)
  return jax.ShapeDtypeStruct(dims, jnp.float32)


def export_stablehlo(path, plan, params, stats, image_shape, opts=fused.Options(),
                     batch=None, platforms=("cpu",)):
  """Writes the serialized jax.export artifact (StableHLO + calling convention) of the
  fused network to `path`, lowered for `platforms` (CPU, whatever the host's default
  backend); batch None: any batch size. Returns the Exported."""
  exported = jax.export.export(jax.jit(_fn(plan, params, stats, opts)), platforms=platforms)(
      _spec(image_shape, batch))
  with open(path, "wb") as f:
    f.write(exported.serialize())
  return exported


def load_stablehlo(path):
  """fn(x [B,H,W,C] f32) -> logits, from a file written by export_stablehlo."""
  with open(path, "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  return exported.call


def export_savedmodel(directory, plan, params, stats, image_shape, opts=fused.Options()):
  """A TF SavedModel at `directory` whose signature 'serving_default' (and attribute
  `logits`) maps images [None,H,W,C] f32 -> logits, via jax2tf (native serialization:
  the graph holds the StableHLO in an XlaCallModule op, lowered for CPU). Imports TensorFlow."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top

  h, w, c = image_shape
  tf_fn = jax2tf.convert(_fn(plan, params, stats, opts),
                         polymorphic_shapes=[f"(b, {h}, {w}, {c})"], with_gradient=False,
                         native_serialization_platforms=("cpu",))
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


def to_tflite(fn, input_shape):
  """LiteRT (TFLite) flatbuffer of fn: x [input_shape] f32 -> logits, float32, builtin
  ops only (no TF fallback ops), converted from fn lowered for CPU. Imports TensorFlow."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top

  tf_fn = tf.function(jax2tf.convert(fn, with_gradient=False,
                                     native_serialization_platforms=("cpu",)), autograph=False,
                      input_signature=[tf.TensorSpec(input_shape, tf.float32, name="images")])
  converter = tf.lite.TFLiteConverter.from_concrete_functions(
      [tf_fn.get_concrete_function()], tf_fn)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  return converter.convert()
