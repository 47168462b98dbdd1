"""SV3D: camera embedding, state-dict compatibility, EDM, sampler, LoRA round trip, presets."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel
from diffusers.models.embeddings import get_timestep_embedding

from gsv3d_pl.models.sv3d import (
    SV3D,
    UNET_PRESETS,
    EDMPreconditioner,
    SV3DUNet,
    triangle_cfg_scales,
)
from gsv3d_pl.orbit import orbit_angles
from gsv3d_pl.weights import MissingWeightsError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _inputs(B=2, F=21, h=8, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(B, F, 4, h, h, generator=g)
    clip = torch.randn(B, 1, D, generator=g)
    cond = torch.randn(B, 4, h, h, generator=g)
    pol, az = orbit_angles(B, F, elevation_deg=torch.tensor([[10.0], [-5.0]])[:B])
    aug = torch.full((B,), 0.02)
    return z0, clip, cond, pol, az, aug


def _reference_embedding(ids: torch.Tensor, a: int) -> torch.Tensor:
    """Straightforward re-implementation: per frame, cat(sin-emb_a(cond_aug), emb_2a(polar), emb_2a(azimuth))."""
    rows = []
    for b in range(ids.shape[0]):
        for f in range(ids.shape[1]):
            c, p, z = ids[b, f]
            rows.append(torch.cat([
                get_timestep_embedding(c[None], a, flip_sin_to_cos=True, downscale_freq_shift=0),
                get_timestep_embedding(p[None], 2 * a, flip_sin_to_cos=True, downscale_freq_shift=0),
                get_timestep_embedding(z[None], 2 * a, flip_sin_to_cos=True, downscale_freq_shift=0),
            ], dim=-1)[0])
    return torch.stack(rows).reshape(ids.shape[0], ids.shape[1], 5 * a)


def test_camera_embedding_matches_reference_and_is_per_frame():
    torch.manual_seed(0)
    unet = SV3DUNet(**UNET_PRESETS["tiny"])
    B, F = 2, 21
    pol, az = orbit_angles(B, F, elevation_deg=12.0)
    ids = torch.stack([torch.full((B, F), 1e-5), pol, az], dim=-1)  # [B, F, 3]
    emb = unet.camera_embedding(ids)
    assert emb.shape == (B, F, 160) and emb.dtype == torch.float32
    torch.testing.assert_close(emb, _reference_embedding(ids, 32), rtol=0, atol=1e-6)
    # Paper-scale widths: 256 + 512 + 512 = 1280 (sinusoids only; no UNet weights needed).
    # Changing one frame's azimuth changes that frame's embedding only.
    ids2 = ids.clone()
    ids2[1, 7, 2] += 0.3
    diff = (unet.camera_embedding(ids2) - emb).abs().amax(-1)  # [B, F]
    assert diff[1, 7] > 1e-3
    diff[1, 7] = 0
    assert diff.max() == 0
    # ... and through add_embedding, only that frame's conditioning vector.
    a1 = unet.add_embedding(emb.flatten(0, 1)).reshape(B, F, -1)
    a2 = unet.add_embedding(unet.camera_embedding(ids2).flatten(0, 1)).reshape(B, F, -1)
    d = (a1 - a2).abs().amax(-1)
    assert d[1, 7] > 0 and d.sum() == d[1, 7]


def test_per_frame_conditioning_changes_only_that_frames_input_embedding():
    """The UNet output depends on per-frame angles (temporal attention mixes frames, so all may change),
    and the stock [B, 3] form is broadcast."""
    torch.manual_seed(0)
    unet = SV3DUNet(**UNET_PRESETS["tiny"]).eval()
    x = torch.randn(1, 21, 8, 8, 8)
    ehs = torch.randn(1, 1, 64)
    ids = torch.zeros(1, 21, 3)
    with torch.no_grad():
        o1 = unet(x, torch.tensor([0.1]), ehs, ids).sample
        o2 = unet(x, torch.tensor([0.1]), ehs, torch.zeros(1, 3)).sample
        ids[0, 3, 2] = 1.0
        o3 = unet(x, torch.tensor([0.1]), ehs, ids).sample
    assert o1.shape == (1, 21, 4, 8, 8)
    torch.testing.assert_close(o1, o2)
    assert (o3 - o1).abs().max() > 1e-6


def test_state_dict_identical_to_stock_unet_both_ways():
    cfg = UNET_PRESETS["tiny"]
    torch.manual_seed(0)
    ours = SV3DUNet(**cfg)
    torch.manual_seed(1)
    stock = UNetSpatioTemporalConditionModel(**cfg)
    a, b = ours.state_dict(), stock.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    stock.load_state_dict(a, strict=True)
    fresh = SV3DUNet(**cfg)
    fresh.load_state_dict(stock.state_dict(), strict=True)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in a.items())


def test_from_pretrained_loads_a_stock_saved_folder(tmp_path):
    torch.manual_seed(0)
    stock = UNetSpatioTemporalConditionModel(**UNET_PRESETS["tiny"])
    stock.save_pretrained(tmp_path / "unet")
    m = SV3D(unet_preset="pretrained", unet_path=str(tmp_path / "unet"))
    assert isinstance(m.unet, SV3DUNet)
    for k, v in stock.state_dict().items():
        assert torch.equal(v, m.unet.state_dict()[k])


def test_missing_pretrained_unet_names_config_key(tmp_path):
    with pytest.raises(MissingWeightsError) as e:
        SV3D(unet_preset="pretrained", unet_path=str(tmp_path / "nope"))
    msg = str(e.value)
    assert "model.init_args.sv3d.init_args.unet_path" in msg and "nope" in msg and "sv3d-diffusers" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingWeightsError, match="config.json"):
        SV3D(unet_preset="pretrained", unet_path=str(tmp_path / "empty"))
    assert SV3D.weight_specs({"unet_preset": "tiny"}, "model.init_args.sv3d") == []
    (spec,) = SV3D.weight_specs({"unet_preset": "pretrained", "unet_path": "/x"}, "model.init_args.sv3d")
    assert spec.explicit == "/x" and spec.config_key == "model.init_args.sv3d.init_args.unet_path"


def test_pretrained_unet_from_the_hub_cache_fp16_variant(fake_hf_cache):
    """No unet_path: the unet/ folder of the refs/main snapshot; an fp16-variant-only folder loads too."""
    torch.manual_seed(0)
    stock = UNetSpatioTemporalConditionModel(**UNET_PRESETS["tiny"])
    snap = fake_hf_cache.add("chenguolin/sv3d-diffusers", commit="c" * 40)
    stock.to(torch.float16).save_pretrained(snap / "unet", variant="fp16")  # half weights, as the release
    assert (snap / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (snap / "unet" / "diffusion_pytorch_model.safetensors").exists()
    m = SV3D(unet_preset="pretrained")
    for k, v in stock.state_dict().items():
        assert torch.equal(v, m.unet.state_dict()[k].to(v.dtype))


def test_edm_scalings_and_loss_weight():
    sigma = torch.tensor([0.002, 0.5, 1.0, 30.0, 700.0])
    c_skip, c_out, c_in, c_noise = EDMPreconditioner.scalings(sigma)
    torch.testing.assert_close(c_in, 1 / torch.sqrt(sigma**2 + 1))
    torch.testing.assert_close(c_skip, 1 / (sigma**2 + 1))
    torch.testing.assert_close(c_out, -sigma / torch.sqrt(sigma**2 + 1))
    torch.testing.assert_close(c_noise, 0.25 * torch.log(sigma))
    torch.testing.assert_close(EDMPreconditioner.loss_weight(sigma), (sigma**2 + 1) / sigma**2)
    s = EDMPreconditioner(0.7, 1.6).sample_sigma(20000, generator=torch.Generator().manual_seed(0))
    assert abs(s.log().mean().item() - 0.7) < 0.05 and abs(s.log().std().item() - 1.6) < 0.05


def test_denoiser_identity_at_zero_sigma_and_loss_formula():
    torch.manual_seed(0)
    m = SV3D().eval()
    z0, clip, cond, pol, az, aug = _inputs()
    D = m.denoise(z0, torch.full((2,), 1e-6), clip, cond, pol, az, aug)
    torch.testing.assert_close(D, z0, atol=1e-4, rtol=0)
    # training_loss = mean(w(σ)·(D − z0)²) with the σ and noise drawn from the generator.
    m.train()
    loss, D, sigma = m.training_loss(z0, clip, cond, pol, az, aug, generator=torch.Generator().manual_seed(3))
    assert D.shape == z0.shape and sigma.shape == (2,) and loss.ndim == 0
    g = torch.Generator().manual_seed(3)
    sigma_ref = m.edm.sample_sigma(2, generator=g)
    noise = torch.randn(z0.shape, generator=g)
    keep = torch.rand(2, generator=g) >= m.cfg_dropout
    torch.testing.assert_close(sigma, sigma_ref)
    D_ref = m.denoise(z0 + sigma.view(2, 1, 1, 1, 1) * noise, sigma, clip * keep.view(2, 1, 1),
                      cond * keep.view(2, 1, 1, 1), pol, az, aug)
    w = (sigma**2 + 1) / sigma**2
    torch.testing.assert_close(loss, (w.view(2, 1, 1, 1, 1) * (D_ref - z0) ** 2).mean())
    loss.backward()
    assert all(p.grad is not None for p in m.unet.parameters())


def test_cfg_dropout_zeroes_both_conditions():
    torch.manual_seed(0)
    m = SV3D(cfg_dropout=0.999).train()
    z0, clip, cond, pol, az, aug = _inputs()
    seen = {}

    def hook(mod, args, kwargs):
        seen["sample"], seen["ehs"] = args[0], args[2]

    h = m.unet.register_forward_pre_hook(hook, with_kwargs=True)
    m.training_loss(z0, clip, cond, pol, az, aug, generator=torch.Generator().manual_seed(0))
    h.remove()
    assert seen["ehs"].abs().max() == 0
    assert seen["sample"][:, :, 4:].abs().max() == 0  # conditioning-latent channels


def test_triangle_cfg():
    s = triangle_cfg_scales(21, 1.0, 2.5)
    assert s.shape == (21,)
    assert s[0] == 1.0 and s[-1] == 1.0 and math.isclose(s[10].item(), 2.5)
    assert torch.all(s[1:11] > s[:10]) and torch.all(s[11:] < s[10:20])


def test_sample_end_to_end_tiny():
    torch.manual_seed(0)
    m = SV3D().eval()
    _, clip, cond, pol, az, _ = _inputs()
    sched = m.make_scheduler()
    sched.set_timesteps(50)
    sig = sched.sigmas
    assert math.isclose(sig[0].item(), 700.0, rel_tol=1e-4) and math.isclose(sig[-2].item(), 0.002, rel_tol=1e-3)
    assert sig[-1] == 0 and len(sig) == 51
    out = m.sample(clip, cond, pol, az, cond_aug=1e-5, num_steps=4, generator=torch.Generator().manual_seed(0),
                   progress=False)
    assert out.shape == (2, 21, 4, 8, 8) and out.dtype == torch.float32 and torch.isfinite(out).all()
    out2 = m.sample(clip, cond, pol, az, cond_aug=1e-5, num_steps=4, generator=torch.Generator().manual_seed(0),
                    progress=False)
    torch.testing.assert_close(out, out2)


def test_sample_last_step_is_denoised_prediction():
    """With one Euler step from σ_max to 0 the result is exactly the CFG-combined D(x_T; σ_max)."""
    torch.manual_seed(0)
    m = SV3D(max_cfg=1.0).eval()
    _, clip, cond, pol, az, _ = _inputs()
    noise = torch.randn(2, 21, 4, 8, 8)
    out = m.sample(clip, cond, pol, az, num_steps=1, latents=noise, progress=False)
    D = m.denoise(noise * 700.0, torch.full((2,), 700.0), clip, cond, pol, az, torch.full((2,), 1e-5))
    # x + (x − D)/σ·(0 − σ) cancels terms of size 700 in fp32: ~700·2⁻²³·few ≈ 5e-4 round-off.
    torch.testing.assert_close(out, D, atol=1e-3, rtol=0)


def test_lora_only_lora_trains_and_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    m = SV3D()
    n = m.add_lora(rank=4)
    trainable = [k for k, p in m.unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in k for k in trainable)
    assert n == sum(p.numel() for p in m.unet.parameters() if p.requires_grad)
    targets = {k.rsplit(".lora_", 1)[0] for k in trainable}
    assert any("temporal_transformer_blocks" in k for k in targets)  # temporal attention too
    assert any(k.endswith("attn1.to_q") for k in targets) and any(k.endswith("attn2.to_out.0") for k in targets)
    with torch.no_grad():  # LoRA B starts at zero; make it non-trivial
        for k, p in m.unet.named_parameters():
            if "lora_B" in k:
                p.normal_(0, 0.1)
    m.eval()
    z0, clip, cond, pol, az, aug = _inputs()
    sigma = torch.tensor([0.7, 3.0])
    with torch.no_grad():
        ref = m.denoise(z0, sigma, clip, cond, pol, az, aug)
    m.unet.save_lora_adapter(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")
    torch.manual_seed(0)
    fresh = SV3D().eval()
    with torch.no_grad():
        base = fresh.denoise(z0, sigma, clip, cond, pol, az, aug)
    assert (base - ref).abs().max() > 1e-4  # the adapter matters
    fresh.unet.load_lora_adapter(str(tmp_path), prefix=None, weight_name="pytorch_lora_weights.safetensors")
    with torch.no_grad():
        out = fresh.denoise(z0, sigma, clip, cond, pol, az, aug)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_bad_inputs_raise_clear_errors():
    m = SV3D()
    z0, clip, cond, pol, az, aug = _inputs()
    with pytest.raises(ValueError, match="cross_attention_dim"):
        m.denoise(z0, torch.ones(2), torch.zeros(2, 1, 1024), cond, pol, az, aug)
    with pytest.raises(ValueError, match="cond_latent"):
        m.denoise(z0, torch.ones(2), clip, cond[..., :4], pol, az, aug)
    with pytest.raises(ValueError, match="unet_preset"):
        SV3D(unet_preset="huge")
    bad = SV3DUNet(**{**UNET_PRESETS["tiny"], "projection_class_embeddings_input_dim": 96})
    with pytest.raises(ValueError, match="5 \\* addition_time_embed_dim"):
        bad.camera_embedding(torch.zeros(1, 21, 3))


def test_pretrained_unet_on_meta_device_parameter_count():
    with torch.device("meta"):
        unet = SV3DUNet(**UNET_PRESETS["pretrained"])
    n = sum(p.numel() for p in unet.parameters())
    print(f"SV3D-p UNet (pretrained preset, meta): {n / 1e9:.3f}B parameters")
    assert 1.4e9 < n < 1.6e9
    ids = torch.zeros(1, 21, 3)
    assert unet.camera_embedding(ids.to("meta")).shape == (1, 21, 1280)
    n_tiny = sum(p.numel() for p in SV3DUNet(**UNET_PRESETS["tiny"]).parameters())
    print(f"SV3D UNet (tiny preset): {n_tiny / 1e6:.2f}M parameters")
