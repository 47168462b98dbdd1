"""Compiled CPU compositing (numba): the same semantics and results as :mod:`.torch_backend`, ~20-50x faster.

The projection (EWA, conics, depths, culling, opacity-aware footprints) is
:func:`~gsv3d_pl.render.param_table.param_table`: by default compiled too (:mod:`.numba_projection`, an analytic
backward), or PyTorch autograd when the cameras require grad or ``projection="torch"`` is asked for. The
per-(Gaussian, pixel) compositing, where torch's per-op overhead dominates, runs in three numba kernels:

1. ``_bin``: every visible (view, Gaussian) is listed in each ``tile x tile`` screen tile its footprint box touches.
   Lists are built per view by a counting sort over tiles of the depth-sorted Gaussians, so each (view, tile) list
   is one contiguous, front-to-back segment of ``ids`` (gsplat's "intersection" lists).
2. ``_forward``: parallel over (view, tile) (chunks of tiles on a thread pool; the kernels release the GIL). Within a tile the Gaussians are walked front to back and each one
   only visits the pixels of its footprint box (instead of gsplat's every-pixel-x-every-listed-Gaussian loop, which
   suits a GPU warp but wastes most evaluations on a CPU when footprints are a few pixels wide). Per pixel:
   α = min(0.999, o·exp(-½dᵀΣ⁻¹d)), pairs with α < 1/255 (or a negative exponent) skipped, and the pixel stops
   *before* the pair that would bring T to <= 1e-4. Saves the final T and the last contributing list index.
3. ``_backward``: the same walk back to front (gsplat's ``rasterize_to_pixels`` backward): T is recovered as
   T / (1 - α) from the final T, and ``after`` = Σ_{j>i} w_j g_j is carried per pixel, giving
   dL/dα_i = T_i g_i - after / (1 - α_i) with g_i = dL/dw_i. Gradients are accumulated per list entry (one writer
   each, so no races between threads) and then summed per (view, Gaussian) in a per-view parallel pass (a
   Gaussian's entries all belong to one view).

The kernels output the per-pixel sums (Σwr, Σwg, Σwb, Σwz, Σw); background blending and the expected-depth ratio
Σwz / Σw are done in torch, so autograd differentiates the ratio exactly.

Kernels are compiled on first use (a few seconds per dtype; float32 and float64 are both supported) and cached on
disk (``cache=True``: next to this file in ``__pycache__``, or numba's user-wide cache / ``NUMBA_CACHE_DIR`` when
the install is read-only; without any writable location they are compiled per process instead).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from gsv3d_pl.render.inputs import RasterInputs
from gsv3d_pl.render.numba_jit import _IMPORT_ERROR, _jit, numba, numba_available
from gsv3d_pl.render.param_table import NPARAM, Z, images_from_sums, param_table, projection_mode
from gsv3d_pl.render.projection import ALPHA_MAX, ALPHA_MIN, EPS2D, T_MIN
from gsv3d_pl.render.threads import run_ranges

__all__ = ["numba_available", "rasterize_numba", "check_numba_inputs"]

# ----------------------------------------------------------------------------------------------------------------
# Kernels. Arrays: table [M, 10] per-(view, Gaussian) parameters (mx, my, conic a, b, c, opacity, r, g, b, z) with
# M = V*N; boxes [M, 4] int32 inclusive pixel box (u0, u1, v0, v1); offsets [V*nT + 1] int64 start of each
# (view, tile) list in ids [R] int32 (entries of the table).
# ----------------------------------------------------------------------------------------------------------------
@_jit
def _boxes_kernel(table, extents, visible, width, height, boxes, keep):  # pragma: no cover - compiled
    """Pixel box (centres u + 0.5 inside the footprint, clipped to the image) and keep flag of every entry."""
    M = table.shape[0]
    for i in range(M):
        mx, my = table[i, 0], table[i, 1]
        ex, ey = extents[i, 0] + 1e-3, extents[i, 1] + 1e-3  # margin against rounding at the box edge
        ok = visible[i] and np.isfinite(mx) and np.isfinite(my) and np.isfinite(ex) and np.isfinite(ey)
        if ok:
            u0 = max(np.ceil(mx - ex - 0.5), 0.0)
            u1 = min(np.floor(mx + ex - 0.5), width - 1.0)
            v0 = max(np.ceil(my - ey - 0.5), 0.0)
            v1 = min(np.floor(my + ey - 0.5), height - 1.0)
            ok = u0 <= u1 and v0 <= v1
        if ok:
            boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3] = int(u0), int(u1), int(v0), int(v1)
        else:
            boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3] = 0, -1, 0, -1
        keep[i] = ok


@_jit
def _count_kernel(v0, v1, boxes, keep, N, tile, tiles_x, tiles_y, counts):  # pragma: no cover - compiled
    """counts [V*nT]: number of list entries per (view, tile), for views v0..v1-1."""
    nT = tiles_x * tiles_y
    for v in range(v0, v1):
        for g in range(N):
            i = v * N + g
            if keep[i]:
                for ty in range(boxes[i, 2] // tile, boxes[i, 3] // tile + 1):
                    for tx in range(boxes[i, 0] // tile, boxes[i, 1] // tile + 1):
                        counts[v * nT + ty * tiles_x + tx] += 1


@_jit
def _fill_kernel(v0, v1, boxes, keep, depths, N, tile, tiles_x, tiles_y, offsets, ids):  # pragma: no cover
    """ids: per (view, tile) the entries in front-to-back depth order (stable: ties keep Gaussian order)."""
    nT = tiles_x * tiles_y
    for v in range(v0, v1):
        key = np.empty(N, np.float64)  # [N] depth, +inf for dropped entries (their depth may be nan)
        for g in range(N):
            key[g] = depths[v * N + g] if keep[v * N + g] else np.inf
        order = np.argsort(key, kind="mergesort")
        cursor = offsets[v * nT:(v + 1) * nT].copy()  # [nT] next free slot of each of this view's lists
        for k in range(N):
            i = v * N + order[k]
            if keep[i]:
                for ty in range(boxes[i, 2] // tile, boxes[i, 3] // tile + 1):
                    for tx in range(boxes[i, 0] // tile, boxes[i, 1] // tile + 1):
                        t = ty * tiles_x + tx
                        ids[cursor[t]] = i
                        cursor[t] += 1


@_jit(inline="always")
def _tile_of_job(job, width, height, tile, tiles_x, tiles_y):  # pragma: no cover - compiled
    """(view, x0, y0, x1, y1) of work item ``job`` = view * tiles + tile id; the pixel range [x0, x1) x [y0, y1)."""
    v = job // (tiles_x * tiles_y)
    tid = job - v * (tiles_x * tiles_y)
    x0 = (tid % tiles_x) * tile
    y0 = (tid // tiles_x) * tile
    return v, x0, y0, min(x0 + tile, width), min(y0 + tile, height)


@_jit(inline="always")
def _row_span(mx, dy, ca, cb, cc, smax, bu0, bu1, centre0):  # pragma: no cover - compiled
    """Pixel columns [u0, u1] of one pixel row (offset dy = my - row centre) whose exponent σ can be <= smax.

    Solves ½a·dx² + b·dy·dx + ½c·dy² <= smax for dx = mx - (u + 0.5), widened by 1e-3 px and clipped to the box
    [bu0, bu1]; an empty span has u0 > u1. Only narrows the loop: the exact α test still decides every pair.
    """
    disc = (cb * dy) * (cb * dy) - ca * (cc * dy * dy - 2.0 * smax)  # float64
    if disc < 0.0 or ca <= 0.0:
        return (bu0, bu0 - 1) if disc < 0.0 else (bu0, bu1)
    root = np.sqrt(disc)
    lo = (-cb * dy - root) / ca  # dx range
    hi = (-cb * dy + root) / ca
    # dx = mx - centre(u)  ->  u = mx - dx - centre0 with centre(u) = u + centre0
    u0 = max(bu0, int(np.ceil(mx - hi - centre0 - 1e-3)))
    u1 = min(bu1, int(np.floor(mx - lo - centre0 + 1e-3)))
    return u0, u1


@_jit
def _forward_kernel(j0, j1, table, boxes, offsets, ids, centres, consts, width, height, tile, tiles_x, tiles_y,
                    out, t_final, last, pairs):  # pragma: no cover - compiled
    """out [V, H, W, 5] = (Σwr, Σwg, Σwb, Σwz, Σw); t_final [V, H, W] transmittance after the last contributor;
    last [V, H, W] int64 list position (index into ids) of the last contributor, -1 if none; pairs [V*nT] number
    of (Gaussian, pixel) pairs evaluated per tile. centres [max(W, H)] pixel centres u + 0.5 and consts (½, 1/255,
    0.999, 1e-4, 1) in the table's dtype keep float32 tables in float32 arithmetic (as gsplat)."""
    half, alpha_min, alpha_max, t_min, one = consts[0], consts[1], consts[2], consts[3], consts[4]
    for job in range(j0, j1):
        v, x0, y0, x1, y1 = _tile_of_job(job, width, height, tile, tiles_x, tiles_y)
        tw, th = x1 - x0, y1 - y0
        # [th, tw] transmittance in front of the next pair; stored negated once the pixel is finished
        T = np.ones((th, tw), table.dtype)
        acc = np.zeros((th, tw, 5), table.dtype)
        lst = np.full((th, tw), -1, np.int64)
        remaining = tw * th
        evaluated = 0
        for r in range(offsets[job], offsets[job + 1]):
            if remaining == 0:  # every pixel of the tile has hit the transmittance floor
                break
            i = ids[r]
            bu0, bu1 = max(boxes[i, 0], x0), min(boxes[i, 1], x1 - 1)
            bv0, bv1 = max(boxes[i, 2], y0), min(boxes[i, 3], y1 - 1)
            mx, my, ca, cb, cc, op = table[i, 0], table[i, 1], table[i, 2], table[i, 3], table[i, 4], table[i, 5]
            cr, cg, cbl, z = table[i, 6], table[i, 7], table[i, 8], table[i, 9]
            smax = np.log(255.0 * np.float64(op)) + 1e-4  # α >= 1/255 needs σ <= ln(255·o)
            for py in range(bv0, bv1 + 1):
                ly = py - y0
                dy = my - centres[py]
                su0, su1 = _row_span(mx, dy, ca, cb, cc, smax, bu0, bu1, centres[0])
                for px in range(su0, su1 + 1):
                    lx = px - x0
                    t = T[ly, lx]
                    if t < 0:
                        continue
                    evaluated += 1
                    dx = mx - centres[px]
                    sigma = half * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
                    if sigma < 0:
                        continue
                    alpha = min(alpha_max, op * np.exp(-sigma))
                    if alpha < alpha_min:
                        continue
                    next_t = t * (one - alpha)
                    if next_t <= t_min:  # gsplat: stop before the pair that would take T to <= 1e-4
                        T[ly, lx] = -t
                        remaining -= 1
                        continue
                    w = alpha * t
                    acc[ly, lx, 0] += w * cr
                    acc[ly, lx, 1] += w * cg
                    acc[ly, lx, 2] += w * cbl
                    acc[ly, lx, 3] += w * z
                    acc[ly, lx, 4] += w
                    T[ly, lx] = next_t
                    lst[ly, lx] = r
        out[v, y0:y1, x0:x1, :] = acc
        t_final[v, y0:y1, x0:x1] = np.abs(T)
        last[v, y0:y1, x0:x1] = lst
        pairs[job] = evaluated


