"""docs/notebooks/researcher.ipynb, run top to bottom as a reader runs it (nbclient, a real
kernel): it starts two real datasites on loopback, trains on them and stops them. Whatever the
notebook leaves running (a cell that failed half-way) is stopped here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
NOTEBOOK = Path(__file__).resolve().parents[2] / "docs" / "notebooks" / "researcher.ipynb"


def _outputs(cell) -> list[dict]:  # noqa: ANN001
    return [o for o in cell.get("outputs", [])]


def test_the_researcher_notebook_runs(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    root = str(NOTEBOOK.parents[2])
    monkeypatch.delenv("FEDSITE_FEDERATION", raising=False)
    monkeypatch.setenv("FEDSITE_NOTEBOOK_DIR", str(tmp_path / "sites"))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    )
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    try:
        client.execute()
    finally:
        _stop_sites(tmp_path / "sites")
    code = [c for c in nb.cells if c.cell_type == "code"]
    nbformat.write(nb, tmp_path / "executed.ipynb")  # with each cell's timing, to read on failure
    text = "\n".join(
        o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
        for c in code
        for o in _outputs(c)
    )
    assert "two datasites running" in text and "stopped" in text, text[-2000:]
    accuracy = float(text.split("final test accuracy:")[1].split()[0])
    assert 0.5 < accuracy <= 1.0, accuracy  # a model trained on 3 DP rounds beats a coin
    images = [o for c in code for o in _outputs(c) if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the inline plot and the run's epsilon.png
    assert any(
        "epsilon of the whole plan" in str(o.get("data", {})) for c in code for o in _outputs(c)
    )


def _stop_sites(work: Path) -> None:
    from datasites.serving import process
    from datasites.serving.config import SiteDir

    for site in work.glob("*/site.toml"):
        process.stop(SiteDir(site.parent))
