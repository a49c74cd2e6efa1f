"""Command-line tests: `python -m fp_jax.main` in a subprocess (profile stage and bad input)."""
import json
import os
import subprocess
import sys

import jax
import ml_collections
import pytest

from fp_jax.models import child
from fp_jax import config as config_lib
from fp_jax.models import flops
from fp_jax.models import space

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "--config=configs/smoke.py"


def _run(*args, timeout=120):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "fp_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _error_line(proc):
  """The single `error:` line of a failed run; asserts the failure is clean."""
  assert proc.returncode != 0, proc.stdout + proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1, proc.stderr
  return lines[0]


def test_profile_stage(tmp_path):
  workdir = tmp_path / "run"
  proc = _run(SMOKE, f"--workdir={workdir}", "--config.stages=profile",
              f"--config.final.arc={space.ENAS_ARC}")
  assert proc.returncode == 0, proc.stderr
  with open(workdir / "profile.json") as f:
    result = json.load(f)
  arc = space.parse_arc(space.ENAS_ARC)
  plan = child.make_plan(arc, 3, 8, (8, 8, 1), 10)   # smoke: final 3 layers, F 8, digits
  counts = flops.count(plan)
  for key in ("macs", "params", "params_no_aux", "aux_macs"):
    assert result[key] == counts[key], key
  params, _ = jax.eval_shape(lambda: child.init(jax.random.key(0), plan))
  assert result["params"] == flops.param_count(params)
  assert result["arc_string"] == space.ENAS_ARC
  assert (result["num_layers"], result["out_filters"]) == (3, 8)
  assert result["image_shape"] == [8, 8, 1] and result["num_classes"] == 10
  assert f"{counts['macs'] / 1e6:.2f}M multiply-adds" in proc.stdout
  with open(workdir / "config.json") as f:
    config = json.load(f)
  assert config["stages"] == "profile"
  assert config["final"]["arc"] == space.ENAS_ARC
  assert config["data"]["name"] == "digits"
  assert config["final"]["num_layers"] == 3 and config["final"]["out_filters"] == 8
  assert not (workdir / "search").exists()
  summary = (workdir / "summary.md").read_text()      # the counts, not only a header
  assert f"- arc: `{space.ENAS_ARC}`" in summary
  assert f"multiply-adds per image: {counts['macs'] / 1e6:.3f} M" in summary
  assert f"{counts['aux_macs'] / 1e6:.3f} M more" in summary
  assert (f"params: {counts['params_no_aux'] / 1e6:.3f} M for inference, "
          f"{counts['params'] / 1e6:.3f} M with the aux head") in summary


BAD_OP = space.ENAS_ARC.replace("0 2 0 0", "0 2 0 7", 1)   # position 3: op 7
BAD = [
    pytest.param(["--config.search.alphaa=1"], ["search.alphaa", "unknown field"],
                 id="unknown_field"),
    pytest.param(["--config.search.alpha=abc"], ["search.alpha", "number"], id="bad_type"),
    pytest.param(["--config.search.alpha=-1"], ["search.alpha", ">= 0"], id="negative"),
    pytest.param(["--config.stages=serch"], ["stages", "serch", "search, final, compress, latency, profile"],
                 id="bad_stage"),
    pytest.param(["--config.stages=profile", "--config.final.arc=1 2 3"],
                 ["final.arc", "40 ints", "got 3"], id="short_arc"),
    pytest.param(["--config.stages=profile", f"--config.final.arc={BAD_OP}"],
                 ["final.arc", "op b = 7", "position 3", "0..4"], id="bad_op"),
    pytest.param(["--config.stages=search", "--config.data.name=npz:/nonexistent.npz"],
                 ["data.name", "/nonexistent.npz", "does not exist"], id="npz_missing"),
]


@pytest.mark.parametrize("args,needles", BAD)
def test_bad_input(tmp_path, args, needles):
  workdir = tmp_path / "run"
  line = _error_line(_run(SMOKE, f"--workdir={workdir}", *args))
  for needle in needles:
    assert needle in line, (needle, line)
  assert not (workdir / "search").exists()


