"""fp_jax: ENAS search with fake pruning.

  python -m fp_jax.main --config=configs/cifar.py --workdir=DIR [--config.search.alpha=0.5]

Bad input ends with one `error: ...` line on stderr and exit status 2.
"""
from __future__ import annotations

import os
import re
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from fp_jax import config as config_lib
from fp_jax import data
from fp_jax.run import errors
from fp_jax.run import parallel
from fp_jax.run import weights

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Work directory for results and checkpoints.")
flags.DEFINE_string("coordinator_address", "",
                    "Multi-host: jax.distributed coordinator HOST:PORT (process 0's host), or "
                    "'auto' to detect a Cloud TPU pod, SLURM or Open MPI job.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes (>= 1).")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's id in [0, num_processes).")


class UsageError(Exception):
  pass


def _error_barrier(timeout_s=10):
  """Waits (at most timeout_s) for the other processes to fail too: a config error is seen
  by every process alike, and process 0 hosts the coordination service, so leaving first
  would kill peers still starting up (a traceback instead of their own error line).
  Processes stuck in a collective never arrive; the timeout lets this one go anyway."""
  try:
    from jax._src import distributed   # pylint: disable=g-import-not-at-top
    distributed.global_state.client.wait_at_barrier("fp_jax_error_exit", timeout_s * 1000)
  except Exception:   # pylint: disable=broad-except  # timed out or no client: leave anyway
    pass


def fail(message):
  message = str(message).replace("\\n", " ").replace("\\'", "'")
  print(f"error: {' '.join(message.split())}", file=sys.stderr)
  if _multi_process():
    # sys.exit would wait at jax's shutdown barrier for processes stuck in collectives
    sys.stderr.flush()
    sys.stdout.flush()
    _error_barrier()
    os._exit(2)
  sys.exit(2)


def _multi_process():
  if "jax" not in sys.modules:
    return False
  import jax
  return jax.distributed.is_initialized() and jax.process_count() > 1


def _flag_error(e, argv=()):
  text = str(e.args[0] if e.args else e).replace("\\n", " ").replace("\\'", "'")
  if "Error whilst parsing config file" in text:  # get_config raised: keep its last line
    last = text.strip().splitlines()[-1].strip()
    return re.sub(r"^\w+(Error|Exception): ", "", last)

  def field(key):  # the full dotted path of the override that named `key`
    for a in argv[1:]:
      m = re.match(r"--config\.([\w.]+)", a)
      if m and key in m.group(1).split("."):
        return f"--config.{m.group(1)}"
    return "--config"

  unknown = re.search(r"(\w+)\W+Did you mean \"(\w+)\"", text)
  if unknown:
    return (f"{field(unknown.group(1))}: unknown field {unknown.group(1)!r} "
            f"(did you mean {unknown.group(2)!r}?)")
  unknown = re.fullmatch(r"\W*(\w+)\W*", text)
  if unknown:
    return f"{field(unknown.group(1))}: unknown field {unknown.group(1)!r}"
  if text.startswith("flag --"):  # absl: "flag --config.x=v: reason"
    head, _, reason = text[len("flag "):].partition(": ")
    for pattern, allowed in (("to float", "must be a number"), ("for int()", "must be an integer"),
                             ("Non-boolean", "must be True or False")):
      if pattern in reason:
        return f"{head}: {allowed}"
    return text[len("flag "):]
  return text if text.startswith("--") or "config" not in text else f"--config: {text}"


def parse_flags(argv):
  """absl flag parsing, with every flag or config-override error reduced to one `error:` line."""
  try:
    return FLAGS(argv)
  except Exception as e:  # flags.Error, or errors raised overriding the config file
    fail(_flag_error(e, argv))


DONE_FILE = {"search": "search/arch.json", "final": "final/result.json",
             "compress": "compress/result.json", "latency": "latency/latency.json",
             "profile": "profile.json"}


BATCH_FIELDS = {"search": ("search.batch_size", "search.eval_batch_size"),
                "final": ("final.batch_size", "final.eval_batch_size"),
                "compress": ("compress.batch_size", "final.eval_batch_size")}


def check_stage_done(path, config, stage):
  if os.path.exists(path) and not config.overwrite:
    raise UsageError(f"stage {stage} already finished in {os.path.dirname(path)} "
                     f"({os.path.basename(path)}); pass --config.overwrite=True to redo it")


def _search(config, workdir, ds):
  from fp_jax.train import search
  search.run(config, workdir, ds, config_lib.ratio_choices(config))


def _final(config, workdir, ds):
  from fp_jax.train import final
  final.run(config, workdir, ds)


def _compress(config, workdir, ds):
  from fp_jax.train import compress
  compress.run(config, workdir, ds)


def _latency(config, workdir, ds):
  del ds
  from fp_jax.infer import latency
  latency.run(config, workdir)


def _profile(config, workdir, ds):
  del ds
  from fp_jax import profile
  profile.run(config, workdir)


# in pipeline order (config_lib.stages returns them so)
STAGE_RUN = {"search": _search, "final": _final, "compress": _compress, "latency": _latency,
             "profile": _profile}


def run(config, workdir):
  config_lib.validate(config)
  stages = config_lib.stages(config)
  parallel.init_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test.{os.getpid()}")
    open(probe, "w").close()
    os.remove(probe)
  except OSError as e:
    raise UsageError(f"--workdir={workdir}: not writable ({e.strerror})") from None
  # before config.json: a refused run must change nothing
  for stage in stages:
    check_stage_done(os.path.join(workdir, DONE_FILE[stage]), config, stage)
    for field in BATCH_FIELDS.get(stage, ()):
      parallel.check_batch(config_lib.value(config, field), field)
  import jax  # after distributed start-up
  from fp_jax.run import memory
  from fp_jax.run import precision
  memory.install()    # compile-time heap back to the OS before each step first runs
  config = precision.set_matmul_precision(config)   # "auto" resolved for this backend
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1, sort_keys=True))

  ds = None
  if {"search", "final", "compress"} & set(stages):
    ds = data.load(config.data.name, config.data.valid_size,
                   tfds_data_dir=config.data.tfds_data_dir, idx_dir=config.data.idx_dir)
  for stage in stages:
    STAGE_RUN[stage](config, workdir, ds)
    # process 0 wrote the stage's files (arch.json, weights.npz, ...): every process waits
    # for them before the next stage reads them
    parallel.barrier(f"stage {stage} done")
  if jax.process_index() == 0:
    from fp_jax import summary
    summary.write(workdir)


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    config = FLAGS.config
    _ = config is not None and "seed" in config
  except OSError as e:  # the config file failed to load (config_flags loads it lazily)
    fail(f"--config: {str(e).strip().splitlines()[-1].strip()}")
  if config is None:
    fail("--config is required (e.g. --config=configs/smoke.py)")
  if not FLAGS.workdir:
    fail("--workdir is required")
  try:
    run(config, FLAGS.workdir)
  except (config_lib.ConfigError, data.DataError, weights.WeightsError, errors.RunError,
          UsageError) as e:
    logging.flush()
    fail(str(e).splitlines()[0])
  except Exception:   # a bug: its traceback, and in a multi-process run no wait at jax's
    if not _multi_process():       # shutdown barrier (5 minutes) for peers in collectives:
      raise                        # the launcher ends them once this process has exited
    traceback.print_exc()
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
