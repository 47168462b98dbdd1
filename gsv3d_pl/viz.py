"""Visuals: image grids, depth colourisation, turntables of Gaussians, atomic PNG / MP4 / GIF writing.

Conventions: images are float RGB in [0, 1]. Functions accept channels-first ``[..., 3, H, W]`` (the
network / batch layout) unless they say otherwise; rendered frames from :func:`render_turntable` are
channels-last ``[F, H, W, 3]`` like the rasterizer's output. Everything here is CPU/GPU agnostic and
has no plotting-library dependency (matplotlib is not required).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gsv3d_pl.io import atomic_path
from gsv3d_pl.orbit import DEFAULT_RADIUS, FOV_DEG

__all__ = [
    "to_uint8",
    "make_grid",
    "labeled_rows",
    "turbo",
    "colorize_depth",
    "render_turntable",
    "save_image",
    "save_video",
    "ffmpeg_available",
]


def to_uint8(image: Tensor | np.ndarray, channels_last: bool | None = None) -> np.ndarray:
    """Float image(s) in [0, 1] -> uint8 channels-last numpy.

    Args:
        image: [..., 3, H, W] or [..., H, W, 3] (or 1 channel) float in [0, 1], or already uint8.
        channels_last: layout of ``image``; ``None`` guesses from the size of the last dimension.
    Returns:
        [..., H, W, C] uint8.
    """
    if isinstance(image, Tensor):
        image = image.detach().float().cpu().numpy()
    image = np.asarray(image)
    if channels_last is None:
        channels_last = image.shape[-1] in (1, 3, 4) and image.shape[-3] not in (1, 3, 4)
    if not channels_last:
        image = np.moveaxis(image, -3, -1)
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    return np.ascontiguousarray((np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


def make_grid(images: Tensor | Sequence[Tensor], nrow: int | None = None, padding: int = 2,
              pad_value: float = 1.0) -> Tensor:
    """Tile images into one image, row-major.

    Args:
        images: [B, C, H, W] (or a list of [C, H, W]) float images of one size.
        nrow: images per row; default ceil(sqrt(B)).
        padding: pixels between tiles and around the border.
        pad_value: the padding colour (white by default, the project's background).
    Returns:
        [C, rows*(H+p)+p, nrow*(W+p)+p] float.
    """
    if not isinstance(images, Tensor):
        images = torch.stack(list(images))
    if images.dim() != 4:
        raise ValueError(f"make_grid expects [B, C, H, W] images, got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    nrow = max(1, min(b, nrow or math.ceil(math.sqrt(b))))
    ncol_rows = math.ceil(b / nrow)
    grid = images.new_full((c, ncol_rows * (h + padding) + padding, nrow * (w + padding) + padding), pad_value)
    for i in range(b):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, y:y + h, x:x + w] = images[i]
    return grid


def labeled_rows(rows: Sequence[Tensor], padding: int = 2, pad_value: float = 1.0) -> Tensor:
    """Stack rows of images (e.g. input | GT | prediction | depth) into one grid.

    Rows may have different counts; short rows are padded with ``pad_value``.

    Args:
        rows: each [n_i, 3, H, W] (1-channel rows are repeated to RGB).
    Returns:
        [3, H_grid, W_grid] float.
    """
    rows = [r.expand(-1, 3, -1, -1) if r.shape[1] == 1 else r for r in rows]
    ncol = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[-2:]
    tiles = []
    for r in rows:
        if r.shape[-2:] != (h, w):
            raise ValueError(f"labeled_rows: every image must be {h}x{w}, got {tuple(r.shape[-2:])}")
        fill = r.new_full((ncol - r.shape[0], 3, h, w), pad_value)
        tiles.append(torch.cat([r.float(), fill.float()]))
    return make_grid(torch.cat(tiles), nrow=ncol, padding=padding, pad_value=pad_value)


# A degree-5 polynomial approximation of Google's Turbo colormap (within a few percent of the LUT).
_TURBO_COEFFS = torch.tensor([
    [0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943],  # red
    [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],  # green
    [0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973],  # blue
], dtype=torch.float64)


def turbo(x: Tensor) -> Tensor:
    """The Turbo colormap: values [...] in [0, 1] (clamped) -> RGB [..., 3] in [0, 1]. 0 is dark blue, 1 dark red."""
    x = x.clamp(0.0, 1.0).to(torch.float64)
    powers = torch.stack([x ** k for k in range(6)], dim=-1)  # [..., 6]
    rgb = powers @ _TURBO_COEFFS.to(x.device).T  # [..., 3]
    return rgb.clamp(0.0, 1.0).float()


def colorize_depth(depth: Tensor, alpha: Tensor | None = None, near: float | None = None, far: float | None = None,
                   background: float = 1.0, alpha_threshold: float = 0.5, quantiles: tuple[float, float] = (0.01, 0.99),
                   ) -> Tensor:
    """Colour planar depth maps with Turbo; near is red, far is blue, empty pixels get ``background``.

    The range is shared over the whole input (so a grid of views is comparable) and, unless given,
    taken from robust quantiles of the valid depths (outlier Gaussians do not wash out the map).

    Args:
        depth: [..., 1, H, W] planar depth (0 where nothing was hit).
        alpha: [..., 1, H, W] coverage; pixels with alpha < ``alpha_threshold`` are empty. Default: depth > 0.
        near, far: the depth range mapped to the ends of the colormap.
        background: colour of empty pixels.
    Returns:
        [..., 3, H, W] float RGB in [0, 1].
    """
    if depth.dim() < 3 or depth.shape[-3] != 1:
        raise ValueError(f"colorize_depth expects [..., 1, H, W] depth, got shape {tuple(depth.shape)}")
    depth = depth.detach().float()
    valid = depth > 0 if alpha is None else (alpha.detach().float() >= alpha_threshold) & (depth > 0)  # [..., 1, H, W]
    vals = depth[valid]
    if vals.numel() == 0:
        return torch.full((*depth.shape[:-3], 3, *depth.shape[-2:]), float(background), device=depth.device)
    if vals.numel() > 1_000_000:  # torch.quantile's input limit; a random subset gives the same quantiles
        vals = vals[torch.randperm(vals.numel(), device=vals.device)[:1_000_000]]
    lo = float(torch.quantile(vals, quantiles[0])) if near is None else float(near)
    hi = float(torch.quantile(vals, quantiles[1])) if far is None else float(far)
    hi = max(hi, lo + 1e-6)
    t = 1.0 - ((depth - lo) / (hi - lo)).clamp(0, 1)  # [..., 1, H, W]; 1 = near, 0 = far
    # Turbo's ends are near-black; [0.08, 0.92] keeps far clearly blue and near clearly red.
    rgb = turbo(0.08 + 0.84 * t[..., 0, :, :]).movedim(-1, -3)  # [..., 3, H, W]
    return torch.where(valid, rgb, torch.full_like(rgb, float(background)))


@torch.no_grad()
def render_turntable(gaussians, num_frames: int = 60, elevation_deg: float = 10.0, radius: float = DEFAULT_RADIUS,
                     fov_deg: float = FOV_DEG, size: int = 256, background: float = 1.0, chunk: int = 8,
                     backend: str = "auto", return_depth: bool = False) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Render a 360° orbit of one set of Gaussians.

    Frames follow the SV3D orbit convention (frame i at azimuth (i+1)·360/F, the last frame is the
    input view), so a turntable with F = ``NUM_FRAMES`` (21) matches the SV3D frames one to one.

    Args:
        gaussians: an unbatched :class:`gsv3d_pl.gaussians.Gaussians` (G Gaussians).
        num_frames: F.
        elevation_deg, radius, fov_deg: the orbit (defaults: SV3D's FoV and the project's radius, see
            :mod:`gsv3d_pl.orbit`).
        size: square frame size in pixels.
        background: background grey level.
        chunk: cameras rendered per rasterizer call (bounds memory).
    Returns:
        rgb [F, size, size, 3] float in [0, 1]; with ``return_depth`` also alpha and depth [F, size, size, 1].
    """
    from gsv3d_pl.cameras import orbit_cameras
    from gsv3d_pl.render import render

    if len(gaussians.batch_shape) != 0:
        raise ValueError(f"render_turntable expects unbatched Gaussians, got batch shape {tuple(gaussians.batch_shape)}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    cams = orbit_cameras(num_frames, elevation_deg, radius, fov_deg, size, size).to(gaussians.device)
    out = render(gaussians, cams.c2w, cams.K, size, size, background, backend, chunk_views=chunk)
    rgb, alpha, depth = (x.movedim(-3, -1) for x in out)  # [F, S, S, 3], [F, S, S, 1], [F, S, S, 1]
    rgb = rgb.clamp(0, 1)
    if return_depth:
        return rgb, alpha, depth
    return rgb


def save_image(image: Tensor | np.ndarray, path: str | os.PathLike) -> Path:
    """Write one image as PNG (or any format PIL infers from the suffix), atomically.

    Args:
        image: [3, H, W] / [1, H, W] float in [0, 1], or [H, W, 3] (either layout, float or uint8).
    """
    from PIL import Image

    path = Path(path)
    arr = to_uint8(image)  # [H, W, C]
    if arr.shape[-1] == 1:
        arr = arr[..., 0]
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))
    return path


