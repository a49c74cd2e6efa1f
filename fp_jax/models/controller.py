"""ENAS micro controller with per-stage pruning-ratio decisions.

An LSTM (1 layer, no bias, as ENAS) emits, for the normal then the reduction
cell, per node: input a, input b (attention over anchors), op a, op b (softmax),
and then one extra step whose output becomes the node's anchor. The LSTM state
carries over from the normal into the reduction cell and then into 5 pruning
ratio decisions (stages 0..4, see `space.stage_of_layer`), whose logits are
bounded by the full tanh constant (ops use tanh_constant / op_tanh_reduce; that
bound left the ratios almost unmovable). One function, `_run`, either samples
all decisions or teacher-forces given ones (scoring).

`sample_random` is the `search.policy=random` counterpart of `sample`: every
decision uniform over its allowed choices (random search with weight sharing,
Li & Talwalkar 2019), nothing learned.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fp_jax.models import space

POLICIES = ("controller", "random")   # search.policy: `sample` (the LSTM learns) | `sample_random`

NUM_STAGES = 5
# Fixed (not learned) op bias of the normal cell, as the ENAS implementation.
_B_SOFT_NO_LEARN = np.array([0.25, 0.25] + [-0.25] * (space.NUM_OPS - 2), np.float32)
_B_SOFT_INIT = np.array([10.0, 10.0] + [0.0] * (space.NUM_OPS - 2), np.float32)


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
  num_ratio_choices: int = 9
  lstm_size: int = 64
  temperature: float = 1.0          # ENAS micro search: none
  tanh_constant: float = 1.1
  op_tanh_reduce: float = 2.5
  entropy_weight: float = 1e-4
  baseline_decay: float = 0.99
  lr: float = 0.0035


def init(key, cfg: ControllerConfig) -> dict:
  """Params pytree; weights ~ uniform(-0.1, 0.1), b_soft = [10, 10, 0, 0, 0]."""
  h, r, n = cfg.lstm_size, cfg.num_ratio_choices, space.NUM_OPS
  shapes = {
      "w_lstm": (2 * h, 4 * h),  # [x, h] -> [i, f, o, g]
      "g_emb": (h,),
      "w_emb": (n, h),
      "w_soft": (h, n),
      "w_attn_1": (h, h),
      "w_attn_2": (h, h),
      "v_attn": (h,),
      "w_ratio": (h, r),
      "w_ratio_emb": (r, h),
  }
  keys = jax.random.split(key, len(shapes))
  params = {name: jax.random.uniform(k, shape, jnp.float32, -0.1, 0.1)
            for k, (name, shape) in zip(keys, shapes.items())}
  params["b_soft"] = jnp.asarray(_B_SOFT_INIT)
  params["b_ratio"] = jnp.zeros((r,), jnp.float32)
  return params


def _lstm(w, x, c, h):
  """One LSTM step on x, c, h: [H] -> (c, h) [H]."""
  i, f, o, g = jnp.split(jnp.concatenate([x, h]) @ w, 4)
  c = jax.nn.sigmoid(i) * jnp.tanh(g) + jax.nn.sigmoid(f) * c
  return c, jax.nn.sigmoid(o) * jnp.tanh(c)


def _decide(logits, key, forced, mask=None):
  """Samples (key) or takes `forced`; returns (index, log_prob, entropy).

  logits: [n]; mask: optional bool [n] of allowed choices.
  """
  if mask is not None:  # Finite, so that 0 * logp stays 0 (no NaN gradients).
    logits = jnp.where(mask, logits, -1e9)
  logp = jax.nn.log_softmax(logits)
  if forced is None:
    idx = jax.random.categorical(key, logits).astype(jnp.int32)
  else:
    idx = jnp.asarray(forced, jnp.int32)
  return idx, logp[idx], -jnp.sum(jnp.exp(logp) * logp)


def _pick(tree, i):
  return None if tree is None else tree[i]


def _run(params, cfg: ControllerConfig, key, actions=None):
  """One architecture: samples with `key`, or teacher-forces `actions`.

  Nodes and ratio stages are `lax.scan` steps (an unrolled loop compiles ~10x
  slower); anchors are padded to [7, H] and unavailable inputs masked.

  Args:
    key: PRNG key, or None when `actions` are given.
    actions: None, or (arc int32 [40], ratio_idx int32 [5]).

  Returns:
    (arc int32 [40], ratio_idx int32 [5], log_prob f32 [], entropy f32 []).
  """
  p, num_in = params, 2 + space.NUM_NODES
  op_tanh = cfg.tanh_constant / cfg.op_tanh_reduce
  node_keys = ratio_keys = arc_in = ratio_in = None
  if key is not None:
    node_key, ratio_key = jax.random.split(key)
    node_keys = jax.random.split(node_key, (2, space.NUM_NODES, 4))
    ratio_keys = jax.random.split(ratio_key, NUM_STAGES)
  if actions is not None:
    arc_in = jnp.reshape(actions[0], (2, space.NUM_NODES, 4))
    ratio_in = actions[1]

  def node_step(carry, xs, op_bias):
    c, h, anchors, anchor_keys = carry  # [H], [H], [7, H], [7, H]
    node, keys, forced = xs  # [], [4] keys or None, [4] ints or None
    x, choice, log_prob, entropy = p["g_emb"], [None] * 4, 0.0, 0.0
    for s in range(2):  # inputs a, b: attention over the node + 2 anchors
      c, h = _lstm(p["w_lstm"], x, c, h)
      query = jnp.tanh(anchor_keys + h @ p["w_attn_2"]) @ p["v_attn"]
      logits = cfg.tanh_constant * jnp.tanh(query / cfg.temperature)
      choice[2 * s], lp, ent = _decide(logits, _pick(keys, s), _pick(forced, 2 * s),
                                       jnp.arange(num_in) < node + 2)
      log_prob, entropy, x = log_prob + lp, entropy + ent, anchors[choice[2 * s]]
    for s in range(2):  # ops a, b
      c, h = _lstm(p["w_lstm"], x, c, h)
      logits = op_tanh * jnp.tanh((h @ p["w_soft"] + p["b_soft"]) / cfg.temperature)
      choice[2 * s + 1], lp, ent = _decide(logits + op_bias, _pick(keys, 2 + s),
                                           _pick(forced, 2 * s + 1))
      log_prob, entropy = log_prob + lp, entropy + ent
      x = p["w_emb"][choice[2 * s + 1]]
    c, h = _lstm(p["w_lstm"], x, c, h)  # the node's anchor
    anchors = anchors.at[node + 2].set(h)
    anchor_keys = anchor_keys.at[node + 2].set(h @ p["w_attn_1"])
    return (c, h, anchors, anchor_keys), (jnp.stack(choice), log_prob, entropy)

  c = h = jnp.zeros((cfg.lstm_size,), jnp.float32)
  arc, log_prob, entropy = [], 0.0, 0.0
  for cell in range(2):  # normal, reduction; the LSTM state carries over
    anchors = anchor_keys = jnp.zeros((num_in, cfg.lstm_size), jnp.float32)
    for i in range(2):  # cell inputs: zero values, keys from two LSTM steps
      c, h = _lstm(p["w_lstm"], p["g_emb"], c, h)
      anchor_keys = anchor_keys.at[i].set(h @ p["w_attn_1"])
    op_bias = _B_SOFT_NO_LEARN if cell == 0 else 0.0
    (c, h, _, _), (cell_arc, lp, ent) = jax.lax.scan(
        lambda carry, xs: node_step(carry, xs, op_bias),
        (c, h, anchors, anchor_keys),
        (jnp.arange(space.NUM_NODES), _pick(node_keys, cell), _pick(arc_in, cell)))
    arc.append(cell_arc.reshape(-1))
    log_prob, entropy = log_prob + lp.sum(), entropy + ent.sum()

  def ratio_step(carry, xs):
    c, h, x = carry
    c, h = _lstm(p["w_lstm"], x, c, h)
    logits = cfg.tanh_constant * jnp.tanh((h @ p["w_ratio"] + p["b_ratio"]) / cfg.temperature)
    idx, lp, ent = _decide(logits, *xs)
    return (c, h, p["w_ratio_emb"][idx]), (idx, lp, ent)

  _, (ratio_idx, lp, ent) = jax.lax.scan(
      ratio_step, (c, h, p["g_emb"]), (ratio_keys, ratio_in), length=NUM_STAGES)
  return (jnp.concatenate(arc), ratio_idx, log_prob + lp.sum(),
          entropy + ent.sum())


def sample(params, key, num: int, cfg: ControllerConfig) -> dict:
  """Samples `num` architectures.

  Returns:
    {'arc': int32 [num, 40], 'ratio_idx': int32 [num, 5],
     'log_prob': f32 [num], 'entropy': f32 [num]}.
  """
  keys = jax.random.split(key, num)
  arc, ratio_idx, log_prob, entropy = jax.vmap(
      lambda k: _run(params, cfg, k))(keys)
  return {"arc": arc, "ratio_idx": ratio_idx, "log_prob": log_prob,
          "entropy": entropy}


def score(params, arc, ratio_idx, cfg: ControllerConfig):
  """Teacher-forced scores of arc [num, 40], ratio_idx [num, 5].

  Returns:
    (log_prob f32 [num], entropy f32 [num]).
  """
  _, _, log_prob, entropy = jax.vmap(
      lambda a, r: _run(params, cfg, None, (a, r)))(arc, ratio_idx)
  return log_prob, entropy


def sample_random(rng: np.random.Generator, num: int, num_ratio_choices: int) -> dict:
  """`num` uniformly random decisions, as `sample` without the LSTM.

  Per architecture, `space.sample_uniform`'s arc (each input uniform over 0..k+1 for
  node k, each op over the NUM_OPS ops), then NUM_STAGES ratio indices uniform over
  0..num_ratio_choices-1.

  Returns:
    {'arc': int32 [num, 40], 'ratio_idx': int32 [num, 5]}.
  """
  arc, ratio_idx = [], []
  for _ in range(num):
    arc.append(space.sample_uniform(rng))
    ratio_idx.append(rng.integers(0, num_ratio_choices, NUM_STAGES))
  return {"arc": np.stack(arc).reshape(num, space.ARC_LEN),
          "ratio_idx": np.asarray(ratio_idx, np.int32).reshape(num, NUM_STAGES)}


def random_entropy(num_ratio_choices: int) -> float:
  """Exact entropy (nats) of `sample_random`'s distribution over (arc, ratio_idx).

  The sum of log(number of choices) over all decisions, as `sample`'s entropy sums
  per-decision entropies: 2 cells x 2 inputs x log((k + 2) choices) over nodes k, 2 x 2
  x log(NUM_OPS) per node, and NUM_STAGES x log(num_ratio_choices).
  """
  inputs = sum(math.log(k + 2) for k in range(space.NUM_NODES))
  return (4 * inputs + 4 * space.NUM_NODES * math.log(space.NUM_OPS)
          + NUM_STAGES * math.log(num_ratio_choices))


def make_optimizer(cfg: ControllerConfig) -> optax.GradientTransformation:
  return optax.adam(cfg.lr, b1=0.0, b2=0.999, eps=1e-3)


@flax.struct.dataclass
class ControllerState:
  """What REINFORCE carries between updates: the LSTM's params (init's tree), Adam's state,
  the reward baseline (f32 []) and the number of updates made (int32 [])."""
  params: Any
  opt_state: Any
  baseline: Any
  step: Any


def init_state(key, cfg: ControllerConfig) -> ControllerState:
  params = init(key, cfg)
  return ControllerState(params, make_optimizer(cfg).init(params), jnp.zeros((), jnp.float32),
                         jnp.zeros((), jnp.int32))


def update(state, arc, ratio_idx, rewards, cfg: ControllerConfig):
  """One REINFORCE step from arc [num, 40], ratio_idx [num, 5], rewards [num].

  As ENAS (micro_controller.py `build_trainer`): each sample's reward gets
  entropy_weight * its entropy (no gradient through the entropy); the baseline
  takes those rewards one by one, and each advantage is measured against the
  baseline after including its own reward.

  Returns:
    (new_state, metrics {'loss', 'baseline', 'entropy', 'reward', 'log_prob'}).
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  _, entropy = score(state.params, arc, ratio_idx, cfg)
  shaped = rewards + cfg.entropy_weight * jax.lax.stop_gradient(entropy)

  def baseline_step(b, r):
    b = b - (1.0 - cfg.baseline_decay) * (b - r)
    return b, b

  baseline, baselines = jax.lax.scan(baseline_step, state.baseline, shaped)
  advantage = jax.lax.stop_gradient(shaped - baselines)

  def loss_fn(params):
    log_prob, _ = score(params, arc, ratio_idx, cfg)
    return -jnp.mean(log_prob * advantage), log_prob

  (loss, log_prob), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = make_optimizer(cfg).update(grads, state.opt_state, state.params)
  new_state = ControllerState(optax.apply_updates(state.params, updates), opt_state, baseline,
                              state.step + 1)
  metrics = {"loss": loss, "baseline": baseline, "entropy": jnp.mean(entropy),
             "reward": jnp.mean(rewards), "log_prob": jnp.mean(log_prob)}
  return new_state, metrics


sample_jit = jax.jit(sample, static_argnames=("num", "cfg"))
score_jit = jax.jit(score, static_argnames="cfg")
update_jit = jax.jit(update, static_argnames="cfg")
