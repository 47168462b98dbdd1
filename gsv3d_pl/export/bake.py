"""Bake a texture from the Gaussians' own renders: every texel's surface point is looked up in the views that see it.

1. :func:`bake_cameras`: V cameras spread evenly over the sphere around the object (a Fibonacci lattice), so every
   side, the top and the bottom included, is seen head-on by some view.
2. :func:`bake_texture`: the Gaussians are rendered at those cameras with the project's renderer
   (:func:`gsv3d_pl.render.render`, on a black background so colour is premultiplied by alpha). Each texel's
   3D point is projected into every view; a view counts where the point is *visible* (its camera depth is within
   ``depth_tolerance`` of the rendered expected depth, so points behind a nearer surface are skipped, and the
   pixel's alpha is high) and is weighted by ``alpha · cos(view angle)^angle_power``: grazing views smear the
   texture, head-on views resolve it. The colour is the weighted mean of the un-premultiplied render colours.
3. :func:`fill_texture`: texels that no view saw (deep concavities) take the opacity-weighted colour of their
   nearest Gaussians; texels outside the charts (the gutters) copy the nearest covered texel, so bilinear
   filtering and mipmaps at chart seams read the chart's own colours instead of black.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from gsv3d_pl.export.atlas import TexelMap

# The renderer's numba helpers: on-disk cached nogil kernels, threaded over ranges by a persistent pool.
from gsv3d_pl.render.numba_backend import _jit
from gsv3d_pl.render.threads import run_ranges

__all__ = ["bake_cameras", "bake_texture", "fill_texture"]


def bake_cameras(center: np.ndarray, radius: float, num_views: int, size: int, fov_deg: float = 30.0
                 ) -> tuple[Tensor, Tensor]:
    """``num_views`` cameras on a Fibonacci sphere around ``center``, each framing the sphere of ``radius``.

    Returns:
        c2w [V, 4, 4] (OpenCV), K [V, 3, 3] for ``size``×``size`` images.
    """
    from gsv3d_pl.cameras import fov_to_K, look_at

    if num_views < 1:
        raise ValueError(f"the bake needs at least 1 view, got {num_views}")
    i = np.arange(num_views, dtype=np.float64) + 0.5
    y = 1.0 - 2.0 * i / num_views  # [V] evenly spaced heights: equal-area bands
    r = np.sqrt(np.clip(1.0 - y * y, 0.0, 1.0))
    phi = i * math.pi * (3.0 - math.sqrt(5.0))  # golden angle
    dirs = np.stack([r * np.sin(phi), y, r * np.cos(phi)], axis=-1)  # [V, 3] unit
    dist = radius / math.sin(math.radians(fov_deg) / 2) * 1.05  # the bounding sphere fits the frame
    center_t = torch.as_tensor(center, dtype=torch.float32)
    eye = center_t + torch.as_tensor(dirs * dist, dtype=torch.float32)
    # look_at's up (+Y) is degenerate straight above/below; it falls back to +Z there.
    c2w = look_at(eye, center_t.expand_as(eye))
    K = fov_to_K(fov_deg, size, size).expand(num_views, 3, 3).clone()
    return c2w, K


@_jit
def _bake_view(i0, i1, pts, nrm, w2c, K, eye, rgba, depth, S, tol, min_alpha, power, acc, wsum):  # pragma: no cover
    """Add one view's weighted colour to texels [i0, i1). Serial and ``nogil``: :func:`run_ranges` threads it.

    pts, nrm: [N, 3] texel points and normals; w2c: [4, 4]; K: [3, 3]; eye: [3] camera centre;
    rgba: [S, S, 4] premultiplied render; depth: [S, S] expected depth; acc: [N, 3], wsum: [N] (in place).
    """
    for i in range(i0, i1):
        px, py, pz = pts[i, 0], pts[i, 1], pts[i, 2]
        dx, dy, dz = eye[0] - px, eye[1] - py, eye[2] - pz
        cos = (nrm[i, 0] * dx + nrm[i, 1] * dy + nrm[i, 2] * dz) / np.sqrt(dx * dx + dy * dy + dz * dz + 1e-20)
        if cos <= 0.05:  # back-facing or grazing
            continue
        cx = w2c[0, 0] * px + w2c[0, 1] * py + w2c[0, 2] * pz + w2c[0, 3]
        cy = w2c[1, 0] * px + w2c[1, 1] * py + w2c[1, 2] * pz + w2c[1, 3]
        z = w2c[2, 0] * px + w2c[2, 1] * py + w2c[2, 2] * pz + w2c[2, 3]
        if z <= 1e-6:
            continue
        u = K[0, 0] * cx / z + K[0, 1] * cy / z + K[0, 2] - 0.5  # pixel coordinates, centres at integers
        v = K[1, 1] * cy / z + K[1, 2] - 0.5
        if not (0.0 <= u <= S - 1 and 0.0 <= v <= S - 1):
            continue
        # Visibility: the rendered depth at the nearest pixel must be this point's own depth.
        if abs(z - depth[int(v + 0.5), int(u + 0.5)]) >= tol:
            continue
        u0, v0 = min(int(u), S - 2), min(int(v), S - 2)
        fu, fv = u - u0, v - v0
        w00, w01, w10, w11 = (1 - fu) * (1 - fv), fu * (1 - fv), (1 - fu) * fv, fu * fv
        a = (w00 * rgba[v0, u0, 3] + w01 * rgba[v0, u0 + 1, 3] + w10 * rgba[v0 + 1, u0, 3]
             + w11 * rgba[v0 + 1, u0 + 1, 3])
        if a <= min_alpha:
            continue
        w = a * cos ** power
        for c in range(3):  # the premultiplied colour / alpha = the surface's own colour
            col = (w00 * rgba[v0, u0, c] + w01 * rgba[v0, u0 + 1, c] + w10 * rgba[v0 + 1, u0, c]
                   + w11 * rgba[v0 + 1, u0 + 1, c])
            acc[i, c] += w * col / a
        wsum[i] += w


@torch.no_grad()
def bake_texture(gaussians, texels: TexelMap, c2w: Tensor, K: Tensor, size: int, depth_tolerance: float,
                 angle_power: float = 2.0, min_alpha: float = 0.5, backend: str = "auto",
                 chunk_views: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Weighted multi-view colour of every covered texel.

    Args:
        gaussians: an unbatched :class:`~gsv3d_pl.gaussians.Gaussians`.
        texels: the atlas' texel map (T×T).
        c2w, K: [V, 4, 4], [V, 3, 3] bake cameras for ``size``×``size`` renders.
        depth_tolerance: world units a texel point may lie in front of / behind the rendered depth and count as
            seen (the iso-surface sits ~1 voxel outside the Gaussians' expected depth).
        angle_power: p of the view weight ``alpha · cos^p``.
        min_alpha: pixels with less accumulated opacity (silhouette fringes) are not used.
        chunk_views: views per render call (bounds the memory of the renders).
    Returns:
        colour [T, T, 3] float32 in [0, 1] (0 where unseen), weight [T, T] float32 (0 = no view saw the texel).
    """
    from gsv3d_pl.render import render

    T = texels.covered.shape[0]
    idx = np.flatnonzero(texels.covered.reshape(-1))  # [N] covered texels
    pts = np.ascontiguousarray(texels.position.reshape(-1, 3)[idx], np.float32)  # [N, 3]
    nrm = np.ascontiguousarray(texels.normal.reshape(-1, 3)[idx], np.float32)  # [N, 3]
    acc = np.zeros((len(idx), 3), np.float32)
    wsum = np.zeros(len(idx), np.float32)
    g = gaussians.to("cpu")
    S = int(size)
    for s in range(0, c2w.shape[0], chunk_views):
        cw, Kc = c2w[s:s + chunk_views].float(), K[s:s + chunk_views].float()
        rgb, alpha, depth = render(g, cw, Kc, S, S, background=0.0, backend=backend)  # [v, 3|1|1, S, S]
        rgba = torch.cat([rgb, alpha], 1).permute(0, 2, 3, 1).contiguous().numpy()  # [v, S, S, 4] premultiplied
        depth = depth[:, 0].contiguous().numpy()  # [v, S, S]
        w2c = torch.linalg.inv(cw).numpy()
        for j in range(cw.shape[0]):
            run_ranges(_bake_view, len(idx), pts, nrm, w2c[j], Kc[j].numpy(), cw[j, :3, 3].numpy(), rgba[j],
                       depth[j], S, np.float32(depth_tolerance), np.float32(min_alpha), np.float32(angle_power),
                       acc, wsum)
    colour = np.zeros((T * T, 3), np.float32)
    weight = np.zeros(T * T, np.float32)
    colour[idx] = np.clip(acc / np.maximum(wsum, 1e-12)[:, None], 0.0, 1.0)
    weight[idx] = wsum
    return colour.reshape(T, T, 3), weight.reshape(T, T)


