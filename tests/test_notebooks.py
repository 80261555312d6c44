"""Executes the benchmark notebook end to end (at the small CPU size it picks on a CPU).

notebooks/benchmarks.ipynb is its own source: edit it in Jupyter and save it without outputs (clear them
before committing; the test below refuses a notebook stored with outputs). The tutorial is a docs page,
docs/tutorial.md, run by tests/test_docs.py. Skipped when the `notebooks` extra (nbclient, nbformat,
ipykernel) is not installed: `pip install -e ".[notebooks]"`.
"""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"benchmarks.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
        f"{path.name} is stored with outputs; clear them (Jupyter: Edit > Clear Outputs of All Cells, or "
        f"`jupyter nbconvert --clear-output --inplace {path.name}`) before committing."
    )


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    notebook = nbformat.read(path, as_version=4)
    # The kernel inherits the environment: the benchmark notebook's figures go to a temporary folder,
    # and the CPU backend is forced so the notebooks pick their small sizes whatever the machine.
    monkeypatch.setenv("SOFO_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