@_jit
def _backward_kernel(j0, j1, table, boxes, offsets, ids, centres, consts, width, height, tile, tiles_x, tiles_y,
                     grad_out, t_final, last, grad_rows):  # pragma: no cover - compiled
    """grad_out [V, H, W, 5] dL/d(out); fills grad_rows [R, 10] = dL/d(table row) contributed by each list entry."""
    half, alpha_min, alpha_max, one = consts[0], consts[1], consts[2], consts[4]
    for job in range(j0, j1):
        v, x0, y0, x1, y1 = _tile_of_job(job, width, height, tile, tiles_x, tiles_y)
        T = t_final[v, y0:y1, x0:x1].copy()  # [th, tw] transmittance after the pair being visited
        lst = last[v, y0:y1, x0:x1]
        go = grad_out[v, y0:y1, x0:x1, :].copy()  # [th, tw, 5]
        after = np.zeros(T.shape, table.dtype)  # Σ_{later pairs j} w_j g_j per pixel
        for r in range(offsets[job + 1] - 1, offsets[job] - 1, -1):
            i = ids[r]
            bu0, bu1 = max(boxes[i, 0], x0), min(boxes[i, 1], x1 - 1)
            bv0, bv1 = max(boxes[i, 2], y0), min(boxes[i, 3], y1 - 1)
            mx, my, ca, cb, cc, op = table[i, 0], table[i, 1], table[i, 2], table[i, 3], table[i, 4], table[i, 5]
            cr, cg, cbl, z = table[i, 6], table[i, 7], table[i, 8], table[i, 9]
            g_mx = g_my = g_ca = g_cb = g_cc = g_op = 0.0  # float64 accumulators: a row sums up to tile² pairs
            g_r = g_g = g_b = g_z = 0.0
            smax = np.log(255.0 * np.float64(op)) + 1e-4
            for py in range(bv0, bv1 + 1):
                ly = py - y0
                dy = my - centres[py]
                su0, su1 = _row_span(mx, dy, ca, cb, cc, smax, bu0, bu1, centres[0])
                for px in range(su0, su1 + 1):
                    lx = px - x0
                    if r > lst[ly, lx]:  # behind the pixel's last contributor (or the pixel had none)
                        continue
                    dx = mx - centres[px]
                    sigma = half * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
                    if sigma < 0:
                        continue
                    G = np.exp(-sigma)
                    a_raw = op * G
                    alpha = min(alpha_max, a_raw)
                    if alpha < alpha_min:
                        continue
                    one_m = one - alpha
                    t = T[ly, lx] / one_m  # transmittance in front of this pair
                    T[ly, lx] = t
                    w = alpha * t
                    go0, go1, go2, go3, go4 = go[ly, lx, 0], go[ly, lx, 1], go[ly, lx, 2], go[ly, lx, 3], go[ly, lx, 4]
                    g_r += w * go0
                    g_g += w * go1
                    g_b += w * go2
                    g_z += w * go3
                    gw = cr * go0 + cg * go1 + cbl * go2 + z * go3 + go4  # dL/dw of this pair
                    v_alpha = t * gw - after[ly, lx] / one_m
                    after[ly, lx] += w * gw
                    if a_raw <= alpha_max:  # the 0.999 clamp is not differentiated
                        g_op += v_alpha * G
                        v_sigma = -v_alpha * a_raw
                        g_mx += v_sigma * (ca * dx + cb * dy)
                        g_my += v_sigma * (cb * dx + cc * dy)
                        g_ca += v_sigma * dx * dx
                        g_cb += v_sigma * dx * dy
                        g_cc += v_sigma * dy * dy
            grad_rows[r, 0] = g_mx
            grad_rows[r, 1] = g_my
            grad_rows[r, 2] = 0.5 * g_ca
            grad_rows[r, 3] = g_cb
            grad_rows[r, 4] = 0.5 * g_cc
            grad_rows[r, 5] = g_op
            grad_rows[r, 6] = g_r
            grad_rows[r, 7] = g_g
            grad_rows[r, 8] = g_b
            grad_rows[r, 9] = g_z


