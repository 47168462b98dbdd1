"""Pure-PyTorch differentiable 3D Gaussian compositor (CPU and GPU), with gsplat's default semantics.

It implements the package's rasterisation semantics (see :mod:`gsv3d_pl.render` and ``docs/conventions.md``)
on the projection of :mod:`.projection` and the parameter table of :mod:`.param_table` (whose ``projection``
switch applies here too: on CPU with numba installed the table comes from the compiled, equivalent projection of
:mod:`.numba_projection` unless ``projection_mode("torch")`` or the cameras require grad).

Algorithm (no dense [pixels × Gaussians] matrix; memory and time O(pairs)):

1. Project every (view, Gaussian) with autograd (cheap: V·N small matrices).
2. Cut each image into ``t × t`` tiles (t chosen per call from the footprint sizes). Each visible Gaussian
   emits one *row* per tile its footprint touches. Rows are enumerated in per-view depth order and then
   stably sorted by tile id once, so each tile's rows form one contiguous segment in front-to-back order.
   A row covers t² (Gaussian, pixel) pairs; a pixel's pairs are the column of its tile segment.
3. Transmittance is a segmented exclusive cumulative product, computed as ``exp`` of a cumulative sum of
   ``log(1 - α)`` down each tile segment's rows.
4. The per-pair work runs in cache-sized blocks of whole segments inside one ``autograd.Function`` with an
   analytic backward (the standard back-to-front compositing gradient via a reverse segmented cumsum).
   Only the per-row parameters are saved; per-pair quantities are recomputed in backward. The 2-core CPU
   this targets is memory-bandwidth bound, so keeping temporaries in cache is worth ~5-10x.

Gradients flow to means, quats, scales, opacities and colors (and the depth channel into the means).
Exactly as in gsplat, the 3σ/1/255 cut-offs, the 0.999 clamp and the T stop are not differentiated.
"""

from __future__ import annotations

import bisect
import math

import torch
from torch import Tensor

from gsv3d_pl.render.inputs import RasterInputs
from gsv3d_pl.render.param_table import CA, CB, CC, FEAT, MX, MY, NPARAM, OP, Z, images_from_sums, param_table
from gsv3d_pl.render.projection import ALPHA_MAX, ALPHA_MIN, EPS2D, T_MIN
from gsv3d_pl.render.threads import cpu_threads, intra_op_threads, thread_pool

__all__ = ["rasterize_torch"]

_LOG_T_MIN = math.log(T_MIN)
# Cost model for choosing the tile size: a row costs about this many per-pair operations on top of its t² pairs
# (sort, gathers, row sums).
_ROW_COST = 8.0


