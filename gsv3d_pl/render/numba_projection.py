"""Compiled EWA projection (numba) with an analytic backward: the parameter table of :mod:`.param_table` without
torch's per-op overhead.

The torch projection (:func:`~gsv3d_pl.render.projection.project_gaussians` + the table) is ~40 small ops over
[B, C, N] tensors and its backward re-runs that graph under autograd; at training sizes (V·N ~ 1e5 rows) the per-op
overhead dominates. Here one kernel computes the table rows and one kernel their backward, with the same formulas
(gsplat's pinhole EWA: the Jacobian sees tx/tz, ty/tz clamped to 1.3x the half-FoV tangent, eps2d on the diagonal,
det_safe, opacity-aware extents, the visibility rule; see ``project_gaussians``):

- ``_forward_kernel`` ranges over views v = b·C + c: table rows v·N + n, extents [V, N, 2], visible [V, N].
- ``_backward_kernel`` ranges over Gaussians (b, n) and loops over their C views inside, so every Gaussian's
  gradient has exactly one writer (no races between threads) and the per-Gaussian tail of the chain (factor
  M = R(q̂) diag(s) -> scales, rotation -> normalised quaternion -> quaternion) runs once, not once per view.

Everything is computed in float64 and cast on output, so a float32 table equals torch's float32 projection up to
torch's own rounding. Cameras get no gradient: :func:`.param_table.param_table` keeps the torch projection when
viewmats or Ks require grad.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from gsv3d_pl.render.inputs import RasterInputs
from gsv3d_pl.render.numba_jit import _jit
from gsv3d_pl.render.projection import ALPHA_MIN
from gsv3d_pl.render.threads import run_ranges

__all__ = ["numba_table"]


# ----------------------------------------------------------------------------------------------------------------
# Kernels. All inputs float64 and C-contiguous: means [B, N, 3], quats [B, N, 4], scales [B, N, 3], opacities
# [B, N], colors [B, N, 3], viewmats [B, C, 4, 4], Ks [B, C, 3, 3]. Outputs in the caller's dtype.
# ----------------------------------------------------------------------------------------------------------------
@_jit(inline="always")
def _factor(quats, scales, b, n, Rq, M):  # pragma: no cover - compiled
    """Fills Rq [3, 3] = R(q̂) and M [3, 3] = Rq diag(s) for q = quats[b, n] (wxyz, any norm), s = scales[b, n].
    Returns |q| and q̂ = q / max(|q|, 1e-12) (F.normalize's eps) as (|q|, w, x, y, z). (Scalar indexing
    throughout the kernels: array views would cost reference-count atomics shared between the threads.)"""
    q0, q1, q2, q3 = quats[b, n, 0], quats[b, n, 1], quats[b, n, 2], quats[b, n, 3]
    nq = np.sqrt(q0 * q0 + q1 * q1 + q2 * q2 + q3 * q3)
    rd = 1.0 / max(nq, 1e-12)
    w, x, y, z = q0 * rd, q1 * rd, q2 * rd, q3 * rd
    Rq[0, 0], Rq[0, 1], Rq[0, 2] = 1.0 - 2.0 * (y * y + z * z), 2.0 * (x * y - w * z), 2.0 * (x * z + w * y)
    Rq[1, 0], Rq[1, 1], Rq[1, 2] = 2.0 * (x * y + w * z), 1.0 - 2.0 * (x * x + z * z), 2.0 * (y * z - w * x)
    Rq[2, 0], Rq[2, 1], Rq[2, 2] = 2.0 * (x * z - w * y), 2.0 * (y * z + w * x), 1.0 - 2.0 * (x * x + y * y)
    for i in range(3):
        for j in range(3):
            M[i, j] = Rq[i, j] * scales[b, n, j]
    return nq, w, x, y, z


@_jit(inline="always")
def _camera(Ks, b, c, width, height):  # pragma: no cover - compiled
    """(fx, fy, cx, cy, lim_x_neg, lim_x_pos, lim_y_neg, lim_y_pos) of K = Ks[b, c]; the limits bound tx/tz and
    ty/tz in the Jacobian (gsplat's guard against exploding covariances far outside the frustum)."""
    fx, fy, cx, cy = Ks[b, c, 0, 0], Ks[b, c, 1, 1], Ks[b, c, 0, 2], Ks[b, c, 1, 2]
    tan_x, tan_y = 0.5 * width / fx, 0.5 * height / fy
    return (fx, fy, cx, cy, cx / fx + 0.3 * tan_x, (width - cx) / fx + 0.3 * tan_x, cy / fy + 0.3 * tan_y,
            (height - cy) / fy + 0.3 * tan_y)


@_jit(inline="always")
def _ewa(Rv, b, c, cam, near, eps2d, means, n, M, JR, F):  # pragma: no cover - compiled
    """One (view, Gaussian): fills JR = J R_view [2, 3] and F = JR M [2, 3] (Σ2D = F Fᵀ + eps2d·I, so the 3x3
    covariance is never formed), for the camera Rv[b, c] (viewmats) and the centre means[b, n]. Returns (tx, ty,
    tz, rz, ux, uy, a, b, c): camera-space centre, rz = 1/z (1 where culled by the near plane: avoids inf), the
    clamped tx/tz, ty/tz, and Σ2D = [[a, b], [b, c]]."""
    fx, fy, lxn, lxp, lyn, lyp = cam[0], cam[1], cam[4], cam[5], cam[6], cam[7]
    m0, m1, m2 = means[b, n, 0], means[b, n, 1], means[b, n, 2]
    tx = Rv[b, c, 0, 0] * m0 + Rv[b, c, 0, 1] * m1 + Rv[b, c, 0, 2] * m2 + Rv[b, c, 0, 3]
    ty = Rv[b, c, 1, 0] * m0 + Rv[b, c, 1, 1] * m1 + Rv[b, c, 1, 2] * m2 + Rv[b, c, 1, 3]
    tz = Rv[b, c, 2, 0] * m0 + Rv[b, c, 2, 1] * m1 + Rv[b, c, 2, 2] * m2 + Rv[b, c, 2, 3]
    rz = 1.0 / tz if tz > near else 1.0
    ux = min(max(tx * rz, -lxn), lxp)
    uy = min(max(ty * rz, -lyn), lyp)
    for k in range(3):  # J = [[fx rz, 0, -fx ux rz], [0, fy rz, -fy uy rz]]
        JR[0, k] = fx * rz * Rv[b, c, 0, k] - fx * ux * rz * Rv[b, c, 2, k]
        JR[1, k] = fy * rz * Rv[b, c, 1, k] - fy * uy * rz * Rv[b, c, 2, k]
    for i in range(2):
        for j in range(3):
            F[i, j] = JR[i, 0] * M[0, j] + JR[i, 1] * M[1, j] + JR[i, 2] * M[2, j]
    a = F[0, 0] * F[0, 0] + F[0, 1] * F[0, 1] + F[0, 2] * F[0, 2] + eps2d
    b = F[0, 0] * F[1, 0] + F[0, 1] * F[1, 1] + F[0, 2] * F[1, 2]
    c = F[1, 0] * F[1, 0] + F[1, 1] * F[1, 1] + F[1, 2] * F[1, 2] + eps2d
    return tx, ty, tz, rz, ux, uy, a, b, c


@_jit
def _forward_kernel(v0, v1, means, quats, scales, opacities, colors, viewmats, Ks, width, height, near, eps2d,
                    table, extents, visible):  # pragma: no cover - compiled
    """Views v0..v1-1: table [V*N, 10] rows (mx, my, conic a, b, c, opacity, r, g, b, z), extents [V, N, 2]
    footprint half-sizes, visible [V, N] (z >= near, det > 0, opacity >= 1/255)."""
    N, C = means.shape[1], viewmats.shape[1]
    Rq, M = np.empty((3, 3)), np.empty((3, 3))  # per-call scratch: no allocation inside the loops
    JR, F = np.empty((2, 3)), np.empty((2, 3))
    for v in range(v0, v1):
        b, c = v // C, v % C
        cam = _camera(Ks, b, c, width, height)
        for n in range(N):
            _factor(quats, scales, b, n, Rq, M)
            tx, ty, tz, rz, _, _, a, bb, cc = _ewa(viewmats, b, c, cam, near, eps2d, means, n, M, JR, F)
            det = a * cc - bb * bb
            rdet = 1.0 / det if det > 0 else 1.0  # 1 / det_safe
            op = opacities[b, n]
            r = v * N + n
            table[r, 0] = cam[0] * tx * rz + cam[2]  # the centre itself is not clamped
            table[r, 1] = cam[1] * ty * rz + cam[3]
            table[r, 2], table[r, 3], table[r, 4] = cc * rdet, -bb * rdet, a * rdet
            table[r, 5], table[r, 9] = op, tz
            table[r, 6], table[r, 7], table[r, 8] = colors[b, n, 0], colors[b, n, 1], colors[b, n, 2]
            visible[v, n] = tz >= near and det > 0 and op >= ALPHA_MIN
            # opacity-aware box: outside extend·sqrt(Σ2D_xx|yy), α < 1/255 analytically
            extend = min(np.sqrt(2.0 * np.log(max(op, ALPHA_MIN) / ALPHA_MIN)), 3.33)
            extents[v, n, 0] = extend * np.sqrt(max(a, 0.0))
            extents[v, n, 1] = extend * np.sqrt(max(cc, 0.0))


@_jit
def _backward_kernel(i0, i1, means, quats, scales, viewmats, Ks, width, height, near, eps2d, grad_table,
                     d_means, d_quats, d_scales, d_opacities, d_colors):  # pragma: no cover - compiled
    """Gaussians b·N + n in i0..i1-1: grad_table [V*N, 10] -> d_means [B, N, 3], d_quats [B, N, 4], d_scales
    [B, N, 3], d_opacities [B, N], d_colors [B, N, 3], each summed over the Gaussian's C views."""
    N, C = means.shape[1], viewmats.shape[1]
    Rq, M, dM = np.empty((3, 3)), np.empty((3, 3)), np.empty((3, 3))
    JR, F, dF, dJR = np.empty((2, 3)), np.empty((2, 3)), np.empty((2, 3)), np.empty((2, 3))
    Rv = viewmats  # [B, C, 4, 4]
    for gi in range(i0, i1):
        b, n = gi // N, gi % N
        nq, w, x, y, z = _factor(quats, scales, b, n, Rq, M)
        dM[:] = 0.0
        dmx = dmy = dmz = d_op = d_r = d_g = d_b = 0.0  # float64 sums over the views
        for c in range(C):
            r = (b * C + c) * N + n
            g0, g1, g2, g3, g4 = (grad_table[r, 0], grad_table[r, 1], grad_table[r, 2], grad_table[r, 3],
                                  grad_table[r, 4])
            cam = _camera(Ks, b, c, width, height)
            fx, fy = cam[0], cam[1]
            tx, ty, tz, rz, ux, uy, a, bb, cc = _ewa(viewmats, b, c, cam, near, eps2d, means, n, M, JR, F)
            det = a * cc - bb * bb
            if det > 0:  # conic = (c, -b, a) / det
                rdet = 1.0 / det
                g_det = -(g2 * cc - g3 * bb + g4 * a) * rdet * rdet
                ga, gb, gc = g4 * rdet + g_det * cc, -g3 * rdet - 2.0 * g_det * bb, g2 * rdet + g_det * a
            else:  # det_safe is the constant 1: conic = (c, -b, a)
                ga, gb, gc = 1.0 * g4, -1.0 * g3, 1.0 * g2
            for j in range(3):  # a = F0·F0 + eps2d, b = F0·F1, c = F1·F1 + eps2d
                dF[0, j] = 2.0 * ga * F[0, j] + gb * F[1, j]
                dF[1, j] = gb * F[0, j] + 2.0 * gc * F[1, j]
            for k in range(3):  # F = JR M
                for j in range(3):
                    dM[k, j] += JR[0, k] * dF[0, j] + JR[1, k] * dF[1, j]
                for i in range(2):
                    dJR[i, k] = dF[i, 0] * M[k, 0] + dF[i, 1] * M[k, 1] + dF[i, 2] * M[k, 2]
            # JR = J R_view: dJ = dJR R_viewᵀ, needed at J's non-constant entries (0, 0), (0, 2), (1, 1), (1, 2)
            dJ00 = dJR[0, 0] * Rv[b, c, 0, 0] + dJR[0, 1] * Rv[b, c, 0, 1] + dJR[0, 2] * Rv[b, c, 0, 2]
            dJ02 = dJR[0, 0] * Rv[b, c, 2, 0] + dJR[0, 1] * Rv[b, c, 2, 1] + dJR[0, 2] * Rv[b, c, 2, 2]
            dJ11 = dJR[1, 0] * Rv[b, c, 1, 0] + dJR[1, 1] * Rv[b, c, 1, 1] + dJR[1, 2] * Rv[b, c, 1, 2]
            dJ12 = dJR[1, 0] * Rv[b, c, 2, 0] + dJR[1, 1] * Rv[b, c, 2, 1] + dJR[1, 2] * Rv[b, c, 2, 2]
            # J's entries and the centre (mx, my) = (fx tx rz + cx, fy ty rz + cy) through rz, ux, uy, tx, ty
            d_rz = fx * (dJ00 - ux * dJ02) + fy * (dJ11 - uy * dJ12) + g0 * fx * tx + g1 * fy * ty
            d_tx, d_ty, d_tz = g0 * fx * rz, g1 * fy * rz, 1.0 * grad_table[r, 9]
            if -cam[4] < tx * rz < cam[5]:  # ux = clamp(tx rz): no gradient where clamped
                d_ux = -fx * rz * dJ02
                d_tx += d_ux * rz
                d_rz += d_ux * tx
            if -cam[6] < ty * rz < cam[7]:
                d_uy = -fy * rz * dJ12
                d_ty += d_uy * rz
                d_rz += d_uy * ty
            if tz > near:  # rz = 1/tz (else the constant 1)
                d_tz -= d_rz * rz * rz
            # (tx, ty, tz) = R_view mean + t_view
            dmx += Rv[b, c, 0, 0] * d_tx + Rv[b, c, 1, 0] * d_ty + Rv[b, c, 2, 0] * d_tz
            dmy += Rv[b, c, 0, 1] * d_tx + Rv[b, c, 1, 1] * d_ty + Rv[b, c, 2, 1] * d_tz
            dmz += Rv[b, c, 0, 2] * d_tx + Rv[b, c, 1, 2] * d_ty + Rv[b, c, 2, 2] * d_tz
            d_op += grad_table[r, 5]
            d_r += grad_table[r, 6]
            d_g += grad_table[r, 7]
            d_b += grad_table[r, 8]
        d_means[b, n, 0], d_means[b, n, 1], d_means[b, n, 2] = dmx, dmy, dmz
        d_opacities[b, n] = d_op
        d_colors[b, n, 0], d_colors[b, n, 1], d_colors[b, n, 2] = d_r, d_g, d_b
        # M = Rq diag(s): ds_j = Σ_i dM_ij Rq_ij, and dRq_ij = dM_ij s_j (stored in dM)
        for j in range(3):
            d_scales[b, n, j] = dM[0, j] * Rq[0, j] + dM[1, j] * Rq[1, j] + dM[2, j] * Rq[2, j]
            for i in range(3):
                dM[i, j] *= scales[b, n, j]
        G = dM
        gw = 2.0 * (z * (G[1, 0] - G[0, 1]) + y * (G[0, 2] - G[2, 0]) + x * (G[2, 1] - G[1, 2]))
        gx = 2.0 * (y * (G[0, 1] + G[1, 0]) + z * (G[0, 2] + G[2, 0]) + w * (G[2, 1] - G[1, 2])
                    - 2.0 * x * (G[1, 1] + G[2, 2]))
        gy = 2.0 * (x * (G[0, 1] + G[1, 0]) + w * (G[0, 2] - G[2, 0]) + z * (G[1, 2] + G[2, 1])
                    - 2.0 * y * (G[0, 0] + G[2, 2]))
        gz = 2.0 * (w * (G[1, 0] - G[0, 1]) + x * (G[0, 2] + G[2, 0]) + y * (G[1, 2] + G[2, 1])
                    - 2.0 * z * (G[0, 0] + G[1, 1]))
        # q̂ = q / max(|q|, 1e-12): project out the radial part (no gradient through a clamped norm)
        if nq >= 1e-12:
            dot, rn = w * gw + x * gx + y * gy + z * gz, 1.0 / nq
            d_quats[b, n, 0], d_quats[b, n, 1] = (gw - w * dot) * rn, (gx - x * dot) * rn
            d_quats[b, n, 2], d_quats[b, n, 3] = (gy - y * dot) * rn, (gz - z * dot) * rn
        else:
            d_quats[b, n, 0], d_quats[b, n, 1], d_quats[b, n, 2], d_quats[b, n, 3] = (
                gw / 1e-12, gx / 1e-12, gy / 1e-12, gz / 1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Python side.
# ----------------------------------------------------------------------------------------------------------------
def _f64(x: Tensor) -> np.ndarray:
    """A C-contiguous float64 numpy array of x (zero-copy when x already is one)."""
    return np.ascontiguousarray(x.detach().numpy(), dtype=np.float64)


class _NumbaTable(torch.autograd.Function):
    """The table of :func:`.param_table._table` with the numba kernels; no gradient to viewmats / Ks."""

    @staticmethod
    def forward(ctx, means, quats, scales, opacities, colors, viewmats, Ks, meta):  # type: ignore[override]
        width, height, near, eps2d = meta
        (B, N), C = means.shape[:2], viewmats.shape[1]
        ins = [_f64(x) for x in (means, quats, scales, opacities, colors, viewmats, Ks)]
        table = torch.empty(B * C * N, 10, dtype=means.dtype)  # [V*N, 10]
        extents = torch.empty(B * C, N, 2, dtype=means.dtype)  # [V, N, 2]
        visible = torch.empty(B * C, N, dtype=torch.bool)  # [V, N]
        run_ranges(_forward_kernel, B * C, *ins, width, height, near, eps2d, table.numpy(), extents.numpy(),
                   visible.numpy())
        ctx.meta = meta
        ctx.save_for_backward(means, quats, scales, opacities, colors, viewmats, Ks)  # guards in-place changes
        ctx.mark_non_differentiable(extents, visible)
        return table, extents, visible

    @staticmethod
    def backward(ctx, grad_table, _g_ext, _g_vis):  # type: ignore[override]
        means, quats, scales, opacities, colors, viewmats, Ks = ctx.saved_tensors
        width, height, near, eps2d = ctx.meta
        B, N = means.shape[:2]
        grads = [torch.empty(x.shape, dtype=x.dtype) for x in (means, quats, scales, opacities, colors)]
        g = grad_table.detach().contiguous().numpy()  # [V*N, 10]
        run_ranges(_backward_kernel, B * N, *(_f64(x) for x in (means, quats, scales, viewmats, Ks)), width, height,
                   near, eps2d, g, *(x.numpy() for x in grads))
        return (*(x if need else None for x, need in zip(grads, ctx.needs_input_grad)), None, None, None)


def numba_table(inputs: RasterInputs, eps2d: float) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`.param_table.param_table` computed by the numba kernels (float32/float64 CPU tensors, numba
    installed); differentiable w.r.t. the Gaussians only (viewmats and Ks get no gradient).

    Returns:
        table [V*N, 10], extents [V, N, 2] (no grad), visible [V, N] bool, V = B·C.
    """
    x = inputs
    return _NumbaTable.apply(x.means, x.quats, x.scales, x.opacities, x.colors, x.viewmats, x.Ks,
                             (x.width, x.height, x.near_plane, eps2d))
