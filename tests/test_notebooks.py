"""Executes every notebook in notebooks/ end to end (at the small CPU size they pick on a CPU).

Skipped when the `notebooks` extra (nbclient, nbformat, ipykernel) is not installed:
`pip install -e ".[notebooks]"`.
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
    assert {p.name for p in NOTEBOOKS} >= {"tutorial.ipynb", "benchmarks.ipynb"}


# The tutorial is the heaviest case of the default suite (about 110 s on a loaded 2-core machine): it runs
# in the slow set (`pytest -m slow`, also run by CI); the benchmark notebook keeps the path in the default run.
HEAVY = {"tutorial.ipynb"}


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=pytest.mark.slow) if p.name in HEAVY else p for p in NOTEBOOKS],
    ids=[p.name for p in NOTEBOOKS],
)
def test_notebook_runs(path, tmp_path, monkeypatch):
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
        f"{path.name} is stored with outputs; regenerate it with `python notebooks/build_notebooks.py`."
    )
    # The kernel inherits the environment: the benchmark notebook's figures go to a temporary folder,
    # and the CPU backend is forced so the notebooks pick their small sizes whatever the machine.
    monkeypatch.setenv("SOFO_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
