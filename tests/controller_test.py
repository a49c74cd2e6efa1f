"""Tests for fp_jax.models.controller (CPU)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp_jax.models import controller
from fp_jax.models import space

CFG = controller.ControllerConfig()
# ENAS places the entropy term in the reward; weight large here so it shows. The update
# tests share this configuration, and every test samples batches of 10: one compilation
# of sample and one of update serve the file.
CFG_ENTROPY = dataclasses.replace(CFG, entropy_weight=0.005)


@pytest.fixture(scope="module")
def samples():
  """200 samples, drawn as 20 batches of 10 (the batch the other tests sample)."""
  params = controller.init(jax.random.PRNGKey(0), CFG)
  outs = [controller.sample_jit(params, k, 10, CFG)
          for k in jax.random.split(jax.random.PRNGKey(1), 20)]
  return params, jax.tree.map(lambda *a: np.concatenate([np.asarray(b) for b in a]), *outs)


def test_sampled_arcs_valid_and_diverse(samples):
  _, out = samples
  assert out["arc"].shape == (200, space.ARC_LEN) and out["arc"].dtype == np.int32
  assert out["ratio_idx"].shape == (200, controller.NUM_STAGES)
  assert out["log_prob"].shape == (200,) and out["entropy"].shape == (200,)
  for arc in out["arc"]:
    space.validate_arc(arc)
  assert out["ratio_idx"].min() >= 0
  assert out["ratio_idx"].max() < CFG.num_ratio_choices
  assert len(np.unique(out["ratio_idx"])) == CFG.num_ratio_choices
  # The last node's inputs (0..5) and all ops are used; arcs are distinct.
  assert len(np.unique(out["arc"][:, 16])) == 6
  assert len(np.unique(out["arc"][:, 1::2])) == space.NUM_OPS
  assert len({tuple(a) for a in out["arc"]}) == 200
  assert np.all(out["log_prob"] <= 0) and np.all(np.isfinite(out["log_prob"]))
  assert np.all(out["entropy"] > 0)


def test_score_matches_sample(samples):
  params, out = samples
  log_prob, entropy = controller.score_jit(params, out["arc"], out["ratio_idx"], CFG)
  np.testing.assert_allclose(log_prob, out["log_prob"], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(entropy, out["entropy"], rtol=1e-5, atol=1e-4)


def test_samples_follow_log_prob(samples):
  # For sequential sampling E[-log p(x)] equals E[sum of per-step entropies].
  _, out = samples
  neg_lp, ent = -out["log_prob"], out["entropy"]
  assert abs(neg_lp.mean() - ent.mean()) < 4 * neg_lp.std() / np.sqrt(len(neg_lp))


def test_ratio_probabilities_normalise():
  """Summing p over all ratio choices gives p(arc), the 1-choice log_prob."""
  cfg3 = dataclasses.replace(CFG, num_ratio_choices=3)
  cfg1 = dataclasses.replace(CFG, num_ratio_choices=1)
  params3 = controller.init(jax.random.PRNGKey(2), cfg3)
  params1 = dict(params3, w_ratio=params3["w_ratio"][:, :1],
                 b_ratio=params3["b_ratio"][:1], w_ratio_emb=params3["w_ratio_emb"][:1])
  out1 = controller.sample_jit(params1, jax.random.PRNGKey(3), 2, cfg1)
  np.testing.assert_array_equal(out1["ratio_idx"], 0)
  ratios = np.stack(np.meshgrid(*[np.arange(3)] * 5, indexing="ij"), -1).reshape(-1, 5)
  for i in range(2):
    arcs = jnp.broadcast_to(out1["arc"][i], (len(ratios), space.ARC_LEN))
    lp3, ent3 = controller.score_jit(
        params3, arcs, jnp.asarray(ratios, jnp.int32), cfg3)
    np.testing.assert_allclose(jax.nn.logsumexp(lp3), out1["log_prob"][i], atol=1e-4)
    # With 3 choices the ratio decisions do add to log_prob and entropy.
    assert np.all(lp3 < out1["log_prob"][i]) and np.all(ent3 > out1["entropy"][i])


def test_update_baseline_and_metrics():
  """ENAS places the entropy term in the reward (weight large here so it shows)."""
  cfg = CFG_ENTROPY
  state = controller.init_state(jax.random.PRNGKey(0), cfg)
  state = state.replace(baseline=jnp.float32(0.5))
  out = controller.sample_jit(state.params, jax.random.PRNGKey(1), 10, cfg)
  rewards = jnp.linspace(0.0, 1.0, 10)
  new_state, metrics = controller.update_jit(
      state, out["arc"], out["ratio_idx"], rewards, cfg)
  log_prob, entropy = controller.score_jit(
      state.params, out["arc"], out["ratio_idx"], cfg)
  # ENAS: the entropy bonus is part of the reward the baseline tracks
  baseline, advantages = 0.5, []
  for r, h in zip(np.asarray(rewards), np.asarray(entropy)):
    r = r + cfg.entropy_weight * h
    baseline -= (1 - cfg.baseline_decay) * (baseline - r)
    advantages.append(r - baseline)
  np.testing.assert_allclose(new_state.baseline, baseline, rtol=1e-6)
  np.testing.assert_allclose(metrics["baseline"], baseline, rtol=1e-6)
  assert int(new_state.step) == 1
  expected = -jnp.mean(log_prob * jnp.array(advantages))
  np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["reward"], 0.5, rtol=1e-6)
  np.testing.assert_allclose(metrics["log_prob"], jnp.mean(log_prob), rtol=1e-5)
  np.testing.assert_allclose(metrics["entropy"], jnp.mean(entropy), rtol=1e-5)
  # The update moves probability towards above-baseline architectures.
  new_log_prob, _ = controller.score_jit(
      new_state.params, out["arc"], out["ratio_idx"], cfg)
  delta = np.asarray(new_log_prob - log_prob)
  adv = np.array(advantages)
  assert delta[adv > 0].mean() > delta[adv < 0].mean()


def test_controller_learns_toy_reward_and_compiles_once():
  """Reward = fraction of the 20 ops that are avg_pool3x3 (disfavoured at init). With
  ENAS's defaults (temperature 1, op logits bounded by 1.1 / 2.5) op probabilities can
  hardly move; temperature 5 leaves room to show the learning."""
  cfg = dataclasses.replace(CFG, lr=0.02, temperature=5.0)
  traces = []

  def counted_update(state, arc, ratio_idx, rewards, cfg):
    traces.append(1)  # Runs once per trace.
    return controller.update(state, arc, ratio_idx, rewards, cfg)

  update = jax.jit(counted_update, static_argnames="cfg")
  state = controller.init_state(jax.random.PRNGKey(0), cfg)
  key = jax.random.PRNGKey(1)
  rewards = []
  for _ in range(250):
    key, sub = jax.random.split(key)
    out = controller.sample_jit(state.params, sub, 10, cfg)
    reward = jnp.mean(out["arc"][:, 1::2] == space.AVG, axis=1)
    state, metrics = update(state, out["arc"], out["ratio_idx"], reward, cfg)
    rewards.append(float(metrics["reward"]))
  first, last = np.mean(rewards[:20]), np.mean(rewards[-20:])
  assert last > first + 0.15, (first, last)
  assert len(traces) == 1 and update._cache_size() == 1


def test_update_jit_does_not_recompile():
  cfg = CFG_ENTROPY
  state = controller.init_state(jax.random.PRNGKey(0), cfg)
  out = controller.sample_jit(state.params, jax.random.PRNGKey(0), 10, cfg)
  state, _ = controller.update_jit(
      state, out["arc"], out["ratio_idx"], jnp.zeros(10), cfg)
  size = controller.update_jit._cache_size()
  for i in range(3):
    out = controller.sample_jit(state.params, jax.random.PRNGKey(i), 10, cfg)
    rewards = jax.random.uniform(jax.random.PRNGKey(10 + i), (10,))
    state, _ = controller.update_jit(state, out["arc"], out["ratio_idx"], rewards, cfg)
  assert controller.update_jit._cache_size() == size
