"""``rasterize()``: gsplat's call signature over the project's backends, and the one backend switch."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from gsv3d_pl.render.gsplat_backend import gsplat_available, rasterize_gsplat
from gsv3d_pl.render.inputs import check_inputs, flatten_inputs
from gsv3d_pl.render.numba_backend import check_numba_inputs, numba_available, rasterize_numba
from gsv3d_pl.render.torch_backend import rasterize_torch

if TYPE_CHECKING:
    from gsv3d_pl.gaussians import Gaussians

__all__ = ["Backend", "BACKENDS", "rasterize", "rasterize_gaussians", "resolve_backend"]

log = logging.getLogger(__name__)
Backend = Literal["auto", "gsplat", "torch", "numba"]
BACKENDS: tuple[str, ...] = ("auto", "gsplat", "torch", "numba")
_RUN = {"gsplat": rasterize_gsplat, "torch": rasterize_torch, "numba": rasterize_numba}
_logged: set[tuple[str, str]] = set()


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The concrete backend ("gsplat", "numba" or "torch") that ``backend`` means for tensors on ``device``.

    "auto" is gsplat for CUDA tensors when its kernels load, else numba for float32/float64 CPU tensors when
    numba imports, else the pure-PyTorch compositor; the choice is logged once per process and device type.
    The explicit names raise when they cannot run on these tensors.
    """
    if backend not in BACKENDS:
        raise ValueError(f"rasterize: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and gsplat_available():
            chosen = "gsplat"
        elif device.type == "cpu" and dtype in (torch.float32, torch.float64) and numba_available():
            chosen = "numba"
        else:
            chosen = "torch"
        key = (device.type, chosen)
        if key not in _logged:
            _logged.add(key)
            log.info("rasterize(backend='auto'): using the %s backend for %s tensors", chosen, device.type)
        return chosen
    if backend == "gsplat" and (device.type != "cuda" or not gsplat_available()):
        raise RuntimeError(
            f"rasterize(backend='gsplat') needs CUDA tensors and gsplat's CUDA kernels (got device {device}, "
            f"kernels available: {gsplat_available()}). Use backend='auto', 'numba' or 'torch' on CPU."
        )
    if backend == "numba":
        check_numba_inputs(device, dtype)
    return backend


def rasterize(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    backgrounds: Tensor | None = None,
    backend: Backend = "auto",
    near_plane: float = 0.01,
) -> tuple[Tensor, Tensor, Tensor]:
    """Render 3D Gaussians into pinhole cameras (RGB, accumulated alpha and expected depth).

    Leading batch dims ``...`` of the Gaussians and of the cameras are broadcast against each other (e.g. B
    objects with C cameras each: means [B, N, 3], viewmats [B, C, 4, 4]; or one camera set for all objects).

    Args:
        means: [..., N, 3] centres in world coordinates.
        quats: [..., N, 4] rotations as wxyz quaternions (normalised internally).
        scales: [..., N, 3] linear scales (> 0).
        opacities: [..., N] in (0, 1).
        colors: [..., N, 3] RGB in [0, 1].
        viewmats: [..., C, 4, 4] world-to-camera matrices (OpenCV: +X right, +Y down, +Z forward).
        Ks: [..., C, 3, 3] intrinsics, pixel centres at (u + 0.5, v + 0.5).
        width, height: image size in pixels.
        backgrounds: [..., C, 3] background colours; None means white (1.0), the project default.
        backend: "auto", "gsplat", "torch" or "numba" (see :func:`resolve_backend`).
        near_plane: Gaussians whose centre has camera z < near_plane are culled.

    Returns:
        rgb: [..., C, H, W, 3] composited colour over the background.
        alpha: [..., C, H, W, 1] accumulated opacity.
        depth: [..., C, H, W, 1] expected planar camera z, Σwz / Σw (0 where alpha = 0).
    """
    check_inputs(means, quats, scales, opacities, colors, viewmats, Ks, backgrounds)
    chosen = resolve_backend(backend, means.device, means.dtype)
    inputs, batch = flatten_inputs((means, quats, scales, opacities, colors), viewmats, Ks, width, height,
                                   backgrounds, near_plane)
    rgb, alpha, depth = _RUN[chosen](inputs)  # [B, C, H, W, 3|1|1]
    C = viewmats.shape[-3]
    out_shape = (*batch, C, inputs.height, inputs.width)
    return rgb.reshape(*out_shape, 3), alpha.reshape(*out_shape, 1), depth.reshape(*out_shape, 1)


def rasterize_gaussians(
    gaussians: Gaussians, viewmats: Tensor, Ks: Tensor, width: int, height: int, **kwargs
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`rasterize` for a :class:`~gsv3d_pl.gaussians.Gaussians` container (batch [...] with cameras
    [..., C, 4, 4]); ``kwargs`` go to :func:`rasterize` (backgrounds, backend, near_plane)."""
    g = gaussians
    return rasterize(g.means, g.quats, g.scales, g.opacities, g.colors, viewmats, Ks, width, height, **kwargs)
