"""ONNX export straight from the network graph (graph.py): NCHW, BN folded, any batch size.

  to_onnx(plan, params, stats, pad_channels=8, opset=OPSET) -> ONNX model bytes

The model's input is DESIGN §3's images, 'images' [batch, H, W, C] float32 NHWC,
normalised as the program feeds its networks (batch symbolic); one leading
Transpose turns them to NCHW, the layout ONNX Runtime's CPU convolutions run
(its blocked NCHWc kernels), and every operator after it is NCHW. The output is
'logits' [batch, classes], equal to fused.forward's. Built with the `onnx`
package's helper API from the folded weights (folding.folded: BN folded into
every conv, channel groups zero-padded to a multiple of `pad_channels`, which
ONNX Runtime's blocked convolutions need: pruned widths such as 22 or 43 ran
3x slower unpadded, export.py), node for node:

  conv     [Relu] Conv k x k (SAME) + folded bias
  fr       [Relu] Conv 1x1 stride 2 on x, and on x shifted by one pixel (Slice
           [1:, 1:], one zero row/column padded at the end), Concat
  sep      2 x [Relu, depthwise Conv (group = C) k x k, Conv 1x1 + folded bias], the
           first depthwise at the node's stride
  avg/max  AveragePool (padding excluded from the count) / MaxPool, 3x3
  add      Add;  concat  Concat (channels)
  head     Relu, GlobalAveragePool, Flatten, MatMul (the fully connected layer)

Strided operators pad as TensorFlow's SAME does (the extra row at the end), which
is how the fused path's stride-1-then-subsample computes them (layers.subsample).
"""
from __future__ import annotations

import numpy as np

from fp_jax.infer import folding
from fp_jax.infer import fused
from fp_jax.run import errors

OPSET = 17


def _onnx():
  try:
    import onnx  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.RunError("export: onnx is not installed (pip install -r requirements.txt): "
                          f"{e}") from e
  return onnx


def same_pads(hw, k, stride):
  """ONNX pads [top, left, bottom, right] of a k x k SAME operator at `stride` on hw."""
  (_, (t, b)), (_, (l, r)) = (fused._same_pads(hw[0], k, stride),   # pylint: disable=protected-access
                              fused._same_pads(hw[1], k, stride))   # pylint: disable=protected-access
  return [t, l, b, r]


class _Graph:
  """Nodes and initializers under construction; every value gets a unique name."""

  def __init__(self, onnx):
    self.onnx, self.nodes, self.inits, self.count, self.shared = onnx, [], [], 0, {}

  def _name(self, stem):
    self.count += 1
    return f"{stem}:{self.count}"

  def const(self, stem, array):
    name = self._name(stem)
    self.inits.append(self.onnx.numpy_helper.from_array(np.asarray(array), name))
    return name

  def shared_const(self, stem, values):
    """One int64 initializer per distinct `values` (the Slice arguments)."""
    if values not in self.shared:
      self.shared[values] = self.const(stem, np.array(values, np.int64))
    return self.shared[values]

  def op(self, op_type, inputs, stem, **attrs):
    out = self._name(stem)
    self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), [out],
                                                 name=out + "/" + op_type, **attrs))
    return out

  def conv(self, x, w, b, stem, hw, stride=1, pads=None, group=1):
    """x NCHW, w HWIO [k, k, I/group, O] (float32), b [O] or None."""
    k = w.shape[0]
    ins = [x, self.const(stem + "/w", np.transpose(w, (3, 2, 0, 1)).astype(np.float32))]
    if b is not None:
      ins.append(self.const(stem + "/b", np.asarray(b, np.float32)))
    pads = same_pads(hw, k, stride) if pads is None else pads
    return self.op("Conv", ins, stem, kernel_shape=[k, k], strides=[stride, stride],
                   pads=pads, group=group)


