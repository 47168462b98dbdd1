"""GSDecoder: shapes, pixel alignment on rays, DINO ablation, gradients, checkpointing, speed, presets."""

from __future__ import annotations

import time

import pytest
import torch

from gsv3d_pl.cameras import orbit_cameras, random_cameras
from gsv3d_pl.gaussians import Gaussians
from gsv3d_pl.models.gs_decoder import GS_DECODER_PRESETS, GSDecoder

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _batch(B=2, N=4, h=8, seed=0, dino_dim=64, T=16):
    g = torch.Generator().manual_seed(seed)
    H = 8 * h
    cams = random_cameras(B * N, radius_range=(1.6, 2.6), width=H, height=H, generator=g)
    c2w = cams.c2w.reshape(B, N, 4, 4)
    K = cams.K.reshape(B, N, 3, 3)
    z = torch.randn(B, N, 4, h, h, generator=g)
    dino = torch.randn(B, T, dino_dim, generator=g) if dino_dim else None
    return z, c2w, K, dino


def test_tiny_shapes_dtypes_and_activation_ranges():
    torch.manual_seed(0)
    dec = GSDecoder.from_preset("tiny")
    z, c2w, K, dino = _batch()
    g = dec(z, c2w, K, dino)
    assert isinstance(g, Gaussians)
    G = 4 * 32 * 32
    assert g.batch_shape == (2,) and g.num_gaussians == G == dec.num_gaussians(4, 8, 8)
    assert g.means.shape == (2, G, 3) and g.quats.shape == (2, G, 4) and g.scales.shape == (2, G, 3)
    assert g.opacities.shape == (2, G) and g.colors.shape == (2, G, 3)
    for t in (g.means, g.quats, g.scales, g.opacities, g.colors):
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
    torch.testing.assert_close(g.quats.norm(dim=-1), torch.ones(2, G))
    assert (g.scales > 0).all() and ((g.opacities > 0) & (g.opacities < 1)).all()
    assert ((g.colors >= 0) & (g.colors <= 1)).all()
    # small-init heads: opacity starts near sigmoid(-2), scales near 0.7 output pixels
    assert abs(g.opacities.mean().item() - torch.sigmoid(torch.tensor(-2.0)).item()) < 0.02
    fx_out = K[0, 0, 0, 0] / 2  # 64-px image -> 32-px Gaussian grid
    px = g.scales[0, :1024] * fx_out / (g.means[0, :1024] - c2w[0, 0, :3, 3]).norm(dim=-1, keepdim=True)
    assert 0.5 < px.median() < 1.0


def test_gaussians_lie_on_their_pixel_rays():
    """mean − camera centre ∥ the ray through the output pixel centre (u + 0.5, v + 0.5), computed here
    from scratch, and the distance lies in ‖o‖ ± object_radius."""
    torch.manual_seed(0)
    dec = GSDecoder.from_preset("tiny")
    with torch.no_grad():  # push depths away from the init so the check is not trivially at t = ‖o‖
        dec.head.weight[0].normal_(0, 1.0)
    z, c2w, K, dino = _batch(B=2, N=3)
    g = dec(z, c2w, K, dino)
    B, N, Ho, Wo = 2, 3, 32, 32
    means = g.means.reshape(B, N, Ho, Wo, 3)
    s = Wo / 64
    v, u = torch.meshgrid(torch.arange(Ho) + 0.5, torch.arange(Wo) + 0.5, indexing="ij")
    for b in range(B):
        for n in range(N):
            fx, fy, cx, cy = K[b, n, 0, 0] * s, K[b, n, 1, 1] * s, K[b, n, 0, 2] * s, K[b, n, 1, 2] * s
            d_cam = torch.stack([(u - cx) / fx, (v - cy) / fy, torch.ones_like(u)], -1)  # [Ho, Wo, 3]
            d = d_cam @ c2w[b, n, :3, :3].T
            d = d / d.norm(dim=-1, keepdim=True)
            o = c2w[b, n, :3, 3]
            rel = means[b, n] - o  # [Ho, Wo, 3]
            t = rel.norm(dim=-1)
            cos = (rel * d).sum(-1) / t
            assert (cos > 1 - 1e-5).all(), cos.min()
            r = o.norm()
            assert (t >= r - 0.9 - 1e-4).all() and (t <= r + 0.9 + 1e-4).all()
            assert t.std() > 0.01  # depths actually vary
    # A fixed depth window is honoured too.
    dec2 = GSDecoder.from_preset("tiny", depth_range=(1.0, 3.0))
    g2 = dec2(z, c2w, K, dino)
    t2 = (g2.means.reshape(B, N, -1, 3) - c2w[:, :, None, :3, 3]).norm(dim=-1)
    assert (t2 > 1.0 - 1e-5).all() and (t2 < 3.0 + 1e-5).all()


