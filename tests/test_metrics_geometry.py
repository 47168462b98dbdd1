"""Geometry metrics against independent references (brute force, closed forms, a known mesh)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh

from gsv3d_pl.metrics.geometry import (
    chamfer_distance,
    depth_to_points,
    evaluate_geometry,
    f_score,
    gaussian_density_grid,
    gaussian_occupancy,
    load_normalized_mesh,
    mesh_occupancy,
    volume_iou,
    winding_numbers,
)
from gsv3d_pl.orbit import DEFAULT_RADIUS, FOV_DEG


def _brute_nn(p, q):
    return np.sqrt(((p[:, None, :] - q[None, :, :]) ** 2).sum(-1)).min(1)


def test_chamfer_matches_bruteforce():
    rng = np.random.default_rng(0)
    p, q = rng.normal(size=(300, 3)), rng.normal(size=(200, 3)) + 0.3
    ref = 0.5 * (_brute_nn(p, q).mean() + _brute_nn(q, p).mean())
    cd, pq, qp = chamfer_distance(torch.tensor(p), q, return_parts=True)
    assert cd == pytest.approx(ref, rel=1e-10)
    assert pq == pytest.approx(_brute_nn(p, q).mean(), rel=1e-10)
    assert chamfer_distance(p, p) == 0.0
    assert chamfer_distance(p, np.zeros((0, 3))) == math.inf


def test_fscore_hand_cases():
    rng = np.random.default_rng(1)
    p = rng.uniform(-0.5, 0.5, size=(500, 3))
    assert f_score(p, p, 0.05) == 1.0
    assert f_score(p, p + np.array([1.5, 0, 0]), 0.05) == 0.0  # shifted clear of the whole cloud
    # half of the prediction is perfect, half is far: precision 0.5, recall 1 -> F = 2/3
    far = p + 10.0
    f, prec, rec = f_score(np.concatenate([p, far]), p, 0.05, return_parts=True)
    assert (prec, rec) == (0.5, 1.0) and f == pytest.approx(2 / 3)
    assert f_score(np.zeros((0, 3)), p) == 0.0


def test_fscore_shift_just_below_and_above_tau():
    g = np.stack(np.meshgrid(*[np.arange(5) * 0.2] * 3, indexing="ij"), -1).reshape(-1, 3)  # spacing 0.2 > τ
    assert f_score(g + [0.04, 0, 0], g, 0.05) == 1.0
    assert f_score(g + [0.06, 0, 0], g, 0.05) == 0.0


def test_volume_iou_offset_spheres_vs_lens_formula():
    r, d = 0.3, 0.2
    a = trimesh.creation.icosphere(subdivisions=4, radius=r).apply_translation([-d / 2, 0.013, -0.007])
    b = trimesh.creation.icosphere(subdivisions=4, radius=r).apply_translation([d / 2, 0.013, -0.007])
    lens = math.pi * (4 * r + d) * (2 * r - d) ** 2 / 12  # volume of the intersection of two balls
    ball = 4 / 3 * math.pi * r**3
    ref = lens / (2 * ball - lens)
    iou = volume_iou(mesh_occupancy(a, 64), mesh_occupancy(b, 64))
    assert iou == pytest.approx(ref, rel=0.02)
    assert volume_iou(np.zeros((4, 4, 4)), np.zeros((4, 4, 4))) == 1.0
    with pytest.raises(ValueError, match="shape"):
        volume_iou(np.zeros((4, 4, 4)), np.zeros((5, 5, 5)))


def test_mesh_occupancy_box_open_mesh_and_overlapping_parts():
    box = trimesh.creation.box([0.5, 0.25, 0.75])
    occ = mesh_occupancy(box, 32)
    assert occ.sum() == 16 * 8 * 24  # voxel centres strictly inside the box, exactly
    open_box = trimesh.Trimesh(box.vertices, box.faces[1:], process=False)  # one triangle missing
    assert not open_box.is_watertight
    assert volume_iou(mesh_occupancy(open_box, 32), occ) > 0.99  # majority vote of three axes
    # Two overlapping closed parts: the overlap is inside (non-zero rule), unlike plain parity.
    two = trimesh.util.concatenate([box, box.copy().apply_translation([0.1, 0, 0])])
    union = trimesh.creation.box([0.6, 0.25, 0.75]).apply_translation([0.05, 0, 0])
    assert volume_iou(mesh_occupancy(two, 32), mesh_occupancy(union, 32)) > 0.99


def test_winding_number_agrees_with_parity_on_closed_mesh():
    s = trimesh.creation.icosphere(subdivisions=1, radius=0.35).apply_translation([0.05, 0, 0])
    assert volume_iou(mesh_occupancy(s, 16, method="parity"), mesh_occupancy(s, 16, method="winding")) == 1.0
    w = winding_numbers(s.vertices, s.faces, torch.tensor([[0.05, 0.0, 0.0], [0.45, 0.45, 0.45]]))
    assert w[0] == pytest.approx(1.0, abs=1e-6) and w[1] == pytest.approx(0.0, abs=1e-6)


def test_gaussian_density_matches_dense_evaluation():
    g = torch.Generator().manual_seed(0)
    G = 40
    means = torch.rand(G, 3, generator=g) - 0.5
    quats = torch.randn(G, 4, generator=g)
    scales = 0.005 + 0.03 * torch.rand(G, 3, generator=g)
    opac = torch.rand(G, generator=g)
    R, f = 16, 1.0
    dens = gaussian_density_grid(means, quats, scales, opac, R, 0.5, filter_voxels=f, cutoff_sigma=100.0)
    # independent dense reference: every Gaussian at every voxel centre
    from scipy.spatial.transform import Rotation

    q = torch.nn.functional.normalize(quats, dim=-1).numpy()
    rot = Rotation.from_quat(q[:, [1, 2, 3, 0]]).as_matrix()  # scipy is xyzw
    cov = rot @ np.apply_along_axis(np.diag, 1, scales.numpy().astype(np.float64) ** 2) @ rot.transpose(0, 2, 1)
    cov += (f / R) ** 2 * np.eye(3)
    t = -0.5 + (np.arange(R) + 0.5) / R
    x = np.stack(np.meshgrid(t, t, t, indexing="ij"), -1).reshape(-1, 3)
    d = x[:, None, :] - means.numpy()[None]
    m = np.einsum("pgi,gij,pgj->pg", d, np.linalg.inv(cov), d)
    ref = (opac.numpy()[None] * np.exp(-0.5 * m)).sum(1).reshape(R, R, R)
    np.testing.assert_allclose(dens.numpy(), ref, rtol=1e-4, atol=1e-6)


def test_depth_to_points_inverts_projection():
    from gsv3d_pl.cameras import cameras_from_spherical

    cams = cameras_from_spherical([10.0], [30.0], DEFAULT_RADIUS, FOV_DEG, 8, 6)
    depth = torch.full((1, 6, 8), 1.7)
    alpha = torch.ones(1, 6, 8)
    alpha[0, 0, 0] = 0.2  # excluded
    pts = depth_to_points(depth, alpha, cams.c2w, cams.K)
    assert pts.shape == (47, 3)
    cam = (torch.linalg.inv(cams.c2w[0]) @ torch.cat([pts, torch.ones(47, 1)], -1).T).T
    torch.testing.assert_close(cam[:, 2], torch.full((47,), 1.7), atol=1e-5, rtol=0)


def _surface_gaussians(mesh, n, seed):
    pts, fi = trimesh.sample.sample_surface(mesh, n, seed=seed)
    nrm = torch.tensor(mesh.face_normals[fi], dtype=torch.float32)  # [n, 3]
    z = torch.tensor([0.0, 0.0, 1.0]).expand_as(nrm)
    q = torch.cat([(1 + (z * nrm).sum(-1))[:, None], torch.linalg.cross(z, nrm, dim=-1)], -1)  # z -> normal
    flip = q.norm(dim=-1) < 1e-3  # normal = -z: a half turn about x
    q[flip] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    q = torch.nn.functional.normalize(q, dim=-1)
    scales = torch.tensor([0.02, 0.02, 1e-3]).expand(n, 3).clone()  # flat disks in the tangent plane
    return torch.tensor(pts, dtype=torch.float32), q, scales, torch.full((n,), 0.95)


def test_geometry_of_gaussians_on_mesh_surface(tmp_path):
    """Gaussians sampled on a mesh, rendered, evaluated against that mesh: near-perfect scores."""
    from gsv3d_pl.cameras import cameras_from_spherical
    from gsv3d_pl.gaussians import Gaussians
    from gsv3d_pl.render import render

    mesh = trimesh.creation.capsule(height=0.6, radius=0.3, count=[12, 12])
    mesh.apply_transform(trimesh.transformations.rotation_matrix(0.6, [1, 1, 0]))
    # store it un-normalised, as a dataset would, with its normalisation
    center = mesh.bounds.mean(0)
    scale = 1.0 / (mesh.bounds[1] - mesh.bounds[0]).max()
    offset = np.array([3.0, -1.0, 2.0])
    raw = trimesh.Trimesh((mesh.vertices - center) * 7.0 + offset, mesh.faces)  # arbitrary source frame
    path = tmp_path / "obj.ply"
    raw.export(path)
    gt = load_normalized_mesh(str(path), torch.tensor(offset), torch.tensor(scale / 7.0))
    np.testing.assert_allclose(gt.vertices, (mesh.vertices - center) * scale, atol=1e-5)
    assert np.abs(gt.bounds).max() == pytest.approx(0.5, abs=1e-5)
    means, quats, scales, opac = _surface_gaussians(gt, 2500, seed=1)
    cams = cameras_from_spherical([25, -25, 25, -25, 60, -60], [0, 90, 180, 270, 45, 225], DEFAULT_RADIUS, FOV_DEG,
                                  40, 40)
    g = Gaussians(means, quats, scales, opac, torch.rand(len(means), 3))
    _, alpha, depth = render(g, cams.c2w, cams.K, 40, 40)  # [V, 1, H, W] each
    res = evaluate_geometry(depth[:, 0], alpha[:, 0], cams.c2w, cams.K, g, gt, num_gt_points=20000)
    assert res["chamfer"] < 0.02, res
    assert res["fscore"] > 0.9, res
    assert res["iou"] > 0.8, res
    # a prediction shifted by 0.1 must score clearly worse
    occ_shift = gaussian_occupancy(means + torch.tensor([0.1, 0, 0]), quats, scales, opac)
    assert volume_iou(occ_shift, mesh_occupancy(gt)) < res["iou"] - 0.1


def _missed_case(nan_gaussians: bool = False):
    """An evaluation where the prediction renders nothing (alpha 0 everywhere: no predicted surface point)."""
    from gsv3d_pl.cameras import cameras_from_spherical
    from gsv3d_pl.gaussians import Gaussians

    mesh = trimesh.creation.box([1.0, 0.5, 0.25]).apply_translation([0.0, 0.25, 0.0])  # the origin is on a face
    cams = cameras_from_spherical([20.0, -20.0], [0.0, 180.0], DEFAULT_RADIUS, FOV_DEG, 8, 8)
    depth, alpha = torch.zeros(2, 8, 8), torch.zeros(2, 8, 8)
    fill = float("nan") if nan_gaussians else 0.0
    g = Gaussians(torch.full((5, 3), fill), torch.tensor([[1.0, 0, 0, 0]] * 5), torch.full((5, 3), 0.05),
                  torch.zeros(5), torch.zeros(5, 3))
    return depth, alpha, cams, g, mesh


@pytest.mark.parametrize("nan_gaussians", [False, True])
def test_missed_object_is_scored_by_the_stated_rule(nan_gaussians):
    """No pixel with alpha > 0.5: CD against one point at the origin, F-Score 0, IoU 0, all finite, missed = 1."""
    from gsv3d_pl.metrics.geometry import MISSED_RULE, sample_surface

    depth, alpha, cams, g, mesh = _missed_case(nan_gaussians)
    res = evaluate_geometry(depth, alpha, cams.c2w, cams.K, g, mesh, num_gt_points=3000, iou_resolution=16)
    assert all(math.isfinite(v) for v in res.values()), res
    gt_dist = np.linalg.norm(sample_surface(mesh, 3000, seed=0), axis=1)  # |q - origin| of every GT point
    assert res["chamfer"] == pytest.approx(0.5 * (gt_dist.min() + gt_dist.mean()), rel=1e-12)
    assert (res["chamfer_acc"], res["chamfer_comp"]) == pytest.approx((gt_dist.min(), gt_dist.mean()))
    # F-Score is 0 by the rule even though the origin lies on the GT surface (a point there would score precision 1)
    assert gt_dist.min() < 0.05
    assert res["fscore"] == res["precision"] == res["recall"] == res["iou"] == 0.0
    assert res["missed"] == 1.0 and res["num_pred_points"] == 0.0
    assert "origin" in MISSED_RULE and "F-Score 0" in MISSED_RULE and "IoU 0" in MISSED_RULE
    # alpha exactly at the threshold is no surface either; one pixel above it is a (poor) prediction, not a miss
    alpha[:] = 0.5
    assert evaluate_geometry(depth + 1.0, alpha, cams.c2w, cams.K, g, mesh, num_gt_points=500,
                             iou_resolution=16)["missed"] == 1.0
    alpha[0, 4, 4] = 0.9
    hit = evaluate_geometry(depth + 1.0, alpha, cams.c2w, cams.K, g, mesh, num_gt_points=500, iou_resolution=16)
    assert hit["missed"] == 0.0 and hit["num_pred_points"] == 1.0 and math.isfinite(hit["chamfer"])


def test_non_finite_renders_and_gaussians_are_left_out():
    from gsv3d_pl.cameras import cameras_from_spherical

    cams = cameras_from_spherical([10.0], [30.0], DEFAULT_RADIUS, FOV_DEG, 4, 4)
    depth, alpha = torch.full((1, 4, 4), 1.5), torch.ones(1, 4, 4)
    depth[0, 0, :2] = torch.tensor([float("nan"), float("inf")])
    assert depth_to_points(depth, alpha, cams.c2w, cams.K).shape == (14, 3)
    g = torch.Generator().manual_seed(0)
    means, quats = torch.rand(6, 3, generator=g) - 0.5, torch.randn(6, 4, generator=g)
    scales, opac = torch.full((6, 3), 0.05), torch.full((6,), 0.8)
    ref = gaussian_density_grid(means[:4], quats[:4], scales[:4], opac[:4], 16)
    means[4], scales[5, 1] = float("nan"), float("inf")  # two diverged Gaussians add nothing
    torch.testing.assert_close(gaussian_density_grid(means, quats, scales, opac, 16), ref)
