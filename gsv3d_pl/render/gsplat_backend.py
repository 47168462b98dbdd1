"""gsplat backend: ``gsplat.rasterization(..., render_mode="RGB+ED")`` on CUDA tensors."""

from __future__ import annotations

import functools

from torch import Tensor

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
    except Exception:  # any import/build failure means "not available"; the caller falls back to torch
        return False


def rasterize_gsplat(
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
    near_plane: float = 0.01,
) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as :func:`gsv3d_pl.render.torch_backend.rasterize_torch` ([B, ...] flattened batch).

    Returns rgb [B, C, H, W, 3], alpha [B, C, H, W, 1], depth [B, C, H, W, 1].
    """
    from gsplat import rasterization

    render, alpha, _ = rasterization(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height,
        near_plane=near_plane, render_mode="RGB+ED", backgrounds=backgrounds, packed=False,
    )  # render [B, C, H, W, 4], alpha [B, C, H, W, 1]
    return render[..., :3], alpha, render[..., 3:4]
