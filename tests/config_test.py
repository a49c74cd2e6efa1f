"""fp_jax/config.py: one table of fields (FIELDS) drives validation; configs/sweep.py variants."""
import glob
import importlib
import os
import subprocess
import sys

import ml_collections
import pytest

from configs import default
from configs import sweep
from fp_jax import config as config_lib
from fp_jax import data
from fp_jax.infer import fused
from fp_jax.models import controller
from fp_jax.models import slot_ops
from fp_jax.models import supernet
from fp_jax.models import supernet_flops
from fp_jax.pruning import importance
from fp_jax.run import precision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
               if not p.endswith(("__init__.py", "sweep.py")))


def _variants():
  """(file, variant) of every experiment config: each Sweep variant, else get_config()."""
  out = []
  for name in FILES:
    mod = importlib.import_module(f"configs.{name}")
    out += [(name, v) for v in mod.SWEEP.variants()] if hasattr(mod, "SWEEP") else [(name, None)]
  return out


def _config(name, variant):
  mod = importlib.import_module(f"configs.{name}")
  return mod.get_config() if variant is None else mod.get_config(variant)


def test_the_table_is_the_fields_of_default_py():
  assert set(config_lib.fields(default.get_config())) == set(config_lib.FIELDS)
  assert FILES == ["cifar", "default", "fashion", "smoke"]


@pytest.mark.parametrize("name,variant", _variants())
def test_every_config_file_and_variant_validates(name, variant):
  config = _config(name, variant)
  assert set(config_lib.fields(config)) == set(config_lib.FIELDS)
  config_lib.validate(config)


def test_choices_come_from_the_modules_that_implement_them():
  f = config_lib.FIELDS
  assert f["search.importance"].values is importance.CRITERIA
  assert f["compress.importance"].values is importance.CRITERIA
  assert f["search.ratio_measure"].values is supernet_flops.MEASURES
  assert f["search.policy"].values is controller.POLICIES
  assert f["search.init_scale"].values is supernet.INITS
  assert f["search.final_init"].values is supernet.FINAL_INITS
  assert f["search.dispatch"].values is slot_ops.DISPATCHES
  assert f["latency.dots"].values is fused.DOT_LIBRARIES
  assert f["latency.engine"].values is fused.ENGINES
  assert f["dtype"].values is precision.DTYPES
  assert f["data.name"].allowed is data.ALLOWED


# a value each kind of field refuses, and the words of what it allows
BAD = {config_lib.Int: ("x", "must be an integer"), config_lib.Float: ("x", "must be a number"),
       config_lib.Choice: ("no_such_choice", "must be one of ")}
PARSED_BAD = {"stages": ("serch", "allowed: search, final"), "data.name": ("", "digits"),
              "search.ratio_choices": ("x", "numbers in [0, 1)"),
              "final.arc": ("1 2 3", "40 ints"), "compress.ratios": ("0.5", "5 numbers"),
              "latency.threads": (-1, "an integer >= 0"),
              "search.latency_table_dir": (3, "a folder path")}


@pytest.mark.parametrize("path", list(config_lib.FIELDS))
def test_every_field_refuses_a_bad_value_naming_itself_and_what_is_allowed(path):
  spec = config_lib.FIELDS[path]
  if spec is config_lib.BOOL or spec is config_lib.FOLDER:
    value, needle = ("yes" if spec is config_lib.BOOL else 3), spec.allowed
  else:
    value, needle = PARSED_BAD[path] if isinstance(spec, config_lib.Parsed) else BAD[type(spec)]
  config = ml_collections.ConfigDict(default.get_config().to_dict(), type_safe=False)
  section, _, key = path.rpartition(".")
  (config[section] if section else config)[key] = value
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  assert str(e.value).startswith(path) and needle in str(e.value), str(e.value)


@pytest.mark.parametrize("spec,good,bad,message", [
    (config_lib.Int(1, 4), [1, 4], [0, 5, 2.0, True], "must be an integer in 1..4"),
    (config_lib.Int(0), [0, 10 ** 9], [-1], "must be an integer >= 0"),
    (config_lib.Float(0.0, 1.0, lo_open=True), [1e-9, 1, 0.5], [0.0, 1.5, "1", False],
     "must be > 0.0 and <= 1.0"),
    (config_lib.Choice(("a", "b")), ["a", "b"], ["c", None], "must be one of a, b"),
    (config_lib.BOOL, [True, False], [1, "True"], "must be True or False")])
def test_kinds_of_fields(spec, good, bad, message):
  for v in good:
    spec.check("x.y", v)
  for v in bad:
    with pytest.raises(config_lib.ConfigError, match=r"^x\.y="):
      spec.check("x.y", v)
  with pytest.raises(config_lib.ConfigError, match=message.replace(".", r"\.")):
    spec.check("x.y", bad[0])


def test_unknown_and_missing_fields():
  config = default.get_config()
  config.search.warmup_epochs = 3
  with pytest.raises(config_lib.ConfigError, match=r"^search\.warmup_epochs: unknown field"):
    config_lib.validate(config)
  config = default.get_config()
  del config.latency["threads"]
  with pytest.raises(config_lib.ConfigError, match=r"^latency\.threads: missing from the config"):
    config_lib.validate(config)


def test_a_config_file_with_an_unknown_field_is_one_error_line(tmp_path):
  path = tmp_path / "extra.py"
  path.write_text("from configs import smoke\n\n\ndef get_config():\n"
                  "  config = smoke.get_config()\n  config.search.warmup = 1\n  return config\n")
  proc = subprocess.run([sys.executable, "-m", "fp_jax.main", f"--config={path}",
                         f"--workdir={tmp_path / 'run'}", "--config.stages=profile"], cwd=ROOT,
                        env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert lines == ["error: search.warmup: unknown field (the fields are configs/default.py's)"]
  assert not (tmp_path / "run").exists()


def test_sweep_names_and_parses_variants():
  s = sweep.Sweep("configs/x.py", ("a1_b2", "a0.5_b0"), default="a0.5_b0",
                  options=(("_p",), ("_q", "_r")))
  assert list(s.variants())[:6] == ["a1_b2", "a1_b2_q", "a1_b2_r", "a1_b2_p", "a1_b2_p_q",
                                    "a1_b2_p_r"]
  assert len(s.variants()) == 2 * 2 * 3
  assert s.parse("") == ("a0.5_b0", ("", "")) and s.parse("a1_b2_p_r") == ("a1_b2", ("_p", "_r"))
  with pytest.raises(ValueError, match=r"^configs/x\.py:a1_b2_r_p: unknown variant; allowed: "
                     r"a1_b2, a0\.5_b0, each optionally with _p, then _q or _r$"):
    s.parse("a1_b2_r_p")
  assert sweep.alpha_beta("a0.005_b5") == (0.005, 5.0)
