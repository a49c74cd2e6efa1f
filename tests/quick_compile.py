"""XLA flags for the subprocess pipelines whose time is compiling (a few steps per stage).

LLVM's quick pipeline: `--xla_backend_optimization_level=0` with its expensive passes off.
The programs are the same HLO; measured on an AMD EPYC Zen 4, one process with two devices
running multihost_test's PIPELINE took 62 s of CPU against 87 s, and that file's pipeline
test 207 against 281 s (bench/results/suite_profile_notes.md). The generated code rounds
differently from the default pipeline in places (two in-process tolerance tests fail under
it), so it is used only where runs are compared with runs under the same flags, or only
whether they finish is checked: never for the in-process invariant tests, which check the
code users run.
"""
FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_flags(devices=None):
  """XLA_FLAGS for a subprocess: FLAGS, and `devices` forced CPU devices when given."""
  forced = [] if devices is None else [f"--xla_force_host_platform_device_count={devices}"]
  return " ".join(forced + [FLAGS])
