"""Small input images for the image -> 3D tests: an off-centre disc, on transparency or on white."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def disc_mask(size: int = 160, center=(70, 95), radius: int = 30) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 < radius**2  # [H, W] bool


def write_rgba(path: Path, size: int = 160, color=(200, 40, 30)) -> Path:
    m = disc_mask(size)
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[..., :3] = color
    rgba[..., 3] = m * 255
    Image.fromarray(rgba).save(path)
    return path


def write_rgb_white(path: Path, size: int = 160, color=(200, 40, 30)) -> Path:
    m = disc_mask(size)
    rgb = np.full((size, size, 3), 255, np.uint8)
    rgb[m] = color
    Image.fromarray(rgb).save(path)
    return path