def _choose_tile(u0: Tensor, u1: Tensor, v0: Tensor, v1: Tensor) -> int:
    """Tile size t in {2, 4, 8, 16} minimising the estimated cost sum_rows (t² + row overhead)."""
    best, best_cost = 4, math.inf
    for t in (2, 4, 8, 16):
        rows = ((u1 // t - u0 // t + 1) * (v1 // t - v0 // t + 1)).sum().item()
        cost = rows * (t * t + _ROW_COST)
        if cost < best_cost:
            best, best_cost = t, cost
    return best


class _Rows:
    """The (Gaussian, tile) rows of one chunk of views, sorted by (view, tile, depth). All index tensors are [R]."""

    def __init__(self, param_idx: Tensor, seg: Tensor, px0: Tensor, py0: Tensor, seg_counts: Tensor,
                 num_segments: int, tile: int) -> None:
        self.param_idx = param_idx  # [R] long: row of the [V*N, 10] per-(view, Gaussian) parameter table
        self.seg = seg  # [R] long: local segment (= view-in-chunk * tiles_per_view + tile) id
        self.px0, self.py0 = px0, py0  # [R] float: x/y of the first pixel centre of the row's tile
        self.seg_counts = seg_counts  # [S] long: rows per segment
        self.num_segments = num_segments
        self.tile = tile


@torch.no_grad()
def _build_rows(
    means2d: Tensor, extents: Tensor, depths: Tensor, visible: Tensor, view0: int, width: int, height: int,
    tile: int,
) -> _Rows:
    """Rows for the views ``view0 .. view0 + Vc - 1`` (tensors given already sliced to [Vc, N, ...])."""
    Vc, N = depths.shape
    device = depths.device
    tiles_x, tiles_y = -(-width // tile), -(-height // tile)
    mx, my = means2d[..., 0].detach(), means2d[..., 1].detach()  # [Vc, N]
    ex, ey = extents[..., 0] + 1e-3, extents[..., 1] + 1e-3  # margin against rounding at the box edge
    # Integer pixel ranges whose centres (u + 0.5) lie inside the footprint, clipped to the image.
    u0 = torch.ceil(mx - ex - 0.5).clamp(min=0)
    u1 = torch.floor(mx + ex - 0.5).clamp(max=width - 1)
    v0 = torch.ceil(my - ey - 0.5).clamp(min=0)
    v1 = torch.floor(my + ey - 0.5).clamp(max=height - 1)
    ok = visible & (u0 <= u1) & (v0 <= v1) & torch.isfinite(mx) & torch.isfinite(my)  # [Vc, N]
    # Front-to-back order within each view; culled Gaussians go last and are dropped below.
    order = torch.argsort(torch.where(ok, depths.detach(), torch.full_like(depths, math.inf)), dim=1)  # [Vc, N]
    flat = (order + torch.arange(Vc, device=device)[:, None] * N).reshape(-1)  # [Vc*N]
    flat = flat[ok.reshape(-1)[flat]]  # [Nv] visible (view, Gaussian) ids, (view, depth)-ordered
    u0, u1, v0, v1 = (x.reshape(-1)[flat].long() for x in (u0, u1, v0, v1))
    tx0, ty0 = u0 // tile, v0 // tile
    ntx = u1 // tile - tx0 + 1
    nty = v1 // tile - ty0 + 1
    counts = ntx * nty  # [Nv] rows per (view, Gaussian)
    item = torch.repeat_interleave(torch.arange(flat.numel(), device=device), counts)  # [R]
    R = item.numel()
    local = torch.arange(R, device=device) - (torch.cumsum(counts, 0) - counts)[item]  # [R] row within its box
    ntx_i = ntx[item]
    ty = ty0[item] + local // ntx_i  # [R]
    tx = tx0[item] + local % ntx_i
    pidx = flat[item]  # [R] (view-in-chunk)*N + g
    view = pidx // N
    seg = (view * tiles_y + ty) * tiles_x + tx  # [R]
    # One stable sort: rows were generated in (view, depth) order, so they end up (view, tile, depth)-ordered.
    seg, perm = torch.sort(seg, stable=True)
    pidx = pidx[perm] + view0 * N
    tile_id = seg % (tiles_x * tiles_y)
    dt = means2d.dtype
    px0 = ((tile_id % tiles_x) * tile).to(dt) + 0.5
    py0 = ((tile_id // tiles_x) * tile).to(dt) + 0.5
    num_segments = Vc * tiles_x * tiles_y
    seg_counts = torch.bincount(seg, minlength=num_segments)
    return _Rows(pidx, seg, px0, py0, seg_counts, num_segments, tile)


def _blocks(seg_counts: Tensor, target_rows: int) -> list[tuple[int, int, int, int]]:
    """Split segments into consecutive blocks of ~target_rows rows: [(row0, row1, seg0, seg1), ...]."""
    ends = torch.cumsum(seg_counts, 0).tolist()  # row end of each segment
    total = ends[-1] if ends else 0
    out, r0, s0 = [], 0, 0
    while r0 < total:
        s1 = bisect.bisect_left(ends, r0 + target_rows) + 1  # first segment end >= r0 + target
        s1 = min(s1, len(ends))
        r1 = ends[s1 - 1]
        out.append((r0, r1, s0, s1))
        r0, s0 = r1, s1
    return out


def _run_blocks(fn, blocks: list, device: torch.device, workers: int) -> None:
    """Run ``fn`` over the blocks: on CPU each block's ops single-threaded, blocks spread over ``workers`` threads
    (the per-block tensors are cache-sized; see :mod:`.threads` for why threads beat OpenMP here)."""
    if device.type != "cpu":  # GPU: kernels are asynchronous already; threads would only add overhead
        for b in blocks:
            fn(b)
        return
    with intra_op_threads(1):
        if workers <= 1 or len(blocks) <= 1:
            for b in blocks:
                fn(b)
            return

        # Grad and inference mode are thread-local: workers must run in the caller's modes (Lightning's
        # validation/test steps run under inference_mode, and in-place writes to inference tensors need it).
        grad_on, inference_on = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

        def worker(k: int) -> None:
            torch.set_num_threads(1)  # OpenMP's thread count is per OS thread
            with torch.inference_mode(inference_on), torch.set_grad_enabled(grad_on):
                for b in blocks[k::workers]:
                    fn(b)

        ex = thread_pool(workers)
        for f in [ex.submit(worker, k) for k in range(workers)]:
            f.result()


def _pair_terms(p: Tensor, px0: Tensor, py0: Tensor, seg: Tensor, seg_first: Tensor, lx: Tensor, ly: Tensor):
    """Per-pair quantities of one block. p [Rb, 10] row params; px0/py0/seg [Rb]; seg_first [Sb] (first local row
    of each segment); lx, ly [P] pixel offsets inside a tile. Returns dx, dy, G, a_raw, alpha, active, T, w, all
    [Rb, P]."""
    dx = p[:, MX, None] - (px0[:, None] + lx)  # [Rb, P] mean - pixel centre
    dy = p[:, MY, None] - (py0[:, None] + ly)
    sigma = 0.5 * (p[:, CA, None] * dx * dx + p[:, CC, None] * dy * dy) + p[:, CB, None] * dx * dy
    G = torch.exp(-sigma)
    a_raw = p[:, OP, None] * G
    alpha = a_raw.clamp(max=ALPHA_MAX)
    valid = (sigma >= 0) & (alpha >= ALPHA_MIN)
    alpha = torch.where(valid, alpha, torch.zeros((), dtype=alpha.dtype, device=alpha.device))
    la = torch.log1p(-alpha.double())  # [Rb, P]; float64 so the block-wide running sum stays exact enough
    cs = torch.cumsum(la, 0)
    base = (cs - la).index_select(0, seg_first.clamp(0, cs.shape[0] - 1))[seg]  # [Rb, P] running sum just before each segment
    log_t_incl = cs - base
    T = torch.exp(log_t_incl - la).to(alpha.dtype)  # transmittance in front of the pair
    active = valid & (log_t_incl > _LOG_T_MIN)  # pixel not yet finished (gsplat: stop when next T <= 1e-4)
    w = torch.where(active, alpha * T, torch.zeros((), dtype=alpha.dtype, device=alpha.device))
    return dx, dy, G, a_raw, alpha, active, T, w


class _Composite(torch.autograd.Function):
    """Front-to-back compositing of sorted rows into per-tile sums [S, P, 5] = (Σwr, Σwg, Σwb, Σwz, Σw)."""

    @staticmethod
    def forward(ctx, table: Tensor, rows: _Rows, block_rows: int, workers: int) -> Tensor:  # type: ignore[override]
        """table [V*N, 10] per-(view, Gaussian) parameters; rows.param_idx [R] picks each row's entry."""
        t = rows.tile
        P = t * t
        dev, dt = table.device, table.dtype
        lx = (torch.arange(P, device=dev) % t).to(dt)  # [P]
        ly = (torch.arange(P, device=dev) // t).to(dt)
        out = torch.zeros(rows.num_segments, P, 5, dtype=dt, device=dev)  # [S, P, 5]
        blocks = _blocks(rows.seg_counts, block_rows)
        seg_start = torch.cumsum(rows.seg_counts, 0) - rows.seg_counts  # [S] first row of each segment

        def run(block: tuple[int, int, int, int]) -> None:
            r0, r1, s0, s1 = block
            p = table.index_select(0, rows.param_idx[r0:r1])  # [Rb, 10]
            seg = rows.seg[r0:r1] - s0
            *_, w = _pair_terms(p, rows.px0[r0:r1], rows.py0[r0:r1], seg, seg_start[s0:s1] - r0, lx, ly)
            src = torch.cat([w[:, :, None] * p[:, None, FEAT], w[:, :, None]], dim=-1)  # [Rb, P, 5]
            out[s0:s1].index_add_(0, seg, src)  # blocks own disjoint segment ranges: thread-safe

        _run_blocks(run, blocks, dev, workers)
        ctx.rows, ctx.blocks, ctx.lx, ctx.ly, ctx.seg_start, ctx.workers = rows, blocks, lx, ly, seg_start, workers
        ctx.save_for_backward(table)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (table,) = ctx.saved_tensors
        rows: _Rows = ctx.rows
        grad = table.new_zeros(rows.param_idx.numel(), NPARAM)  # [R, 10] per-row gradients
        go_t = grad_out.permute(2, 0, 1).contiguous()  # [5, S, P]

        def run(block: tuple[int, int, int, int]) -> None:
            r0, r1, s0, s1 = block
            p = table.index_select(0, rows.param_idx[r0:r1])  # [Rb, 10]
            seg = rows.seg[r0:r1] - s0
            seg_first = ctx.seg_start[s0:s1] - r0
            dx, dy, G, a_raw, alpha, active, T, w = _pair_terms(
                p, rows.px0[r0:r1], rows.py0[r0:r1], seg, seg_first, ctx.lx, ctx.ly
            )
            feat = p[:, FEAT]  # [Rb, 4]
            # dL/dw_i = c_i · dL/dC_p + dL/dA_p; channel-first gathers keep every op a plain [Rb, P] elementwise op.
            g = go_t[4, s0:s1].index_select(0, seg)  # [Rb, P]
            for k in range(4):
                go_k = go_t[k, s0:s1].index_select(0, seg)  # [Rb, P]
                g = g + feat[:, k, None] * go_k
                grad[r0:r1, 6 + k] = (w * go_k).sum(1)
            # dL/dα_i = T_i g_i - (Σ_{j>i} w_j g_j) / (1 - α_i), the sum over later pairs of the same pixel.
            h = (w * g).double()
            csh = torch.cumsum(h, 0)  # [Rb, P]
            seg_last = (torch.cat([seg_first[1:], seg_first.new_tensor([r1 - r0])]) - 1).clamp(0, r1 - r0 - 1)  # [Sb]
            after = csh.index_select(0, seg_last)[seg] - csh  # [Rb, P]
            v_alpha = T * g - (after / (1.0 - alpha.double())).to(g.dtype)
            v_raw = torch.where(active & (a_raw <= ALPHA_MAX), v_alpha, torch.zeros_like(v_alpha))
            grad[r0:r1, OP] = (v_raw * G).sum(1)
            v_sigma = -v_raw * a_raw  # dα/dσ = -o·G
            ca, cb, cc = p[:, CA, None], p[:, CB, None], p[:, CC, None]
            grad[r0:r1, MX] = (v_sigma * (ca * dx + cb * dy)).sum(1)
            grad[r0:r1, MY] = (v_sigma * (cb * dx + cc * dy)).sum(1)
            grad[r0:r1, CA] = 0.5 * (v_sigma * dx * dx).sum(1)
            grad[r0:r1, CB] = (v_sigma * dx * dy).sum(1)
            grad[r0:r1, CC] = 0.5 * (v_sigma * dy * dy).sum(1)

        _run_blocks(run, ctx.blocks, table.device, ctx.workers)
        with cpu_threads(table.device):
            grad_table = torch.zeros_like(table).index_add_(0, rows.param_idx, grad)  # [V*N, 10]
        return grad_table, None, None, None


def rasterize_torch(
    inputs: RasterInputs,
    eps2d: float = EPS2D,
    tile_size: int | None = None,
    block_pairs: int = 1 << 16,
    chunk_pairs: int = 1 << 24,
    stats: dict | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Render B Gaussian sets into C cameras each (see :class:`~gsv3d_pl.render.inputs.RasterInputs`).

    Args:
        inputs: means [B, N, 3], quats [B, N, 4], scales [B, N, 3], opacities [B, N], colors [B, N, 3],
            viewmats [B, C, 4, 4], Ks [B, C, 3, 3], W, H, backgrounds [B, C, 3] or None (black), near_plane.
        eps2d: see :func:`~gsv3d_pl.render.projection.project_gaussians`.
        tile_size: side of the compositing tiles; None picks one from the footprint sizes.
        block_pairs: (Gaussian, pixel) pairs per compositing block (cache blocking; speed only).
        chunk_pairs: pairs per chunk of views whose rows are built at once (bounds the row-index memory).
        stats: if a dict, filled with "tile" (t), "rows" (Gaussian-tile rows R), "pairs" (R·t², the evaluated
            Gaussian-pixel pairs) and "chunks".

    Returns:
        rgb [B, C, H, W, 3], alpha [B, C, H, W, 1], depth [B, C, H, W, 1] (expected depth, 0 where alpha = 0).
    """
    workers = torch.get_num_threads()
    # Everything here is single-threaded per op (see .threads); parallelism is over compositing blocks.
    with cpu_threads(inputs.means.device):
        return _rasterize(inputs, eps2d, tile_size, block_pairs, chunk_pairs, stats, workers)


def _rasterize(inputs: RasterInputs, eps2d: float, tile_size: int | None, block_pairs: int, chunk_pairs: int,
               stats: dict | None, workers: int) -> tuple[Tensor, Tensor, Tensor]:
    B, C, N = inputs.batch
    width, height = inputs.width, inputs.height
    V = B * C
    params, extents_v, visible_v = param_table(inputs, eps2d)  # [V*N, 10], [V, N, 2], [V, N]
    means2d_d = params.detach()[:, MX:MY + 1].reshape(V, N, 2)
    depths_v = params.detach()[:, Z].reshape(V, N)

    with torch.no_grad():
        mx, my = means2d_d[..., 0], means2d_d[..., 1]
        ex, ey = extents_v[..., 0], extents_v[..., 1]
        u0 = torch.ceil(mx - ex - 0.5).clamp(0, width - 1).long()
        u1 = torch.floor(mx + ex - 0.5).clamp(0, width - 1).long()
        v0 = torch.ceil(my - ey - 0.5).clamp(0, height - 1).long()
        v1 = torch.floor(my + ey - 0.5).clamp(0, height - 1).long()
        vis = visible_v & (mx + ex > 0) & (mx - ex < width) & (my + ey > 0) & (my - ey < height)
        if tile_size is None:
            tile_size = _choose_tile(u0[vis], u1[vis], v0[vis], v1[vis])
        t = tile_size
        rows_per_view = (((u1 // t - u0 // t + 1) * (v1 // t - v0 // t + 1)) * vis).sum(1).tolist()  # [V]

    tiles_x, tiles_y = -(-width // t), -(-height // t)
    P = t * t
    if inputs.means.device.type != "cpu":
        block_pairs = max(block_pairs, 1 << 22)  # GPU: big blocks, the cache argument does not apply
    block_rows = max(1, block_pairs // P)
    chunk_rows = max(1, chunk_pairs // P)
    per_view = []  # [Vc, tiles_y*t, tiles_x*t, 5] per chunk
    v = 0
    while v < V:
        v1_, acc = v, 0
        while v1_ < V and (v1_ == v or acc + rows_per_view[v1_] <= chunk_rows):
            acc += rows_per_view[v1_]
            v1_ += 1
        rows = _build_rows(means2d_d[v:v1_], extents_v[v:v1_], depths_v[v:v1_], visible_v[v:v1_], v, width,
                           height, t)
        sums = _Composite.apply(params, rows, block_rows, workers)  # [S, P, 5]
        img = sums.reshape(v1_ - v, tiles_y, tiles_x, t, t, 5).permute(0, 1, 3, 2, 4, 5)
        per_view.append(img.reshape(v1_ - v, tiles_y * t, tiles_x * t, 5))
        v = v1_
        if stats is not None:
            stats["rows"] = stats.get("rows", 0) + rows.seg.numel()
            stats["chunks"] = stats.get("chunks", 0) + 1
    if stats is not None:
        stats["tile"] = t
        stats["pairs"] = stats.get("rows", 0) * P
    sums = torch.cat(per_view, 0)[:, :height, :width].reshape(B, C, height, width, 5)
    return images_from_sums(sums, inputs.backgrounds)
