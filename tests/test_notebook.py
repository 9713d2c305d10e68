"""The exploration notebook runs headless against the catalog after data_engineering, so it cannot rot."""

from __future__ import annotations

import os
import shutil

import nbformat
from nbclient import NotebookClient

from conftest import REPO_ROOT, run_pipeline


def test_exploration_notebook_executes(kedro_project, monkeypatch):
    run_pipeline(kedro_project, "data_engineering", env="smoke")
    (kedro_project / "notebooks").mkdir(exist_ok=True)
    target = kedro_project / "notebooks" / "data_exploration.ipynb"
    shutil.copy2(REPO_ROOT / "notebooks" / "data_exploration.ipynb", target)
    nb = nbformat.read(target, as_version=4)
    monkeypatch.setenv("KEDRO_ENV", "smoke")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(kedro_project / "notebooks")}})
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    errors = [f"{o['ename']}: {o['evalue']}" for o in outputs if o.get("output_type") == "error"]
    assert not errors, errors
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "train:" in text and "vocabulary of" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)
