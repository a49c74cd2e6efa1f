"""The search stage: supernet epochs, controller updates, the final choice.

Each epoch trains the shared child with a freshly sampled architecture every
step, then makes `controller_updates` REINFORCE updates over
`controller_samples` architectures each, rewarded on validation minibatches
(unmasked TrainAcc and masked PruneAcc on the same batch). All state lives in
one pytree; batches and controller keys are pure functions of (seed, position).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fp_jax import config as config_lib
from fp_jax import controller
from fp_jax import data
from fp_jax import parallel
from fp_jax import pruning
from fp_jax import reward as reward_lib
from fp_jax import schedules
from fp_jax import space
from fp_jax import supernet
from fp_jax.parallel import AXIS, BATCH, REPLICATED


def xent(logits, labels):
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))


def controller_config(config, num_ratio_choices):
  c = config.controller
  return controller.ControllerConfig(
      num_ratio_choices=num_ratio_choices, lstm_size=c.lstm_size, temperature=c.temperature,
      tanh_constant=c.tanh_constant, op_tanh_reduce=c.op_tanh_reduce,
      entropy_weight=c.entropy_weight, baseline_decay=c.baseline_decay, lr=c.lr)


def _opt_key(s, steps_per_epoch):
  return (steps_per_epoch, s.lr_t0, s.lr_tmul, s.lr_max, s.lr_min, s.momentum, s.l2, s.grad_clip)


def child_optimizer(s, steps_per_epoch):
  """(optax transform, lr schedule) of the supernet: L2, clipping, Nesterov SGDR."""
  return _optimizer(_opt_key(s, steps_per_epoch))


def _optimizer(opt):
  spe, t0, tmul, lr_max, lr_min, momentum, l2, clip = opt
  schedule = schedules.cosine_restarts(spe, t0, tmul, lr_max, lr_min)
  tx = optax.chain(optax.add_decayed_weights(2 * l2), optax.clip_by_global_norm(clip),
                   optax.sgd(schedule, momentum=momentum, nesterov=True))
  return tx, schedule


def make_child_step(plan, tx, aux_weight, mesh):
  """Data-parallel supernet step: (child_state, arc, x, y) -> (child_state, metrics)."""
  def step(state, arc, x, y):
    def loss_fn(params):
      logits, aux = supernet.forward(plan, params, arc, x, AXIS)
      ce = xent(logits, y)
      loss = ce + aux_weight * xent(aux, y) if aux is not None else ce
      acc = jnp.mean(jnp.argmax(logits, -1) == y)
      return jax.lax.pmean(loss, AXIS), jax.lax.pmean((ce, acc), AXIS)

    (_, (ce, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state}, {"loss": ce, "acc": acc}

  return parallel.data_parallel(step, mesh, (REPLICATED, REPLICATED, BATCH, BATCH),
                                (REPLICATED, REPLICATED), donate_argnums=(0,))


def make_reward_eval(plan, criterion, mesh):
  """(params, arc, ratios [5], x, y) -> (train_acc, prune_acc) on one batch."""
  def evaluate(params, arc, ratios, x, y):
    acc = lambda p: jax.lax.pmean(jnp.mean(
        jnp.argmax(supernet.forward(plan, p, arc, x, AXIS, with_aux=False)[0], -1) == y), AXIS)
    masks = pruning.supernet_masks(plan, params, arc, ratios, criterion)
    return acc(params), acc(pruning.apply_supernet_masks(plan, params, arc, masks))

  return parallel.data_parallel(evaluate, mesh, (REPLICATED,) * 3 + (BATCH, BATCH),
                                (REPLICATED, REPLICATED))


@functools.lru_cache(maxsize=8)
def _steps(plan, mesh, opt, aux_weight, criterion):
  """Optimizer and compiled steps, shared by every Search with the same settings."""
  tx, schedule = _optimizer(opt)
  return (tx, schedule, make_child_step(plan, tx, aux_weight, mesh),
          make_reward_eval(plan, criterion, mesh))


@dataclasses.dataclass
class Search:
  """Everything static about one search run (built from config and data)."""
  config: object
  ds: data.Dataset
  plan: object
  mesh: object
  ccfg: controller.ControllerConfig
  ratio_choices: np.ndarray
  steps_per_epoch: int
  tx: object
  schedule: object
  child_step: object
  reward_eval: object
  reward_fn: object

  @classmethod
  def build(cls, config, ds, ratio_choices, mesh=None):
    s = config.search
    mesh = mesh or parallel.make_mesh()
    parallel.check_batch(s.batch_size, "search.batch_size", mesh)
    parallel.check_batch(s.eval_batch_size, "search.eval_batch_size", mesh)
    if len(ds.y_valid) < s.eval_batch_size:
      raise config_lib.ConfigError(f"data.valid_size={len(ds.y_valid)}: must be >= "
                       f"search.eval_batch_size={s.eval_batch_size}")
    spe = s.steps_per_epoch or data.batches_per_epoch(len(ds.y_train), s.batch_size)
    plan = supernet.make_plan(s.num_layers, s.out_filters, ds.image_shape, ds.num_classes)
    tx, schedule, child_step, reward_eval = _steps(plan, mesh, _opt_key(s, spe), s.aux_weight,
                                                   s.importance)
    return cls(config, ds, plan, mesh, controller_config(config, len(ratio_choices)),
               np.asarray(ratio_choices, np.float32), spe, tx, schedule, child_step,
               reward_eval, reward_lib.make(s.alpha, s.beta))

  def init_state(self):
    k_child, k_ctrl = jax.random.split(jax.random.key(self.config.seed))
    params = supernet.init(k_child, self.plan)
    child = parallel.replicate(self.mesh, {"params": params, "opt_state": self.tx.init(params)})
    return {"child": child, "controller": controller.init_state(k_ctrl, self.ccfg), "epoch": 0}

  def _key(self, purpose, *ints):
    key = jax.random.fold_in(jax.random.key(self.config.seed), purpose)
    for i in ints:
      key = jax.random.fold_in(key, i)
    return key

  def _batch(self, x, y, step, batch_size, stream, augment):
    c = self.config.data
    xb, yb = data.train_batch(
        x, y, step=step, batch_size=batch_size, seed=self.config.seed, stream=stream,
        mean=self.ds.mean, std=self.ds.std, crop_pad=c.crop_pad if augment else 0,
        flip=c.flip and augment, process_index=jax.process_index(),
        process_count=jax.process_count())
    return parallel.shard(self.mesh, (xb, yb))

  def evaluate_sample(self, params, arc, ratio_idx, position, stream=1):
    """Reward fields of one architecture on validation batch `position`."""
    ratios = self.ratio_choices[np.asarray(ratio_idx)]
    x, y = self._batch(self.ds.x_valid, self.ds.y_valid, position,
                       self.config.search.eval_batch_size, stream, augment=False)
    train_acc, prune_acc = self.reward_eval(params, jnp.asarray(arc), jnp.asarray(ratios), x, y)
    ratio = float(sum(ratios[spec.stage] for spec in self.plan.cells))
    out = self.reward_fn(float(train_acc), float(prune_acc), ratio)
    return dict(arc=[int(a) for a in arc], ratios=[float(r) for r in ratios], **out)

  def run_epoch(self, state, on_sample=None):
    """One epoch of child steps and controller updates; returns (state, metrics)."""
    s, epoch = self.config.search, state["epoch"]
    ctrl = state["controller"]
    if epoch < s.uniform_child_epochs:   # supernet warm-up on uniformly sampled arcs
      rng = np.random.default_rng([self.config.seed, 3, epoch])
      arcs = np.stack([space.sample_uniform(rng) for _ in range(self.steps_per_epoch)])
    else:
      arcs = np.asarray(controller.sample_jit(ctrl["params"], self._key(0, epoch),
                                              self.steps_per_epoch, self.ccfg)["arc"])
    child, losses, accs = state["child"], [], []
    t0 = time.perf_counter()
    for i in range(self.steps_per_epoch):
      step = epoch * self.steps_per_epoch + i
      x, y = self._batch(self.ds.x_train, self.ds.y_train, step, s.batch_size, 0, True)
      child, m = self.child_step(child, jnp.asarray(arcs[i]), x, y)
      losses.append(m["loss"])
      accs.append(m["acc"])
    losses, accs = np.asarray(jax.device_get(losses)), np.asarray(jax.device_get(accs))
    images_per_sec = self.steps_per_epoch * s.batch_size / (time.perf_counter() - t0)

    samples, cmetrics = [], {}
    for u in range(s.controller_updates):
      update = epoch * s.controller_updates + u
      sampled = controller.sample_jit(ctrl["params"], self._key(1, update),
                                      s.controller_samples, self.ccfg)
      batch = []
      for m in range(s.controller_samples):
        r = self.evaluate_sample(child["params"], np.asarray(sampled["arc"][m]),
                                 np.asarray(sampled["ratio_idx"][m]),
                                 update * s.controller_samples + m)
        r["step"] = (epoch + 1) * self.steps_per_epoch
        batch.append(r)
      rewards = jnp.asarray([r["reward"] for r in batch], jnp.float32)
      ctrl, cmetrics = controller.update_jit(ctrl, sampled["arc"], sampled["ratio_idx"],
                                             rewards, self.ccfg)
      samples += batch
      if on_sample:
        for r in batch:
          on_sample(r)
    step = (epoch + 1) * self.steps_per_epoch
    mean = lambda k: float(np.mean([r[k] for r in samples])) if samples else None
    metrics = {
        "step": step, "epoch": epoch + 1, "child_loss": float(losses.mean()),
        "child_acc": float(accs.mean()), "lr": float(self.schedule(step - 1)),
        "reward": mean("reward"), "train_acc": mean("train_acc"),
        "prune_acc": mean("prune_acc"), "gap": mean("gap"), "ratio": mean("ratio"),
        "baseline": float(ctrl["baseline"]),
        "entropy": float(cmetrics["entropy"]) if cmetrics else None,
        "images_per_sec": images_per_sec}
    return {"child": child, "controller": ctrl, "epoch": epoch + 1}, metrics, samples

  def choose(self, state, samples):
    """Re-evaluates the best distinct samples on more batches; returns arch.json."""
    s = self.config.search
    seen, cands = set(), []
    for r in sorted(samples, key=lambda r: -r["reward"]):
      key = (tuple(r["arc"]), tuple(r["ratios"]))
      if key not in seen:
        seen.add(key)
        cands.append(r)
      if len(cands) == s.num_candidates:
        break
    if not cands:   # no controller updates were run: take the controller's mode
      sampled = controller.sample_jit(state["controller"]["params"], self._key(2), 1, self.ccfg)
      cands = [{"arc": np.asarray(sampled["arc"][0]).tolist(),
                "ratios": self.ratio_choices[np.asarray(sampled["ratio_idx"][0])].tolist()}]
    best = None
    idx_of = {float(v): i for i, v in enumerate(self.ratio_choices)}
    for c in cands:
      ratio_idx = [idx_of[float(np.float32(r))] for r in c["ratios"]]
      evals = [self.evaluate_sample(state["child"]["params"], np.asarray(c["arc"]), ratio_idx,
                                    b, stream=2) for b in range(s.final_eval_batches)]
      avg = {k: float(np.mean([e[k] for e in evals]))
             for k in ("train_acc", "prune_acc", "gap", "ratio", "reward")}
      logging.info("candidate reward %.4f train_acc %.4f prune_acc %.4f ratios %s",
                   avg["reward"], avg["train_acc"], avg["prune_acc"], c["ratios"])
      if best is None or avg["reward"] > best[1]["reward"]:
        best = (c, avg)
    c, avg = best
    arc = np.asarray(c["arc"])
    normal, reduce = space.split(arc)
    return {"normal": normal.tolist(), "reduce": reduce.tolist(),
            "arc_string": space.arc_to_string(arc), "ratios": c["ratios"], **avg,
            "candidates_evaluated": len(cands), "eval_batches": s.final_eval_batches}


def _append_jsonl(path, record):
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")


def run(config, workdir, ds, ratio_choices):
  """Runs the search stage, writing DIR/search/{metrics,samples}.jsonl and arch.json."""
  out = os.path.join(workdir, "search")
  os.makedirs(out, exist_ok=True)
  search = Search.build(config, ds, ratio_choices)
  state = search.init_state()
  is_main = jax.process_index() == 0
  metrics_path, samples_path = (os.path.join(out, n) for n in ("metrics.jsonl", "samples.jsonl"))
  if is_main:
    for p in (metrics_path, samples_path):
      open(p, "w").close()
  last_samples = []
  logging.info("search: %d epochs x %d steps, %d devices", config.search.epochs,
               search.steps_per_epoch, jax.device_count())
  for epoch in range(config.search.epochs):
    t = time.perf_counter()
    state, metrics, last_samples = search.run_epoch(
        state, on_sample=(lambda r: _append_jsonl(samples_path, r)) if is_main else None)
    if is_main:
      _append_jsonl(metrics_path, metrics)
    logging.info("search epoch %d/%d (%.1fs): loss %.4f acc %.3f reward %s ratio %s "
                 "prune_acc %s %.0f img/s", epoch + 1, config.search.epochs,
                 time.perf_counter() - t, metrics["child_loss"], metrics["child_acc"],
                 _fmt(metrics["reward"]), _fmt(metrics["ratio"]), _fmt(metrics["prune_acc"]),
                 metrics["images_per_sec"])
  arch = search.choose(state, last_samples)
  if is_main:
    with open(os.path.join(out, "arch.json"), "w") as f:
      json.dump(arch, f, indent=1)
  logging.info("search: chose %s ratios %s\n%s", arch["arc_string"], arch["ratios"],
               space.render_arc(np.asarray(arch["normal"] + arch["reduce"])))
  return arch


def _fmt(v):
  return "-" if v is None else f"{v:.4f}"
