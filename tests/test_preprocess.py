"""Image -> 3D input preprocessing: framing (recentre, rescale), foreground from alpha or a plain background,
image modes, and the orbit frames the decoder is given."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gsv3d_pl.inference import default_foreground_ratio, estimate_foreground, load_image, preprocess_image
from gsv3d_pl.orbit import input_frames
from tests.images import disc_mask, write_rgb_white, write_rgba


def test_default_foreground_ratio_matches_orbit_geometry():
    # sphere of diameter 1 at distance 2 with FoV 33.8°: tan(asin(0.25)) / tan(16.9°)
    assert default_foreground_ratio() == pytest.approx(0.2581989 / 0.3038302, rel=1e-4)
    assert default_foreground_ratio(radius=3.0) < default_foreground_ratio(radius=2.0)


def test_rgba_is_recentred_and_rescaled(tmp_path):
    img, alpha = preprocess_image(write_rgba(tmp_path / "a.png"), size=128, foreground_ratio=0.5)
    assert img.shape == (3, 128, 128) and alpha.shape == (1, 128, 128)
    assert img.dtype == torch.float32 and 0.0 <= img.min() and img.max() <= 1.0
    ys, xs = torch.nonzero(alpha[0] > 0.5, as_tuple=True)
    # the disc (off-centre in the source) is centred and spans half the frame
    assert (ys.float().mean() - 63.5).abs() < 1.5 and (xs.float().mean() - 63.5).abs() < 1.5
    assert abs((xs.max() - xs.min() + 1).item() - 64) <= 2
    # composited on white outside, object colour inside
    assert torch.allclose(img[:, 0, 0], torch.ones(3))
    assert torch.allclose(img[:, 64, 64], torch.tensor([200, 40, 30]) / 255.0, atol=0.02)


def test_rgb_on_white_matches_rgba(tmp_path):
    a_img, a_alpha = preprocess_image(write_rgba(tmp_path / "a.png"), size=96)
    b_img, b_alpha = preprocess_image(write_rgb_white(tmp_path / "b.png"), size=96)
    assert (a_alpha - b_alpha).abs().mean() < 0.02
    assert (a_img - b_img).abs().mean() < 0.02


def test_foreground_keeps_background_coloured_parts_inside_the_object():
    rgb = np.ones((100, 100, 3), np.float32)
    rgb[20:80, 20:80] = (0.1, 0.2, 0.8)  # a blue box ...
    rgb[40:60, 40:60] = 1.0  # ... with a white label in the middle (not connected to the border)
    fg, alpha = estimate_foreground(rgb)
    assert alpha[50, 50] == 1.0 and alpha[30, 30] == 1.0 and alpha[5, 5] == 0.0
    assert np.allclose(fg[30, 30], (0.1, 0.2, 0.8), atol=1e-5)


def test_foreground_on_grey_background_is_unmixed():
    rgb = np.full((100, 100, 3), 0.5, np.float32)
    rgb[30:70, 30:70] = (1.0, 0.0, 0.0)
    rgb[30:70, 29] = 0.5 * np.array([1.0, 0.0, 0.0]) + 0.5 * 0.5  # a 50 % anti-aliased edge
    fg, alpha = estimate_foreground(rgb)
    assert 0.2 < alpha[50, 29] <= 1.0 and np.allclose(fg[50, 29], (1.0, 0.0, 0.0), atol=0.05)
    assert alpha[0, 0] == 0.0


def test_palette_and_16bit_are_converted(tmp_path):
    # palette image with a transparent index
    m = disc_mask()
    p = Image.fromarray(np.where(m, 1, 0).astype(np.uint8), mode="P")
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png", transparency=0)
    assert Image.open(tmp_path / "p.png").mode == "P"
    img, alpha = preprocess_image(tmp_path / "p.png", size=64)
    assert alpha.max() == 1.0 and alpha.min() == 0.0
    assert torch.allclose(img[:, 32, 32], torch.tensor([10, 200, 30]) / 255.0, atol=0.03)

    # 16-bit greyscale on a plain (black) background: scaled from 16 bits, not clipped as 8 bits
    g = np.zeros((160, 160), np.uint16)
    g[m] = 40000
    Image.fromarray(g).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    rgb, a = load_image(tmp_path / "g16.png")
    assert a is None and rgb.shape == (160, 160, 3)
    assert rgb[70, 95, 0] == pytest.approx(40000 / 65535, abs=1e-4)
    img, alpha = preprocess_image(tmp_path / "g16.png", size=64)
    assert img[0, 32, 32] == pytest.approx(40000 / 65535, abs=0.01) and img[0, 0, 0] == 1.0

    # greyscale + alpha (LA)
    la = np.zeros((160, 160, 2), np.uint8)
    la[..., 0] = 90
    la[..., 1] = m * 255
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    img, alpha = preprocess_image(tmp_path / "la.png", size=64)
    assert torch.allclose(img[:, 32, 32], torch.full((3,), 90 / 255), atol=0.02)


def test_opaque_alpha_channel_falls_back_to_border(tmp_path):
    rgba = np.full((160, 160, 4), 255, np.uint8)
    rgba[disc_mask()] = (20, 20, 200, 255)
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    _, alpha = preprocess_image(tmp_path / "opaque.png", size=64)
    assert alpha[0, 0, 0] == 0.0 and alpha[0, 32, 32] == 1.0


def test_decoder_input_frames():
    assert input_frames(4) == [4, 9, 15, 20]
    assert input_frames(1) == [20]
    assert input_frames(21) == list(range(21))
    for n in range(1, 22):
        idx = input_frames(n)
        assert len(idx) == n and idx[-1] == 20
    with pytest.raises(ValueError):
        input_frames(0)
