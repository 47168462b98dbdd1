"""Tests for gsv3d_pl.render.numba_projection: the compiled projection equals the torch one (table, extents,
visible, gradients), the projection switch and its fallback to torch, and the renderer end to end."""

from __future__ import annotations

import pytest
import torch

from gsv3d_pl.cameras import look_at
from gsv3d_pl.render import param_table as param_table_mod
from gsv3d_pl.render import rasterize
from gsv3d_pl.render.inputs import RasterInputs
from gsv3d_pl.render.numba_jit import numba_available
from gsv3d_pl.render.param_table import _table, param_table, projection_mode, resolve_projection
from gsv3d_pl.render.projection import ALPHA_MIN
from tests.test_render import random_cams, random_scene

pytestmark = pytest.mark.skipif(not numba_available(), reason="numba is not installed")

F32, F64 = torch.float32, torch.float64
W, H, NEAR = 40, 32, 0.01


def projection_scene(B=2, N=400, C=3, dtype=F64, seed=0):
    """Gaussians [B, N] spread over a box of side 8 around cameras at distance ~2 from the origin, so that many
    are behind some camera or far outside its frustum (the Jacobian clamp), every 7th has opacity < 1/255,
    quaternions have norms in (0.3, 3); per-object cameras [B, C] with off-centre principal points."""
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(B, N, 3, generator=g) - 0.5) * 8
    quats = torch.nn.functional.normalize(torch.randn(B, N, 4, generator=g), dim=-1)
    quats = quats * (0.3 + 2.7 * torch.rand(B, N, 1, generator=g))
    scales = torch.exp(torch.randn(B, N, 3, generator=g) - 3.0)  # ~0.05, some far larger or smaller
    opac = torch.rand(B, N, generator=g)
    opac[:, ::7] *= 3e-3  # below 1/255: culled
    colors = torch.rand(B, N, 3, generator=g)
    eye = torch.nn.functional.normalize(torch.randn(B, C, 3, generator=g), dim=-1) * (1.6 + torch.rand(B, C, 1,
                                                                                                    generator=g))
    viewmats = torch.linalg.inv(look_at(eye, (torch.rand(B, C, 3, generator=g) - 0.5) * 0.2))
    Ks = torch.zeros(B, C, 3, 3)
    Ks[..., 0, 0], Ks[..., 1, 1], Ks[..., 2, 2] = 50.0 + 10 * torch.rand(B, C, generator=g), 45.0, 1.0
    Ks[..., 0, 2], Ks[..., 1, 2] = W / 2 + 4 * torch.rand(B, C, generator=g) - 2, H / 2 + 1.5
    return [x.to(dtype) for x in (means, quats, scales, opac, colors, viewmats, Ks)]


def torch_table(xs, eps2d):
    return _table(*xs, W, H, NEAR, eps2d)


def numba_table(xs, eps2d):
    with projection_mode("numba"):
        return param_table(RasterInputs(*xs, W, H, near_plane=NEAR), eps2d)


def _categories(table_t, visible_t, opac, C):
    """Counts of the culled / clamped cases the scene must exercise."""
    mx, my, z = table_t[:, 0], table_t[:, 1], table_t[:, 9]
    front = z > NEAR
    # |tx/tz| beyond the Jacobian's limits <=> the centre is more than 0.15 W (0.15 H) outside the image
    clamped = front & ((mx < -0.15 * W) | (mx > 1.15 * W) | (my < -0.15 * H) | (my > 1.15 * H))
    faint = (opac < ALPHA_MIN)[:, None, :].expand(-1, C, -1).reshape(-1)
    return {"behind": int((~front).sum()), "clamped": int(clamped.sum()), "faint": int(faint.sum()),
            "visible": int(visible_t.sum()), "culled": int((~visible_t).sum())}


@pytest.mark.parametrize("eps2d", [0.3, -0.3])  # -0.3 makes det <= 0 for some rows: the det_safe branch
def test_forward_matches_torch_float64(eps2d):
    xs = projection_scene()
    C = xs[5].shape[1]
    tab_t, ext_t, vis_t = torch_table(xs, eps2d)
    tab_n, ext_n, vis_n = numba_table(xs, eps2d)
    assert tab_n.shape == tab_t.shape == (2 * C * 400, 10) and ext_n.shape == (2 * C, 400, 2)
    assert tab_n.dtype == ext_n.dtype == F64 and vis_n.dtype == torch.bool
    cats = _categories(tab_t, vis_t.reshape(-1), xs[3], C)
    assert min(cats.values()) > 10, cats
    if eps2d < 0:
        a, b, c = (tab_t[:, k] for k in (2, 3, 4))  # with det <= 0 the conic is (c, -b, a) of Σ2D itself
        assert ((a * c - b * b) > 0).sum() > 10 and (~vis_t.reshape(-1) & (tab_t[:, 9] > NEAR)).sum() > 10
    torch.testing.assert_close(tab_n, tab_t, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ext_n, ext_t, rtol=1e-10, atol=1e-10)
    assert torch.equal(vis_n, vis_t)