def test_no_dino_has_no_cross_attention_parameters():
    dec = GSDecoder.from_preset("tiny", dino_dim=None)
    names = [n for n, _ in dec.named_parameters()]
    assert not any("cross" in n or "dino" in n or "norm_x" in n for n in names)
    with_dino = GSDecoder.from_preset("tiny")
    assert any("cross_attn" in n for n, _ in with_dino.named_parameters())
    assert sum(p.numel() for p in dec.parameters()) < sum(p.numel() for p in with_dino.parameters())
    z, c2w, K, _ = _batch(dino_dim=None)
    assert dec(z, c2w, K).num_gaussians == 4096
    with pytest.raises(ValueError, match="dino_tokens must be given iff dino_dim"):
        dec(z, c2w, K, torch.randn(2, 16, 64))
    with pytest.raises(ValueError, match="dino_tokens must be given iff dino_dim"):
        with_dino(z, c2w, K)


def test_dino_tokens_change_the_output():
    torch.manual_seed(0)
    dec = GSDecoder.from_preset("tiny")
    z, c2w, K, dino = _batch()
    a = dec(z, c2w, K, dino).colors
    b = dec(z, c2w, K, torch.randn_like(dino)).colors  # (a constant shift would be removed by the LayerNorm)
    assert (a - b).abs().max() > 1e-5


def test_gradients_reach_every_parameter_and_checkpointing_matches():
    torch.manual_seed(0)
    dec = GSDecoder.from_preset("tiny").train()
    z, c2w, K, dino = _batch()

    def loss_of(m):
        g = m(z, c2w, K, dino)
        return (g.means.square().mean() + g.colors.mean() + g.scales.mean() * 10 + g.opacities.mean()
                + g.quats[..., 1:].square().mean())

    loss_of(dec).backward()
    no_grad = [n for n, p in dec.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not no_grad, no_grad
    ref = {n: p.grad.clone() for n, p in dec.named_parameters()}
    dec.zero_grad()
    dec.gradient_checkpointing = True
    loss_of(dec).backward()
    for n, p in dec.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-6, rtol=1e-5)


def test_tiny_forward_backward_under_one_second():
    torch.manual_seed(0)
    dec = GSDecoder.from_preset("tiny").train()
    z, c2w, K, dino = _batch(B=1, N=4)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        g = dec(z, c2w, K, dino)
        (g.means.mean() + g.colors.mean() + g.opacities.mean() + g.scales.mean()).backward()
        times.append(time.perf_counter() - t0)
    best = min(times[1:])
    print(f"GSDecoder tiny fwd+bwd, B=1, N=4, 8² latents -> 4096 Gaussians: {best * 1000:.0f} ms (1 thread)")
    assert best < 1.0


