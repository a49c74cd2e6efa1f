"""The search stage, ENAS's loop: every epoch trains the supernet, then the controller.

Each epoch first makes `steps_per_epoch` supernet steps, a freshly sampled architecture
each, then `controller_updates` REINFORCE updates over `controller_samples`
architectures each, rewarded on validation minibatches (unmasked TrainAcc and masked
PruneAcc on the same batch: train/reward.py). With `search.policy=random` (random search
with weight sharing, Li & Talwalkar 2019) every architecture is drawn uniformly instead
(`controller.sample_random`) and nothing is learned: the controller's state stays at its
init. All state lives in one SearchState; batches, keys and draws are pure functions of
(seed, train/streams.py's names, position). Checkpoints, SIGTERM and resume (DESIGN §3)
are in train/search_state.py.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from fp_jax.run import precision
from fp_jax.run import checkpoint
from fp_jax import config as config_lib
from fp_jax.models import controller
from fp_jax import data
from fp_jax.infer import latency_table
from fp_jax.run import errors
from fp_jax.run import logs
from fp_jax.run import parallel
from fp_jax.run import preemption
from fp_jax.train import reward as reward_lib
from fp_jax.models import slot_ops
from fp_jax.models import space
from fp_jax.models import supernet
from fp_jax.train import search_batches
from fp_jax.train import search_state
from fp_jax.train import search_steps
from fp_jax.train.search_state import SearchState
from fp_jax.train.search_steps import SupernetState, empty_stages
from fp_jax.train.streams import Purpose, Stream
from fp_jax.train import streams


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
  tx: object               # the supernet's optimizer
  schedule: object         # its learning rate by supernet step
  supernet_step: object    # search_steps.make_supernet_step, compiled
  reward_eval: object      # search_steps.make_reward_eval, compiled
  reward_fn: object        # reward.make(alpha, beta)
  batches: object          # search_batches.SearchBatches (data.input)
  latency: object = None   # latency_table.Predictor (samples' latency_ms; measure latency)

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
    dispatch = slot_ops.resolve_dispatch(s.dispatch, jax.default_backend())
    logging.info("search: node slots by %s (search.dispatch=%s on %s)", dispatch, s.dispatch,
                 jax.default_backend())
    tx, supernet_step, reward_eval = search_steps.compiled(
        plan, mesh, search_steps.optimizer_settings(s), s.aux_weight, float(s.keep_prob),
        s.importance, config.dtype, dispatch, round_to=s.round_to)
    schedule = search_steps.supernet_schedule(s, spe)
    empty = empty_stages(plan)
    if empty:
      logging.warning("search: stage(s) %s hold no cell at search.num_layers=%d; their "
                      "ratios are fixed at 0 (the policy's choice for them is ignored)",
                      ", ".join(map(str, empty)), s.num_layers)
    return cls(config, ds, plan, mesh, search_steps.controller_config(config, len(ratio_choices)),
               np.asarray(ratio_choices, np.float32), spe, tx, schedule, supernet_step,
               reward_eval, reward_lib.make(s.alpha, s.beta),
               search_batches.build(config, ds, plan, mesh, dispatch, supernet_step))

  def init_state(self):
    """The SearchState at the start of the search (epoch 0, nothing done)."""
    k_net, k_ctrl = jax.random.split(jax.random.key(self.config.seed))
    params = supernet.init(k_net, self.plan, self.config.search.init_scale,
                           self.config.search.final_init,
                           self.config.search.share_inputs)
    net = parallel.replicate(self.mesh, SupernetState(params, self.tx.init(params)))
    return SearchState.epoch_start(net, controller.init_state(k_ctrl, self.ccfg), 0, [],
                                   self.steps_per_epoch)

  def key(self, purpose, *ints):
    """The PRNG key of (streams.Purpose `purpose`, ints) for this run's seed."""
    return streams.key(self.config.seed, purpose, *ints)

  def _sample(self, ctrl, num, purpose, *ints):
    """`num` architectures of search.policy for (purpose, ints): {'arc', 'ratio_idx'}.

    controller: `controller.sample` with key `key(purpose, *ints)`; random: uniform draws
    (`controller.sample_random`) from `streams.rng(seed, purpose, *ints)`.
    """
    if self.config.search.policy == "random":
      return controller.sample_random(streams.rng(self.config.seed, purpose, *ints), num,
                                      len(self.ratio_choices))
    return controller.sample_jit(ctrl.params, self.key(purpose, *ints), num, self.ccfg)

  def _batch(self, x, y, step, batch_size, stream, augment):   # tests hook it by this name
    return self.batches.host(x, y, step, batch_size, stream, augment)

  def stage_ratios(self, ratio_idx):
    """The 5 stage ratios of the controller's choices; 0 for stages without a cell."""
    used = np.ones(5, bool)
    used[empty_stages(self.plan)] = False
    return np.where(used, self.ratio_choices[np.asarray(ratio_idx)], np.float32(0))

  def evaluate_sample(self, params, arc, ratio_idx, position, stream=Stream.REWARD):
    """The samples.jsonl fields of one policy decision on validation batch `position`."""
    return self.evaluate_ratios(params, arc, self.stage_ratios(ratio_idx), position, stream)

  def evaluate_ratios(self, params, arc, ratios, position, stream=Stream.REWARD):
    """The samples.jsonl fields (reward.evaluate) of `arc` masked at stage `ratios` [5] on
    validation batch `position` of data stream `stream`."""
    s = self.config.search
    batch = self._batch(self.ds.x_valid, self.ds.y_valid, position, s.eval_batch_size, stream,
                        augment=False)
    return reward_lib.evaluate(self.plan, self.reward_eval, self.reward_fn, s.ratio_measure,
                               params, arc, ratios, batch,
                               self.key(Purpose.REWARD_SCORES, stream, position), self.latency)

  def run_epoch(self, state, on_sample=None, hooks=None, progress=False):
    """The rest of epoch `state.epoch`: supernet steps, then controller updates.

    hooks: optional object with `due(state) -> bool`, asked after every supernet step and
      controller update, and `save(state) -> bool`, called with the state when due (True:
      stop here). Nothing non-finite reaches `save`: a non-finite supernet loss raises
      search_state.NonFinite first.
    progress: show a progress bar (log lines when not on a terminal) for the supernet steps.

    Returns:
      (state, metrics, samples): the state at the next epoch's start, the epoch's metrics and
      rewarded samples; or (the mid-epoch state, None, samples so far) when hooks stopped it.
    """
    state, stopped, timing = self.train_supernet(state, hooks, progress)
    if not stopped:
      state, stopped = self.train_controller(state, on_sample, hooks)
    if stopped:
      return state, None, state.samples
    samples = state.samples
    step = (state.epoch + 1) * self.steps_per_epoch
    mean = lambda k: float(np.mean([r[k] for r in samples])) if samples else None
    metrics = {
        "step": step, "epoch": state.epoch + 1, "child_loss": float(state.losses.mean()),
        "child_acc": float(state.accs.mean()), "lr": float(self.schedule(step - 1)),
        "reward": mean("reward"), "train_acc": mean("train_acc"),
        "prune_acc": mean("prune_acc"), "gap": mean("gap"), "ratio": mean("ratio"),
        "baseline": float(state.controller.baseline), "entropy": state.entropy, **timing}
    return (SearchState.epoch_start(state.supernet, state.controller, state.epoch + 1, samples,
                                    self.steps_per_epoch), metrics, samples)

  def _epoch_arcs(self, state):
    """int [steps_per_epoch, 40]: the architectures of the epoch's supernet steps."""
    s, spe = self.config.search, self.steps_per_epoch
    if state.epoch < s.uniform_child_epochs or s.policy == "random":   # uniform (warm-up)
      rng = streams.rng(self.config.seed, Purpose.UNIFORM_ARCS, state.epoch)
      return np.stack([space.sample_uniform(rng) for _ in range(spe)])
    return np.asarray(controller.sample_jit(state.controller.params,
                                            self.key(Purpose.SUPERNET_ARCS, state.epoch), spe,
                                            self.ccfg)["arc"])

  def train_supernet(self, state, hooks=None, progress=False):
    """The epoch's remaining supernet steps, a sampled architecture each.

    Returns (state, stopped by hooks, {'images_per_sec', 'step_time'} of the steps made)."""
    s, epoch, spe = self.config.search, state.epoch, self.steps_per_epoch
    losses, accs, first = state.losses.copy(), state.accs.copy(), state.steps
    pending = []   # supernet steps whose loss is not read yet (one step of lag keeps the
                   # device busy while the host prepares the next batch)

    def resolve(keep=0):
      while len(pending) > keep:
        i, m = pending.pop(0)
        loss, acc = float(m["loss"]), float(m["acc"])
        if not math.isfinite(loss):
          raise search_state.NonFinite(
              f"search: child loss is {loss} at step {epoch * spe + i + 1} "
              f"(epoch {epoch + 1}, step {i + 1} of {spe})")
        losses[i], accs[i] = loss, acc

    bar = logs.Progress(spe, f"search epoch {epoch + 1}/{s.epochs}", initial=first,
                        enabled=progress)
    t0, stopped = time.perf_counter(), False
    inputs = self.batches.supernet(self, range(epoch * spe + first, (epoch + 1) * spe))
    try:
      arcs = self._epoch_arcs(state) if first < spe else None
      for i in range(first, spe):
        step_fn, args = next(inputs)
        g = epoch * spe + i
        net, m = step_fn(state.supernet, jnp.asarray(arcs[i]),
                         self.key(Purpose.SUPERNET_STEP, g), *args,
                         jnp.asarray(self.schedule(g), jnp.float32))
        pending.append((i, m))
        resolve(keep=1)
        state = state.replace(supernet=net, steps=i + 1)   # losses: when saved or returned
        bar.update(1, **({"loss": float(losses[i - 1])} if i > first else {}))
        if hooks is not None and hooks.due(state):
          resolve()
          state = state.replace(losses=losses.copy(), accs=accs.copy())
          if hooks.save(state):
            stopped = True
            break
      resolve()
    finally:
      inputs.close()
      bar.close()
    state = state.replace(losses=losses, accs=accs)
    elapsed, timed = time.perf_counter() - t0, state.steps - first
    return state, stopped, {"images_per_sec": timed * s.batch_size / elapsed if timed else None,
                            "step_time": elapsed / timed if timed else None}

  def train_controller(self, state, on_sample=None, hooks=None):
    """The epoch's remaining controller updates, each over controller_samples rewarded
    architectures (random policy: the same draws and rewards, nothing learned).

    Returns (state, stopped by hooks)."""
    s, spe, epoch = self.config.search, self.steps_per_epoch, state.epoch
    for u in range(state.updates, s.controller_updates):
      update = epoch * s.controller_updates + u
      sampled = self._sample(state.controller, s.controller_samples, Purpose.UPDATE_SAMPLES,
                             update)
      batch = tuple(
          {**self.evaluate_sample(state.supernet.params, np.asarray(sampled["arc"][m]),
                                  np.asarray(sampled["ratio_idx"][m]),
                                  update * s.controller_samples + m),
           "step": (epoch + 1) * spe,
           "update": update + 1}   # the controller update this sample was used in
          for m in range(s.controller_samples))
      ctrl = state.controller
      if s.policy == "random":   # nothing learned; the uniform policy's exact entropy
        entropy = controller.random_entropy(len(self.ratio_choices))
      else:
        rewards = jnp.asarray([r["reward"] for r in batch], jnp.float32)
        ctrl, cmetrics = controller.update_jit(ctrl, sampled["arc"], sampled["ratio_idx"],
                                               rewards, self.ccfg)
        entropy = float(cmetrics["entropy"])
      state = state.replace(controller=ctrl, updates=u + 1, samples=state.samples + batch,
                            entropy=entropy)
      if on_sample:
        for r in batch:
          on_sample(r)
      if hooks is not None and hooks.due(state) and hooks.save(state):
        return state, True
    return state, False

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
    if not cands:   # no controller updates were run: one sample of the policy
      sampled = self._sample(state.controller, 1, Purpose.CHOOSE_SAMPLE)
      cands = [{"arc": np.asarray(sampled["arc"][0]).tolist(),
                "ratios": self.stage_ratios(sampled["ratio_idx"][0]).tolist()}]
    best = None
    for c in cands:
      evals = [self.evaluate_ratios(state.supernet.params, np.asarray(c["arc"]), c["ratios"],
                                    b, Stream.CHOOSE) for b in range(s.final_eval_batches)]
      avg = {k: float(np.mean([e[k] for e in evals]))
             for k in ("train_acc", "prune_acc", "gap", "ratio", "reward", "macs",
                       "masked_macs", "latency_ms", "masked_latency_ms") if k in evals[0]}
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


