"""Cameras: SV3D orbits, intrinsics, Plücker rays and convention conversions.

Conventions (fixed project-wide, see README "Conventions"):

- World: right-handed, +Y up (glTF / trimesh). Objects live in [-0.5, 0.5]^3.
- Camera: OpenCV, +X right, +Y down, +Z forward. ``c2w`` is camera-to-world, ``viewmat = inv(c2w)``.
- Intrinsics: pixel (u, v) has its centre at (u + 0.5, v + 0.5); the principal point of an
  orbit camera is the image centre (W/2, H/2).
- Orbit: azimuth 0 looks at the origin from +Z; azimuth grows counter-clockwise seen from +Y
  (azimuth 90° puts the camera on +X); elevation > 0 puts the camera above the object.
  SV3D order: frame i has azimuth (i + 1)·360/F, so the last frame is the input view.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gsv3d_pl.orbit import DEFAULT_RADIUS, FOV_DEG, NUM_FRAMES, orbit_azimuths_deg

__all__ = [
    "Cameras",
    "orbit_cameras",
    "cameras_from_spherical",
    "random_cameras",
    "fov_to_K",
    "look_at",
    "spherical_to_position",
    "opengl_to_opencv",
    "opencv_to_opengl",
    "plucker_rays",
    "pixel_rays",
]

# Flips camera Y and Z: OpenGL (+Y up, -Z forward) <-> OpenCV (+Y down, +Z forward).
_GL_CV_FLIP = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))


@dataclass
class Cameras:
    """A batch of F pinhole cameras sharing one image size.

    Attributes:
        c2w: [F, 4, 4] OpenCV camera-to-world matrices.
        K: [F, 3, 3] intrinsics (pixel centres at u + 0.5).
        width, height: image size in pixels.
        azimuths_rad: [F] azimuth relative to the input view (SV3D's convention), radians.
        polars_rad: [F] polar angle = radians(90 - elevation), SV3D's camera input.
        radii: [F] distance from the origin.
    """

    c2w: Tensor
    K: Tensor
    width: int
    height: int
    azimuths_rad: Tensor
    polars_rad: Tensor
    radii: Tensor

    @property
    def viewmats(self) -> Tensor:
        """[F, 4, 4] world-to-camera matrices (gsplat's ``viewmats``)."""
        return torch.linalg.inv(self.c2w)

    @property
    def elevations_rad(self) -> Tensor:
        return math.pi / 2 - self.polars_rad

    @property
    def centers(self) -> Tensor:
        """[F, 3] camera centres in world coordinates."""
        return self.c2w[:, :3, 3]

    def __len__(self) -> int:
        return self.c2w.shape[0]

    def __getitem__(self, idx) -> Cameras:
        if isinstance(idx, int):
            idx = slice(idx, idx + 1) if idx != -1 else slice(-1, None)
        return Cameras(
            self.c2w[idx], self.K[idx], self.width, self.height,
            self.azimuths_rad[idx], self.polars_rad[idx], self.radii[idx],
        )

    def to(self, *args, **kwargs) -> Cameras:
        return Cameras(
            self.c2w.to(*args, **kwargs), self.K.to(*args, **kwargs), self.width, self.height,
            self.azimuths_rad.to(*args, **kwargs), self.polars_rad.to(*args, **kwargs),
            self.radii.to(*args, **kwargs),
        )

    @staticmethod
    def cat(cams: list[Cameras]) -> Cameras:
        if len({(c.width, c.height) for c in cams}) != 1:
            raise ValueError("Cameras.cat: all cameras must share one image size")
        return Cameras(
            torch.cat([c.c2w for c in cams]), torch.cat([c.K for c in cams]),
            cams[0].width, cams[0].height,
            torch.cat([c.azimuths_rad for c in cams]), torch.cat([c.polars_rad for c in cams]),
            torch.cat([c.radii for c in cams]),
        )


def fov_to_K(fov_deg: float | Tensor, width: int, height: int) -> Tensor:
    """Intrinsics for a square-pixel camera whose horizontal and vertical FoV are both ``fov_deg``.

    For non-square images fx and fy differ so that each axis spans ``fov_deg`` (SV3D's
    convention: "vertical = horizontal"). Returns [3, 3], or [F, 3, 3] for a tensor of FoVs.
    """
    fov = torch.as_tensor(fov_deg, dtype=torch.float32)
    t = torch.tan(torch.deg2rad(fov) / 2)
    fx = width / (2 * t)
    fy = height / (2 * t)
    K = torch.zeros(*fov.shape, 3, 3)
    K[..., 0, 0] = fx
    K[..., 1, 1] = fy
    K[..., 0, 2] = width / 2
    K[..., 1, 2] = height / 2
    K[..., 2, 2] = 1.0
    return K


def spherical_to_position(elevation_rad: Tensor, azimuth_rad: Tensor, radius: Tensor) -> Tensor:
    """Camera centre [..., 3] for the orbit convention above."""
    ce = torch.cos(elevation_rad)
    return torch.stack(
        [radius * ce * torch.sin(azimuth_rad), radius * torch.sin(elevation_rad), radius * ce * torch.cos(azimuth_rad)],
        dim=-1,
    )


def look_at(eye: Tensor, target: Tensor | None = None, up: Tensor | None = None) -> Tensor:
    """OpenCV c2w [..., 4, 4] for cameras at ``eye`` [..., 3] looking at ``target`` (default origin).

    ``up`` is the world up (+Y); image-down is then -up projected on the image plane. A camera looking
    straight along ±up is ill-posed; there we fall back to +Z as the reference up.
    """
    eye = torch.as_tensor(eye, dtype=torch.float32)
    target = torch.zeros_like(eye) if target is None else torch.as_tensor(target, dtype=eye.dtype).expand_as(eye)
    up = torch.tensor([0.0, 1.0, 0.0], dtype=eye.dtype) if up is None else torch.as_tensor(up, dtype=eye.dtype)
    up = up.expand_as(eye)
    forward = torch.nn.functional.normalize(target - eye, dim=-1)  # camera +Z
    right = torch.linalg.cross(forward, up, dim=-1)  # camera +X
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
    alt = torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0], dtype=eye.dtype).expand_as(eye), dim=-1)
    right = torch.nn.functional.normalize(torch.where(degenerate, alt, right), dim=-1)
    down = torch.linalg.cross(forward, right, dim=-1)  # camera +Y
    c2w = torch.zeros(*eye.shape[:-1], 4, 4, dtype=eye.dtype)
    c2w[..., :3, 0] = right
    c2w[..., :3, 1] = down
    c2w[..., :3, 2] = forward
    c2w[..., :3, 3] = eye
    c2w[..., 3, 3] = 1.0
    return c2w


