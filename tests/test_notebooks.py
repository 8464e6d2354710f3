"""Executes every notebook at a small size; a failing cell fails the test."""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted(
    (pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_notebooks_exist():
  names = [p.name for p in NOTEBOOKS]
  assert names == ["01_quickstart.ipynb", "02_parameter_free.ipynb",
                   "03_distributed.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
  notebook = nbformat.read(path, as_version=4)
  # Stored without outputs, and Colab-ready: the first code cell installs.
  code = [c for c in notebook.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code)
  assert "%pip install" in code[0].source
  monkeypatch.setenv("OPTAX_SIGN_NOTEBOOK_SMALL", "1")  # skip pip, tiny sizes
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  client = nbclient.NotebookClient(
      notebook, timeout=300, kernel_name="python3",
      resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError naming the failing cell
  errors = [o for c in code for o in c.outputs if o.output_type == "error"]
  assert not errors
