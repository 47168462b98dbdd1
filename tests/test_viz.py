"""gsv3d_pl.viz: grids, depth colourisation, turntables, atomic PNG/MP4/GIF writing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gsv3d_pl import viz
from gsv3d_pl.gaussians import Gaussians


def blob(means, colors, scale=0.08) -> Gaussians:
    means = torch.as_tensor(means, dtype=torch.float32)  # [G, 3]
    G = means.shape[0]
    return Gaussians(
        means=means,
        quats=torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(G, 4).clone(),
        scales=torch.full((G, 3), scale),
        opacities=torch.full((G,), 0.95),
        colors=torch.as_tensor(colors, dtype=torch.float32),
    )


def test_to_uint8_layouts():
    x = torch.rand(2, 3, 5, 7)
    a = viz.to_uint8(x)
    assert a.shape == (2, 5, 7, 3) and a.dtype == np.uint8
    b = viz.to_uint8(x.permute(0, 2, 3, 1))
    assert np.array_equal(a, b)
    assert viz.to_uint8(torch.tensor([[[2.0]], [[-1.0]], [[0.5]]])).reshape(-1).tolist() == [255, 0, 128]


def test_make_grid_places_tiles_row_major():
    imgs = torch.stack([torch.full((3, 4, 5), i / 10) for i in range(5)])  # [5, 3, 4, 5]
    g = viz.make_grid(imgs, nrow=3, padding=1, pad_value=1.0)
    assert g.shape == (3, 2 * 5 + 1, 3 * 6 + 1)
    assert torch.allclose(g[:, 1:5, 1:6], imgs[0])
    assert torch.allclose(g[:, 1:5, 7:12], imgs[1])
    assert torch.allclose(g[:, 6:10, 7:12], imgs[4])
    assert torch.all(g[:, 6:10, 13:18] == 1.0)  # the empty sixth slot is padding
    with pytest.raises(ValueError):
        viz.make_grid(torch.rand(3, 4, 5))


def test_labeled_rows_pads_short_rows_and_expands_grey():
    rows = [torch.rand(3, 3, 8, 8), torch.rand(2, 1, 8, 8)]
    g = viz.labeled_rows(rows, padding=0)
    assert g.shape == (3, 16, 24)
    assert torch.allclose(g[:, 8:16, 0:8], rows[1][0].expand(3, -1, -1))
    assert torch.all(g[:, 8:16, 16:24] == 1.0)


def test_colorize_depth_near_red_far_blue_background_white():
    depth = torch.zeros(2, 1, 4, 4)  # [V, 1, H, W]
    depth[0, 0, :2] = 1.5  # near
    depth[1, 0, :2] = 2.5  # far (other view: the range is shared)
    rgb = viz.colorize_depth(depth)
    assert rgb.shape == (2, 3, 4, 4)
    near, far = rgb[0, :, 0, 0], rgb[1, :, 0, 0]
    assert near[0] > near[2] and far[2] > far[0]
    assert torch.all(rgb[:, :, 2:] == 1.0)  # empty pixels
    alpha = torch.ones_like(depth)
    alpha[0, 0, 0, 0] = 0.1
    assert torch.all(viz.colorize_depth(depth, alpha)[0, :, 0, 0] == 1.0)
    assert torch.all(viz.colorize_depth(torch.zeros(1, 4, 4), background=0.0) == 0.0)
    with pytest.raises(ValueError):
        viz.colorize_depth(torch.zeros(4, 4, 1))


def test_turbo_is_a_colormap():
    c = viz.turbo(torch.linspace(0, 1, 11))
    assert c.shape == (11, 3) and c.min() >= 0 and c.max() <= 1
    assert c[1, 2] > c[1, 0] + 0.3 and c[-2, 0] > c[-2, 2] + 0.3  # blue low end, red high end
    assert (c[1:] - c[:-1]).norm(dim=-1).min() > 0.02  # distinct steps


def test_turntable_frames_and_orbit_convention():
    # red at +X, green at -X; the last frame (azimuth 0, camera on +Z) sees +X on the right
    g = blob([[0.3, 0.0, 0.0], [-0.3, 0.0, 0.0]], [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    rgb, alpha, depth = viz.render_turntable(g, num_frames=20, elevation_deg=0.0, size=48, return_depth=True)
    assert rgb.shape == (20, 48, 48, 3) and alpha.shape == (20, 48, 48, 1) and depth.shape == (20, 48, 48, 1)
    last = rgb[-1]
    right, left = last[:, 24:], last[:, :24]
    assert (right[..., 0] - right[..., 1]).max() > 0.5  # red on the right
    assert (left[..., 1] - left[..., 0]).max() > 0.5  # green on the left
    half = rgb[9]  # azimuth 180°: camera on -Z, sides swap
    assert (half[:, :24, 0] - half[:, :24, 1]).max() > 0.5
    assert depth[-1][alpha[-1] > 0.5].mean() == pytest.approx(2.0, abs=0.15)
    assert rgb.std() > 0.05
    with pytest.raises(ValueError):
        viz.render_turntable(Gaussians.stack([g, g]), num_frames=2)


def test_save_image_atomic(tmp_path):
    p = viz.save_image(torch.rand(3, 10, 12), tmp_path / "sub" / "x.png")
    assert Image.open(p).size == (12, 10)
    viz.save_image(torch.rand(1, 10, 12), tmp_path / "sub" / "g.png")
    assert sorted(q.name for q in (tmp_path / "sub").iterdir()) == ["g.png", "x.png"]


@pytest.mark.skipif(not viz.ffmpeg_available(), reason="imageio-ffmpeg has no binary here")
def test_save_video_mp4_frame_count(tmp_path):
    import imageio.v2 as imageio

    frames = torch.rand(7, 33, 35, 3)  # odd sizes are padded to even for H.264
    p = viz.save_video(frames, tmp_path / "t.mp4", fps=10)
    assert p.suffix == ".mp4"
    reader = imageio.get_reader(p, format="FFMPEG")
    try:
        assert reader.count_frames() == 7
        assert reader.get_data(0).shape == (34, 36, 3)
    finally:
        reader.close()
    assert [q.name for q in tmp_path.iterdir()] == ["t.mp4"]


def test_save_video_gif_fallback_without_ffmpeg(tmp_path, monkeypatch):
    monkeypatch.setattr(viz, "ffmpeg_available", lambda: False)
    frames = (np.arange(5)[:, None, None, None] * 40 * np.ones((5, 16, 16, 3))).astype(np.uint8)
    p = viz.save_video(frames, tmp_path / "t.mp4")
    assert p.suffix == ".gif" and p.exists() and not (tmp_path / "t.mp4").exists()
    im = Image.open(p)
    assert im.n_frames == 5
    with pytest.raises(ValueError):
        viz.save_video(np.zeros((0, 4, 4, 3), np.uint8), tmp_path / "e.gif")
