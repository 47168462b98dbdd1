"""Tests for gsv3d_pl.render: brute-force parity, gradients, orientation, batching, the backend switch,
render(), gsplat parity (GPU).

Every test runs once per CPU backend: ``backend="numba"`` (compiled kernels) and ``backend="torch"`` (pure PyTorch).
"""

from __future__ import annotations

import math

import pytest
import torch

from gsv3d_pl.cameras import cameras_from_spherical, fov_to_K, look_at, orbit_cameras
from gsv3d_pl.gaussians import Gaussians
from gsv3d_pl.render import rasterize, rasterize_gaussians, render, resolve_backend
from gsv3d_pl.render import rasterizer as rasterizer_mod
from gsv3d_pl.render.inputs import RasterInputs
from gsv3d_pl.render.numba_backend import numba_available


@pytest.fixture(autouse=True, params=["numba", "torch"])
def backend(request):
    """Runs each test with the numba and with the pure-PyTorch CPU backend."""
    if request.param == "numba" and not numba_available():
        pytest.skip("numba is not installed")
    return request.param


# ----------------------------------------------------------------------------------------------------------------
# Independent float64 reference: every pixel x every Gaussian, sequential front-to-back compositing.
# ----------------------------------------------------------------------------------------------------------------
def _rotmat_reference(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrices from wxyz quaternions via Rodrigues' formula (a different route than the renderer's)."""
    q = q / q.norm(dim=-1, keepdim=True)
    w, v = q[..., :1], q[..., 1:]  # [N, 1], [N, 3]
    angle = 2 * torch.atan2(v.norm(dim=-1), w[..., 0])  # [N]
    axis = v / v.norm(dim=-1, keepdim=True).clamp(min=1e-30)
    Kx = torch.zeros(*axis.shape[:-1], 3, 3, dtype=q.dtype)
    Kx[..., 0, 1], Kx[..., 0, 2], Kx[..., 1, 2] = -axis[..., 2], axis[..., 1], -axis[..., 0]
    Kx = Kx - Kx.transpose(-1, -2)
    s, c = torch.sin(angle)[..., None, None], torch.cos(angle)[..., None, None]
    return torch.eye(3, dtype=q.dtype) + s * Kx + (1 - c) * Kx @ Kx


def test_projection_helpers_match_rodrigues(backend):
    """quat_to_rotmat / covariance_3d (shared by the backends and the occupancy metric) against Rodrigues."""
    if backend != "torch":
        pytest.skip("backend-independent")
    from gsv3d_pl.render.projection import covariance_3d, quat_to_rotmat

    q = torch.randn(50, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3  # not unit norm
    s = torch.rand(50, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.1
    R = _rotmat_reference(q)
    assert torch.allclose(quat_to_rotmat(q), R, atol=1e-12)
    assert torch.allclose(covariance_3d(q, s), R @ torch.diag_embed(s**2) @ R.transpose(-1, -2), atol=1e-12)
    assert quat_to_rotmat(q.reshape(5, 10, 4)).shape == (5, 10, 3, 3)


def reference_render(means, quats, scales, opacities, colors, viewmat, K, W, H, bg, near=0.01):
    """One camera, float64, no footprint boxes: rgb [H, W, 3], alpha [H, W, 1], depth [H, W, 1]."""
    f64 = torch.float64
    means, quats, scales, opacities, colors = (x.to(f64) for x in (means, quats, scales, opacities, colors))
    viewmat, K, bg = viewmat.to(f64), K.to(f64), bg.to(f64)
    Rq = _rotmat_reference(quats)
    cov = Rq @ torch.diag_embed(scales**2) @ Rq.transpose(-1, -2)  # [N, 3, 3]
    Rv, tv = viewmat[:3, :3], viewmat[:3, 3]
    pc = means @ Rv.T + tv  # [N, 3]
    cov_c = Rv @ cov @ Rv.T
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    x, y, z = pc.unbind(-1)
    limx_p, limx_n = (W - cx) / fx + 0.3 * 0.5 * W / fx, cx / fx + 0.3 * 0.5 * W / fx
    limy_p, limy_n = (H - cy) / fy + 0.3 * 0.5 * H / fy, cy / fy + 0.3 * 0.5 * H / fy
    xc = z * (x / z).clamp(-limx_n, limx_p)
    yc = z * (y / z).clamp(-limy_n, limy_p)
    J = torch.zeros(len(z), 2, 3, dtype=f64)
    J[:, 0, 0], J[:, 0, 2] = fx / z, -fx * xc / z**2
    J[:, 1, 1], J[:, 1, 2] = fy / z, -fy * yc / z**2
    cov2 = J @ cov_c @ J.transpose(-1, -2) + 0.3 * torch.eye(2, dtype=f64)
    mu = torch.stack([fx * x / z + cx, fy * y / z + cy], -1)  # [N, 2]
    keep = (z >= near) & (torch.linalg.det(cov2) > 0)
    v, u = torch.meshgrid(torch.arange(H, dtype=f64) + 0.5, torch.arange(W, dtype=f64) + 0.5, indexing="ij")
    pix = torch.stack([u, v], -1).reshape(-1, 2)  # [HW, 2]
    order = torch.argsort(z)
    order = order[keep[order]]  # front to back, culled ones dropped
    d = pix[None] - mu[order][:, None]  # [n, HW, 2] dense over every Gaussian x every pixel
    m = torch.einsum("npi,nij,npj->np", d, torch.linalg.inv(cov2[order]), d)  # squared Mahalanobis
    a = (opacities[order][:, None] * torch.exp(-0.5 * m)).clamp(max=0.999)  # [n, HW]
    a = torch.where(a >= 1 / 255, a, torch.zeros_like(a))  # skipped pairs
    T_after = torch.cumprod(1 - a, dim=0)  # [n, HW] transmittance after each Gaussian
    T_before = torch.cat([torch.ones_like(a[:1]), T_after[:-1]])
    use = (a > 0) & (T_after > 1e-4)  # a pixel stops before the Gaussian that would take T to <= 1e-4
    use = torch.cumprod(use | (a == 0), dim=0).bool() & use  # ... and never resumes
    w = torch.where(use, a * T_before, torch.zeros_like(a))  # [n, HW]
    rgb = w.T @ colors[order]  # [HW, 3]
    acc = w.sum(0)
    dep = w.T @ z[order]
    rgb = rgb + (1 - acc[:, None]) * bg
    depth = torch.where(acc > 0, dep / acc.clamp(min=1e-10), torch.zeros_like(dep))
    return rgb.reshape(H, W, 3), acc.reshape(H, W, 1), depth.reshape(H, W, 1)


def random_scene(n: int, seed: int, scale=(0.02, 0.12), opacity=(0.05, 0.99), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) - 0.5) * 1.0
    quats = torch.randn(n, 4, generator=g)
    quats = quats / quats.norm(dim=-1, keepdim=True)
    scales = scale[0] + (scale[1] - scale[0]) * torch.rand(n, 3, generator=g)
    opac = opacity[0] + (opacity[1] - opacity[0]) * torch.rand(n, generator=g)
    colors = torch.rand(n, 3, generator=g)
    return tuple(x.to(dtype) for x in (means, quats, scales, opac, colors))


def random_cams(c: int, seed: int, W: int, H: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    eye = torch.nn.functional.normalize(torch.randn(c, 3, generator=g), dim=-1) * (1.6 + torch.rand(c, 1, generator=g))
    c2w = look_at(eye, (torch.rand(c, 3, generator=g) - 0.5) * 0.2)
    K = fov_to_K(40.0, W, H).expand(c, 3, 3).clone()
    K[:, 0, 2] += torch.rand(c, generator=g) * 4 - 2  # off-centre principal points
    return torch.linalg.inv(c2w).to(dtype), K.to(dtype)


@pytest.mark.parametrize("W,H,n,seed", [(40, 32, 60, 0), (33, 47, 150, 1), (48, 40, 250, 2)])
def test_matches_bruteforce_reference(W, H, n, seed, backend):
    scene = random_scene(n, seed)
    viewmats, Ks = random_cams(3, seed + 10, W, H)
    bgs = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.2, 0.5, 0.9]])
    rgb, alpha, depth = rasterize(*scene, viewmats, Ks, W, H, backgrounds=bgs, backend=backend)
    assert rgb.shape == (3, H, W, 3) and alpha.shape == (3, H, W, 1) and depth.shape == (3, H, W, 1)
    for c in range(3):
        r_rgb, r_a, r_d = reference_render(*scene, viewmats[c], Ks[c], W, H, bgs[c])
        assert r_a.max() > 0.5, "scene should cover part of the image"
        assert (rgb[c].double() - r_rgb).abs().mean() <= 1e-3
        assert (alpha[c].double() - r_a).abs().mean() <= 1e-3
        assert (depth[c].double() - r_d).abs().mean() <= 1e-3
        # Far tighter in practice: the footprint box loses nothing (alpha < 1/255 outside it).
        assert (rgb[c].double() - r_rgb).abs().max() <= 2e-3


def test_saturated_pixels_stop_at_transmittance_floor(backend):
    """Many opaque layers: the T <= 1e-4 early stop and the 0.999 clamp must match the reference."""
    n = 80
    means = torch.zeros(n, 3)
    means[:, 2] = torch.linspace(-0.3, 0.3, n)
    quats = torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1)
    scales = torch.full((n, 3), 0.15)
    opac = torch.full((n,), 0.9)
    opac[::7] = 1.0  # exercises the 0.999 clamp
    colors = torch.rand(n, 3, generator=torch.Generator().manual_seed(3))
    # Azimuths off the axes: at 90° all centres would share one depth and the order would be ambiguous.
    cams = cameras_from_spherical([10.0, -20.0, 30.0, 5.0], [20.0, 110.0, 200.0, 290.0], width=24, height=24)
    rgb, alpha, depth = rasterize(means, quats, scales, opac, colors, cams.viewmats, cams.K, 24, 24, backend=backend)
    for c in range(4):
        r_rgb, r_a, r_d = reference_render(means, quats, scales, opac, colors, cams.viewmats[c], cams.K[c], 24, 24,
                                           torch.ones(3))
        assert torch.allclose(rgb[c].double(), r_rgb, atol=1e-4)
        assert torch.allclose(alpha[c].double(), r_a, atol=1e-4)
        assert torch.allclose(depth[c].double(), r_d, atol=1e-4)


def test_near_plane_and_empty(backend):
    scene = random_scene(20, 5)
    viewmats, Ks = random_cams(2, 6, 16, 16)
    # Everything behind the camera: white background, zero alpha and depth.
    flipped = viewmats.clone()
    flipped[:, 2, :] *= -1
    rgb, alpha, depth = rasterize(*scene, flipped, Ks, 16, 16, backend=backend)
    assert torch.all(rgb == 1.0) and torch.all(alpha == 0) and torch.all(depth == 0)
    # No Gaussians at all.
    empty = tuple(x[:0] for x in scene)
    rgb, alpha, depth = rasterize(*empty, viewmats, Ks, 16, 16, backend=backend)
    assert torch.all(rgb == 1.0) and torch.all(alpha == 0)


def test_gradcheck_all_parameters(backend):
    """float64 gradcheck of rgb, alpha and depth w.r.t. means, quats, scales, opacities and colors."""
    torch.manual_seed(0)
    n, W, H = 6, 12, 10
    means, quats, scales, opac, colors = random_scene(n, 7, scale=(0.08, 0.2), opacity=(0.2, 0.7),
                                                      dtype=torch.float64)
    viewmats, Ks = random_cams(2, 8, W, H, dtype=torch.float64)
    bgs = torch.tensor([[0.3, 0.6, 0.9], [1.0, 1.0, 1.0]], dtype=torch.float64)
    wr, wa, wd = (torch.rand(2, H, W, k, dtype=torch.float64) for k in (3, 1, 1))

    def f(m, q, s, o, c):
        rgb, a, d = rasterize(m, q, s, o, c, viewmats, Ks, W, H, backgrounds=bgs, backend=backend)
        return (rgb * wr).sum() + (a * wa).sum() + (d * wd).sum()

    inputs = tuple(x.clone().requires_grad_(True) for x in (means, quats, scales, opac, colors))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_orientation_input_view(backend):
    """Azimuth-0 orbit camera (frame 20): +X world is on the right, +Y world is at the top."""
    W = H = 64
    cams = orbit_cameras(21, width=W, height=H)
    vm, K = cams.viewmats[20], cams.K[20]
    quats = torch.tensor([[1.0, 0, 0, 0]])
    scales = torch.full((1, 3), 0.03)
    for pos, check in [
        ([0.4, 0.0, 0.0], lambda cy, cx: cx > W / 2 + 5),
        ([0.0, 0.4, 0.0], lambda cy, cx: cy < H / 2 - 5),
        ([0.0, 0.0, 0.0], lambda cy, cx: abs(cx - W / 2) < 0.5 and abs(cy - H / 2) < 0.5),
    ]:
        _, alpha, _ = rasterize(torch.tensor([pos]), quats, scales, torch.ones(1) * 0.9, torch.zeros(1, 3),
                                vm[None], K[None], W, H, backend=backend)
        a = alpha[0, :, :, 0]
        v, u = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
        cy, cx = (a * v).sum() / a.sum(), (a * u).sum() / a.sum()
        assert check(cy.item(), cx.item()), (pos, cx.item(), cy.item())


def test_origin_projects_to_centre_for_every_orbit_frame(backend):
    W = H = 32
    cams = orbit_cameras(21, elevation_deg=15.0, width=W, height=H)
    _, alpha, depth = rasterize(torch.zeros(1, 3), torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), 0.02),
                                torch.ones(1) * 0.9, torch.zeros(1, 3), cams.viewmats, cams.K, W, H, backend=backend)
    v, u = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    a = alpha[..., 0]  # [21, H, W]
    cx = (a * u).sum((1, 2)) / a.sum((1, 2))
    cy = (a * v).sum((1, 2)) / a.sum((1, 2))
    assert torch.allclose(cx, torch.full_like(cx, W / 2), atol=1e-3)
    assert torch.allclose(cy, torch.full_like(cy, H / 2), atol=1e-3)
    # Depth at the centre is the orbit radius.
    assert torch.allclose(depth[:, H // 2, W // 2, 0], torch.full((21,), 2.0), atol=1e-4)


def test_batch_dims_and_broadcasting(backend):
    W, H = 20, 16
    scenes = [random_scene(50, s) for s in (11, 12)]
    stacked = tuple(torch.stack(xs) for xs in zip(*scenes))  # each [2, N, ...]
    viewmats, Ks = random_cams(3, 13, W, H)
    # [B=2] Gaussians with one shared camera set [C=3] -> [2, 3, H, W, *]
    rgb, alpha, depth = rasterize(*stacked, viewmats, Ks, W, H, backend=backend)
    assert rgb.shape == (2, 3, H, W, 3) and alpha.shape == (2, 3, H, W, 1) and depth.shape == (2, 3, H, W, 1)
    for b in range(2):
        r, a, d = rasterize(*scenes[b], viewmats, Ks, W, H, backend=backend)
        assert torch.allclose(rgb[b], r, atol=1e-6) and torch.allclose(alpha[b], a) and torch.allclose(depth[b], d)
    # Per-object cameras and the Gaussians container; extra leading dim.
    g = Gaussians(*stacked)
    vm2 = torch.stack([viewmats, viewmats.flip(0)])
    K2 = torch.stack([Ks, Ks.flip(0)])
    rgb2, _, _ = rasterize_gaussians(g, vm2, K2, W, H, backend=backend)
    assert torch.allclose(rgb2[1], rgb[1].flip(0), atol=1e-6)
    g4 = Gaussians(*(x[None].expand(2, *x.shape) for x in stacked))  # batch [2, 2]
    rgb4, _, _ = rasterize_gaussians(g4, vm2[None].expand(2, -1, -1, -1, -1), K2[None].expand(2, -1, -1, -1, -1),
                                     W, H, backend=backend)
    assert rgb4.shape == (2, 2, 3, H, W, 3) and torch.allclose(rgb4[1, 0], rgb2[0], atol=1e-6)


def test_tile_sizes_and_chunking_agree(backend):
    """The tile size, the block size and the view chunking are speed knobs only."""
    if backend != "torch":
        pytest.skip("knobs of the pure-PyTorch compositor")
    from gsv3d_pl.render.torch_backend import rasterize_torch

    scene = tuple(x[None] for x in random_scene(300, 21))
    viewmats, Ks = random_cams(4, 22, 37, 29)
    inputs = RasterInputs(*scene, viewmats[None], Ks[None], 37, 29)
    ref = rasterize_torch(inputs, tile_size=4)
    for kw in ({"tile_size": 2}, {"tile_size": 16}, {"block_pairs": 64}, {"chunk_pairs": 1}):
        out = rasterize_torch(inputs, **kw)
        for x, y in zip(out, ref):
            assert torch.allclose(x, y, atol=1e-5), kw


def test_gradients_match_autograd_of_reference(backend):
    """The analytic compositing backward equals autograd through a dense per-pixel loop (float64)."""
    n, W, H = 25, 14, 12
    scene = random_scene(n, 31, scale=(0.05, 0.2), opacity=(0.3, 0.95), dtype=torch.float64)
    viewmats, Ks = random_cams(2, 32, W, H, dtype=torch.float64)
    wr = torch.rand(2, H, W, 3, dtype=torch.float64)
    ins = [x.clone().requires_grad_(True) for x in scene]
    rgb, a, d = rasterize(*ins, viewmats, Ks, W, H, backend=backend)
    ((rgb * wr).sum() + a.sum() + d.sum()).backward()
    ins_ref = [x.clone().requires_grad_(True) for x in scene]
    loss = 0
    for c in range(2):
        r_rgb, r_a, r_d = reference_render(*ins_ref, viewmats[c], Ks[c], W, H, torch.ones(3, dtype=torch.float64))
        loss = loss + (r_rgb * wr[c]).sum() + r_a.sum() + r_d.sum()
    loss.backward()
    for x, y in zip(ins, ins_ref):
        assert torch.allclose(x.grad, y.grad, atol=1e-6, rtol=1e-5)


def test_numba_and_torch_compositors_agree(backend):
    """A bigger float32 scene with many overlapping layers: outputs and all parameter gradients agree."""
    if backend != "numba":
        pytest.skip("compares the two compositors once")
    W, H = 64, 48
    scene = random_scene(3000, 51, scale=(0.005, 0.04))
    viewmats, Ks = random_cams(5, 52, W, H)
    bgs = torch.rand(5, 3, generator=torch.Generator().manual_seed(53))
    outs, grads = [], []
    for k in ("numba", "torch"):
        ins = [x.clone().requires_grad_(True) for x in scene]
        out = rasterize(*ins, viewmats, Ks, W, H, backgrounds=bgs, backend=k)
        w = [torch.rand(x.shape, generator=torch.Generator().manual_seed(54 + i)) for i, x in enumerate(out)]
        sum((x * v).sum() for x, v in zip(out, w)).backward()
        outs.append(out)
        grads.append([x.grad for x in ins])
    assert outs[0][1].mean() > 0.3, "scene should cover the images"
    for x, y in zip(*outs):
        assert (x - y).abs().max() < 1e-4
    for gx, gy in zip(*grads):
        rel = (gx - gy).norm() / gy.norm()
        assert rel < 1e-4, rel


def test_numba_tile_sizes_agree(backend):
    if backend != "numba":
        pytest.skip("numba tile sizes")
    from gsv3d_pl.render.numba_backend import rasterize_numba

    scene = tuple(x[None].double() for x in random_scene(300, 21))
    viewmats, Ks = (x[None].double() for x in random_cams(4, 22, 37, 29))
    stats: dict = {}
    inputs = RasterInputs(*scene, viewmats, Ks, 37, 29)
    ref = rasterize_numba(inputs, tile_size=16, stats=stats)
    assert stats["tile"] == 16 and stats["rows"] > 0 and stats["pairs"] > 0
    for t in (1, 5, 8, 64):
        out = rasterize_numba(inputs, tile_size=t)
        for x, y in zip(out, ref):
            assert torch.allclose(x, y, atol=1e-12), t


def test_backend_switch(monkeypatch, caplog):
    """One switch: "auto" resolves per device and dtype; "numba" and "gsplat" say why they cannot run."""
    cpu = torch.device("cpu")
    assert resolve_backend("torch", cpu) == "torch"
    assert resolve_backend("auto", cpu, torch.float32) == ("numba" if numba_available() else "torch")
    assert resolve_backend("auto", cpu, torch.bfloat16) == "torch"  # the kernels are float32/float64 only
    assert resolve_backend("auto", torch.device("cuda"), torch.float32) in ("gsplat", "torch")
    with pytest.raises(ValueError, match="CPU"):
        resolve_backend("numba", torch.device("cuda"))
    with pytest.raises(ValueError, match="float32"):
        resolve_backend("numba", cpu, torch.float16)
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("fast", cpu)
    # The auto choice is logged once per process and device type.
    monkeypatch.setattr(rasterizer_mod, "_logged", set())
    with caplog.at_level("INFO", logger=rasterizer_mod.__name__):
        resolve_backend("auto", cpu)
        resolve_backend("auto", cpu)
    assert sum("backend='auto'" in r.getMessage() for r in caplog.records) == 1
    # Without numba: "auto" falls back to torch and "numba" raises naming the missing package.
    from gsv3d_pl.render import numba_backend

    monkeypatch.setattr(numba_backend, "numba", None)
    monkeypatch.setattr(rasterizer_mod, "numba_available", lambda: False)
    assert resolve_backend("auto", cpu) == "torch"
    with pytest.raises(RuntimeError, match="numba"):
        resolve_backend("numba", cpu)
    scene = random_scene(5, 0)
    viewmats, Ks = random_cams(1, 1, 8, 8)
    with pytest.raises(RuntimeError, match="numba"):
        rasterize(*scene, viewmats, Ks, 8, 8, backend="numba")


def test_bad_inputs_raise():
    scene = random_scene(5, 0)
    viewmats, Ks = random_cams(2, 1, 8, 8)
    with pytest.raises(ValueError, match="quats"):
        rasterize(scene[0], scene[1][:, :3], *scene[2:], viewmats, Ks, 8, 8)
    with pytest.raises(ValueError, match="Ks"):
        rasterize(*scene, viewmats, Ks[:1], 8, 8)
    with pytest.raises(ValueError, match="backend"):
        rasterize(*scene, viewmats, Ks, 8, 8, backend="cuda")
    with pytest.raises(RuntimeError, match="gsplat"):
        rasterize(*scene, viewmats, Ks, 8, 8, backend="gsplat")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gsplat_parity_cuda(backend):
    if backend != "torch":
        pytest.skip("compares the pure-PyTorch compositor with gsplat once")
    from gsv3d_pl.render.gsplat_backend import gsplat_available

    if not gsplat_available():
        pytest.skip("gsplat CUDA kernels do not load")
    W, H = 64, 48
    scene = tuple(x.cuda() for x in random_scene(2000, 41, scale=(0.005, 0.05)))
    viewmats, Ks = (x.cuda() for x in random_cams(5, 42, W, H))
    bgs = torch.rand(5, 3, device="cuda")
    ins_t = [x.clone().requires_grad_(True) for x in scene]
    ins_g = [x.clone().requires_grad_(True) for x in scene]
    out_t = rasterize(*ins_t, viewmats, Ks, W, H, backgrounds=bgs, backend=backend)
    out_g = rasterize(*ins_g, viewmats, Ks, W, H, backgrounds=bgs, backend="gsplat")
    for x, y in zip(out_t, out_g):
        assert (x - y).abs().mean() < 1e-4 and (x - y).abs().max() < 1e-2
    w = [torch.rand_like(x) for x in out_t]
    sum((x * v).sum() for x, v in zip(out_t, w)).backward()
    sum((x * v).sum() for x, v in zip(out_g, w)).backward()
    for a, b in zip(ins_t, ins_g):
        rel = (a.grad - b.grad).norm() / b.grad.norm().clamp(min=1e-12)
        assert rel < 1e-2, rel
    assert math.isfinite(float(rel))


def test_inference_mode_matches_grad_mode(backend):
    """Lightning runs validation/test under torch.inference_mode; the worker threads must follow it."""
    from gsv3d_pl.cameras import orbit_cameras

    cams = orbit_cameras(num_frames=4, width=24, height=24)
    g = torch.Generator().manual_seed(0)
    n = 300
    means = torch.rand(n, 3, generator=g) - 0.5
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1)
    scales = torch.full((n, 3), 0.03)
    opac = torch.full((n,), 0.6)
    colors = torch.rand(n, 3, generator=g)
    ref = rasterize(means, quats, scales, opac, colors, cams.viewmats, cams.K, 24, 24, backend=backend)
    with torch.inference_mode():
        out = rasterize(means, quats, scales, opac, colors, cams.viewmats, cams.K, 24, 24, backend=backend)
    for a, b in zip(ref, out):
        assert torch.allclose(a, b, atol=1e-6)
    assert ref[1].max() > 0.5  # the scene is visible: the comparison is not between two empty images


def test_render_chunks_broadcast_and_autocast(backend):
    """render(): channels-first rasterize() at c2w cameras; chunking, camera broadcasting, the background forms
    and bf16 autocast do not change the result."""
    W, H, V = 20, 16, 5
    scenes = [random_scene(80, s) for s in (61, 62)]
    g = Gaussians(*(torch.stack(xs) for xs in zip(*scenes)))  # batch [2]
    viewmats, Ks = random_cams(V, 63, W, H)
    c2w = torch.linalg.inv(viewmats)  # [V, 4, 4], shared by both objects
    out = render(g, c2w, Ks, W, H, background=0.25, backend=backend)
    assert out.rgb.shape == (2, V, 3, H, W) and out.alpha.shape == (2, V, 1, H, W) and out.depth.shape == out.alpha.shape
    assert out.alpha.max() > 0.5
    ref = rasterize(*(torch.stack(xs) for xs in zip(*scenes)), viewmats, Ks, W, H,
                    backgrounds=torch.full((V, 3), 0.25), backend=backend)
    for x, y in zip(out, ref):
        assert torch.allclose(x, y.movedim(-1, -3), atol=1e-5)
    per_object = render(g, c2w.expand(2, V, 4, 4), Ks.expand(2, V, 3, 3), W, H, background=torch.full((3,), 0.25),
                        backend=backend, chunk_views=2)  # 3 chunks: 2 + 2 + 1 views
    for x, y in zip(per_object, out):
        assert torch.allclose(x, y, atol=1e-6)
    single = render(g[1], c2w, Ks, W, H, background=0.25, backend=backend, chunk_views=3)
    assert single.rgb.shape == (V, 3, H, W) and torch.allclose(single.rgb, out.rgb[1], atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = render(g, c2w, Ks, W, H, background=0.25, backend=backend, chunk_views=4)
    assert half.rgb.dtype == torch.float32 and torch.allclose(half.rgb, out.rgb, atol=1e-6)
    with pytest.raises(ValueError, match="K"):
        render(g, c2w, Ks[:2], W, H)


def test_render_gradients_through_chunks(backend):
    """Gradients of a chunked render() equal those of one call over all views (float32, as render() runs)."""
    W, H, V = 12, 10, 4
    scene = random_scene(30, 71)
    viewmats, Ks = random_cams(V, 72, W, H)
    c2w = torch.linalg.inv(viewmats)
    grads = []
    for chunk in (None, 1):
        g = Gaussians(*(x.clone().requires_grad_(True) for x in scene))
        rgb, alpha, depth = render(g, c2w, Ks, W, H, backend=backend, chunk_views=chunk)
        (rgb.square().sum() + alpha.sum() + depth.sum()).backward()
        grads.append([g.means.grad, g.opacities.grad, g.colors.grad])
    assert grads[0][0].abs().sum() > 0
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
