"""The per-(view, Gaussian) parameter table the CPU/PyTorch compositors read, and their shared output step.

Both compositors (:mod:`.torch_backend`, :mod:`.numba_backend`) consume one [V·N, 10] table, V = B·C views, of
columns (mx, my, conic a, b, c, opacity, r, g, b, z), produce per-pixel sums (Σwr, Σwg, Σwb, Σwz, Σw), and turn
those into images the same way (:func:`images_from_sums`).

The projection that builds the table has two implementations of the same formulas (the ``projection`` switch,
:func:`projection_mode`; it applies to both compositors):

- ``"torch"``: :func:`~gsv3d_pl.render.projection.project_gaussians` in PyTorch autograd, differentiable w.r.t. the
  Gaussians *and* the cameras, any device and dtype.
- ``"numba"``: compiled kernels with an analytic backward (:mod:`.numba_projection`), several times faster on CPU
  where torch's per-op overhead dominates; float32/float64 CPU tensors, no gradient to viewmats / Ks. It computes
  in float64, so a float32 table differs from torch's float32 one only by torch's rounding (~1e-7 relative, up to
  ~1e-4 in entries that cancel).
- ``"auto"`` (default): numba when it can run and the cameras need no gradient, else torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from torch import Tensor

from gsv3d_pl.render.inputs import RasterInputs
from gsv3d_pl.render.numba_jit import numba_available
from gsv3d_pl.render.numba_projection import numba_table
from gsv3d_pl.render.projection import project_gaussians
from gsv3d_pl.render.threads import cpu_threads

__all__ = [
    "MX", "MY", "CA", "CB", "CC", "OP", "FEAT", "Z", "NPARAM", "PROJECTIONS", "param_table",
    "projection_mode", "resolve_projection", "images_from_sums",
]

MX, MY, CA, CB, CC, OP = range(6)  # columns: projected centre, conic (a, b, c), opacity
FEAT = slice(6, 10)  # r, g, b, z: the features each pair's weight w multiplies
Z = 9  # camera z of the centre
NPARAM = 10
PROJECTIONS: tuple[str, ...] = ("auto", "torch", "numba")
# The current projection choice; a ContextVar so that projection_mode() in one thread leaves other threads alone.
_PROJECTION: ContextVar[str] = ContextVar("gsv3d_projection", default="auto")


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


@contextlib.contextmanager
def projection_mode(projection: str | None) -> Iterator[None]:
    """Within the block, :func:`param_table` (so both CPU compositors) projects with ``projection``: "auto",
    "torch" or "numba" (module docstring); None leaves the current choice. Scoped to the calling thread, e.g.
    ``with projection_mode("torch"): render(...)`` to time the two side by side."""
    if projection is None:
        yield
        return
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    token = _PROJECTION.set(projection)
    try:
        yield
    finally:
        _PROJECTION.reset(token)


def resolve_projection(inputs: RasterInputs, projection: str | None = None) -> str:
    """The projection ("torch" or "numba") :func:`param_table` uses for ``inputs`` under ``projection`` (None:
    the current :func:`projection_mode`, default "auto").

    "auto" is numba for float32/float64 CPU tensors when numba imports and neither viewmats nor Ks requires grad
    (the kernels differentiate the Gaussians only), else torch. "numba" raises where it cannot run.
    """
    mode = _PROJECTION.get() if projection is None else projection
    if mode not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {mode!r}")
    x = inputs
    camera_grad = torch.is_grad_enabled() and (x.viewmats.requires_grad or x.Ks.requires_grad)
    runs = numba_available() and x.means.device.type == "cpu" and x.means.dtype in (torch.float32, torch.float64)
    if mode == "torch" or (mode == "auto" and (camera_grad or not runs)):
        return "torch"
    if not numba_available():
        raise RuntimeError("projection='numba' needs numba (pip install 'numba>=0.60')")
    if not runs:
        raise ValueError(f"projection='numba' needs float32/float64 CPU tensors, got {x.means.dtype} on "
                         f"{x.means.device}")
    if camera_grad:
        raise ValueError("projection='numba' gives viewmats and Ks no gradient, but they require grad; use 'auto' "
                         "or 'torch'")
    return "numba"


def param_table(inputs: RasterInputs, eps2d: float) -> tuple[Tensor, Tensor, Tensor]:
    """Project ``inputs`` and build the table, differentiable w.r.t. every Gaussian parameter (and the cameras
    when they require grad: then the torch projection runs).

    The projection is chosen by :func:`resolve_projection` under the current :func:`projection_mode` (default
    "auto": the numba kernels on CPU unless viewmats or Ks require grad); both compute the same formulas.

    Returns:
        table [V*N, 10] (row v*N + g: view v = b*C + c, Gaussian g), extents [V, N, 2] footprint half-sizes in
        pixels (no grad), visible [V, N] bool.
    """
    if resolve_projection(inputs) == "numba":
        return numba_table(inputs, eps2d)
    return _param_table_torch(inputs, eps2d)


def _param_table_torch(inputs: RasterInputs, eps2d: float) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`param_table` with the PyTorch projection (any device and dtype; gradients to the cameras too)."""
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
