"""SV3D's orbit: the facts every module shares, defined once.

- ``NUM_FRAMES = 21`` frames at one elevation, frame i at azimuth (i+1)·360/21 degrees relative to the input
  view, so the **last frame (``INPUT_FRAME = 20``) is the input view** (azimuth 0). This is
  ``linspace(0, 360, 22)[1:] % 360`` of Stability's SV3D sampling script.
- ``FOV_DEG = 33.8`` (vertical = horizontal; stated by Stability staff, HF ``stabilityai/sv3d`` discussion #4).
- ``DEFAULT_RADIUS = 2.0``: SV3D's camera distance is not published; 2.0 is this project's choice, with
  objects normalised into the unit cube.
- SV3D's camera inputs are ``polar = radians(90 - elevation)`` and the azimuth in radians.

:func:`input_frames` is the one rule for "N evenly spaced input frames, ending at the input view": the
datamodule's evaluation frames and inference's default decoder frames.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "NUM_FRAMES", "INPUT_FRAME", "FOV_DEG", "DEFAULT_RADIUS", "orbit_azimuths_deg", "orbit_angles",
    "input_frames",
]

NUM_FRAMES = 21
INPUT_FRAME = NUM_FRAMES - 1
FOV_DEG = 33.8
DEFAULT_RADIUS = 2.0


def orbit_azimuths_deg(num_frames: int = NUM_FRAMES) -> Tensor:
    """[F] azimuths in degrees, (i+1)·360/F mod 360, float64: the last frame is the input view (0°)."""
    return torch.linspace(0.0, 360.0, num_frames + 1, dtype=torch.float64)[1:] % 360.0


def orbit_angles(batch: int, num_frames: int = NUM_FRAMES, elevation_deg: float | Tensor = 0.0,
                 device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """SV3D's camera inputs for a fixed-elevation orbit: (polars_rad [B, F], azimuths_rad [B, F]), float32.

    ``elevation_deg`` is a scalar or one value per batch item ([B]).
    """
    az = torch.deg2rad(orbit_azimuths_deg(num_frames)).float()  # [F]
    el = torch.as_tensor(elevation_deg, dtype=torch.float32).reshape(-1, 1).expand(batch, num_frames)  # [B, F]
    pol = torch.deg2rad(90.0 - el)
    return pol.to(device).contiguous(), az.expand(batch, num_frames).to(device).contiguous()


def input_frames(num_views: int, num_frames: int = NUM_FRAMES) -> list[int]:
    """N orbit frames spread evenly around the orbit, always including the input view (the last frame).

    Frames ``(F − 1 + round(k·F/N)) mod F`` for k = 0..N−1, sorted. N = 4 of 21 -> [4, 9, 15, 20] (about 90°
    apart); N = 1 -> [20].
    """
    if not 1 <= int(num_views) <= num_frames:
        raise ValueError(f"the number of input views must be in [1, {num_frames}], got {num_views}")
    idx = sorted({(num_frames - 1 + round(k * num_frames / num_views)) % num_frames for k in range(num_views)})
    # Steps of F/N >= 1 never collide for N <= F; keep the guarantee explicit.
    assert len(idx) == num_views, f"input_frames({num_views}) produced duplicates: {idx}"
    return idx