@_jit
def _reduce_kernel(v0, v1, grad_rows, ids, offsets, nT, grad_table):  # pragma: no cover - compiled
    """grad_table [M, 10] += grad_rows [R, 10] per entry of views v0..v1-1 (a view's entries are its own, so
    disjoint view ranges can run concurrently)."""
    for v in range(v0, v1):
        for r in range(offsets[v * nT], offsets[(v + 1) * nT]):
            i = ids[r]
            for k in range(10):
                grad_table[i, k] += grad_rows[r, k]


# ----------------------------------------------------------------------------------------------------------------
# Python side.
# ----------------------------------------------------------------------------------------------------------------
class _Bins:
    """Per-(view, tile) front-to-back lists of table entries (numpy arrays shared by forward and backward)."""

    def __init__(self, boxes: np.ndarray, offsets: np.ndarray, ids: np.ndarray, V: int, width: int, height: int,
                 tile: int):
        self.boxes = boxes  # [M, 4] int32 inclusive pixel box (u0, u1, v0, v1) of each table entry
        self.offsets = offsets  # [V*nT + 1] int64 start of each (view, tile) list in ids
        self.ids = ids  # [R] int32 table entries, (view, tile, depth)-ordered
        self.V, self.width, self.height, self.tile = V, width, height, tile
        self.tiles_x, self.tiles_y = -(-width // tile), -(-height // tile)


def _aux(dtype, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres [max(W, H)] and the constants (½, 1/255, 0.999, 1e-4, 1) [5] in the table's dtype."""
    centres = np.arange(max(width, height), dtype=dtype) + dtype.type(0.5)
    return centres, np.array([0.5, ALPHA_MIN, ALPHA_MAX, T_MIN, 1.0], dtype)


def _bin(table: np.ndarray, extents: np.ndarray, visible: np.ndarray, V: int, N: int, width: int, height: int,
         tile: int) -> _Bins:
    M = V * N
    boxes = np.empty((M, 4), np.int32)  # [M, 4]
    keep = np.empty(M, np.bool_)  # [M]
    _boxes_kernel(table, extents, visible, width, height, boxes, keep)
    tiles_x, tiles_y = -(-width // tile), -(-height // tile)
    counts = np.zeros(V * tiles_x * tiles_y, np.int64)  # [V*nT]
    run_ranges(_count_kernel, V, boxes, keep, N, tile, tiles_x, tiles_y, counts)
    offsets = np.zeros(counts.size + 1, np.int64)  # [V*nT + 1]
    np.cumsum(counts, out=offsets[1:])
    ids = np.empty(int(offsets[-1]), np.int32)  # [R]
    run_ranges(_fill_kernel, V, boxes, keep, np.ascontiguousarray(table[:, Z]), N, tile, tiles_x, tiles_y, offsets,
              ids)
    return _Bins(boxes, offsets, ids, V, width, height, tile)


class _Composite(torch.autograd.Function):
    """table [V*N, 10] -> per-pixel sums [V, H, W, 5] = (Σwr, Σwg, Σwb, Σwz, Σw), compositing in numba."""

    @staticmethod
    def forward(ctx, table: Tensor, bins: _Bins, stats: dict | None) -> Tensor:  # type: ignore[override]
        tab = table.detach().contiguous().numpy()  # [M, 10] zero-copy view
        V, H, W = bins.V, bins.height, bins.width
        out = np.empty((V, H, W, 5), tab.dtype)  # [V, H, W, 5]
        t_final = np.empty((V, H, W), tab.dtype)  # [V, H, W]
        last = np.empty((V, H, W), np.int64)  # [V, H, W]
        pairs = np.zeros(bins.offsets.size - 1, np.int64)  # [V*nT]
        run_ranges(_forward_kernel, pairs.size, tab, bins.boxes, bins.offsets, bins.ids, *_aux(tab.dtype, W, H), W, H,
                  bins.tile, bins.tiles_x, bins.tiles_y, out, t_final, last, pairs)
        if stats is not None:
            stats["pairs"] = stats.get("pairs", 0) + int(pairs.sum())
            stats["rows"] = stats.get("rows", 0) + int(bins.ids.size)
            stats["tile"] = bins.tile
        ctx.bins, ctx.tab, ctx.t_final, ctx.last = bins, tab, t_final, last
        ctx.save_for_backward(table)  # keeps `tab`'s storage alive and guards against in-place changes
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        ctx.saved_tensors  # noqa: B018 - raises if the table was modified in place after forward
        bins: _Bins = ctx.bins
        tab = ctx.tab
        go = grad_out.detach().to(torch.from_numpy(tab).dtype).contiguous().numpy()  # [V, H, W, 5]
        grad_rows = np.empty((bins.ids.size, NPARAM), tab.dtype)  # [R, 10] one writer per list entry
        run_ranges(_backward_kernel, bins.offsets.size - 1, tab, bins.boxes, bins.offsets, bins.ids,
                  *_aux(tab.dtype, bins.width, bins.height), bins.width, bins.height, bins.tile, bins.tiles_x,
                  bins.tiles_y, go, ctx.t_final, ctx.last, grad_rows)
        grad_table = np.zeros_like(tab)  # [M, 10]
        run_ranges(_reduce_kernel, bins.V, grad_rows, bins.ids, bins.offsets, bins.tiles_x * bins.tiles_y, grad_table)
        return torch.from_numpy(grad_table), None, None


def rasterize_numba(
    inputs: RasterInputs, eps2d: float = EPS2D, tile_size: int = 16, stats: dict | None = None,
    projection: str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract and results as :func:`gsv3d_pl.render.torch_backend.rasterize_torch` (CPU tensors only).

    Args:
        inputs: means [B, N, 3], quats [B, N, 4], scales [B, N, 3], opacities [B, N], colors [B, N, 3],
            viewmats [B, C, 4, 4], Ks [B, C, 3, 3] (float32 or float64 CPU tensors), W, H, backgrounds [B, C, 3]
            or None (black), near_plane.
        eps2d: see :func:`~gsv3d_pl.render.projection.project_gaussians`.
        tile_size: side of the screen tiles that are the unit of parallel work (speed only).
        stats: if a dict, filled with "tile", "rows" (Gaussian-tile list entries) and "pairs" (Gaussian-pixel pairs
            evaluated in the forward pass).
        projection: the projection step, "auto", "torch" or "numba" (see
            :mod:`~gsv3d_pl.render.param_table`; the results agree, only the speed and the camera gradients
            differ); None follows :func:`~gsv3d_pl.render.param_table.projection_mode` (default "auto": numba
            unless viewmats or Ks require grad). Through :func:`~gsv3d_pl.render.rasterize` / ``render``, set it
            with ``with projection_mode("torch"): ...``.

    Returns:
        rgb [B, C, H, W, 3], alpha [B, C, H, W, 1], depth [B, C, H, W, 1] (expected depth, 0 where alpha = 0).
    """
    check_numba_inputs(inputs.means.device, inputs.means.dtype)
    if tile_size < 1:
        raise ValueError(f"rasterize_numba: tile_size must be >= 1, got {tile_size}")
    B, C, N = inputs.batch
    V = B * C
    width, height = inputs.width, inputs.height
    with projection_mode(projection):
        table, extents, visible = param_table(inputs, eps2d)  # [V*N, 10], [V, N, 2], [V, N]
    tab = table.detach().contiguous().numpy()  # [V*N, 10] zero-copy view
    bins = _bin(tab, extents.reshape(V * N, 2).to(table.dtype).contiguous().numpy(),
                visible.reshape(V * N).contiguous().numpy(), V, N, width, height, int(tile_size))
    sums = _Composite.apply(table, bins, stats)  # [V, H, W, 5]
    return images_from_sums(sums.reshape(B, C, height, width, 5), inputs.backgrounds)


def check_numba_inputs(device: torch.device, dtype: torch.dtype) -> None:
    """Raise a clear error unless numba imports and tensors on ``device`` of ``dtype`` suit the kernels
    (float32/float64 on CPU)."""
    if numba is None:
        raise RuntimeError(f"the numba backend needs numba (pip install 'numba>=0.60'): {_IMPORT_ERROR}")
    if device.type != "cpu":
        raise ValueError(f"the numba backend runs on CPU tensors, got device {device}; use backend='auto'")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the numba backend supports float32 and float64 tensors, got {dtype}")
