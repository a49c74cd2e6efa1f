"""bench/suite_profile.py: its sums on hand-made records, and one real run of its plugin."""
import json

from bench import suite_profile


def _records():
  return {
      "gw0": {"tests/a_test.py::x": {"start": 100.0, "end": 110.0, "wall_s": 10.0,
                                     "compile_s": 6.0, "compiles": 3,
                                     "programs": {"step": [2, 5.0], "f": [1, 1.0]}},
              "tests/a_test.py::y": {"start": 110.0, "end": 114.0, "wall_s": 4.0},
              "tests/c_test.py::z": {"start": 114.0, "end": 130.0, "wall_s": 16.0,
                                     "compile_s": 2.0, "compiles": 1,
                                     "checkpoint_blocking_s": 0.5, "failed": "call"}},
      "gw1": {"tests/b_test.py::w": {"start": 101.0, "end": 121.0, "wall_s": 20.0,
                                     "compile_s": 15.0, "compiles": 5, "trace_s": 1.0,
                                     "programs": {"step": [5, 15.0]}}}}


def test_summarise_sums_files_and_workers():
  s = suite_profile.summarise(_records())
  assert list(s["files"]) == ["tests/b_test.py", "tests/c_test.py", "tests/a_test.py"]
  a = s["files"]["tests/a_test.py"]
  assert (a["worker"], a["tests"], a["wall_s"], a["compile_s"], a["compiles"]) == (
      "gw0", 2, 14.0, 6.0, 3)
  assert a["compile_share"] == 6.0 / 14.0
  assert s["files"]["tests/c_test.py"]["checkpoint_blocking_s"] == 0.5
  assert s["workers"]["gw0"] == {"tests": 3, "busy_s": 30.0, "first_start": 100.0,
                                 "last_end": 130.0}
  assert s["workers"]["gw1"]["busy_s"] == 20.0
  t = s["totals"]
  assert (t["wall_s"], t["compile_s"], t["compiles"], t["trace_s"]) == (50.0, 23.0, 9, 1.0)
  assert t["compile_share"] == 23.0 / 50.0
  assert s["span_s"] == 30.0 and s["tail_s"] == 9.0     # 130 - 100; 130 - 121
  assert s["failed"] == ["tests/c_test.py::z (call)"]
  assert s["programs"] == {"step": {"compiles": 7, "compile_s": 20.0, "tests": 2, "files": 2},
                           "f": {"compiles": 1, "compile_s": 1.0, "tests": 1, "files": 1}}
  md = suite_profile.markdown({"summary": s, "cpu": "Test CPU", "command": "pytest",
                               "environment": {"time": "t"}, "load_start": [1, 1, 1],
                               "load_end": [2, 2, 2], "wall_s": None})
  assert "| tests/b_test.py | gw1 | 1 | 20 | 15 | 5 | 75 % | 0 |" in md
  assert "23 s (46 %) in 9 XLA compiles" in md and "idle tail 9 s" in md
  assert "Failed: tests/c_test.py::z (call)" in md
  assert "| step | 7 | 20 | 2.857 | 2 | 2 |" in md


def test_a_real_run_records_the_compiles_of_each_test(tmp_path, monkeypatch):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)   # compiled, not read back
  tests = tmp_path / "t"
  tests.mkdir()
  (tests / "one_test.py").write_text(
      "import jax, jax.numpy as jnp\n"
      "def test_two_programs():\n"
      "  assert float(jax.jit(lambda x: x * 2 + 1)(jnp.float32(3))) == 7.0\n"
      "  assert float(jax.jit(lambda x: jnp.sin(x) ** 2)(jnp.float32(0))) == 0.0\n"
      "def test_no_jax():\n"
      "  assert sorted([3, 1, 2]) == [1, 2, 3]\n"
      "def test_fails():\n"
      "  assert 1 == 2\n")
  keep = tmp_path / "records"
  assert suite_profile.main(["--files", str(tests), "--workers", "0", "--keep", str(keep),
                             "--out", str(tmp_path / "p.json")]) == 1   # one test failed
  result = json.loads((tmp_path / "p.json").read_text())
  assert result["returncode"] == 1 and "1 failed, 2 passed" in result["pytest"]
  files = result["summary"]["files"]
  (path, f), = files.items()
  assert path.endswith("one_test.py") and f["tests"] == 3 and f["worker"] == "main"
  (failed,) = result["summary"]["failed"]
  assert failed.endswith("one_test.py::test_fails (call)")
  rec = json.loads((keep / "main.json").read_text())["tests"]
  two, none = rec[next(k for k in rec if "two_programs" in k)], rec[
      next(k for k in rec if "no_jax" in k)]
  assert two["compiles"] >= 2 and two["compile_s"] > 0   # jit's programs (and the consts')
  assert sum(n for n, _ in two["programs"].values()) == two["compiles"]
  assert two["programs"]["jit(<lambda>)"][0] == 2   # both jitted lambdas, by jit's name
  assert "compiles" not in none and none["end"] >= none["start"]
  assert (tmp_path / "p.md").read_text().startswith("# Test suite: where the time goes")


def test_no_records_is_an_error(tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  assert suite_profile.main(["--from_dir", str(tmp_path / "empty"),
                             "--out", str(tmp_path / "p.json")]) == 1
  assert capsys.readouterr().err.startswith("error: no records in")

