"""Direct geometry supervision of pixel-aligned Gaussians on their own input views (a stage-1 switch, off in the paper).

L_3D reaches a Gaussian's depth only through the rasterizer: each rendered pixel blends many Gaussians, so the
gradient that tells one Gaussian where its surface is arrives mixed and weak. A pixel-aligned decoder (LGM,
Splatter Image, GSDecoder) puts Gaussian (n, u, v) on the ray of pixel (u, v) of input view n, and that view's
ground-truth depth and mask say exactly where it belongs. Two terms use this, neither needs a render:

- ``splat_depth``: the MSE between each Gaussian's planar camera z in its input view and the GT depth there, on
  foreground cells (GT coverage > 0.5); world units².
- ``splat_opacity``: the MSE between each Gaussian's opacity and the GT coverage of its cell, which empties the
  background (the grey fog of an under-trained decoder is background Gaussians left half-opaque).

The Gaussian grid H'×W' may be coarser than the image (``upsample < vae_factor``): the GT is area-averaged to it,
depth weighted by coverage so that silhouette cells are not pulled toward 0.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["splat_geometry_terms"]


def splat_geometry_terms(means: Tensor, opacities: Tensor, c2w: Tensor, depths: Tensor, alphas: Tensor
                         ) -> dict[str, Tensor]:
    """Per-object ``splat_depth`` and ``splat_opacity`` terms of pixel-aligned Gaussians (see the module doc).

    Args:
        means: [B, G, 3] Gaussian centres, G = N·H'·W' view-major then row-major (GSDecoder's layout).
        opacities: [B, G] in (0, 1).
        c2w: [B, N, 4, 4] OpenCV camera-to-world of the N input views the Gaussians are aligned to.
        depths: [B, N, 1, H, W] GT planar depth of those views (0 off-surface).
        alphas: [B, N, 1, H, W] GT coverage of those views.
    Returns:
        {"splat_depth": [B], "splat_opacity": [B]}.
    Raises:
        ValueError: G is not N·H'·W' for a grid H'×W' that divides H×W (not a pixel-aligned decoder).
    """
    B, G = opacities.shape
    N, H, W = depths.shape[1], depths.shape[-2], depths.shape[-1]
    per_view = G // N if G % N == 0 else 0
    f = round((H * W / per_view) ** 0.5) if per_view else 0  # image pixels per Gaussian cell side
    if not per_view or f < 1 or H % f or W % f or (H // f) * (W // f) != per_view:
        raise ValueError(
            f"splat geometry supervision (lambda_splat_depth / lambda_splat_opacity) needs pixel-aligned Gaussians: "
            f"G = N·H'·W' with H'×W' dividing the {H}×{W} views, got G = {G} for N = {N} views. Set both to 0 for "
            "a decoder whose Gaussians are not one per input pixel.")
    Ho, Wo = H // f, W // f
    a = alphas.float().flatten(0, 1)  # [BN, 1, H, W]
    cov = F.avg_pool2d(a, f)  # [BN, 1, Ho, Wo] GT coverage per cell
    z_gt = F.avg_pool2d(a * depths.float().flatten(0, 1), f) / cov.clamp_min(1e-6)  # [BN, 1, Ho, Wo] coverage-weighted
    cov = cov.reshape(B, N * Ho * Wo)  # [B, G], the Gaussians' order
    z_gt = z_gt.reshape(B, N * Ho * Wo)
    origin = c2w[..., :3, 3].float()  # [B, N, 3]
    forward = c2w[..., :3, 2].float()  # [B, N, 3] camera +z axis in world
    rel = means.reshape(B, N, Ho * Wo, 3) - origin[:, :, None]  # [B, N, HoWo, 3]
    z = (rel * forward[:, :, None]).sum(-1).reshape(B, G)  # [B, G] planar camera z in the own view
    fg = (cov > 0.5).to(z.dtype)  # [B, G]
    depth_term = ((z - z_gt).square() * fg).sum(1) / fg.sum(1).clamp_min(1)  # [B]
    opacity_term = (opacities - cov).square().mean(1)  # [B]
    return {"splat_depth": depth_term, "splat_opacity": opacity_term}