def test_forward_matches_torch_float32():
    """float32 inputs: the kernels compute in float64 and round once, so the table is the float64 projection of the
    same inputs to float32 rounding. It matches torch's float32 projection to 1e-5 (relative, plus 1e-5 of each
    column's median size) except in rows where torch's float32 arithmetic cancels (centres just past the near
    plane, conics of det ~ b²); there torch is the one that is off."""
    xs = projection_scene(dtype=F32, seed=1)
    tab_t, ext_t, vis_t = torch_table(xs, 0.3)
    tab_n, ext_n, vis_n = numba_table(xs, 0.3)
    tab_64, ext_64, vis_64 = torch_table([x.double() for x in xs], 0.3)
    assert tab_n.dtype == ext_n.dtype == F32
    assert min(_categories(tab_t, vis_t.reshape(-1), xs[3], xs[5].shape[1]).values()) > 10
    for n, t, r in ((tab_n, tab_t, tab_64), (ext_n.reshape(-1, 2), ext_t.reshape(-1, 2), ext_64.reshape(-1, 2))):
        err_n, err_t = (n.double() - r).abs(), (t.double() - r).abs()  # against float64
        assert (err_n <= 1.2e-7 * r.abs() + 1e-30).all()  # one float32 rounding
        close = (n - t).abs() <= 1e-5 * (t.abs() + t.abs().median(dim=0).values)
        assert close.double().mean() > 0.999 and (close | (err_n < err_t)).all()
    assert torch.equal(vis_n, vis_t) and torch.equal(vis_n, vis_64)


@pytest.mark.parametrize("eps2d", [0.3, -0.3])
def test_gradients_match_torch_autograd(eps2d):
    """float64: the analytic backward equals autograd through the torch projection, for every Gaussian input
    (quaternions of non-unit norm, culled and clamped rows included), with a random grad_table."""
    xs = projection_scene(seed=2)
    cams = xs[5:]
    g_table = torch.randn(2 * 3 * 400, 10, generator=torch.Generator().manual_seed(3), dtype=F64)
    ins_n = [x.clone().requires_grad_(True) for x in xs[:5]]
    ins_t = [x.clone().requires_grad_(True) for x in xs[:5]]
    grads_n = torch.autograd.grad(numba_table([*ins_n, *cams], eps2d)[0], ins_n, g_table)
    grads_t = torch.autograd.grad(torch_table([*ins_t, *cams], eps2d)[0], ins_t, g_table)
    for name, gn, gt in zip(("means", "quats", "scales", "opacities", "colors"), grads_n, grads_t):
        assert gn.shape == gt.shape and gn.dtype == F64
        torch.testing.assert_close(gn, gt, rtol=1e-9, atol=1e-10 * float(gt.abs().max()), msg=name)
    # Only the inputs that require grad get one.
    means = xs[0].clone().requires_grad_(True)
    tab = numba_table([means, *xs[1:]], eps2d)[0]
    (gm,) = torch.autograd.grad(tab, [means], g_table)
    torch.testing.assert_close(gm, grads_t[0], rtol=1e-9, atol=1e-10 * float(grads_t[0].abs().max()))


