"""Round-trip checks of the export: Gaussians made from a known textured mesh, and exported-mesh-vs-Gaussians renders.

- :func:`gaussians_on_mesh`: flat Gaussians (surfels) sampled uniformly on a mesh's surface, tangent to it, with
  the mesh's own colour at each sample (texture × factor, vertex colours or flat colour). A fixed, fast stand-in
  for "Gaussians fitted to an object": the tests and ``benchmarks/bench_export_mesh.py`` use toy objects.
- :func:`compare_renders`: the exported mesh rendered by the dataset renderer (:mod:`datamodules.mesh_render`,
  unlit: the texture holds radiance) against the Gaussians rendered at the same cameras: silhouette IoU and
  the RGB PSNR inside the union of both masks.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from datamodules.mesh_render import MeshRenderer

__all__ = ["gaussians_on_mesh", "compare_renders", "UnlitMeshRenderer"]


def _sample_colours(mesh, faces: np.ndarray, points: np.ndarray) -> np.ndarray:
    """[M, 3] RGB in [0, 1] of ``mesh`` at surface ``points`` [M, 3] lying on ``faces`` [M]."""
    import trimesh

    vis = mesh.visual
    tri = mesh.triangles[faces]  # [M, 3, 3]
    bary = trimesh.triangles.points_to_barycentric(tri, points)  # [M, 3]
    if isinstance(vis, trimesh.visual.ColorVisuals):
        if vis.kind == "vertex":
            c = (vis.vertex_colors[mesh.faces[faces]][..., :3].astype(np.float64) / 255.0 * bary[..., None]).sum(1)
            return c
        return np.broadcast_to(vis.main_color[:3] / 255.0, (len(points), 3)).copy()
    mat = vis.material
    factor = np.asarray(getattr(mat, "baseColorFactor", None) if getattr(mat, "baseColorFactor", None) is not None
                        else [255, 255, 255, 255], np.float64)[:3]
    factor = factor / 255.0 if factor.max() > 1.0 else factor
    img = getattr(mat, "baseColorTexture", None)
    if img is None or vis.uv is None:
        return np.broadcast_to(factor, (len(points), 3)).copy()
    tex = np.asarray(img.convert("RGB"), np.float64) / 255.0  # [h, w, 3] row 0 = top
    uv = (vis.uv[mesh.faces[faces]] * bary[..., None]).sum(1) % 1.0  # [M, 2] v up, wrapped (REPEAT)
    h, w = tex.shape[:2]
    col = np.clip((uv[:, 0] * w).astype(int), 0, w - 1)
    row = np.clip(((1.0 - uv[:, 1]) * h).astype(int), 0, h - 1)
    return tex[row, col] * factor


def _quat_z_to(normals: np.ndarray) -> np.ndarray:
    """[M, 4] wxyz unit quaternions rotating +Z onto ``normals`` [M, 3] (unit)."""
    z = np.array([0.0, 0.0, 1.0])
    axis = np.cross(z, normals)  # [M, 3] |axis| = sin θ
    w = 1.0 + normals[:, 2]  # 2cos²(θ/2) before normalisation
    q = np.concatenate([w[:, None], axis], 1)
    flip = w < 1e-8  # normal = -Z: half-turn about X
    q[flip] = [0.0, 1.0, 0.0, 0.0]
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def gaussians_on_mesh(scene, num: int, seed: int = 0, opacity: float = 0.95, thickness: float = 0.1):
    """Flat Gaussians on the surface of ``scene`` (a trimesh Scene or Trimesh), in the scene's world frame.

    Samples are area-uniform over all parts; each Gaussian is a disc of radius ~ the sample spacing
    (``sqrt(area / num)``) tangent to its face, ``thickness`` × that along the normal, with the surface colour.

    Returns:
        an unbatched :class:`~gsv3d_pl.gaussians.Gaussians` with ``num`` Gaussians.
    """
    import trimesh

    from gsv3d_pl.gaussians import Gaussians

    parts = scene.dump() if isinstance(scene, trimesh.Scene) else [scene]
    areas = np.array([p.area for p in parts])
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(num, areas / areas.sum())
    pts, nrm, col = [], [], []
    for part, n in zip(parts, counts):
        if n == 0:
            continue
        p, fi = trimesh.sample.sample_surface(part, int(n), seed=int(rng.integers(1 << 31)))
        pts.append(p)
        nrm.append(part.face_normals[fi])
        col.append(_sample_colours(part, fi, p))
    pts, nrm, col = (np.concatenate(a, 0) for a in (pts, nrm, col))
    spacing = math.sqrt(areas.sum() / num)
    scale = np.array([1.0, 1.0, thickness]) * 0.8 * spacing
    t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)
    return Gaussians(means=t(pts), quats=t(_quat_z_to(nrm)), scales=t(np.broadcast_to(scale, (len(pts), 3))),
                     opacities=t(np.full(len(pts), opacity)), colors=t(np.clip(col, 0, 1)))


class UnlitMeshRenderer(MeshRenderer):
    """The dataset renderer with the world lights off and ambient 1: the texture's colour as it is (the baked
    texture holds the Gaussians' radiance, which already includes the training renders' lighting)."""

    LIGHT_INTENSITIES = (0.0, 0.0)

    def __init__(self, width: int, **kw):
        super().__init__(width, ambient=1.0, **kw)


@torch.no_grad()
def compare_renders(gaussians, mesh_path, c2w: torch.Tensor, K: torch.Tensor, size: int,
                    background: float = 1.0, backend: str = "auto") -> dict[str, float]:
    """Silhouette IoU (alpha > 0.5) and RGB PSNR inside the union of both masks, mesh vs Gaussians.

    Args:
        mesh_path: an exported .glb/.obj, loaded *without* normalisation (it is in the Gaussians' frame).
        c2w, K: [V, 4, 4], [V, 3, 3] cameras for ``size``×``size`` images.
    Returns:
        {"iou", "psnr"} over all V views together, plus "iou_min" (the worst single view).
    """
    from datamodules.mesh_io import load_mesh
    from gsv3d_pl.render import render

    mesh = load_mesh(mesh_path, normalize=False)
    m = UnlitMeshRenderer(size, background=background).render(mesh, c2w, K)  # [V, S, S, 3|1]
    rgb_g, alpha_g, _ = render(gaussians, c2w, K, size, size, background=background, backend=backend)
    rgb_g, alpha_g = rgb_g.movedim(-3, -1).clamp(0, 1), alpha_g.movedim(-3, -1)  # [V, S, S, 3|1]
    sil_m, sil_g = m.alpha[..., 0] > 0.5, alpha_g[..., 0] > 0.5  # [V, S, S]
    inter, union = (sil_m & sil_g).flatten(1).sum(1), (sil_m | sil_g).flatten(1).sum(1)
    per_view = inter.float() / union.clamp(min=1).float()
    mask = sil_m | sil_g
    mse = ((m.rgb - rgb_g) ** 2).mean(-1)[mask].mean()
    return {"iou": float(inter.sum() / union.sum().clamp(min=1)), "iou_min": float(per_view.min()),
            "psnr": float(-10 * torch.log10(mse.clamp(min=1e-10)))}
