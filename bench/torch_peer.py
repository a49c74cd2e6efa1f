"""The eager PyTorch peer of the training-step benches: the fixed network of one arc
(no weight sharing, no per-step architecture) built from fp_jax's own graph
(fp_jax/models/graph.py), trained as the search child is (cross-entropy + aux_weight * aux,
dropout on the pooled features, decayed weights, global-norm clipping, Nesterov
momentum), NCHW or channels_last.

  python -m bench.torch_peer [--num_layers 6 --out_filters 20 --batch 4 --image 32]

checks that the peer computes fp_jax's network: with fp_jax's initial parameters
copied in, its logits and aux logits (train-mode BN, no dropout) must equal
child.forward's to 1e-4 (relative); `fixed_step` runs that check before it times
anything. torch is a bench-only dependency (bench/requirements.txt, the CPU build).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

from bench import common
from configs import default
from fp_jax.models import child
from fp_jax.models import graph
from fp_jax.models import layers
from fp_jax.run import memory
from fp_jax.models import space

torch = None   # imported on first use: the rest of bench/ must not need it


def _torch():
  global torch
  if torch is None:
    import torch as t   # pylint: disable=g-import-not-at-top
    torch = t
  return torch


def _same_pad(n, k, stride):
  """(before, after) zero padding of TF's SAME k x k op at `stride` on n pixels."""
  total = max((-(-n // stride) - 1) * stride + k - n, 0)
  return total // 2, total - total // 2


def _oihw(w):
  """fp_jax HWIO kernel (depthwise: [k,k,1,C]) -> a torch OIHW tensor."""
  return _torch().from_numpy(np.ascontiguousarray(np.asarray(w, np.float32).transpose(3, 2, 0, 1)))


class Net:
  """Builds the torch modules of `plan` and runs them; parameters from fp_jax params."""

  def __init__(self, plan, params):
    t = _torch()
    nn = t.nn
    self.plan, self.mods = plan, nn.ModuleDict()

    def bn(p):
      m = nn.BatchNorm2d(p["scale"].shape[-1], eps=layers.BN_EPS, momentum=1 - layers.BN_MOMENTUM)
      m.weight.data[:] = t.from_numpy(np.array(p["scale"]))
      m.bias.data[:] = t.from_numpy(np.array(p["bias"]))
      return m

    def conv(w, groups=1):
      k, c_out = w.shape[0], w.shape[3]
      m = nn.Conv2d(w.shape[2] * groups, c_out, k, groups=groups, bias=False)
      m.weight.data[:] = _oihw(w)
      return m

    for _, n in graph.param_nodes(plan):
      p = params["blocks"][n.name]
      key = n.name.replace("/", "__")
      if n.kind == "conv":
        self.mods[key] = nn.ModuleDict({"conv": conv(p["conv"]), "bn": bn(p["bn"])})
      elif n.kind == "fr":
        self.mods[key] = nn.ModuleDict({"conv1": conv(p["conv1"]), "conv2": conv(p["conv2"]),
                                        "bn": bn(p["bn"])})
      else:
        c = p["dw1"].shape[-1]         # the block's own width (compact or padded too)
        self.mods[key] = nn.ModuleDict({
            "dw1": conv(p["dw1"], c), "pw1": conv(p["pw1"]), "bn1": bn(p["bn1"]),
            "dw2": conv(p["dw2"], c), "pw2": conv(p["pw2"]), "bn2": bn(p["bn2"])})
    a = params["aux"]
    self.mods["aux"] = nn.ModuleDict({"conv1": conv(a["conv1"]), "bn1": bn(a["bn1"]),
                                      "conv2": conv(a["conv2"]), "bn2": bn(a["bn2"])})
    self.aux_fc = nn.Parameter(t.from_numpy(np.asarray(a["fc"]["w"]).copy()))
    self.fc = nn.Parameter(t.from_numpy(np.asarray(params["fc"]["w"]).copy()))

  def load_stats(self, stats):
    """BN running statistics from fp_jax stats (for eval mode: `inference`)."""
    t = _torch()
    for _, n in graph.param_nodes(self.plan):
      m, s = self.mods[n.name.replace("/", "__")], stats["blocks"][n.name]
      for bn in [b for b in m if b.startswith("bn")]:
        m[bn].running_mean.data[:] = t.from_numpy(np.array(s[bn]["mean"], np.float32))
        m[bn].running_var.data[:] = t.from_numpy(np.array(s[bn]["var"], np.float32))
    return self

  def inference(self):
    """An nn.Module in eval mode: x [B,C,H,W] -> logits (running BN statistics, no aux)."""
    net = self

    class Inference(_torch().nn.Module):
      def __init__(self):
        super().__init__()
        self.mods, self.fc = net.mods, net.fc       # registered: exports see them

      def forward(self, x):
        return net.forward(x, with_aux=False)[0]

    return Inference().eval()

  def parameters(self):
    return list(self.mods.parameters()) + [self.aux_fc, self.fc]

  def to(self, **kw):
    self.mods.to(**kw)
    return self

  def _pad_conv(self, m, x, stride=1):
    k = m.kernel_size[0]
    (t0, t1), (l0, l1) = (_same_pad(x.shape[2], k, stride), _same_pad(x.shape[3], k, stride))
    if t0 or t1 or l0 or l1:
      x = _torch().nn.functional.pad(x, (l0, l1, t0, t1))
    return _torch().nn.functional.conv2d(x, m.weight, None, stride, 0, 1, m.groups)

  def _fr(self, m, x, relu):
    f = _torch().nn.functional
    if relu:
      x = f.relu(x)
    a = m["conv1"](x[:, :, ::2, ::2])
    b = m["conv2"](f.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:][:, :, ::2, ::2])
    return m["bn"](_torch().cat([a, b], 1))

  def _block(self, n, x):
    f = _torch().nn.functional
    m = self.mods[n.name.replace("/", "__")]
    if n.kind == "conv":
      return m["bn"](self._pad_conv(m["conv"], f.relu(x) if n.relu else x))
    if n.kind == "fr":
      return self._fr(m, x, n.relu)
    y = m["bn1"](m["pw1"](self._pad_conv(m["dw1"], f.relu(x), n.stride)))
    return m["bn2"](m["pw2"](self._pad_conv(m["dw2"], f.relu(y))))

  def _pool(self, n, x):
    f = _torch().nn.functional
    if n.kind == "avg":
      y = f.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    else:
      y = f.max_pool2d(x, 3, 1, 1)
    if n.stride == 1:
      return y
    oh = layers.same_offset(x.shape[2], 3, n.stride)
    ow = layers.same_offset(x.shape[3], 3, n.stride)
    return y[:, :, oh::n.stride, ow::n.stride]

  def forward(self, x, keep_prob=1.0, with_aux=True):
    """x [B,3,H,W] -> (logits, aux logits or None); BN in the modules' mode (training:
    batch statistics; `inference`: running ones)."""
    t = _torch()
    f = t.nn.functional
    vals = []
    for n in self.plan.nodes:
      ins = [vals[i] for i in n.inputs]
      if n.kind == "image":
        y = x
      elif n.kind in graph.PARAM_KINDS:
        y = self._block(n, ins[0])
      elif n.kind in ("avg", "max"):
        y = self._pool(n, ins[0])
      elif n.kind == "add":
        y = ins[0] + ins[1]
      else:
        y = t.cat(ins, 1)
      vals.append(y)
    feats = f.relu(vals[self.plan.out]).mean((2, 3))
    if not with_aux:
      return feats @ self.fc, None
    h = vals[self.plan.cells[self.plan.aux_index].out]
    m = self.mods["aux"]
    win = layers.aux_pool_window(h.shape[2])
    a = f.avg_pool2d(f.relu(h), win, 3)
    a = f.relu(m["bn1"](m["conv1"](a)))
    a = f.relu(m["bn2"](m["conv2"](a)))
    aux = a.permute(0, 2, 3, 1).reshape(a.shape[0], -1) @ self.aux_fc
    if keep_prob < 1.0:
      feats = f.dropout(feats, 1.0 - keep_prob)
    return feats @ self.fc, aux


def build(num_layers, filters, image, classes, seed=0, arc=None):
  """(plan, fp_jax params, torch Net) of the fixed network of `arc` (default ENAS's)."""
  arc = space.parse_arc(space.ENAS_ARC) if arc is None else arc
  plan = child.make_plan(arc, num_layers, filters, (image, image, 3), classes)
  params, _ = child.init(jax.random.key(seed), plan)
  return plan, params, Net(plan, params)


def check(plan, params, net, x):
  """Max relative difference of the torch net's (logits, aux) from child.forward's on x
  [B,H,W,3] (train-mode BN, no regularisation)."""
  t = _torch()
  _, stats = child.init(jax.random.key(0), plan)
  logits, aux, _ = child.forward(plan, params, stats, x, True)
  with t.no_grad():
    tl, ta = net.forward(t.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()))
  rel = lambda a, b: float(np.max(np.abs(np.asarray(a) - b.numpy())) /
                           max(np.max(np.abs(np.asarray(a))), 1e-12))
  return max(rel(logits, tl), rel(aux, ta))


def fixed_step(pkg, num_layers, filters, batch, image, classes, dtype="float32", seed=0,
               channels_last=False):
  """steps.BUILDERS signature: (None, state, call(state, rep) -> (state, loss), 0.0); the
  torch net is checked against fp_jax's on 4 images first (ValueError if it differs)."""
  del pkg
  if dtype != "float32":
    raise ValueError("the torch peer runs float32 only")
  t = _torch()
  t.manual_seed(seed)
  cfg = default.get_config().search
  plan, params, net = build(num_layers, filters, image, classes, seed)
  x, y = common.synthetic_batch(seed, batch, image, classes)
  diff = check(plan, params, net, x[:4])
  if not diff < 1e-4:
    raise ValueError(f"torch peer differs from fp_jax's network: {diff:.3g}")
  common.log(f"torch peer == fp_jax network (max rel diff {diff:.2g}); RSS after the check "
             f"{memory.peak_rss_bytes() / 2**30:.2f} GiB")
  fmt = t.channels_last if channels_last else t.contiguous_format
  net.to(memory_format=fmt)
  xt = t.from_numpy(x.transpose(0, 3, 1, 2).copy()).contiguous(memory_format=fmt)
  yt = t.from_numpy(y.astype(np.int64))
  ps = net.parameters()
  opt = t.optim.SGD(ps, lr=cfg.lr_max, momentum=cfg.momentum, nesterov=True)

  def call(state, rep):
    del rep
    logits, aux = net.forward(xt, cfg.keep_prob)
    ce = t.nn.functional.cross_entropy(logits, yt)
    loss = ce + cfg.aux_weight * t.nn.functional.cross_entropy(aux, yt)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    with t.no_grad():
      for p in ps:
        p.grad.add_(p, alpha=2 * cfg.l2)
    t.nn.utils.clip_grad_norm_(ps, cfg.grad_clip)
    opt.step()
    return state, float(ce.detach())
  return None, None, call, 0.0


def main(argv=None):
  p = common.add_size_flags(argparse.ArgumentParser(description=__doc__))
  p.set_defaults(num_layers=6, out_filters=20, batch=4)
  a = p.parse_args(argv)
  plan, params, net = build(a.num_layers, a.out_filters, a.image, a.classes, a.seed)
  x, _ = common.synthetic_batch(a.seed, a.batch, a.image, a.classes)
  diff = check(plan, params, net, x)
  print(f"max relative difference torch vs fp_jax: {diff:.3g}")
  return 0 if diff < 1e-4 else 1


if __name__ == "__main__":
  sys.exit(main())
