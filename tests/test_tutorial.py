"""The tutorial notebook (tutorial.ipynb) runs top to bottom without an error.

A copy is executed with nbclient in a temporary directory, with mlorc importable from this checkout;
the notebook saved in the repository is never written. Skipped when the notebook tooling (nbclient,
nbformat, ipykernel, matplotlib) is not installed. The notebook takes a few minutes on 2 CPU cores;
MLORC_TUTORIAL_TIMEOUT sets the limit per cell in seconds (default 900).
"""
import hashlib
import os
import shutil
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "tutorial.ipynb")
MIN_FIGURES = 6


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_tutorial_executes(tmp_path, monkeypatch):
    before = sha256(NOTEBOOK)
    copy = tmp_path / "tutorial.ipynb"
    shutil.copy(NOTEBOOK, copy)
    nb = nbformat.read(copy, as_version=4)
    for cell in nb.cells:                                  # start from a clean notebook
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None

    # The kernel must import this checkout's mlorc and run on this interpreter (a "python3" kernelspec
    # installed elsewhere may name another one on PATH).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("PATH", os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    client = nbclient.NotebookClient(nb, timeout=int(os.environ.get("MLORC_TUTORIAL_TIMEOUT", "900")),
                                     kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()                                       # raises CellExecutionError on any cell error
    nbformat.write(nb, copy)

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = sum("image/png" in o.get("data", {}) for o in outputs)
    assert figures >= MIN_FIGURES, f"{figures} figures, expected at least {MIN_FIGURES}"
    assert sha256(NOTEBOOK) == before, "executing the tutorial modified the notebook in the repository"
