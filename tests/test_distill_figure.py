"""The README picture of stage 2 (gsv3d_pl/tools/distill_figure.py) on a tiny distill stage: its layout, and that the
LoRA-off and LoRA-on rows come from the stage's own variants (equal for a zero LoRA, different for a trained one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gsv3d_pl.orbit import INPUT_FRAME
from gsv3d_pl.tools.distill_figure import (
    CAPTION_LINE,
    HEADER_HEIGHT,
    LABEL_WIDTH,
    MARK,
    PADDING,
    ROWS,
    distill_figure,
    find_run_config,
    select_object,
    shown_frames,
    write_distill_figure,
)
from tests.synthetic import collate, synthetic_sample
from tests.test_distill_stage import decoder_ckpt, make_distill  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_figure_layout_and_the_lora_changes_only_the_distilled_rows(decoder_ckpt, tmp_path):  # noqa: F811
    stage = make_distill(decoder_ckpt).eval()
    batch = collate([synthetic_sample(2000, train=False)])  # a held-out object, the evaluation's input frames
    out = tmp_path / "fig.png"
    fig = write_distill_figure(stage, batch, out, num_frames=8, tile=64)

    # every column is a novel view: an orbit frame the decoder did not read, never the input frame
    read = batch["input_indices"][0].tolist()
    assert len(fig.frames) == 8 and not set(fig.frames) & set(read) and INPUT_FRAME not in fig.frames
    assert fig.frames == shown_frames(read, 8)
    assert set(fig.rows) == {k for k, _ in ROWS} and all(v.shape == (8, 3, 32, 32) for v in fig.rows.values())
    assert torch.equal(fig.rows["gt"], batch["target_images"][0, fig.frames])
    assert set(fig.psnr) == {k for k, _ in ROWS[1:]} and all(np.isfinite(v) for v in fig.psnr.values())

    # the PNG: label column + (input + 8 frames) tiles of 64 px, header, 5 rows, caption
    img = np.asarray(Image.open(out).convert("RGB"))
    t = 64 + PADDING
    H, W = img.shape[:2]
    assert W == LABEL_WIDTH + 9 * t + PADDING
    grid_bottom = HEADER_HEIGHT + 5 * t + PADDING
    assert H > grid_bottom and (H - grid_bottom - 4) % CAPTION_LINE == 0 and 1 <= (H - grid_bottom - 4) // CAPTION_LINE <= 4
    corner = img[HEADER_HEIGHT + PADDING, LABEL_WIDTH + PADDING]  # the input image's orange mark
    assert np.abs(corner.astype(float) - 255 * np.array(MARK)).max() < 2
    assert (img[HEADER_HEIGHT + PADDING + t + 10, LABEL_WIDTH + PADDING + 10] == 255).all()  # blank below it

    # peft starts lora_B at 0: LoRA off and on are the same model, so the same rows
    for v in ("orbit", "render"):
        assert torch.allclose(fig.rows[f"{v}_undistilled"], fig.rows[f"{v}_distilled"], atol=1e-5)

    # a trained (non-zero) LoRA changes the distilled rows only
    with torch.no_grad():
        for n, p in stage.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 3.0)
    fig2 = distill_figure(stage, batch, num_frames=8)
    assert (fig2.rows["orbit_distilled"] - fig2.rows["orbit_undistilled"]).abs().mean() > 1e-2
    for v in ("orbit", "render"):
        assert torch.allclose(fig2.rows[f"{v}_undistilled"], fig.rows[f"{v}_undistilled"], atol=1e-5)
    # row 4 is the orbit the stage samples (same seed and per-object noise), VAE-decoded; up to the conditioning's
    # cond_aug noise (std 1e-5, drawn anew by each conditioning call), which the large random LoRA amplifies a bit
    lat = stage.generate_orbit(batch, seed=stage.e2e_seed)  # [1, 21, C, h, w]
    want = stage.vae.decode(lat[0, fig2.frames]).clamp(0, 1)
    assert (fig2.rows["orbit_distilled"] - want).abs().max() < 5e-3
    assert "generate_orbit" not in vars(stage)  # the recorder is gone again
    with pytest.raises(ValueError, match="batch of one"):
        distill_figure(stage, collate([synthetic_sample(i, train=False) for i in range(2)]))


def test_run_config_and_object_selection(tmp_path):
    run = tmp_path / "run"
    for v in (2, 10, 9):
        (run / "csv" / f"version_{v}").mkdir(parents=True)
        (run / "csv" / f"version_{v}" / "config.yaml").write_text("{}")
    assert find_run_config(run) == run / "csv" / "version_10" / "config.yaml"  # numeric, not string order
    (run / "config.yaml").write_text("{}")
    assert find_run_config(run) == run / "config.yaml"
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        find_run_config(tmp_path / "nothing")

    loader = [{"target_images": torch.arange(2.0).view(2, 1) + 10 * i, "uid": [f"a{i}", f"b{i}"]} for i in range(2)]
    one = select_object(loader, 3)
    assert one["uid"] == ["b1"] and one["target_images"].tolist() == [[11.0]]
    with pytest.raises(IndexError, match="4 objects"):
        select_object(loader, 4)


def test_shown_frames_spread_over_the_unread_orbit_frames():
    assert shown_frames([4, 9, 15, 20], 8) == [0, 2, 6, 8, 11, 13, 17, 19]
    assert shown_frames([20], 30) == list(range(20))
    with pytest.raises(ValueError):
        shown_frames(list(range(21)), 4)
