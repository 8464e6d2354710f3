"""Executes every notebook at a small size; a failing cell fails the test."""

import pathlib
import tomllib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_notebooks_exist():
  names = [p.name for p in NOTEBOOKS]
  assert names == ["01_quickstart.ipynb", "02_parameter_free.ipynb",
                   "03_distributed.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_install_cell(path):
  # The first code cell installs only what is missing: nothing when optax_sign
  # is importable, the checkout (editable) inside the repository, else the
  # project's repository on GitHub (Colab). The tests run it as written.
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  code = [c for c in nbformat.read(path, as_version=4).cells
          if c.cell_type == "code"]
  install = code[0].source
  assert 'importlib.util.find_spec("optax_sign")' in install
  assert f"'name = \"{project['name']}\"'" in install
  assert '%pip install -q -e "..[notebooks]"' in install
  url = project["urls"]["Repository"]
  assert f'%pip install -q "{project["name"]}[notebooks] @ git+{url}"' in install
  assert "OPTAX_SIGN_NOTEBOOK_SMALL" not in install  # no skip: it always runs
  # Taught with the public API only.
  assert not any("optax_sign.bench" in c.source for c in code)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
  notebook = nbformat.read(path, as_version=4)
  # Stored without outputs, and Colab-ready: the first code cell installs.
  code = [c for c in notebook.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code)
  assert "%pip install" in code[0].source
  monkeypatch.setenv("OPTAX_SIGN_NOTEBOOK_SMALL", "1")  # tiny sizes
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  client = nbclient.NotebookClient(
      notebook, timeout=300, kernel_name="python3",
      resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError naming the failing cell
  errors = [o for c in code for o in c.outputs if o.output_type == "error"]
  assert not errors
  # The install cell ran and found the package of this environment.
  printed = "".join(o.get("text", "") for o in code[0].outputs)
  assert "optax_sign is already installed" in printed
