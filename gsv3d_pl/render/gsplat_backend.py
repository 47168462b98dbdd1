"""gsplat backend: ``gsplat.rasterization(..., render_mode="RGB+ED")`` on CUDA tensors."""

from __future__ import annotations

import functools

from torch import Tensor

from gsv3d_pl.render.inputs import RasterInputs

__all__ = ["gsplat_available", "rasterize_gsplat"]


@functools.lru_cache(maxsize=1)
def gsplat_available() -> bool:
    """True when gsplat imports and its CUDA kernels load (they are JIT-built or shipped prebuilt)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        from gsplat.cuda._backend import _C  # noqa: F401  (None when the kernels failed to build/load)

        return _C is not None
    except Exception:  # any import/build failure means "not available"; "auto" falls back to the CPU backends
        return False


def rasterize_gsplat(inputs: RasterInputs) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as :func:`gsv3d_pl.render.torch_backend.rasterize_torch` (CUDA tensors).

    Args:
        inputs: means [B, N, 3], quats [B, N, 4], scales [B, N, 3], opacities [B, N], colors [B, N, 3],
            viewmats [B, C, 4, 4], Ks [B, C, 3, 3], W, H, backgrounds [B, C, 3] or None (black), near_plane.
    Returns:
        rgb [B, C, H, W, 3], alpha [B, C, H, W, 1], depth [B, C, H, W, 1].
    """
    from gsplat import rasterization

    x = inputs
    render, alpha, _ = rasterization(
        x.means, x.quats, x.scales, x.opacities, x.colors, x.viewmats, x.Ks, x.width, x.height,
        near_plane=x.near_plane, render_mode="RGB+ED", backgrounds=x.backgrounds, packed=False,
    )  # render [B, C, H, W, 4], alpha [B, C, H, W, 1]
    return render[..., :3], alpha, render[..., 3:4]
