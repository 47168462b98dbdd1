"""The per-(view, Gaussian) parameter table the CPU/PyTorch compositors read, and their shared output step.

Both compositors (:mod:`.torch_backend`, :mod:`.numba_backend`) consume one [V·N, 10] table, V = B·C views, of
columns (mx, my, conic a, b, c, opacity, r, g, b, z), produce per-pixel sums (Σwr, Σwg, Σwb, Σwz, Σw), and turn
those into images the same way (:func:`images_from_sums`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gsv3d_pl.render.inputs import RasterInputs
from gsv3d_pl.render.projection import project_gaussians
from gsv3d_pl.render.threads import cpu_threads

__all__ = ["MX", "MY", "CA", "CB", "CC", "OP", "FEAT", "Z", "NPARAM", "param_table", "images_from_sums"]

MX, MY, CA, CB, CC, OP = range(6)  # columns: projected centre, conic (a, b, c), opacity
FEAT = slice(6, 10)  # r, g, b, z: the features each pair's weight w multiplies
Z = 9  # camera z of the centre
NPARAM = 10


def _table(means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane, eps2d):
    """Projection + table: table [V*N, 10], extents [V, N, 2], visible [V, N] from [B, N, ...] / [B, C, ...]."""
    B, N = means.shape[:2]
    C = viewmats.shape[1]
    means2d, conics, depths, extents, visible = project_gaussians(
        means, quats, scales, opacities, viewmats, Ks, width, height, near_plane, eps2d
    )
    table = torch.cat(
        [
            means2d,
            conics,
            opacities[:, None, :, None].expand(B, C, N, 1),
            colors[:, None].expand(B, C, N, 3),
            depths[..., None],
        ],
        dim=-1,
    ).reshape(B * C * N, NPARAM)  # [V*N, 10]
    return table, extents.reshape(B * C, N, 2), visible.reshape(B * C, N)


class _ParamTable(torch.autograd.Function):
    """:func:`_table` whose backward recomputes the (cheap) projection graph under the single-threaded CPU policy
    of :mod:`.threads` instead of keeping it alive, so no autograd op of the renderer runs with OpenMP fork/join."""

    @staticmethod
    def forward(ctx, means, quats, scales, opacities, colors, viewmats, Ks, meta):  # type: ignore[override]
        ctx.meta = meta
        ctx.save_for_backward(means, quats, scales, opacities, colors, viewmats, Ks)
        table, extents, visible = _table(means, quats, scales, opacities, colors, viewmats, Ks, *meta)
        ctx.mark_non_differentiable(extents, visible)
        return table, extents, visible

    @staticmethod
    def backward(ctx, grad_table, _g_ext, _g_vis):  # type: ignore[override]
        inputs = [x.detach().requires_grad_(need) for x, need in zip(ctx.saved_tensors, ctx.needs_input_grad)]
        with torch.enable_grad(), cpu_threads(grad_table.device):
            table, _, _ = _table(*inputs, *ctx.meta)
            wanted = [x for x in inputs if x.requires_grad]
            grads = iter(torch.autograd.grad(table, wanted, grad_table, allow_unused=True))
        return (*(next(grads) if x.requires_grad else None for x in inputs), None)


def param_table(inputs: RasterInputs, eps2d: float) -> tuple[Tensor, Tensor, Tensor]:
    """Project ``inputs`` and build the table (differentiable w.r.t. every Gaussian parameter and camera).

    Returns:
        table [V*N, 10] (row v*N + g: view v = b*C + c, Gaussian g), extents [V, N, 2] footprint half-sizes in
        pixels (no grad), visible [V, N] bool.
    """
    x = inputs
    with cpu_threads(x.means.device):  # small ops: OpenMP fork/join would cost more than it saves
        return _ParamTable.apply(x.means, x.quats, x.scales, x.opacities, x.colors, x.viewmats, x.Ks,
                                 (x.width, x.height, x.near_plane, eps2d))


def images_from_sums(sums: Tensor, backgrounds: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pixel sums [B, C, H, W, 5] = (Σwr, Σwg, Σwb, Σwz, Σw) -> rgb [B, C, H, W, 3] (over ``backgrounds``
    [B, C, 3], or black for None), alpha [B, C, H, W, 1] = Σw, depth [B, C, H, W, 1] = Σwz / Σw (0 where
    alpha = 0). Done in torch, so autograd differentiates the depth ratio exactly."""
    alpha = sums[..., 4:5]
    rgb = sums[..., :3]
    if backgrounds is not None:
        rgb = rgb + (1.0 - alpha) * backgrounds[:, :, None, None, :]
    depth = sums[..., 3:4] / alpha.clamp(min=1e-10)
    return rgb, alpha, depth
