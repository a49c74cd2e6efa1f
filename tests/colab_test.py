"""launch/colab.ipynb executed top to bottom on CPU: nbclient runs every cell in a python3
kernel with the notebook's smoke setting in the kernel's environment (FP_JAX_NOTEBOOK_SMOKE=1:
no pip install, a tiny search -> final -> compress on digits, no CIFAR-10 download, the
CIFAR-10 cell's command run as its profile stage; FP_JAX_REPO_DIR: this checkout instead of a
clone; FP_JAX_RUNS: a temporary work directory). The pipeline runs in a subprocess; compiling
dominates its time (compiled with tests/quick_compile.FLAGS)."""
import json
import os
import re

import nbformat
from nbclient import NotebookClient

from tests import quick_compile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "launch", "colab.ipynb")


def _text(cell):
  """Everything a code cell printed (streams and text/plain results)."""
  parts = []
  for out in cell.outputs:
    if out.output_type == "stream":
      parts.append(out.text)
    elif out.output_type in ("execute_result", "display_data"):
      parts.append(out.data.get("text/plain", ""))
  return "".join(parts)


def _cell(nb, needle):
  """The one code cell whose source contains needle."""
  found = [c for c in nb.cells if c.cell_type == "code" and needle in c.source]
  assert len(found) == 1, needle
  return found[0]


def test_stored_notebook_is_clean():
  """Committed without outputs, and valid nbformat 4 (what a user opens in Colab)."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert nb.metadata.kernelspec.name == "python3"
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(c.outputs == [] and c.execution_count is None for c in code)
  first = code[0].source   # the parameters cell reads the smoke setting; the default is the full run
  assert "FP_JAX_NOTEBOOK_SMOKE" in first and "FP_JAX_REPO_DIR" in first


def test_notebook_runs_top_to_bottom(tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  runs = tmp_path / "runs"
  env = dict(os.environ, FP_JAX_NOTEBOOK_SMOKE="1", FP_JAX_REPO_DIR=ROOT, FP_JAX_RUNS=str(runs),
             JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env["XLA_FLAGS"] = quick_compile.xla_flags()   # one CPU device, as on a Colab CPU runtime
  client = NotebookClient(nb, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}})
  client.execute(env=env)              # raises CellExecutionError on the first failing cell

  code = [c for c in nb.cells if c.cell_type == "code"]
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
  assert not [o for c in code for o in c.outputs if o.output_type == "error"]

  assert "smoke setting (FP_JAX_NOTEBOOK_SMOKE)" in _text(code[0])
  setup = _text(_cell(nb, "def sh("))
  assert f"using the checkout {ROOT} as it is" in setup and "accelerator: cpu" in setup
  install = _text(_cell(nb, "pip\", \"install"))
  assert "smoke setting: pip install skipped" in install
  assert re.search(r"^0\.10\.2 cpu \[CpuDevice\(id=0\)\]$", install, re.M), install
  assert "CIFAR-10 not prepared" in _text(_cell(nb, "fp_jax.prepare"))

  # the smoke run: every stage's results, and summary.md's table from them
  smoke = runs / "smoke"
  arch = json.loads((smoke / "search" / "arch.json").read_text())
  assert len(arch["arc_string"].split()) == 40 and len(arch["ratios"]) == 5
  fin = json.loads((smoke / "final" / "result.json").read_text())
  com = json.loads((smoke / "compress" / "result.json").read_text())
  assert fin["arc_string"] == arch["arc_string"]
  assert [round(r, 6) for r in com["ratios"]] == [round(r, 6) for r in arch["ratios"]]
  assert 0 <= fin["test_error"] <= 100 and com["pruned_macs"] <= com["macs"] == fin["macs"]
  config = json.loads((smoke / "config.json").read_text())
  assert config["stages"] == "search,final,compress" and config["data"]["name"] == "digits"
  assert config["search"]["epochs"] == 1 and config["final"]["num_layers"] == 1
  summary = (smoke / "summary.md").read_text()
  assert "## Results (test split)" in summary and arch["arc_string"] in summary
  assert f"| {fin['test_error']:.2f} | {fin['macs'] / 1e6:.3f} |" in summary
  assert (f"| {com['test_error_finetuned']:.2f} | {com['pruned_macs'] / 1e6:.3f} |"
          in summary)
  smoke_log = _text(_cell(nb, "SMOKE_EXTRA = []"))
  assert "final: test error" in smoke_log and "compress:" in smoke_log

  # show(SMOKE) displayed summary.md and every plot
  shown = _cell(nb, "show(SMOKE)").outputs
  markdown = [o.data["text/markdown"] for o in shown
              if o.output_type == "display_data" and "text/markdown" in o.data]
  assert markdown == [summary]
  pngs = sorted(p.name for p in (smoke / "plots").glob("*.png"))
  assert pngs and len([o for o in shown if "image/png" in o.get("data", {})]) == len(pngs)

  # the CIFAR-10 cell: its command, as profile (no data), counts the paper's network
  cifar = runs / "cifar_a0.02_b20"
  profile = json.loads((cifar / "profile.json").read_text())
  assert profile["arc_string"] == arch["arc_string"]
  assert (profile["num_layers"], profile["out_filters"]) == (15, 36)
  assert profile["image_shape"] == [32, 32, 3] and profile["macs"] > 100e6
  cifar_config = json.loads((cifar / "config.json").read_text())
  assert cifar_config["search"]["alpha"] == 0.02 and cifar_config["search"]["beta"] == 20.0
  assert "profile:" in _text(_cell(nb, "CIFAR_CMD = ["))
  assert [o.data["text/markdown"] for o in _cell(nb, "show(CIFAR)").outputs
          if "text/markdown" in o.get("data", {})] == [(cifar / "summary.md").read_text()]
