"""rasterize(): shape checks, batch flattening and the backend switch."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from gsv3d_pl.render.gsplat_backend import gsplat_available, rasterize_gsplat
from gsv3d_pl.render.numba_backend import numba_available, rasterize_numba
from gsv3d_pl.render.torch_backend import project_gaussians, rasterize_torch

if TYPE_CHECKING:
    from gsv3d_pl.gaussians import Gaussians

__all__ = [
    "rasterize", "rasterize_gaussians", "resolve_backend", "project_gaussians", "Backend", "set_cpu_kernel",
    "cpu_kernel",
]

log = logging.getLogger(__name__)
Backend = Literal["auto", "torch", "gsplat"]
_logged: set[tuple[str, str]] = set()
CpuKernel = Literal["auto", "numba", "torch"]
_cpu_kernel: str | None = None  # set_cpu_kernel() override; None = the GSV3D_CPU_KERNEL environment variable


def set_cpu_kernel(kernel: CpuKernel | None) -> None:
    """Choose the compositor of the "torch" backend on CPU: "auto" (numba when it imports, else torch), "numba",
    "torch", or None to go back to the ``GSV3D_CPU_KERNEL`` environment variable (default "auto")."""
    if kernel not in (None, "auto", "numba", "torch"):
        raise ValueError(f"set_cpu_kernel: expected 'auto', 'numba', 'torch' or None, got {kernel!r}")
    global _cpu_kernel
    _cpu_kernel = kernel


def cpu_kernel() -> str:
    """The CPU compositor that ``rasterize(backend="torch"|"auto")`` uses now: "numba" or "torch"."""
    want = _cpu_kernel or os.environ.get("GSV3D_CPU_KERNEL", "auto").strip().lower() or "auto"
    if want not in ("auto", "numba", "torch"):
        raise ValueError(f"GSV3D_CPU_KERNEL must be 'auto', 'numba' or 'torch', got {want!r}")
    if want == "numba" and not numba_available():
        raise RuntimeError("GSV3D_CPU_KERNEL / set_cpu_kernel asks for 'numba' but numba does not import; "
                           "pip install 'numba>=0.60' or use 'auto'/'torch'")
    if want == "auto":
        return "numba" if numba_available() else "torch"
    return want


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ("torch" or "gsplat") that ``backend`` means for tensors on ``device``."""
    if backend not in ("auto", "torch", "gsplat"):
        raise ValueError(f"rasterize: backend must be 'auto', 'torch' or 'gsplat', got {backend!r}")
    if backend == "auto":
        chosen = "gsplat" if device.type == "cuda" and gsplat_available() else "torch"
        key = (device.type, chosen)
        if key not in _logged:
            _logged.add(key)
            log.info("rasterize(backend='auto'): using the %s backend for %s tensors", chosen, device.type)
        return chosen
    if backend == "gsplat" and (device.type != "cuda" or not gsplat_available()):
        raise RuntimeError(
            f"rasterize(backend='gsplat') needs CUDA tensors and gsplat's CUDA kernels (got device {device}, "
            f"kernels available: {gsplat_available()}). Use backend='torch' or 'auto' on CPU."
        )
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
        backend: "auto", "torch" or "gsplat" (see module docstring).
        near_plane: Gaussians whose centre has camera z < near_plane are culled.

    Returns:
        rgb: [..., C, H, W, 3] composited colour over the background.
        alpha: [..., C, H, W, 1] accumulated opacity.
        depth: [..., C, H, W, 1] expected planar camera z, Σwz / Σw (0 where alpha = 0).
    """
    _check_shapes(means, quats, scales, opacities, colors, viewmats, Ks, backgrounds)
    batch = torch.broadcast_shapes(means.shape[:-2], viewmats.shape[:-3])
    C = viewmats.shape[-3]
    B = 1
    for d in batch:
        B *= d

    def flat(x: Tensor, tail: int) -> Tensor:
        return x.expand(*batch, *x.shape[x.dim() - tail:]).reshape(B, *x.shape[x.dim() - tail:])

    dtype = means.dtype
    if backgrounds is None:
        backgrounds = torch.ones(3, dtype=dtype, device=means.device)
    bg = backgrounds.to(dtype).expand(*batch, C, 3).reshape(B, C, 3)
    args = (
        flat(means, 2), flat(quats, 2), flat(scales, 2), flat(opacities, 1), flat(colors, 2),
        flat(viewmats.to(dtype), 3), flat(Ks.to(dtype), 3), int(width), int(height),
    )
    chosen = resolve_backend(backend, means.device)
    if chosen == "gsplat":
        rgb, alpha, depth = rasterize_gsplat(*args, backgrounds=bg, near_plane=near_plane)
    elif means.device.type == "cpu" and means.dtype in (torch.float32, torch.float64) and cpu_kernel() == "numba":
        rgb, alpha, depth = rasterize_numba(*args, backgrounds=bg, near_plane=near_plane)
    else:
        rgb, alpha, depth = rasterize_torch(*args, backgrounds=bg, near_plane=near_plane)
    out_shape = (*batch, C, int(height), int(width))
    return rgb.reshape(*out_shape, 3), alpha.reshape(*out_shape, 1), depth.reshape(*out_shape, 1)


def rasterize_gaussians(
    gaussians: Gaussians, viewmats: Tensor, Ks: Tensor, width: int, height: int, **kwargs
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`rasterize` for a :class:`~gsv3d_pl.gaussians.Gaussians` container (batch [...] with cameras
    [..., C, 4, 4]); ``kwargs`` go to :func:`rasterize` (backgrounds, backend, near_plane)."""
    g = gaussians
    return rasterize(g.means, g.quats, g.scales, g.opacities, g.colors, viewmats, Ks, width, height, **kwargs)


def _check_shapes(means, quats, scales, opacities, colors, viewmats, Ks, backgrounds) -> None:
    N = means.shape[-2] if means.dim() >= 2 else -1
    lead = means.shape[:-2]
    expected = {
        "means": (means, (*lead, N, 3)),
        "quats": (quats, (*lead, N, 4)),
        "scales": (scales, (*lead, N, 3)),
        "opacities": (opacities, (*lead, N)),
        "colors": (colors, (*lead, N, 3)),
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