def test_projection_switch_and_fallback(monkeypatch):
    xs = projection_scene(B=1, N=50, C=2, dtype=F32, seed=4)
    inputs = RasterInputs(*xs, W, H)
    assert resolve_projection(inputs) == "numba"  # the default, "auto"
    with projection_mode("torch"):
        assert resolve_projection(inputs) == "torch"
        with projection_mode(None):  # None keeps the current choice
            assert resolve_projection(inputs) == "torch"
    assert resolve_projection(inputs) == "numba"
    with pytest.raises(ValueError, match="projection"):
        resolve_projection(inputs, "fast")
    with pytest.raises(ValueError, match="float32"):
        resolve_projection(inputs._replace(means=xs[0].half()), "numba")
    # Cameras that require grad: "auto" keeps the torch projection, which differentiates them; "numba" refuses.
    vm, K = xs[5].clone().requires_grad_(True), xs[6].clone().requires_grad_(True)
    cam_inputs = inputs._replace(viewmats=vm, Ks=K)
    assert resolve_projection(cam_inputs) == "torch"
    assert resolve_projection(inputs._replace(Ks=K)) == "torch"
    with torch.no_grad():
        assert resolve_projection(cam_inputs) == "numba"  # no gradient wanted
    with pytest.raises(ValueError, match="viewmats"):
        resolve_projection(cam_inputs, "numba")
    means = xs[0].clone().requires_grad_(True)
    table, _, _ = param_table(cam_inputs._replace(means=means), 0.3)
    g_vm, g_K, g_means = torch.autograd.grad(table.square().sum(), [vm, K, means])
    assert g_vm.abs().sum() > 0 and g_K.abs().sum() > 0
    table_n, _, _ = param_table(inputs._replace(means=means), 0.3)  # numba: the same Gaussian gradient
    torch.testing.assert_close(torch.autograd.grad(table_n.square().sum(), [means])[0], g_means, rtol=1e-4,
                               atol=1e-4 * float(g_means.abs().max()))
    # Through rasterize(backend="numba"): the cameras get their gradient.
    scene = [x.clone().requires_grad_(True) for x in random_scene(40, 5)]
    viewmats, Ks = random_cams(2, 6, 16, 16)
    viewmats.requires_grad_(True)
    rgb, alpha, depth = rasterize(*scene, viewmats, Ks, 16, 16, backend="numba")
    (rgb.sum() + alpha.sum() + depth.sum()).backward()
    assert viewmats.grad is not None and viewmats.grad.abs().sum() > 0
    # Without numba: "auto" is torch and "numba" says what is missing.
    monkeypatch.setattr(param_table_mod, "numba_available", lambda: False)
    assert resolve_projection(inputs) == "torch"
    with pytest.raises(RuntimeError, match="numba"):
        resolve_projection(inputs, "numba")


def _render(dtype, backend, projection, seed=7):
    """rgb, alpha, depth and the gradients of a weighted sum of them w.r.t. the 5 Gaussian inputs."""
    W_, H_ = 48, 40
    scene = [x.clone().to(dtype).requires_grad_(True) for x in random_scene(800, seed, scale=(0.01, 0.06))]
    viewmats, Ks = (x.to(dtype) for x in random_cams(4, seed + 1, W_, H_))
    bgs = torch.rand(4, 3, generator=torch.Generator().manual_seed(seed + 2), dtype=dtype)
    with projection_mode(projection):
        out = rasterize(*scene, viewmats, Ks, W_, H_, backgrounds=bgs, backend=backend)
    weights = [torch.rand(x.shape, generator=torch.Generator().manual_seed(seed + 3 + i), dtype=dtype)
               for i, x in enumerate(out)]
    sum((x * w).sum() for x, w in zip(out, weights)).backward()
    assert out[1].mean() > 0.2, "the scene should cover the images"
    return [x.detach() for x in out], [x.grad for x in scene]


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_end_to_end_numba_projection_matches_torch_projection(backend):
    """Each compositor renders the same images and gradients with either projection (float64: to rounding)."""
    out_n, grads_n = _render(F64, backend, "numba")
    out_t, grads_t = _render(F64, backend, "torch")
    for x, y in zip(out_n, out_t):
        assert (x - y).abs().max() < 1e-10
    for gx, gy in zip(grads_n, grads_t):
        assert (gx - gy).norm() / gy.norm() < 1e-9


@pytest.mark.parametrize("dtype", [F64, F32])
def test_rasterize_numba_matches_torch_backend(dtype):
    """rasterize(backend="numba") (compiled projection and compositing) against backend="torch" with the torch
    projection (the all-PyTorch pipeline, as before this projection existed)."""
    out_n, grads_n = _render(dtype, "numba", "auto")
    out_t, grads_t = _render(dtype, "torch", "torch")
    # float32: the projections round differently, which may flip a pair across the 1/255 or T cut-offs.
    tol_max, tol_mean, tol_grad = (1e-10, 1e-12, 1e-9) if dtype == F64 else (2e-3, 1e-5, 1e-3)
    for x, y in zip(out_n, out_t):
        assert (x - y).abs().max() < tol_max and (x - y).abs().mean() < tol_mean
    for gx, gy in zip(grads_n, grads_t):
        assert (gx - gy).norm() / gy.norm() < tol_grad