def run(config, workdir, ds, ratio_choices):
  """Runs (or resumes) the search stage: DIR/search/{metrics,samples}.jsonl, tb/, ckpt/, arch.json
  (and latency_table.json, the deployed network's latency table: infer/latency_table.py).

  SIGTERM at any point (start-up included) stops the run after its next step with a
  checkpoint: `preemption.Preempted` (a SystemExit with status 0) is raised.
  """
  with preemption.Preemption(sync_every=config.preemption_sync_steps) as preempt:
    return _run(config, workdir, ds, ratio_choices, preempt)


def _run(config, workdir, ds, ratio_choices, preempt):
  s = config.search
  out = os.path.join(workdir, "search")
  os.makedirs(out, exist_ok=True)
  search = Search.build(config, ds, ratio_choices)
  is_main = jax.process_index() == 0
  ckpt_dir = os.path.join(out, "ckpt")
  every = s.ckpt_every_steps
  if config.overwrite:
    checkpoint.clear(ckpt_dir)
  metrics_w = logs.MetricsWriter(out, "metrics", enabled=is_main)
  samples_w = logs.MetricsWriter(out, "samples", enabled=is_main, tensorboard=False)
  ckpt = checkpoint.Checkpointer(ckpt_dir, keep=2)
  hooks = search_state.Checkpoints(search, ckpt, preempt, every)

  def stop():
    how = ("rerun the same command without --config.overwrite=True to resume (with it, the "
           "search starts afresh)" if config.overwrite else "rerun the same command to resume")
    return preemption.Preempted(
        f"search: stopped by {preempt.signal_name or 'request'} after saving checkpoint "
        f"{hooks.last[0]} in {ckpt_dir}; {how}")

  latest, table_info = None, None
  try:
    latest = ckpt.latest_step()
    # the deployed network's latency table: built (or read from its cache) on a fresh
    # start, the run's own copy on a resume
    search.latency, table_info = latency_table.for_search(
        config, ds.image_shape, ds.num_classes, ratio_choices, out, resume=latest is not None)
    if latest is None:
      state = search.init_state()
      metrics_w.reset()
      samples_w.reset()
      if is_main and os.path.exists(os.path.join(out, "arch.json")):   # overwrite=True
        os.remove(os.path.join(out, "arch.json"))   # stale now; lets a rerun resume
      logging.info("search: %d epochs x %d steps, %d devices; checkpoints in %s", s.epochs,
                   search.steps_per_epoch, jax.device_count(), ckpt_dir)
    else:
      state = search_state.restore(search, ckpt, latest)
      metrics_w.truncate_after(state.epoch * search.steps_per_epoch)   # one line per epoch
      # updates done so far (the controller's step, which search.policy=random leaves at 0)
      samples_w.truncate_after(state.epoch * s.controller_updates + state.updates,
                               key="update")
      logging.info("search: resuming from checkpoint %d in %s: %d of %d epochs done, then "
                   "%d/%d supernet steps and %d/%d controller updates", latest, ckpt_dir,
                   state.epoch, s.epochs, state.steps, search.steps_per_epoch,
                   state.updates, s.controller_updates)
    bar = logs.Progress(s.epochs, "search", initial=state.epoch, unit="epoch",
                        enabled=is_main)
    try:
      while state.epoch < s.epochs:
        t = time.perf_counter()
        state, metrics, _ = search.run_epoch(state, on_sample=samples_w.write, hooks=hooks,
                                             progress=is_main)
        if metrics is None:   # stopped by SIGTERM, after saving
          raise stop()
        metrics_w.write(metrics)   # before the checkpoint: a resume truncates it if need be
        hooks.save(state)
        bar.update(1, reward=metrics["reward"], loss=metrics["child_loss"])
        logging.info("search epoch %d/%d (%.1fs): loss %.4f acc %.3f reward %s ratio %s "
                     "prune_acc %s %s img/s", state.epoch, s.epochs,
                     time.perf_counter() - t, metrics["child_loss"], metrics["child_acc"],
                     _fmt(metrics["reward"]), _fmt(metrics["ratio"]),
                     _fmt(metrics["prune_acc"]), _fmt(metrics["images_per_sec"], ".0f"))
        if preempt.requested:
          raise stop()
    finally:
      bar.close()
  except search_state.NonFinite as e:
    kept = ckpt.latest_step()
    raise errors.RunError(
        f"{e}; stopped without saving it: " +
        (f"the last good checkpoint ({kept}) in {ckpt_dir} is kept" if kept is not None else
         "no checkpoint had been saved") +
        f". Lower search.lr_max (now {s.lr_max:g}) or check the data, then rerun"
        f"{ckpt.resume_note(latest)}") from None
  finally:
    ckpt.close()
    metrics_w.close()
    samples_w.close()
  arch = search.choose(state, state.last_samples)
  arch["matmul_precision"] = precision.matmul_precision()
  if table_info:
    arch["latency_table"] = table_info
  if is_main:
    path = os.path.join(out, "arch.json")
    with open(path + ".tmp", "w") as f:
      json.dump(arch, f, indent=1)
    os.replace(path + ".tmp", path)
  logging.info("search: chose %s ratios %s\n%s", arch["arc_string"], arch["ratios"],
               space.render_arc(np.asarray(arch["normal"] + arch["reduce"])))
  return arch


def _fmt(v, spec=".4f"):
  return "-" if v is None else format(v, spec)