def _producer(g, fb, node, x, in_hw):
  if node.relu:
    x = g.op("Relu", [x], node.name + "/relu")
  if "w" in fb:
    return g.conv(x, fb["w"], fb["b"], node.name, in_hw)
  a = g.conv(x, fb["w1"], fb["b1"], node.name + "/path1", in_hw, stride=node.stride,
             pads=[0, 0, 0, 0])
  big = np.iinfo(np.int64).max
  shifted = g.op("Slice", [x, g.shared_const("starts", (1, 1)),
                           g.shared_const("ends", (big, big)), g.shared_const("axes", (2, 3))],
                 node.name + "/shift")
  b = g.conv(shifted, fb["w2"], fb["b2"], node.name + "/path2", in_hw, stride=node.stride,
             pads=[0, 0, 1, 1])
  return g.op("Concat", [a, b], node.name, axis=1)


def _sep(g, fs, node, x, in_hw):
  y = g.op("Relu", [x], node.name + "/relu1")
  c = fs["dw1"].shape[-1]
  y = g.conv(y, fs["dw1"], None, node.name + "/dw1", in_hw, stride=node.stride, group=c)
  y = g.conv(y, fs["pw1"], fs["b1"], node.name + "/pw1", node.hw)
  y = g.op("Relu", [y], node.name + "/relu2")
  y = g.conv(y, fs["dw2"], None, node.name + "/dw2", node.hw, group=fs["dw2"].shape[-1])
  return g.conv(y, fs["pw2"], fs["b2"], node.name + "/pw2", node.hw)


def _pool(g, node, x, in_hw):
  kind = {"avg": "AveragePool", "max": "MaxPool"}[node.kind]
  attrs = {"count_include_pad": 0} if node.kind == "avg" else {}
  return g.op(kind, [x], node.name, kernel_shape=[3, 3], strides=[node.stride] * 2,
              pads=same_pads(in_hw, 3, node.stride), **attrs)


def to_onnx(plan, params, stats, pad_channels=8, opset=OPSET):
  """ONNX model bytes of the BN-folded network (plan, params, stats): full, compact or
  padded child.py weights; images [batch, H, W, C] NHWC -> logits [batch, classes]."""
  onnx = _onnx()
  fp = folding.folded(plan, params, stats, pad_channels)
  g = _Graph(onnx)
  vals = {}
  for j, n in enumerate(plan.nodes):
    if n.kind == "image":
      vals[j] = g.op("Transpose", ["images"], "nchw", perm=[0, 3, 1, 2])
      continue
    ins = [vals[i] for i in n.inputs]
    in_hw = plan.nodes[n.inputs[0]].hw
    if n.kind in ("conv", "fr"):
      vals[j] = _producer(g, fp["blocks"][n.name], n, ins[0], in_hw)
    elif n.kind == "sep":
      vals[j] = _sep(g, fp["blocks"][n.name], n, ins[0], in_hw)
    elif n.kind in ("avg", "max"):
      vals[j] = _pool(g, n, ins[0], in_hw)
    elif n.kind == "add":
      vals[j] = g.op("Add", ins, n.name)
    elif n.kind == "concat":
      vals[j] = g.op("Concat", ins, n.name, axis=1)
    else:
      raise ValueError(f"unknown node kind {n.kind!r}")
  x = g.op("Relu", [vals[plan.out]], "head/relu")
  x = g.op("Flatten", [g.op("GlobalAveragePool", [x], "head/pool")], "head/flatten", axis=1)
  g.nodes.append(onnx.helper.make_node(
      "MatMul", [x, g.const("fc/w", fp["fc"]["w"].astype(np.float32))], ["logits"],
      name="fc/MatMul"))
  h, w = plan.image_hw
  f32 = onnx.TensorProto.FLOAT
  graph_def = onnx.helper.make_graph(
      g.nodes, "fp_jax_fused",
      [onnx.helper.make_tensor_value_info("images", f32, ["batch", h, w, plan.in_channels])],
      [onnx.helper.make_tensor_value_info("logits", f32, ["batch", plan.num_classes])],
      initializer=g.inits)
  model = onnx.helper.make_model(graph_def, producer_name="fp_jax",
                                 opset_imports=[onnx.helper.make_opsetid("", opset)])
  model.ir_version = min(model.ir_version, 10)     # readable by ONNX Runtime 1.2x and later
  onnx.checker.check_model(model)
  return model.SerializeToString()
