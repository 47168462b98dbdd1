"""The flattened inputs every backend takes: built once by :func:`gsv3d_pl.render.rasterize`.

The public call broadcasts any leading batch dims ``...`` of the Gaussians against those of the cameras; the
backends only ever see one flat batch dim B (objects) with C cameras each.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["RasterInputs", "flatten_inputs", "check_inputs"]


class RasterInputs(NamedTuple):
    """B Gaussian sets of N Gaussians, each seen by C cameras; all tensors share one dtype and device."""

    means: Tensor  # [B, N, 3] world-space centres
    quats: Tensor  # [B, N, 4] wxyz rotations (any norm)
    scales: Tensor  # [B, N, 3] linear scales
    opacities: Tensor  # [B, N] in (0, 1)
    colors: Tensor  # [B, N, 3] RGB
    viewmats: Tensor  # [B, C, 4, 4] world-to-camera (OpenCV)
    Ks: Tensor  # [B, C, 3, 3] intrinsics
    width: int  # W, image width in pixels
    height: int  # H, image height in pixels
    backgrounds: Tensor | None = None  # [B, C, 3], or None for black
    near_plane: float = 0.01  # centres with camera z below it are culled

    @property
    def batch(self) -> tuple[int, int, int]:
        """(B, C, N)."""
        return self.means.shape[0], self.viewmats.shape[1], self.means.shape[1]


def check_inputs(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, colors: Tensor, viewmats: Tensor,
                 Ks: Tensor, backgrounds: Tensor | None) -> None:
    """Raise ValueError naming the argument whose shape breaks the public contract of ``rasterize``."""
    N = means.shape[-2] if means.dim() >= 2 else -1
    lead = means.shape[:-2]
    expected = {
        "means": (means, (*lead, N, 3)), "quats": (quats, (*lead, N, 4)), "scales": (scales, (*lead, N, 3)),
        "opacities": (opacities, (*lead, N)), "colors": (colors, (*lead, N, 3)),
    }
    for name, (x, shape) in expected.items():
        if tuple(x.shape) != tuple(shape):
            raise ValueError(
                f"rasterize: {name} has shape {tuple(x.shape)}, expected {tuple(shape)} "
                "(means [..., N, 3], quats [..., N, 4], scales [..., N, 3], opacities [..., N], colors [..., N, 3])"
            )
    if viewmats.dim() < 3 or viewmats.shape[-2:] != (4, 4):
        raise ValueError(f"rasterize: viewmats must be [..., C, 4, 4], got {tuple(viewmats.shape)}")
    if Ks.shape != viewmats.shape[:-2] + (3, 3):
        raise ValueError(f"rasterize: Ks must be [..., C, 3, 3] matching viewmats, got {tuple(Ks.shape)}")
    if backgrounds is not None and backgrounds.shape[-1] != 3:
        raise ValueError(f"rasterize: backgrounds must be [..., C, 3] or None, got {tuple(backgrounds.shape)}")
    try:
        torch.broadcast_shapes(lead, viewmats.shape[:-3])
    except RuntimeError as e:
        raise ValueError(
            f"rasterize: Gaussian batch dims {tuple(lead)} do not broadcast with camera batch dims "
            f"{tuple(viewmats.shape[:-3])}"
        ) from e


def flatten_inputs(gaussians: tuple[Tensor, Tensor, Tensor, Tensor, Tensor], viewmats: Tensor, Ks: Tensor,
                   width: int, height: int, backgrounds: Tensor | None,
                   near_plane: float) -> tuple[RasterInputs, torch.Size]:
    """Broadcast and flatten the public inputs (already checked) to :class:`RasterInputs`.

    Args:
        gaussians: (means [..., N, 3], quats [..., N, 4], scales [..., N, 3], opacities [..., N], colors [..., N, 3]).
        viewmats: [..., C, 4, 4]; Ks: [..., C, 3, 3]; backgrounds: anything that broadcasts to [..., C, 3], or
            None for white (1.0).
    Returns:
        The flat inputs (B = the product of the broadcast batch dims) and that batch shape ``...``.
    """
    means = gaussians[0]
    batch = torch.broadcast_shapes(means.shape[:-2], viewmats.shape[:-3])
    C = viewmats.shape[-3]
    B = batch.numel()

    def flat(x: Tensor, tail: int) -> Tensor:
        return x.expand(*batch, *x.shape[x.dim() - tail:]).reshape(B, *x.shape[x.dim() - tail:])

    dtype = means.dtype
    if backgrounds is None:
        backgrounds = torch.ones(3, dtype=dtype, device=means.device)
    bg = backgrounds.to(dtype).expand(*batch, C, 3).reshape(B, C, 3)
    tails = (2, 2, 2, 1, 2)  # trailing dims of means, quats, scales, opacities, colors: [N, k] or [N]
    flat_gaussians = (flat(x, t) for x, t in zip(gaussians, tails))
    inputs = RasterInputs(*flat_gaussians, flat(viewmats.to(dtype), 3), flat(Ks.to(dtype), 3), int(width),
                          int(height), bg, float(near_plane))
    return inputs, batch