def test_runs_under_bf16_autocast():
    """The GPU stages autocast the decoder to bf16: rays stay in fp32 and the Gaussians come out fp32."""
    torch.manual_seed(0)
    dec = GSDecoder.from_preset("tiny")
    z, c2w, K, dino = _batch(B=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = dec(z, c2w, K, dino)
    ref = dec(z, c2w, K, dino)
    assert g.means.dtype == torch.float32 and torch.isfinite(g.means).all()
    torch.testing.assert_close(g.means, ref.means, atol=0.05, rtol=0.05)  # bf16 body, same geometry
    g.means.sum().backward()
    assert dec.patch_embed.weight.grad is not None


def test_works_with_orbit_cameras_and_non_square_latents():
    cams = orbit_cameras(21, width=96, height=64)
    dec = GSDecoder.from_preset("tiny", dino_dim=None, upsample=2)
    idx = torch.tensor([2, 9, 20])
    g = dec(torch.randn(1, 3, 4, 8, 12), cams.c2w[idx][None], cams.K[idx][None])
    assert g.num_gaussians == 3 * 16 * 24


def test_bad_config_and_inputs():
    with pytest.raises(ValueError, match="power of two"):
        GSDecoder(patch_size=1, upsample=3)
    with pytest.raises(ValueError, match="unknown preset"):
        GSDecoder.from_preset("huge")
    dec = GSDecoder.from_preset("tiny", dino_dim=None, patch_size=2, upsample=2)
    z, c2w, K, _ = _batch(dino_dim=None)
    assert dec(z, c2w, K).num_gaussians == 4 * 16 * 16
    with pytest.raises(ValueError, match="multiples of patch_size"):
        dec(z[..., :7, :7], c2w, K)
    with pytest.raises(ValueError, match="c2w must be"):
        dec(z, c2w[:, :2], K)


def test_base_preset_on_meta_device():
    with torch.device("meta"):
        dec = GSDecoder.from_preset("base")
        n = sum(p.numel() for p in dec.parameters())
        no_dino = GSDecoder.from_preset("base", dino_dim=None)
    n0 = sum(p.numel() for p in no_dino.parameters())
    tokens = 21 * (72 // 2) ** 2
    print(f"GSDecoder base: {n / 1e6:.1f}M parameters ({n0 / 1e6:.1f}M without DINO cross-attention); "
          f"{tokens} tokens at 21 × 72² latents; {dec.num_gaussians(21, 72, 72):,} Gaussians")
    assert 100e6 < n < 200e6 and n0 < n
    assert GS_DECODER_PRESETS["base"]["dim"] == 768 and GS_DECODER_PRESETS["base"]["depth"] == 12
    # the paper-scale forward runs on meta tensors too (memory estimates do this): shapes only, no FLOPs
    cams = orbit_cameras(21, 10.0, width=576, height=576)
    with torch.device("meta"):
        g = no_dino(torch.randn(1, 2, 4, 72, 72), cams.c2w[:2][None].to("meta"), cams.K[:2][None].to("meta"))
    assert g.means.shape == (1, no_dino.num_gaussians(2, 72, 72), 3) and g.means.is_meta


def test_shuffle_skip_reads_each_sub_pixel_of_its_latent():
    """latent_skip='shuffle': the skip path's output pixel (u, v) depends only on latent pixel (u//s, v//s), and a
    change of the read-out for one sub-position changes only those output pixels' features."""
    torch.manual_seed(0)
    dec = GSDecoder.from_preset("tiny", latent_channels=8, upsample=2, vae_factor=4, latent_skip="shuffle")
    z = torch.randn(3, 8, 16, 16)
    up = dec.latent_up(z)  # [3, 8, 32, 32]
    assert up.shape == (3, 8, 32, 32)
    z2 = z.clone()
    z2[:, :, 5, 7] += 1.0
    diff = (dec.latent_up(z2) - up).abs().sum(dim=(0, 1))  # [32, 32]
    changed = diff.nonzero().tolist()
    assert changed and all(u // 2 == 5 and v // 2 == 7 for u, v in changed)
    # Whole forward at the miniature's operating point: 16×16×8 latents of 64² views -> 32² Gaussians per view.
    g = torch.Generator().manual_seed(1)
    cams = random_cameras(4, radius_range=(1.6, 2.6), width=64, height=64, generator=g)
    out = dec(torch.randn(1, 4, 8, 16, 16), cams.c2w[None], cams.K[None], torch.randn(1, 16, 64))
    assert out.num_gaussians == 4 * 32 * 32 and torch.isfinite(out.means).all()
    with pytest.raises(ValueError, match="latent_skip"):
        GSDecoder.from_preset("tiny", latent_skip="nearest")
    with pytest.raises(ValueError, match="upsample"):
        GSDecoder.from_preset("tiny", upsample=1, patch_size=2, latent_skip="shuffle")


def _sphere_views(N=4, size=64, latent=16, radius=0.6):
    """Latents that 'see' a sphere with a smooth 8-channel colour field (constant background), and their cameras."""
    from gsv3d_pl.cameras import pixel_rays

    cams = orbit_cameras(N, 20.0, width=size, height=size)
    c2w, K = cams.c2w[None], cams.K[None]  # [1, N, 4, 4], [1, N, 3, 3]
    K_lat = K.clone()
    K_lat[..., :2, :] *= latent / size
    o, d, _ = pixel_rays(c2w, K_lat, latent, latent)  # [1, N, h, w, 3]
    b = (o * d).sum(-1)
    disc = b * b - (o * o).sum(-1) + radius**2
    t = -b - disc.clamp_min(0).sqrt()  # nearest hit
    p = o + t[..., None] * d
    freq = torch.tensor([3.0, 2.0, 4.0, 3.0, 2.5, 3.5, 2.0, 4.5])
    phase = torch.arange(8.0)
    axis = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    field = torch.sin(freq * p[..., axis] + phase)  # [1, N, h, w, 8]
    z = torch.where((disc > 0)[..., None], field, torch.full_like(field, -2.0)).permute(0, 1, 4, 2, 3)
    return z.contiguous(), c2w, K  # [1, N, 8, h, w]


def test_matching_volume_finds_the_surface_of_a_sphere():
    """The min-over-other-views latent difference is lowest at the true depth: the projection into the other views,
    the sampling convention and the candidate layout are all right, or this fails."""
    from gsv3d_pl.cameras import pixel_rays
    from gsv3d_pl.models.cost_volume import MatchingVolume

    z, c2w, K = _sphere_views()
    Ho, D, r = 32, 24, 0.6
    K_out = K.clone()
    K_out[..., :2, :] *= Ho / 64
    o, d, _ = pixel_rays(c2w, K_out, Ho, Ho)  # [1, N, Ho, Wo, 3]
    dist = o.norm(dim=-1, keepdim=True)
    t_k = dist - 0.9 + 1.8 * (torch.arange(D) + 0.5) / D  # [1, N, Ho, Wo, D]
    pts = (o[..., None, :] + t_k[..., None] * d[..., None, :]).permute(0, 1, 4, 2, 3, 5)  # [1, N, D, Ho, Wo, 3]
    feats = MatchingVolume(8, D).features(z, c2w, K, pts, (64, 64))  # [1, N, 19, D, Ho, Wo]
    assert feats.shape == (1, 4, 19, D, Ho, Ho)
    b = (o * d).sum(-1)
    disc = b * b - (o * o).sum(-1) + r**2
    hit = disc > 0.05  # rays well inside the silhouette
    t_true = -b - disc.clamp_min(0).sqrt()
    best = t_k.gather(-1, feats[:, :, 16].argmin(2)[..., None])[..., 0]  # [1, N, Ho, Wo] depth of the best match
    err = (best - t_true).abs()[hit]
    assert hit.sum() > 500
    assert (err < 2 * 1.8 / D).float().mean() > 0.8, float((err < 2 * 1.8 / D).float().mean())
    # the view's own latent, and every other view sees a point in front of the cameras at mid-depth
    assert torch.allclose(feats[:, :, :8, 0], feats[:, :, :8, -1])


def test_cost_volume_decoder_trains_its_matching_mlp_and_off_builds_none():
    torch.manual_seed(0)
    z, c2w, K = _sphere_views()
    dec = GSDecoder.from_preset("tiny", latent_channels=8, upsample=2, vae_factor=4, latent_skip="shuffle",
                                cost_volume_depths=8)
    g = dec(z, c2w, K, torch.randn(1, 16, 64))
    assert g.num_gaussians == 4 * 32 * 32 and torch.isfinite(g.means).all()
    (g.means.square().sum() + g.opacities.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dec.matching.parameters())
    dist = (g.means - c2w[:, :, None, :3, 3].repeat_interleave(32 * 32, 1)[:, :, 0]).norm(dim=-1)
    assert (dist > 2.0 - 0.9 - 1e-4).all() and (dist < 2.0 + 0.9 + 1e-4).all()  # inside the depth window
    off = GSDecoder.from_preset("tiny", latent_channels=8, upsample=2, vae_factor=4)
    assert off.matching is None and not any("matching" in n for n, _ in off.named_parameters())
    assert off.head.out_channels == 12 and dec.head.out_channels == 8 + 11
    with pytest.raises(ValueError, match="num_depths"):
        GSDecoder.from_preset("tiny", cost_volume_depths=1)