def test_unknown_dataset(tmp_path):
  """TFDS is imported to look the name up (several seconds), then it fails cleanly."""
  line = _error_line(_run(SMOKE, f"--workdir={tmp_path}", "--config.stages=search",
                          "--config.data.name=no_such_dataset_xyz"))
  assert line.startswith("error: data.name:")
  assert "no_such_dataset_xyz" in line and "digits" in line
  assert not (tmp_path / "search").exists()


def test_missing_workdir_and_config_file(tmp_path):
  line = _error_line(_run(SMOKE, "--config.stages=profile"))
  assert line == "error: --workdir is required"
  line = _error_line(_run("--config=configs/no_such_config.py", f"--workdir={tmp_path}"))
  assert line.startswith("error: --config:") and "no_such_config.py" in line
  assert os.listdir(tmp_path) == []


def test_does_not_overwrite_finished_search(tmp_path):
  (tmp_path / "search").mkdir()
  arch = tmp_path / "search" / "arch.json"
  arch.write_text('{"arc_string": "keep me"}\n')
  config = tmp_path / "config.json"
  config.write_text('{"earlier": "run"}\n')
  line = _error_line(_run(SMOKE, f"--workdir={tmp_path}", "--config.stages=search",
                          "--config.search.epochs=1"))
  assert "overwrite" in line and "search" in line and "arch.json" in line
  assert arch.read_text() == '{"arc_string": "keep me"}\n'
  assert config.read_text() == '{"earlier": "run"}\n'
  assert sorted(os.listdir(tmp_path)) == ["config.json", "search"]
  assert os.listdir(tmp_path / "search") == ["arch.json"]


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  line = _error_line(_run(SMOKE, f"--workdir={blocker / 'sub'}", "--config.stages=profile",
                          f"--config.final.arc={space.ENAS_ARC}"))
  assert line.startswith(f"error: --workdir={blocker / 'sub'}: not writable")
  assert blocker.read_text() == "not a directory"


RATIO_FORMS = ["0.5 0.3 0.5 0.3 0.5", "0.5,0.3,0.5,0.3,0.5", "(0.5,0.3,0.5,0.3,0.5)",
               "( 0.5, 0.3, 0.5, 0.3, 0.5 )", "[0.5, 0.3, 0.5, 0.3, 0.5]"]


@pytest.mark.parametrize("text", RATIO_FORMS)
def test_compress_ratios_forms_on_the_command_line(tmp_path, text):
  """absl / ml_collections hand the string field over verbatim (brackets and commas
  included); every form is accepted and records the string as given."""
  proc = _run(SMOKE, f"--workdir={tmp_path}", "--config.stages=profile",
              f"--config.final.arc={space.ENAS_ARC}", f"--config.compress.ratios={text}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["compress"]["ratios"] == text


@pytest.mark.parametrize("text", RATIO_FORMS)
def test_compress_ratios_parse(text):
  from configs import smoke
  config = smoke.get_config()
  config.compress.ratios = text
  assert config_lib.compress_ratios(config) == (0.5, 0.3, 0.5, 0.3, 0.5)


@pytest.mark.parametrize("value", [(0.5, 0.3, 0.5, 0.3, 0.5), [0.5, 0.3, 0.5, 0.3, 0.5]])
def test_compress_ratios_as_a_tuple_or_list(value):
  config = ml_collections.ConfigDict({"compress": {"ratios": value}})
  assert config_lib.compress_ratios(config) == (0.5, 0.3, 0.5, 0.3, 0.5)
  config = ml_collections.ConfigDict({"compress": {"ratios": value[:4]}})
  with pytest.raises(config_lib.ConfigError, match=r"compress\.ratios=.*must be 5 numbers"):
    config_lib.compress_ratios(config)


@pytest.mark.parametrize("text", ["0.5 0.3", "(0.5,0.3,0.5,0.3,0.5]", "0.5;0.3;0.5;0.3;0.5",
                                  "0.5,,0.3,0.5,0.3", "0.5 0.3 0.5 0.3 1.0", "a b c d e"])
def test_bad_compress_ratios_is_one_error_line(tmp_path, text):
  line = _error_line(_run(SMOKE, f"--workdir={tmp_path}", "--config.stages=profile",
                          f"--config.compress.ratios={text}"))
  assert line.startswith(f"error: compress.ratios={text!r}: must be 5 numbers in [0, 1)")
  assert "spaces or commas, optionally in () or []" in line
  assert os.listdir(tmp_path) == []
