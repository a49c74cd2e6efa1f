"""Test session set-up: two forced CPU devices (parallelism tests), the CLI's matmul
precision, repo on sys.path, and one persistent compilation cache for the session.

The cache directory is in the environment before JAX is imported, so this process and every
`python -m fp_jax.main` subprocess the tests start read and write it: the many subprocess runs
of the same tiny configs compile each program once. Only a speed-up; a fresh directory per
session, removed at exit.
"""
import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# the matmul precision `python -m fp_jax.main` sets on CPU (precision.AUTO_MATMUL): the stages
# the tests run in this process then compile the programs the CLI runs they start compile
# (the precision is part of the HLO, so of the persistent cache's key)
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "float32")
# no latency table unless a test asks for one (search.latency_table_dir's default reads it):
# searches in tests neither measure blocks nor write to ~/.cache
os.environ.setdefault("FP_JAX_LATENCY_TABLE_DIR", "")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="fp_jax_test_cache_")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