def ffmpeg_available() -> bool:
    """Whether imageio can write MP4 (imageio-ffmpeg with its bundled or a system ffmpeg)."""
    try:
        import imageio_ffmpeg

        return Path(imageio_ffmpeg.get_ffmpeg_exe()).exists()
    except Exception:  # no package, or no binary for this platform
        return False


def save_video(frames: Tensor | np.ndarray, path: str | os.PathLike, fps: int = 24) -> Path:
    """Write frames as an MP4 (H.264 via imageio-ffmpeg) or, without ffmpeg or for a ``.gif`` path, a GIF.

    The file is written atomically. Odd frame sizes are padded (white) to even for H.264.

    Args:
        frames: [F, H, W, 3] (or [F, 3, H, W]) float in [0, 1] or uint8.
        path: target; its suffix picks the format (``.mp4`` falls back to ``.gif`` when ffmpeg is missing).
    Returns:
        The path actually written.
    """
    path = Path(path)
    arr = to_uint8(frames)  # [F, H, W, 3]
    if arr.ndim != 4 or arr.shape[0] == 0:
        raise ValueError(f"save_video expects [F, H, W, 3] frames with F >= 1, got shape {arr.shape}")
    if path.suffix.lower() == ".mp4" and not ffmpeg_available():
        path = path.with_suffix(".gif")
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".gif":
            from PIL import Image

            imgs = [Image.fromarray(f) for f in arr]
            imgs[0].save(tmp, format="GIF", save_all=True, append_images=imgs[1:],
                         duration=max(1, round(1000 / fps)), loop=0, optimize=False)
        else:
            import imageio.v2 as imageio

            h, w = arr.shape[1:3]
            if h % 2 or w % 2:  # yuv420p needs even sizes
                arr = np.pad(arr, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=255)
            writer = imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                        pixelformat="yuv420p", macro_block_size=1, quality=8,
                                        ffmpeg_log_level="error")
            try:
                for f in arr:
                    writer.append_data(f)
            finally:
                writer.close()
    return path
