"""notebooks/quickstart.ipynb runs top to bottom (nbclient, the venv's python3 kernel) on CPU.

Both of its paths run: a fresh clone (no demo checkpoint: it trains a few steps itself) and after
``make demo`` (it loads ``runs/decoder_tiny/checkpoints/last.ckpt``). ``GSV3D_DEMO_CKPT`` points the
notebook at the checkpoint so that the test does not depend on what this checkout's ``runs/`` holds.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def _tiny_checkpoint(path: Path) -> Path:
    """A checkpoint of the tiny decoder config, as `gsv3d fit` writes it (untrained weights suffice)."""
    from gsv3d_pl.tools.predict import load_stage

    stage, _ = load_stage([str(ROOT / "configs" / "decoder" / "tiny.yaml")])
    torch.save({"state_dict": stage.state_dict()}, path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("with_checkpoint", [False, True], ids=["fresh-clone", "after-make-demo"])
def test_quickstart_notebook_executes(tmp_path, monkeypatch, with_checkpoint):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    ckpt = _tiny_checkpoint(tmp_path / "last.ckpt") if with_checkpoint else tmp_path / "absent.ckpt"
    monkeypatch.setenv("GSV3D_DEMO_CKPT", str(ckpt))  # the kernel inherits the environment

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
    assert ("loaded the demo checkpoint" in text) == with_checkpoint
    assert elapsed < 300, f"notebook took {elapsed:.0f}s"