def cameras_from_spherical(
    elevations_deg,
    azimuths_deg,
    radius=DEFAULT_RADIUS,
    fov_deg: float = FOV_DEG,
    width: int = 576,
    height: int = 576,
) -> Cameras:
    """Cameras looking at the origin from (elevation, azimuth, radius) triples (degrees, world units).

    ``radius`` may be a scalar or one value per camera; lists are broadcast against each other.
    """
    el = torch.as_tensor(elevations_deg, dtype=torch.float32).reshape(-1)
    az = torch.as_tensor(azimuths_deg, dtype=torch.float32).reshape(-1)
    r = torch.as_tensor(radius, dtype=torch.float32).reshape(-1)
    el, az, r = torch.broadcast_tensors(el, az, r)
    el_rad, az_rad = torch.deg2rad(el), torch.deg2rad(az % 360.0)
    eye = spherical_to_position(el_rad, az_rad, r)  # [F, 3]
    c2w = look_at(eye)  # [F, 4, 4]
    K = fov_to_K(fov_deg, width, height).expand(len(el), 3, 3).clone()  # [F, 3, 3]
    return Cameras(c2w, K, width, height, az_rad, math.pi / 2 - el_rad, r.clone())


def orbit_cameras(
    num_frames: int = NUM_FRAMES,
    elevation_deg: float = 0.0,
    radius: float = DEFAULT_RADIUS,
    fov_deg: float = FOV_DEG,
    width: int = 576,
    height: int = 576,
) -> Cameras:
    """SV3D's orbit: frame i at azimuth (i+1)·360/num_frames, so the last frame is the input view.

    The azimuths are :func:`gsv3d_pl.orbit.orbit_azimuths_deg` (Stability's sampling script's order).
    """
    az = orbit_azimuths_deg(num_frames)  # [F]
    return cameras_from_spherical(
        torch.full((num_frames,), float(elevation_deg)), az.float(), radius, fov_deg, width, height
    )


