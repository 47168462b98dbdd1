"""Tests for gsv3d_pl.cameras: orbit order, orientation, intrinsics, rays and convention conversions."""

from __future__ import annotations

import math

import pytest
import torch

from gsv3d_pl.cameras import (
    cameras_from_spherical,
    fov_to_K,
    look_at,
    opencv_to_opengl,
    opengl_to_opencv,
    orbit_cameras,
    pixel_rays,
    plucker_rays,
    random_cameras,
)


def project(points: torch.Tensor, viewmat: torch.Tensor, K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """World points [P, 3] -> pixel coordinates [P, 2] (continuous, centres at +0.5) and planar depth [P]."""
    pc = points @ viewmat[:3, :3].T + viewmat[:3, 3]
    uvw = pc @ K.T
    return uvw[:, :2] / uvw[:, 2:], pc[:, 2]


def test_orbit_order_and_input_view():
    cams = orbit_cameras()
    assert len(cams) == 21 and cams.c2w.shape == (21, 4, 4) and cams.K.shape == (21, 3, 3)
    expected = torch.tensor([(i + 1) * 360.0 / 21 % 360.0 for i in range(21)])
    assert torch.allclose(torch.rad2deg(cams.azimuths_rad), expected, atol=1e-3)
    # Frame 20 is the input view: azimuth 0, camera on +Z looking at the origin (camera +Z = world -Z).
    assert cams.azimuths_rad[20].item() == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(cams.centers[20], torch.tensor([0.0, 0.0, 2.0]), atol=1e-6)
    assert torch.allclose(cams.c2w[20, :3, 2], torch.tensor([0.0, 0.0, -1.0]), atol=1e-6)
    assert torch.allclose(cams.polars_rad, torch.full((21,), math.pi / 2))
    # Azimuth grows counter-clockwise seen from +Y: 90° puts the camera on +X.
    c = cameras_from_spherical([0.0], [90.0])
    assert torch.allclose(c.centers[0], torch.tensor([2.0, 0.0, 0.0]), atol=1e-6)
    # Elevation > 0 is above the object; polar = 90° - elevation.
    up = orbit_cameras(21, elevation_deg=20.0)
    assert torch.all(up.centers[:, 1] > 0)
    assert torch.allclose(up.polars_rad, torch.full((21,), math.radians(70.0)))
    assert torch.allclose(up.centers.norm(dim=-1), torch.full((21,), 2.0), atol=1e-5)


def test_c2w_is_rigid_right_handed_opencv():
    cams = random_cameras(16, generator=torch.Generator().manual_seed(0))
    R = cams.c2w[:, :3, :3]
    assert torch.allclose(R @ R.transpose(-1, -2), torch.eye(3).expand(16, 3, 3), atol=1e-5)
    assert torch.allclose(torch.linalg.det(R), torch.ones(16), atol=1e-5)
    assert torch.allclose(cams.viewmats @ cams.c2w, torch.eye(4).expand(16, 4, 4), atol=1e-5)
    # Camera +Z (forward) points at the origin; camera +Y (image down) has a negative world-Y component.
    fwd = R[:, :, 2]
    assert torch.allclose(fwd, torch.nn.functional.normalize(-cams.centers, dim=-1), atol=1e-5)
    assert torch.all(R[:, 1, 1] < 0)
    # Straight down the up axis: no NaN, still a rotation.
    top = look_at(torch.tensor([[0.0, 3.0, 0.0]]))
    assert torch.isfinite(top).all() and torch.allclose(torch.linalg.det(top[0, :3, :3]), torch.tensor(1.0))


def test_input_view_orientation():
    """From the azimuth-0 camera, +X world is on the image's right and +Y world at its top."""
    W, H = 64, 48
    cams = orbit_cameras(21, width=W, height=H)
    vm, K = cams.viewmats[20], cams.K[20]
    uv, _ = project(torch.tensor([[0.3, 0.0, 0.0], [0.0, 0.3, 0.0]]), vm, K)
    assert uv[0, 0] > W / 2 + 1 and abs(uv[0, 1] - H / 2) < 1e-4  # +X -> right
    assert uv[1, 1] < H / 2 - 1 and abs(uv[1, 0] - W / 2) < 1e-4  # +Y -> top


@pytest.mark.parametrize("elev", [-10.0, 0.0, 30.0])
def test_origin_projects_to_image_centre(elev):
    cams = orbit_cameras(21, elevation_deg=elev, radius=2.5, width=96, height=64)
    for i in range(21):
        uv, z = project(torch.zeros(1, 3), cams.viewmats[i], cams.K[i])
        assert torch.allclose(uv[0], torch.tensor([48.0, 32.0]), atol=1e-4)
        assert z.item() == pytest.approx(2.5, abs=1e-5)


def test_fov_to_K():
    K = fov_to_K(33.8, 576, 576)
    f = 288 / math.tan(math.radians(16.9))
    assert torch.allclose(K, torch.tensor([[f, 0, 288.0], [0, f, 288.0], [0, 0, 1.0]]), rtol=1e-6)
    K2 = fov_to_K(torch.tensor([60.0, 90.0]), 200, 100)
    assert K2.shape == (2, 3, 3)
    assert K2[1, 0, 0].item() == pytest.approx(100.0, rel=1e-6) and K2[1, 1, 1].item() == pytest.approx(50.0, rel=1e-6)
    # The image edge (pixel boundary u = 0, not the first pixel centre) sits exactly at the half-FoV angle.
    assert math.degrees(math.atan(K2[0, 0, 2] / K2[0, 0, 0])) == pytest.approx(30.0, rel=1e-6)


def test_project_backproject_roundtrip_with_depth_and_plucker():
    g = torch.Generator().manual_seed(1)
    cams = random_cameras(6, width=40, height=30, radius_range=(1.5, 3.0), generator=g)
    pts = (torch.rand(100, 3, generator=g) - 0.5)  # inside the normalised object box
    for i in range(6):
        uv, z = project(pts, cams.viewmats[i], cams.K[i])
        # Back-project at the (continuous) pixel coordinate with planar depth.
        fx, fy, cx, cy = cams.K[i, 0, 0], cams.K[i, 1, 1], cams.K[i, 0, 2], cams.K[i, 1, 2]
        pc = torch.stack([(uv[:, 0] - cx) / fx * z, (uv[:, 1] - cy) / fy * z, z], -1)
        back = pc @ cams.c2w[i, :3, :3].T + cams.c2w[i, :3, 3]
        assert torch.allclose(back, pts, atol=1e-5)
    # Pixel rays and Plücker rays at pixel centres: a point at planar depth z along pixel (u, v)'s ray projects back
    # to (u + 0.5, v + 0.5), and lies on the Plücker line (o × d = p × d).
    c2w, K = cams.c2w[:2], cams.K[:2]
    o, d, z_per_t = pixel_rays(c2w, K, 40, 30)  # [2, H, W, 3], [2, H, W, 3], [2, H, W, 1]
    pl = plucker_rays(c2w, K, 40, 30)  # [2, 6, H, W]
    assert pl.shape == (2, 6, 30, 40)
    assert torch.allclose(pl[:, 3:].movedim(1, -1), d) and torch.allclose(d.norm(dim=-1), torch.ones(2, 30, 40))
    depth = 1.0 + torch.rand(2, 30, 40, 1, generator=g) * 2
    p = o + depth / z_per_t * d  # [2, H, W, 3]
    for i in range(2):
        uv, z = project(p[i].reshape(-1, 3), torch.linalg.inv(c2w[i]), K[i])
        v, u = torch.meshgrid(torch.arange(30) + 0.5, torch.arange(40) + 0.5, indexing="ij")
        assert torch.allclose(uv, torch.stack([u, v], -1).reshape(-1, 2), atol=1e-3)
        assert torch.allclose(z, depth[i].reshape(-1), atol=1e-5)
    moment = pl[:, :3].movedim(1, -1)
    assert torch.allclose(torch.linalg.cross(p, d, dim=-1), moment, atol=1e-5)
    # The moment is independent of the point chosen on the line (o itself).
    assert torch.allclose(torch.linalg.cross(o, d, dim=-1), moment, atol=1e-6)


def test_opengl_opencv_conversion():
    cams = random_cameras(5, generator=torch.Generator().manual_seed(2))
    gl = opencv_to_opengl(cams.c2w)
    assert torch.allclose(opengl_to_opencv(gl), cams.c2w)
    # OpenGL: the camera looks down its -Z and +Y is image-up; same centre.
    assert torch.allclose(-gl[:, :3, 2], cams.c2w[:, :3, 2]) and torch.allclose(gl[:, :3, 1], -cams.c2w[:, :3, 1])
    assert torch.allclose(gl[:, :3, 3], cams.c2w[:, :3, 3])
    assert torch.allclose(torch.linalg.det(gl[:, :3, :3]), torch.ones(5), atol=1e-5)


def test_cameras_container():
    cams = orbit_cameras(21, width=32, height=32)
    last = cams[-1]
    assert len(last) == 1 and torch.equal(last.c2w[0], cams.c2w[20])
    both = type(cams).cat([cams[0], cams[5]])
    assert len(both) == 2 and torch.equal(both.azimuths_rad[1], cams.azimuths_rad[5])
    assert cams.to(torch.float64).c2w.dtype == torch.float64
    with pytest.raises(ValueError):
        type(cams).cat([cams, orbit_cameras(21, width=16, height=16)])
