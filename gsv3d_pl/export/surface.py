"""Gaussians -> a closed triangle surface: the opacity-weighted density on a grid, marching cubes, simplification.

The density is the geometry metrics' own (:func:`gsv3d_pl.metrics.occupancy.gaussian_density_grid`):
``d(x) = Σ_i o_i exp(-½ (x-μ_i)ᵀ Σ_i'⁻¹ (x-μ_i))``. Pixel-aligned Gaussians sit *on* the surface, so the voxels
above the iso level form a shell about a Gaussian thick around the object, not a solid. Marching cubes on the
raw density would therefore return two sheets (the shell's outside and its inside). As for the volume IoU, a
shell is closed and its enclosed interior filled (:func:`gsv3d_pl.metrics.occupancy._close_and_fill`), here on a
half-resolution grid with the IoU's wider filter (a thicker shell that does not leak); voxels deeper inside than
``OUTSIDE_REACH`` are then raised above the iso level, so only the outer sheet remains, still placed with
sub-voxel accuracy by the sharp density itself on the outside.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from gsv3d_pl.metrics.occupancy import _close_and_fill, gaussian_density_grid

__all__ = ["SurfaceGrid", "surface_grid", "extract_surface", "simplify_mesh", "NoSurfaceError"]


# The low-pass (fine voxels) of the coarse density the interior is found on: the volume IoU's default.
CLOSURE_FILTER = 1.0
# How far (fine voxels) into the coarse solid the sharp density decides: the sharp outer surface lies 0-2 voxels
# inside the coarse solid's border, the sharp shell's inner sheet ~3-4 voxels in (each ~σ·sqrt(2 ln(peak / iso))
# from the Gaussians' centres, σ including the filter; the coarse border is quantised to 2 voxels).
OUTSIDE_REACH = 2.5
# The farthest (fine voxels) the ridge inset moves a vertex, and the step of its search along the normal.
MAX_INSET = 2.0
_RIDGE_STEP = 0.25
# What the inset leaves of a part whose two sides' ridges merge (voxels): a thin slab, not a zero-width sheet.
_MIN_HALF_THICKNESS = 0.5


class NoSurfaceError(ValueError):
    """The density never reaches the iso level (or the Gaussians are empty): there is no surface to extract."""


@dataclass(frozen=True)
class SurfaceGrid:
    """A cubic grid of ``resolution``³ cells over ``center ± half`` (world units)."""

    center: np.ndarray  # [3]
    half: float
    resolution: int

    @property
    def voxel(self) -> float:
        return 2 * self.half / self.resolution


def surface_grid(means: Tensor, scales: Tensor, opacities: Tensor, resolution: int,
                 min_opacity: float = 0.05, margin: float = 0.05) -> SurfaceGrid:
    """The cube that holds the visible Gaussians, with a margin.

    The extent is the 0.1 / 99.9 % quantiles of the means of the Gaussians with opacity > ``min_opacity``
    (a few far floaters must not shrink the object to a handful of voxels), grown by 3σ of the median scale and
    ``margin`` of the side so the iso-surface, which lies ~1-2 voxels outside the means, stays inside.

    Args:
        means: [G, 3], scales: [G, 3] (linear), opacities: [G].
    """
    keep = opacities.reshape(-1) > min_opacity
    if int(keep.sum()) == 0:
        raise NoSurfaceError(f"no Gaussian has opacity > {min_opacity}: nothing to mesh")
    m = means.reshape(-1, 3)[keep].double()
    lo = torch.quantile(m, 0.001, dim=0) if m.shape[0] > 1000 else m.amin(0)
    hi = torch.quantile(m, 0.999, dim=0) if m.shape[0] > 1000 else m.amax(0)
    pad = 3.0 * float(scales.reshape(-1, 3)[keep].amax(-1).median())
    center = ((lo + hi) / 2).numpy()
    side = float((hi - lo).max()) + 2 * pad
    side = max(side * (1 + 2 * margin), 1e-3)
    return SurfaceGrid(center=center.astype(np.float64), half=side / 2, resolution=int(resolution))


@torch.no_grad()
def extract_surface(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, grid: SurfaceGrid,
                    iso: float = 0.5, filter_voxels: float = 0.5, close_iters: int = 1, inset: float = 0.0,
                    max_inset: float = MAX_INSET) -> tuple[np.ndarray, np.ndarray]:
    """The outer iso-surface ``d(x) = iso`` of the Gaussians' density on ``grid``.

    Args:
        means: [G, 3], quats: [G, 4] wxyz, scales: [G, 3], opacities: [G]: one unbatched set.
        iso: the density level of the surface (the volume IoU's default threshold, 0.5: where an opaque
            Gaussian's contribution has fallen to half).
        filter_voxels: the density's isotropic low-pass, in voxels (see :func:`gaussian_density_grid`). The
            iso-surface lies ``σ_n·sqrt(2 ln(peak / iso))`` outside the Gaussians' centres, with σ_n the Gaussians'
            thickness *plus* this filter: 0.5 (not the volume IoU's 1.0) keeps the surface about one Gaussian
            radius outside the centres, where the splats' own silhouette is, while a Gaussian thinner than a
            voxel still reaches its neighbouring voxel centres.
        close_iters: pinholes of up to this many voxels are sealed before the interior is filled.
        inset: each vertex moves this fraction of the way inward to the density's ridge along its normal
            (:func:`inset_to_ridge`); 0 keeps the iso-surface.
        max_inset: the farthest (voxels) a vertex moves.
    Returns:
        vertices [V, 3] float32 (world), faces [F, 3] int64, outward-facing (counter-clockwise seen from outside).
    Raises:
        NoSurfaceError: no voxel reaches ``iso`` (it names the peak density, so the caller can lower ``iso``).
    """
    R = grid.resolution
    c = torch.as_tensor(grid.center, dtype=torch.float32, device=means.device)
    dens = gaussian_density_grid(means.reshape(-1, 3) - c, quats, scales, opacities, R, grid.half,
                                filter_voxels=filter_voxels)  # [R, R, R]
    dens = dens.cpu().numpy()
    peak = float(dens.max(initial=0.0))
    if peak <= iso:
        raise NoSurfaceError(f"the Gaussians' density peaks at {peak:.3g}, which does not reach the iso level "
                             f"{iso:g}: no surface; lower --iso (e.g. {max(peak / 2, 1e-3):.2g})")
    shell = dens > iso
    # The enclosed interior is found on a coarser grid (half the resolution) with a wider low-pass
    # (CLOSURE_FILTER fine voxels, the volume IoU's): there the shell is about twice as thick, so it does not leak
    # between sparse Gaussians or at sharp edges, where the sharp shell alone can (fill_holes then finds no
    # interior and marching cubes returns both sheets). At half the resolution it costs ~1/8 of the sharp pass.
    Rc = max(R // 2, 4)
    coarse = gaussian_density_grid(means.reshape(-1, 3) - c, quats, scales, opacities, Rc, grid.half,
                                   filter_voxels=CLOSURE_FILTER * Rc / R).cpu().numpy()  # [Rc, Rc, Rc]
    ic = (np.arange(R) * Rc) // R  # fine index -> the coarse cell holding its centre
    solid = _close_and_fill(coarse > iso, close_iters)[np.ix_(ic, ic, ic)]  # [R, R, R] shell + gaps + interior
    # Voxels more than OUTSIDE_REACH voxels from the outside are inside: they go above the iso level, so the
    # shell's inner sheet disappears (a leak in the sharp shell becomes a dimple of at most that depth, not a
    # second sheet). Near the outside the sharp density is kept: the surface keeps its sub-voxel position.
    depth_in = ndimage.distance_transform_edt(solid)  # [R, R, R] voxels to the nearest outside voxel
    field = np.where(shell | (depth_in <= OUTSIDE_REACH), dens, np.float32(2 * iso)).astype(np.float32)
    # One empty voxel all round closes surfaces cut by the grid border.
    field = np.pad(field, 1)

    from skimage import measure

    verts, faces, normals, _ = measure.marching_cubes(field, level=iso, gradient_direction="descent",
                                                      allow_degenerate=False)  # in padded voxel indices
    if inset > 0:
        verts = inset_to_ridge(verts, normals, np.pad(dens, 1), field, iso, inset, max_inset)
    # Grid index i (after the 1-voxel pad) has its centre at -half + (i - 1 + 0.5) * voxel around ``center``.
    verts = verts * grid.voxel + (grid.center - grid.half - 0.5 * grid.voxel)[None]
    # skimage returns triangles wound clockwise seen along the normal it reports; glTF wants counter-clockwise
    # seen from outside, so swap two corners.
    faces = faces[:, [0, 2, 1]]
    return verts.astype(np.float32), faces.astype(np.int64)


def inset_to_ridge(verts: np.ndarray, normals: np.ndarray, dens: np.ndarray, field: np.ndarray, iso: float,
                   fraction: float, max_voxels: float = MAX_INSET) -> np.ndarray:
    """Move iso-surface vertices inward along their normals toward the density's ridge (the Gaussians' centres).

    The iso-surface ``d = iso`` of a shell of Gaussians lies ``σ·sqrt(2 ln(peak / iso))`` outside their centres
    (σ: the Gaussians' thickness plus the filter), ~1 voxel for thin surfels, while their renders' silhouette and
    depth hug the centres. Along each vertex's inward normal the density rises to the shell's ridge (the centres)
    and falls again; the vertex moves ``fraction`` of the way to that maximum, found on samples every
    ``_RIDGE_STEP`` voxels (trilinear) and refined by a parabola, at most ``max_voxels`` (where the density still
    rises there, a filled solid rather than a shell, it moves ``fraction · max_voxels``). A part thin enough for
    both sides' ridges to merge keeps at least ``_MIN_HALF_THICKNESS`` voxels each side of its middle (half the
    distance to where ``field`` falls below ``iso`` again along the normal).

    Args:
        verts: [V, 3] marching-cubes vertices in ``dens``' voxel indices; normals: [V, 3] outward unit normals.
        dens: the sharp density; field: what marching cubes ran on (interior raised above ``iso``); same shape.
    Returns:
        [V, 3] moved vertices (voxel indices).
    """
    from scipy.ndimage import map_coordinates

    n = normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    reach = 2 * max_voxels + 2 * _MIN_HALF_THICKNESS  # far enough to see a thin part's other side
    s = np.arange(0.0, reach + 1e-6, _RIDGE_STEP, dtype=np.float32)  # [S] distances inward (voxels)
    out = np.empty_like(verts)
    for a in range(0, len(verts), 1 << 16):  # bounded memory: [3, chunk · S] sample coordinates
        v, nv = verts[a:a + (1 << 16)], n[a:a + (1 << 16)]
        pts = v[:, None, :] - s[None, :, None] * nv[:, None, :]  # [c, S, 3]
        coords = pts.reshape(-1, 3).T
        d = map_coordinates(dens, coords, order=1, mode="constant", cval=0.0).reshape(len(v), -1)  # [c, S]
        f = map_coordinates(field, coords, order=1, mode="constant", cval=0.0).reshape(len(v), -1)
        # The other side: the first sample (past the start) where the field drops below iso again.
        below = (f < iso) & (s[None] > _RIDGE_STEP)
        other = np.where(below.any(1), s[np.argmax(below, 1)], np.inf)  # [c]
        limit = np.minimum(max_voxels, np.maximum(other / 2 - _MIN_HALF_THICKNESS, 0.0))  # [c]
        dm = np.where(s[None] <= limit[:, None] + 1e-6, d, -np.inf)
        k = np.argmax(dm, 1)  # [c] the ridge sample within the limit
        # Parabolic refinement around an interior maximum.
        kk = np.clip(k, 1, len(s) - 2)
        rows = np.arange(len(v))
        y0, y1, y2 = dm[rows, kk - 1], dm[rows, kk], dm[rows, kk + 1]
        fin = np.isfinite(y0) & np.isfinite(y1) & np.isfinite(y2)  # all three within the limit
        y0, y1, y2 = (np.where(fin, y, 0.0) for y in (y0, y1, y2))  # no inf arithmetic where not refined
        den = y0 - 2 * y1 + y2
        ok = (k == kk) & fin & (den < 0)
        shift = np.where(ok, 0.5 * (y0 - y2) / np.where(ok, den, -1.0), 0.0)
        depth = np.clip((k + np.clip(shift, -0.5, 0.5)) * _RIDGE_STEP, 0.0, limit)
        out[a:a + len(v)] = v - (fraction * depth)[:, None] * nv
    return out


def drop_small_components(vertices: np.ndarray, faces: np.ndarray, min_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Remove connected pieces with fewer than ``min_fraction`` of all faces (floaters: specks of a few stray
    Gaussians cost atlas space and texture for nothing). The largest piece is always kept."""
    if min_fraction <= 0 or len(faces) == 0:
        return vertices, faces
    import trimesh

    labels = trimesh.graph.connected_component_labels(trimesh.graph.face_adjacency(faces), node_count=len(faces))
    counts = np.bincount(labels)
    keep_labels = (counts >= min_fraction * len(faces)) | (counts == counts.max())
    faces = faces[keep_labels[labels]]
    used = np.unique(faces)
    remap = np.full(len(vertices), -1, np.int64)
    remap[used] = np.arange(len(used))
    return vertices[used], remap[faces]


def simplify_mesh(vertices: np.ndarray, faces: np.ndarray, target_faces: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadric edge-collapse simplification (fast-simplification) down to about ``target_faces`` triangles.

    Marching cubes emits ~2 triangles per surface voxel, far more than the shape needs and than xatlas can
    unwrap quickly (its time grows faster than linearly with the face count). Meshes already at or below the
    target are returned unchanged.

    Args:
        vertices: [V, 3] float, faces: [F, 3] int.
    Returns:
        vertices [V', 3] float32, faces [F', 3] int64 with F' ≈ min(F, target_faces).
    """
    if target_faces <= 0:
        raise ValueError(f"target face count must be > 0, got {target_faces}")
    if len(faces) <= target_faces:
        return vertices.astype(np.float32), faces.astype(np.int64)
    import fast_simplification

    v, f = fast_simplification.simplify(np.ascontiguousarray(vertices, np.float32),
                                        np.ascontiguousarray(faces, np.int64),
                                        target_reduction=1.0 - target_faces / len(faces))
    return np.asarray(v, np.float32), np.asarray(f, np.int64)
