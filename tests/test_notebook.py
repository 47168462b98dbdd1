"""notebooks/quickstart.ipynb runs top to bottom (nbclient, the venv's python3 kernel) on CPU."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    t = time.time()
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT / "notebooks")}})
    client.execute()
    elapsed = time.time() - t
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4, "the notebook should show the views, depth, GT-vs-prediction and turntable"
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "novel-view PSNR" in text and "wrote" in text
    assert elapsed < 300, f"notebook took {elapsed:.0f}s"
