"""The one camera-to-world rendering helper: a batch of Gaussian sets at V cameras, channels-first, chunked.

Every caller that renders :class:`~gsv3d_pl.gaussians.Gaussians` at OpenCV ``c2w`` cameras (the losses, the
turntables, inference, tests) goes through :func:`render`, so the float32 rule, the background handling and
the view chunking are written once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from gsv3d_pl.render.rasterizer import rasterize

if TYPE_CHECKING:
    from gsv3d_pl.gaussians import Gaussians

__all__ = ["Renders", "render"]


class Renders(NamedTuple):
    """Channels-first renders of V views (the networks' layout; ``.movedim(-3, -1)`` for channels-last)."""

    rgb: Tensor  # [..., V, 3, H, W] composited colour over the background
    alpha: Tensor  # [..., V, 1, H, W] accumulated opacity
    depth: Tensor  # [..., V, 1, H, W] expected planar camera z (0 where alpha = 0)


def render(
    gaussians: Gaussians,
    c2w: Tensor,
    K: Tensor,
    width: int,
    height: int,
    background: float | Tensor = 1.0,
    backend: str = "auto",
    chunk_views: int | None = None,
    near_plane: float = 0.01,
) -> Renders:
    """Render Gaussian sets at camera-to-world cameras, ``chunk_views`` views per rasterizer call.

    The rasterizer always runs in float32 (autocast off, inputs cast), so bf16 training renders exactly
    like float32 evaluation; the outputs are float32.

    Args:
        gaussians: :class:`~gsv3d_pl.gaussians.Gaussians` with batch shape [...] (e.g. [B] or []), G each.
        c2w: [..., V, 4, 4] OpenCV camera-to-world matrices (+X right, +Y down, +Z forward); the leading dims
            broadcast against the Gaussians' batch (one camera set [V, 4, 4] serves every object).
        K: [..., V, 3, 3] intrinsics at the render size (same leading dims as ``c2w``).
        width, height: image size in pixels.
        background: a scalar grey level, [3] RGB, or anything that broadcasts to [..., V, 3].
        backend: the rasterizer backend, see :func:`gsv3d_pl.render.rasterize`.
        chunk_views: views per rasterizer call (None or 0 = all at once); peak memory is that of one chunk.
        near_plane: Gaussians whose centre has camera z < near_plane are culled.

    Returns:
        :class:`Renders` ``(rgb [..., V, 3, H, W], alpha [..., V, 1, H, W], depth [..., V, 1, H, W])``.
    """
    if c2w.dim() < 3 or c2w.shape[-2:] != (4, 4):
        raise ValueError(f"render: c2w must be [..., V, 4, 4], got {tuple(c2w.shape)}")
    if K.shape != c2w.shape[:-2] + (3, 3):
        raise ValueError(f"render: K must be [..., V, 3, 3] matching c2w {tuple(c2w.shape)}, got {tuple(K.shape)}")
    g = gaussians
    batch = torch.broadcast_shapes(g.batch_shape, c2w.shape[:-3])
    V = c2w.shape[-3]
    chunk = V if not chunk_views else int(chunk_views)
    device = g.means.device
    bg = torch.as_tensor(background, dtype=torch.float32, device=device)
    bg = bg.expand(*batch, V, 3)  # [..., V, 3]
    with torch.autocast(device.type, enabled=False):
        # c2w is rigid, but a general inverse keeps the helper exact for any invertible pose the caller passes.
        viewmats = torch.linalg.inv(c2w.float())  # [..., V, 4, 4]
        Ks = K.float()
        params = (g.means.float(), g.quats.float(), g.scales.float(), g.opacities.float(), g.colors.float())
        outs = [
            rasterize(*params, viewmats[..., s:s + chunk, :, :], Ks[..., s:s + chunk, :, :], width, height,
                      backgrounds=bg[..., s:s + chunk, :], backend=backend, near_plane=near_plane)
            for s in range(0, V, chunk)
        ]  # each ([..., c, H, W, 3], [..., c, H, W, 1], [..., c, H, W, 1])
    rgb, alpha, depth = (
        (outs[0][i] if len(outs) == 1 else torch.cat([o[i] for o in outs], dim=-4)).movedim(-1, -3)
        for i in range(3)
    )
    return Renders(rgb, alpha, depth)
