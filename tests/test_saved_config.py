"""A run's own saved config.yaml drives `gsv3d test` and `gsv3d predict`, as a new user would try it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def gsv3d(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "gsv3d_pl", *args], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=timeout)
    assert res.returncode == 0, f"gsv3d {' '.join(args)}\n" + (res.stdout + res.stderr)[-4000:]
    return res


def saved_config(run: Path) -> Path:
    found = sorted(run.glob("csv/version_*/config.yaml"))
    assert found, f"fit saved no config.yaml under {run}/csv"
    return found[-1]


@pytest.mark.slow
def test_saved_configs_work_with_test_and_predict(tmp_path):
    data = ["--data.init_args.toy_objects=8", f"--data.init_args.cache_dir={tmp_path / 'cache'}"]
    short = ["--trainer.limit_val_batches=0", "--trainer.max_steps=1"]
    dec, dist = tmp_path / "decoder", tmp_path / "distill"
    # stage 1 with another width than the shipped config's (64): stage 2's unchanged config builds it
    gsv3d("fit", "--config", "configs/decoder/tiny.yaml", f"--trainer.default_root_dir={dec}", *short, *data,
          "--model.init_args.heldout_eval=false", "--model.init_args.decoder.init_args.dim=48")
    gsv3d("fit", "--config", "configs/distill/tiny.yaml", f"--trainer.default_root_dir={dist}", *short, *data,
          f"--model.init_args.decoder_ckpt={dec / 'checkpoints' / 'last.ckpt'}", "--model.init_args.val_sample_steps=2")
    meta = torch.load(dist / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["gsv3d"]
    assert meta["decoder"]["init_args"]["dim"] == 48 and meta["decoder"]["class_path"].endswith("GSDecoder")

    # `gsv3d test` with each run's saved config (it holds ckpt_path: null, which the test parser accepts)
    for run in (dec, dist):
        gsv3d("test", "--config", str(saved_config(run)), f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
              "--trainer.limit_test_batches=1")
        metrics = json.loads((run / "metrics.json").read_text())
        assert np.isfinite(metrics["psnr"]["value"]) and metrics["psnr"]["num_objects"] >= 1

    # `gsv3d predict` (the image -> 3D tool) with the distill run's saved config
    img = np.zeros((64, 64, 4), np.uint8)
    yy, xx = np.mgrid[:64, :64]
    disk = (yy - 32) ** 2 + (xx - 32) ** 2 < 20**2
    img[disk] = (200, 60, 40, 255)
    Image.fromarray(img, "RGBA").save(tmp_path / "object.png")
    out = tmp_path / "pred"
    gsv3d("predict", "--config", str(saved_config(dist)), "--ckpt_path", str(dist / "checkpoints" / "last.ckpt"),
          "--image", str(tmp_path / "object.png"), "--out", str(out), "--num_steps", "2", "--turntable_frames", "4")
    assert (out / "gaussians.ply").stat().st_size > 0 and (out / "views.png").exists()