def random_cameras(
    num: int,
    elevation_range_deg: tuple[float, float] = (-10.0, 40.0),
    radius_range: tuple[float, float] = (DEFAULT_RADIUS, DEFAULT_RADIUS),
    fov_deg: float = FOV_DEG,
    width: int = 576,
    height: int = 576,
    generator: torch.Generator | None = None,
) -> Cameras:
    """``num`` cameras looking at the origin, azimuth uniform in [0, 360), elevation and radius
    uniform in their ranges. Extra supervision views for the decoder."""
    u = torch.rand(num, 3, generator=generator)  # [num, 3]
    az = u[:, 0] * 360.0
    el = elevation_range_deg[0] + u[:, 1] * (elevation_range_deg[1] - elevation_range_deg[0])
    r = radius_range[0] + u[:, 2] * (radius_range[1] - radius_range[0])
    return cameras_from_spherical(el, az, r, fov_deg, width, height)


def opengl_to_opencv(c2w_gl: Tensor) -> Tensor:
    """Camera-to-world [..., 4, 4] from OpenGL/Blender (+Y up, -Z forward) to OpenCV (+Y down, +Z forward).

    Only the camera axes change; the world frame is untouched. The map is its own inverse.
    """
    return c2w_gl @ _GL_CV_FLIP.to(c2w_gl)


def opencv_to_opengl(c2w_cv: Tensor) -> Tensor:
    """Inverse of :func:`opengl_to_opencv` (the same flip)."""
    return c2w_cv @ _GL_CV_FLIP.to(c2w_cv)


def pixel_rays(c2w: Tensor, K: Tensor, width: int, height: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pixel rays through pixel centres (u + 0.5, v + 0.5).

    Args:
        c2w: [..., 4, 4] OpenCV camera-to-world.
        K: [..., 3, 3] intrinsics.
    Returns:
        origins [..., H, W, 3], unit directions [..., H, W, 3] (world), and ``z_per_t``
        [..., H, W, 1]: the camera-space z of a point at unit distance along the ray, so that a
        point of planar depth z lies at ``origin + (z / z_per_t) * direction``.
    """
    dt = c2w.dtype if c2w.dtype in (torch.float32, torch.float64) else torch.float32
    with _no_autocast(c2w.device):  # rays in full precision, also inside a bf16 step
        return _pixel_rays(c2w.to(dt), K.to(dt), width, height)


def _no_autocast(device: torch.device):
    """Autocast off on ``device`` (a no-op context where autocast does not exist, e.g. the meta device)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _pixel_rays(c2w: Tensor, K: Tensor, width: int, height: int) -> tuple[Tensor, Tensor, Tensor]:
    dtype, device = c2w.dtype, c2w.device
    v, u = torch.meshgrid(
        torch.arange(height, dtype=dtype, device=device) + 0.5,
        torch.arange(width, dtype=dtype, device=device) + 0.5,
        indexing="ij",
    )  # [H, W] each
    fx, fy = K[..., 0, 0, None, None], K[..., 1, 1, None, None]
    cx, cy = K[..., 0, 2, None, None], K[..., 1, 2, None, None]
    x = (u - cx) / fx  # [..., H, W]
    y = (v - cy) / fy
    d_cam = torch.stack([x, y, torch.ones_like(x)], dim=-1)  # [..., H, W, 3]
    R = c2w[..., None, None, :3, :3]  # [..., 1, 1, 3, 3]
    d_world = (R @ d_cam[..., None])[..., 0]  # [..., H, W, 3]
    norm = d_world.norm(dim=-1, keepdim=True)
    dirs = d_world / norm
    origins = c2w[..., None, None, :3, 3].expand_as(dirs)
    return origins, dirs, 1.0 / norm


def plucker_rays(c2w: Tensor, K: Tensor, width: int, height: int) -> Tensor:
    """Plücker coordinates (o × d, d) of every pixel's ray, d unit, at pixel centres.

    Args:
        c2w: [..., 4, 4] OpenCV camera-to-world.
        K: [..., 3, 3] intrinsics.
    Returns:
        [..., 6, H, W], channels-first as the networks take them.
    """
    origins, dirs, _ = pixel_rays(c2w, K, width, height)  # [..., H, W, 3], full precision
    with _no_autocast(c2w.device):  # linalg.cross refuses mixed bf16/fp32 inputs
        moment = torch.linalg.cross(origins, dirs, dim=-1)
    return torch.cat([moment, dirs], dim=-1).movedim(-1, -3)  # [..., 6, H, W]
