"""Geometry metrics: Chamfer distance, F-Score@τ and volume IoU between predicted Gaussians and a GT mesh.

Everything is measured in the *unit-bbox object frame*: the GT mesh is normalised as
``(v - norm_center) * norm_scale`` (bounding box centred at the origin, largest side 1), which is
also the frame the Gaussians live in. The full protocol is in ``docs/evaluation.md``; in short:

- **Points.** Predicted points back-project the rendered expected depth at the evaluation cameras
  on pixels with alpha > 0.5 (:func:`depth_to_points`); GT points are sampled uniformly on the mesh
  surface (:func:`sample_surface`). Both clouds are subsampled to a fixed count with a fixed seed.
- **Chamfer distance** (:func:`chamfer_distance`): the symmetric mean L2 (not squared) nearest-neighbour
  distance, ``0.5 * (mean_p min_q |p-q| + mean_q min_p |q-p|)``, SyncDreamer's variant.
- **F-Score@τ** (:func:`f_score`): harmonic mean of precision (fraction of predicted points within τ of
  GT) and recall (fraction of GT points within τ of the prediction), τ = 0.05 by default.
- **Volume IoU** (:func:`volume_iou`) on a 64³ grid over [-0.5, 0.5]³: predicted occupancy from the
  opacity-weighted Gaussian density (:func:`gaussian_occupancy`), GT occupancy from ray parity or the
  generalised winding number of the mesh (:func:`mesh_occupancy`), exact for watertight meshes and the
  standard robust extension for open ones. The grids live in :mod:`gsv3d_pl.metrics.occupancy`.
- **Missed objects** (:data:`MISSED_RULE`): a prediction with no pixel of alpha > 0.5 has no surface points, and
  the Chamfer distance of an empty cloud is infinite, which would turn the whole mean into inf. Such an object is
  counted as *missed* and scored by a fixed rule instead: CD against a single predicted point at the origin (the
  centre of the unit bbox), F-Score 0 (precision 0, recall 0) and IoU 0. The rule is a deliberate penalty: it is
  never better than a poor prediction near the object, and it keeps every mean finite.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import Tensor

from gsv3d_pl.cameras import pixel_rays

# The occupancy grids live in their own module; callers still import them from here ("X as X" re-exports).
from gsv3d_pl.metrics import occupancy
from gsv3d_pl.metrics.occupancy import carve_free_space as carve_free_space
from gsv3d_pl.metrics.occupancy import gaussian_density_grid as gaussian_density_grid
from gsv3d_pl.metrics.occupancy import gaussian_occupancy, mesh_occupancy, volume_iou
from gsv3d_pl.metrics.occupancy import grid_centers as grid_centers
from gsv3d_pl.metrics.occupancy import ray_parity_occupancy as ray_parity_occupancy
from gsv3d_pl.metrics.occupancy import winding_numbers as winding_numbers
from gsv3d_pl.render.projection import quat_to_rotmat as quat_to_rotmat

__all__ = [
    "MISSED_RULE",
    "nn_distances",
    "chamfer_distance",
    "f_score",
    "depth_to_points",
    "subsample_points",
    "load_normalized_mesh",
    "sample_surface",
    "evaluate_geometry",
    "quat_to_rotmat",
    *occupancy.__all__,
]


# How a missed object (no rendered pixel with alpha > alpha_threshold: no predicted surface point) is scored.
# evaluate_geometry applies it; results.md and docs/evaluation.md state it.
MISSED_RULE = "CD against a single predicted point at the origin, F-Score 0 (precision and recall 0), IoU 0"


def _np_points(x, name: str) -> np.ndarray:
    a = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"{name}: expected a point cloud of shape [M, 3], got {tuple(a.shape)}")
    return a


def nn_distances(p, q) -> np.ndarray:
    """For each point of ``p`` [M, 3], the L2 distance to its nearest neighbour in ``q`` [K, 3] -> [M] (float64).

    Uses a KD-tree on ``q`` (scipy cKDTree, all cores), O((M + K) log K).
    """
    p, q = _np_points(p, "p"), _np_points(q, "q")
    if len(q) == 0:
        return np.full(len(p), np.inf)
    d, _ = cKDTree(q).query(p, k=1, workers=-1)
    return d


def chamfer_distance(p, q, return_parts: bool = False):
    """Symmetric Chamfer distance, mean L2 (not squared) both ways, averaged.

    ``CD = 0.5 * (mean_{x in p} min_{y in q} |x - y| + mean_{y in q} min_{x in p} |x - y|)``

    Args:
        p: [M, 3] points (Tensor or array), e.g. the prediction.
        q: [K, 3] points, e.g. the GT surface samples.
        return_parts: also return the two one-way means (accuracy p->q, completeness q->p).
    Returns:
        float CD in the units of the points (unit-bbox units here), or ``(cd, p_to_q, q_to_p)``.
        ``inf`` if either cloud is empty.
    """
    p, q = _np_points(p, "p"), _np_points(q, "q")
    if len(p) == 0 or len(q) == 0:
        return (math.inf, math.inf, math.inf) if return_parts else math.inf
    pq = float(nn_distances(p, q).mean())
    qp = float(nn_distances(q, p).mean())
    cd = 0.5 * (pq + qp)
    return (cd, pq, qp) if return_parts else cd


def f_score(p, q, tau: float = 0.05, return_parts: bool = False):
    """F-Score@τ between a predicted cloud ``p`` [M, 3] and a GT cloud ``q`` [K, 3].

    precision = fraction of ``p`` within τ of ``q``; recall = fraction of ``q`` within τ of ``p``;
    F = 2PR / (P + R) (0 when both are 0 or a cloud is empty). τ is in the points' units
    (0.05 = 5% of the object's largest bbox side here).
    """
    p, q = _np_points(p, "p"), _np_points(q, "q")
    if len(p) == 0 or len(q) == 0:
        return (0.0, 0.0, 0.0) if return_parts else 0.0
    precision = float((nn_distances(p, q) < tau).mean())
    recall = float((nn_distances(q, p) < tau).mean())
    f = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return (f, precision, recall) if return_parts else f


def depth_to_points(depth: Tensor, alpha: Tensor, c2w: Tensor, K: Tensor, alpha_threshold: float = 0.5) -> Tensor:
    """Back-project rendered planar depth to world points on pixels with alpha > ``alpha_threshold``.

    Args:
        depth: [..., V, H, W] planar camera-space z (world units) of V views.
        alpha: [..., V, H, W] accumulated opacity of the same renders.
        c2w: [..., V, 4, 4] OpenCV camera-to-world.
        K: [..., V, 3, 3] intrinsics of the H x W images.
    Returns:
        [M, 3] world points ``origin + (z / z_per_t) * dir`` of all selected pixels (all views flattened);
        pixels whose point is not finite are left out.
    """
    if depth.shape != alpha.shape:
        raise ValueError(f"depth_to_points: depth {tuple(depth.shape)} and alpha {tuple(alpha.shape)} differ")
    H, W = depth.shape[-2:]
    origins, dirs, z_per_t = pixel_rays(c2w.to(torch.float32), K.to(torch.float32), W, H)  # [..., V, H, W, 3|1]
    z = depth.to(torch.float32)[..., None]  # [..., V, H, W, 1]
    pts = origins + (z / z_per_t) * dirs  # [..., V, H, W, 3]
    # A diverged prediction can render NaN/inf depth; those pixels are not surface points.
    mask = (alpha > alpha_threshold) & (depth > 0) & torch.isfinite(pts).all(-1)  # [..., V, H, W]
    return pts[mask]  # [M, 3]


def subsample_points(points, max_points: int | None, seed: int = 0) -> np.ndarray:
    """At most ``max_points`` rows of ``points`` [M, 3], chosen uniformly without replacement with a fixed seed."""
    p = _np_points(points, "points")
    if max_points is None or len(p) <= max_points:
        return p
    idx = np.random.default_rng(seed).choice(len(p), size=max_points, replace=False)
    return p[np.sort(idx)]


def _trimesh_sample(mesh, n: int, seed: int):
    import trimesh

    return trimesh.sample.sample_surface(mesh, n, seed=seed)


def load_normalized_mesh(mesh_path: str | os.PathLike, norm_center, norm_scale):
    """The GT mesh in the unit-bbox object frame: ``trimesh.load(mesh_path, force="mesh")`` with
    vertices mapped to ``(v - norm_center) * norm_scale`` (data contract: scene transforms applied)."""
    import trimesh

    if not os.path.exists(mesh_path):
        raise FileNotFoundError(
            f"GeometryMetrics: GT mesh {mesh_path!r} (batch key 'mesh_path') does not exist; "
            "geometry metrics need the source meshes of the evaluated objects (check data.init_args.mesh_dir)"
        )
    mesh = trimesh.load(mesh_path, force="mesh", process=False)
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise ValueError(f"GeometryMetrics: {mesh_path!r} has no triangles to evaluate against")
    c = np.asarray(torch.as_tensor(norm_center).detach().cpu(), dtype=np.float64).reshape(3)
    s = float(torch.as_tensor(norm_scale).detach().cpu().reshape(()))
    return trimesh.Trimesh(vertices=(np.asarray(mesh.vertices, dtype=np.float64) - c) * s, faces=mesh.faces,
                           process=False)


def sample_surface(mesh, num_points: int = 100_000, seed: int = 0) -> np.ndarray:
    """[num_points, 3] points uniform (area-weighted) on the mesh surface, reproducible via ``seed``."""
    pts, _ = _trimesh_sample(mesh, num_points, seed=seed)
    return np.asarray(pts, dtype=np.float64)


def evaluate_geometry(
    pred_depths: Tensor,
    pred_alphas: Tensor,
    c2w: Tensor,
    K: Tensor,
    gaussians,
    mesh,
    tau: float = 0.05,
    num_gt_points: int = 100_000,
    num_pred_points: int | None = 100_000,
    alpha_threshold: float = 0.5,
    iou_resolution: int = 64,
    density_threshold: float = 0.5,
    mesh_occupancy_method: str = "parity",
    seed: int = 0,
) -> dict[str, float]:
    """All geometry metrics of one object.

    A prediction without a single pixel of alpha > ``alpha_threshold`` is *missed* and scored by
    :data:`MISSED_RULE`: CD against one point at the origin (so CD = ½ (min_q |q| + mean_q |q|) over the GT points
    q: finite, and worse than any prediction that lands near the surface), F-Score, precision, recall and IoU 0. ``"missed"`` is 1.0 then, else 0.0.
    Every returned value is finite.

    Args:
        pred_depths, pred_alphas: [V, H, W] renders of the prediction at the evaluation cameras.
        c2w: [V, 4, 4], K: [V, 3, 3] those cameras.
        gaussians: object with unbatched ``means [G,3], quats [G,4], scales [G,3], opacities [G]``.
        mesh: the GT ``trimesh.Trimesh`` already in the unit-bbox frame (:func:`load_normalized_mesh`).
    Returns:
        {"chamfer", "chamfer_acc", "chamfer_comp", "fscore", "precision", "recall", "iou",
         "num_pred_points", "missed", "watertight"}.
    """
    pred = subsample_points(depth_to_points(pred_depths, pred_alphas, c2w, K, alpha_threshold), num_pred_points, seed)
    gt = sample_surface(mesh, num_gt_points, seed=seed)
    missed = len(pred) == 0
    if missed:
        # MISSED_RULE. IoU is set, not computed: with every pixel at alpha <= threshold, carving would empty the
        # predicted grid anyway, and a diverged prediction (NaN Gaussians) need not reach the density code.
        cd, acc, comp = chamfer_distance(np.zeros((1, 3)), gt, return_parts=True)
        f, prec, rec, iou = 0.0, 0.0, 0.0, 0.0
    else:
        cd, acc, comp = chamfer_distance(pred, gt, return_parts=True)
        f, prec, rec = f_score(pred, gt, tau, return_parts=True)
        occ_pred = gaussian_occupancy(
            gaussians.means, gaussians.quats, gaussians.scales, gaussians.opacities, iou_resolution,
            density_threshold=density_threshold, carve_with=(pred_depths, pred_alphas, c2w, K),
        )
        occ_gt = mesh_occupancy(mesh, iou_resolution, method=mesh_occupancy_method, device=gaussians.means.device)
        iou = volume_iou(occ_pred, occ_gt)
    return {
        "chamfer": cd, "chamfer_acc": acc, "chamfer_comp": comp,
        "fscore": f, "precision": prec, "recall": rec,
        "iou": iou,
        "num_pred_points": float(len(pred)),
        "missed": float(missed),
        "watertight": float(bool(mesh.is_watertight)),
    }
