"""The projection shared by every backend: quaternions, 3D covariances, EWA splatting and the cut-off constants.

The constants are those of gsplat's defaults (the semantics every backend implements, see the package
docstring): a (Gaussian, pixel) pair with α < ``ALPHA_MIN`` is skipped, α is clamped to ``ALPHA_MAX``, a pixel
stops before the pair that would take its transmittance to <= ``T_MIN``, and ``EPS2D`` px² is added to the
diagonal of every 2D covariance.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "ALPHA_MIN", "ALPHA_MAX", "T_MIN", "EPS2D", "quat_to_rotmat", "covariance_factor", "covariance_3d",
    "project_gaussians",
]

ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.999
T_MIN = 1e-4
EPS2D = 0.3


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """[..., 4] wxyz quaternions (any norm; normalised here, as gsplat does) -> [..., 3, 3] rotation matrices."""
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).unflatten(-1, (3, 3))


def covariance_factor(quats: Tensor, scales: Tensor) -> Tensor:
    """M = R(q) diag(s), the factor of the 3D covariance Σ = M Mᵀ: quats [..., 4], scales [..., 3] -> [..., 3, 3]."""
    return quat_to_rotmat(quats) * scales[..., None, :]


def covariance_3d(quats: Tensor, scales: Tensor) -> Tensor:
    """Σ = R diag(s²) Rᵀ: quats [..., 4] (wxyz), scales [..., 3] (linear) -> [..., 3, 3]."""
    M = covariance_factor(quats, scales)
    return M @ M.transpose(-1, -2)


def project_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    eps2d: float = EPS2D,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """EWA projection of B Gaussian sets into their C cameras each (gsplat's pinhole model).

    The perspective Jacobian uses camera-space x/z and y/z clamped to 1.3x the half-FoV tangent (gsplat's
    ``lim_x``/``lim_y``); the footprint box is opacity-aware, ``extend · sqrt(Σ2D_xx|yy)`` with
    ``extend = min(3.33, sqrt(2 ln(255 o)))``, so outside it α < 1/255 analytically.

    Args:
        means: [B, N, 3] world-space centres.
        quats: [B, N, 4] rotations, wxyz (normalised here).
        scales: [B, N, 3] linear scales.
        opacities: [B, N] in (0, 1).
        viewmats: [B, C, 4, 4] world-to-camera (OpenCV).
        Ks: [B, C, 3, 3] intrinsics.
        width, height: image size in pixels.
        near_plane: Gaussians whose centre has camera z < near_plane are culled.
        eps2d: blur added to the 2D covariance diagonal (0.3 px², gsplat's default).

    Returns:
        means2d: [B, C, N, 2] projected centres in pixels (differentiable).
        conics: [B, C, N, 3] upper triangle (a, b, c) of the inverse 2D covariance (differentiable).
        depths: [B, C, N] camera-space z of the centres (differentiable).
        extents: [B, C, N, 2] half-size of the footprint box in pixels along x and y (no grad).
        visible: [B, C, N] bool, False where the Gaussian is culled (near plane, det <= 0, opacity < 1/255).
    """
    R = viewmats[..., :3, :3]  # [B, C, 3, 3]
    t = viewmats[..., :3, 3]  # [B, C, 3]
    means_c = torch.einsum("bcij,bnj->bcni", R, means) + t[:, :, None, :]  # [B, C, N, 3]
    tx, ty, tz = means_c.unbind(-1)  # [B, C, N] each

    fx, fy = Ks[..., 0, 0, None], Ks[..., 1, 1, None]  # [B, C, 1]
    cx, cy = Ks[..., 0, 2, None], Ks[..., 1, 2, None]
    tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
    # Clamp the direction used by the Jacobian to 1.3x the FoV: gsplat's guard against exploding covariances of
    # Gaussians far outside the frustum. The projected centre itself is not clamped.
    lim_x_pos, lim_x_neg = (width - cx) / fx + 0.3 * tan_fovx, cx / fx + 0.3 * tan_fovx
    lim_y_pos, lim_y_neg = (height - cy) / fy + 0.3 * tan_fovy, cy / fy + 0.3 * tan_fovy
    z_safe = torch.where(tz > near_plane, tz, torch.ones_like(tz))  # culled anyway; avoids inf/nan gradients
    rz = 1.0 / z_safe
    ux = torch.minimum(torch.maximum(tx * rz, -lim_x_neg), lim_x_pos)  # clamped tx / tz
    uy = torch.minimum(torch.maximum(ty * rz, -lim_y_neg), lim_y_pos)
    zeros = torch.zeros_like(tz)
    J = torch.stack([fx * rz, zeros, -fx * ux * rz, zeros, fy * rz, -fy * uy * rz], dim=-1).unflatten(-1, (2, 3))
    # J [B, C, N, 2, 3]; cov2d = (J R_view M)(J R_view M)^T with M = R_q diag(s), so only the 2x3 factor is formed.
    M = covariance_factor(quats, scales)  # [B, N, 3, 3]
    JR = J @ R[:, :, None]  # [B, C, N, 2, 3]
    F = JR @ M[:, None]  # [B, C, N, 2, 3]
    a = (F[..., 0, :] * F[..., 0, :]).sum(-1) + eps2d  # [B, C, N]
    b = (F[..., 0, :] * F[..., 1, :]).sum(-1)
    c = (F[..., 1, :] * F[..., 1, :]).sum(-1) + eps2d
    det = a * c - b * b
    det_safe = torch.where(det > 0, det, torch.ones_like(det))
    conics = torch.stack([c / det_safe, -b / det_safe, a / det_safe], dim=-1)  # [B, C, N, 3]
    means2d = torch.stack([fx * tx * rz + cx, fy * ty * rz + cy], dim=-1)  # [B, C, N, 2]

    with torch.no_grad():
        op = opacities[:, None, :].expand_as(tz)  # [B, C, N]
        visible = (tz >= near_plane) & (det > 0) & (op >= ALPHA_MIN)
        extend = torch.sqrt(2.0 * torch.log(op.clamp(min=ALPHA_MIN) / ALPHA_MIN)).clamp(max=3.33)
        extents = torch.stack([extend * a.clamp(min=0).sqrt(), extend * c.clamp(min=0).sqrt()], dim=-1)
    return means2d, conics, tz, extents, visible