def fill_texture(colour: np.ndarray, weight: np.ndarray, texels: TexelMap, gaussians, k: int = 8) -> np.ndarray:
    """Colour the texels the bake could not: unseen surface texels from nearby Gaussians, gutters from charts.

    Args:
        colour: [T, T, 3], weight: [T, T] from :func:`bake_texture`.
        gaussians: the unbatched set the texture was baked from (its means, opacities and colours).
        k: Gaussians averaged per unseen texel (weights: opacity / distance).
    Returns:
        [T, T, 3] uint8 texture, every texel set.
    """
    from scipy import ndimage
    from scipy.spatial import cKDTree

    out = colour.copy()
    seen = weight > 0
    unseen = texels.covered & ~seen
    if unseen.any():
        means = gaussians.means.detach().cpu().numpy().reshape(-1, 3)
        opac = gaussians.opacities.detach().cpu().numpy().reshape(-1)
        cols = gaussians.colors.detach().cpu().numpy().reshape(-1, 3)
        vis = opac > 0.05
        if vis.sum() >= 1:
            means, opac, cols = means[vis], opac[vis], cols[vis]
            kk = int(min(k, len(means)))
            dist, nn = cKDTree(means).query(texels.position[unseen], k=kk, workers=-1)
            dist, nn = dist.reshape(-1, kk), nn.reshape(-1, kk)
            w = opac[nn] / np.maximum(dist, 1e-6)  # [M, k]
            out[unseen] = (w[..., None] * cols[nn]).sum(1) / w.sum(1, keepdims=True)
    known = seen | unseen  # every covered texel now has a colour
    if known.any() and not known.all():
        # Gutters and the half-covered texels at chart borders: copy the nearest known texel.
        _, (ri, ci) = ndimage.distance_transform_edt(~known, return_indices=True)
        out = out[ri, ci]
    return (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
