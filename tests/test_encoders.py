"""Frozen encoders: shapes/dtypes, freezing, checkpoint exclusion, weights keys, missing-weights errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gsv3d_pl.models.encoders import VAE, CLIPImageEmbedder, DINOEncoder
from gsv3d_pl.weights import MissingWeightsError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def encoders():
    torch.manual_seed(0)
    return VAE(), CLIPImageEmbedder(), DINOEncoder()


def _frozen(m: nn.Module) -> bool:
    return not m.training and not any(p.requires_grad for p in m.parameters())


def test_vae_shapes_determinism_and_decode(encoders):
    vae = encoders[0]
    x = torch.rand(3, 3, 64, 48)
    z = vae.encode(x)
    assert z.shape == (3, 4, 8, 6) and z.dtype == torch.float32
    torch.testing.assert_close(vae.encode(x), z)  # posterior mode: deterministic
    assert 0.3 < z.std() < 3  # tiny scaling factor gives roughly unit-variance latents
    img = vae.decode(z)
    assert img.shape == (3, 3, 64, 48) and img.min() >= 0 and img.max() <= 1
    g = torch.Generator().manual_seed(0)
    zc = vae.encode_cond(x, torch.tensor([0.0, 0.5, 0.0]), generator=g)
    assert zc.shape == (3, 4, 8, 6)
    torch.testing.assert_close(zc[0] * vae.scaling_factor, z[0])  # cond_aug 0 = unscaled encode
    assert (zc[1] * vae.scaling_factor - z[1]).abs().max() > 1e-3  # noise augmentation applied
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.rand(1, 3, 60, 64))


def test_vae_chunking_matches_single_call():
    torch.manual_seed(0)
    a = VAE(chunk_size=2)
    b = VAE(chunk_size=64)
    b.vae.load_state_dict(a.vae.state_dict())
    x = torch.rand(5, 3, 32, 32)
    torch.testing.assert_close(a.encode(x), b.encode(x), atol=1e-5, rtol=1e-5)


def test_tiny_vae_latents_carry_the_image(encoders):
    """Block colours are linearly decodable from tiny latents (the reason for the identity-residual init)."""
    vae = encoders[0]
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.interpolate(torch.rand(32, 3, 4, 4, generator=g), size=64, mode="nearest")
    z = vae.encode(x)  # [32, 4, 8, 8]
    c = torch.nn.functional.avg_pool2d(x, 8)  # [32, 3, 8, 8]
    Z = torch.cat([z.permute(0, 2, 3, 1).reshape(-1, 4), torch.ones(32 * 64, 1)], 1)
    Y = c.permute(0, 2, 3, 1).reshape(-1, 3)
    W = torch.linalg.lstsq(Z, Y).solution
    r2 = 1 - ((Z @ W - Y) ** 2).mean() / Y.var(0).mean()
    print(f"tiny VAE: linear R² of 8×8 block colours from latents = {r2:.3f}")
    assert r2 > 0.1


def test_clip_and_dino_shapes(encoders):
    _, clip, dino = encoders
    x = torch.rand(2, 3, 64, 64)
    e = clip(x)
    assert e.shape == (2, 1, clip.embed_dim) and clip.embed_dim == 64 and e.dtype == torch.float32
    t = dino(x)
    assert t.shape == (2, (224 // 14) ** 2, 64) and dino.embed_dim == 64
    assert DINOEncoder(image_size=56)(x).shape == (2, 16, 64)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        DINOEncoder(image_size=100)


def test_frozen_eval_no_grad_and_out_of_checkpoints(encoders):
    for m in encoders:
        assert _frozen(m)
        m.train()
        assert _frozen(m)  # train() cannot unfreeze

    from gsv3d_pl.stages.common import StageBase

    class Holder(StageBase):  # the one checkpoint rule lives in the stages' base class
        def __init__(self):
            super().__init__(1e-3, 0.0, (0.9, 0.999), 0, 0.0, 1.0, None, "auto")
            self.vae, self.clip, self.dino = encoders
            self.head = nn.Linear(3, 3)

    h = Holder()
    sd = h.state_dict()
    assert sorted(sd) == ["head.bias", "head.weight"]
    h2 = Holder()
    h2.load_state_dict(sd, strict=True)  # encoders' keys are filled in from the live weights
    # A checkpoint that does contain encoder weights still loads them.
    torch.manual_seed(5)
    other = VAE()
    with torch.no_grad():
        next(other.parameters()).add_(1.0)  # weights another run might have had
    full = {f"vae.{k}": v for k, v in other.state_dict().items()} | sd
    h2.load_state_dict(full, strict=True)
    assert h2.vae.weights_key() == other.weights_key()


def test_weights_key_tracks_weights():
    # Tiny presets draw their init from their own seed: the same weights whatever the global RNG state,
    # which is what lets stage 2 and predict rebuild stage 1's frozen VAE.
    torch.manual_seed(0)
    a = VAE()
    torch.manual_seed(1)
    b = VAE()
    assert a.weights_key() == b.weights_key()
    assert all(torch.equal(x, y) for x, y in zip(a.vae.state_dict().values(), b.vae.state_dict().values()))
    c = VAE()
    with torch.no_grad():
        c.vae.encoder.conv_in.weight.add_(1e-3)
    assert c.weights_key() != a.weights_key()
    d = VAE(scaling_factor=2.0)
    d.vae.load_state_dict(a.vae.state_dict())
    assert d.weights_key() != a.weights_key()  # the scaling factor is part of the latent cache key


@pytest.mark.parametrize(
    "ctor, key, hint",
    [
        (lambda p: VAE("pretrained", path=p), "model.init_args.vae.init_args.path", "sd-vae-ft-mse"),
        (lambda p: CLIPImageEmbedder("pretrained", path=p), "model.init_args.clip.init_args.path", "ViT-H-14"),
        (lambda p: DINOEncoder("pretrained", path=p), "model.init_args.dino.init_args.path", "dinov2"),
    ],
)
def test_missing_pretrained_weights_raise_with_key(tmp_path, ctor, key, hint):
    missing = str(tmp_path / "absent")
    with pytest.raises(MissingWeightsError) as e:
        ctor(missing)
    msg = str(e.value)
    assert key in msg and missing in msg and hint in msg


def test_vae_folder_without_weights_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MissingWeightsError, match="diffusion_pytorch_model.safetensors"):
        VAE("pretrained", path=str(tmp_path))


def test_pretrained_vae_loads_a_local_diffusers_folder(tmp_path, encoders):
    encoders[0].vae.save_pretrained(tmp_path / "vae")
    v = VAE("pretrained", path=str(tmp_path / "vae"))
    assert v.scaling_factor == 0.18215 and _frozen(v)
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(v.encode(x) / 0.18215, encoders[0].encode(x) / encoders[0].scaling_factor)


def test_pretrained_vae_without_path_comes_from_the_hub_cache(fake_hf_cache, encoders):
    """No ``path``: the vae/ folder of the current (refs/main) sv3d-diffusers snapshot, not a stale one."""
    repo = "chenguolin/sv3d-diffusers"
    stale = fake_hf_cache.add(repo, {"vae/config.json": "{}"}, commit="a" * 40)  # no weights: loading it fails
    current = fake_hf_cache.add(repo, commit="b" * 40)
    encoders[0].vae.save_pretrained(current / "vae")
    assert (stale / "vae").is_dir()
    v = VAE("pretrained")
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(v.encode(x) / 0.18215, encoders[0].encode(x) / encoders[0].scaling_factor)


def test_weight_specs_and_tiny_needs_nothing(fake_hf_cache):
    assert VAE.weight_specs({}, "model.init_args.vae") == []
    assert CLIPImageEmbedder.weight_specs({"preset": "tiny"}, "model.init_args.clip") == []
    (spec,) = DINOEncoder.weight_specs({"preset": "pretrained", "model_name": "vit_base_patch14_dinov2"},
                                       "model.init_args.dino")
    assert "vit_base_patch14_dinov2" in spec.name and spec.config_key == "model.init_args.dino.init_args.path"
    assert spec.status() == "MISSING"
    (spec,) = CLIPImageEmbedder.weight_specs({"preset": "pretrained"}, "model.init_args.stage.init_args.clip")
    assert spec.config_key == "model.init_args.stage.init_args.clip.init_args.path"  # keyed where the node is
    # Found in the hub cache's current snapshot; the .safetensors file is preferred over the .bin.
    snap = fake_hf_cache.add("laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                             {"open_clip_pytorch_model.bin": "x", "open_clip_model.safetensors": "y"})
    (spec,) = CLIPImageEmbedder.weight_specs({"preset": "pretrained"}, "model.init_args.clip")
    assert spec.find() == snap / "open_clip_model.safetensors" and spec.status() == "found"
    with pytest.raises(ValueError, match="only read with preset='pretrained'"):
        VAE("tiny", path="/x")


def test_base_scale_encoders_on_meta_parameter_counts():
    import open_clip
    import timm
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        cfg = open_clip.get_model_config("ViT-H-14")
        clip = open_clip.model._build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"])
        dino = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224, num_classes=0)
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2)
    for name, m in (("open_clip ViT-H-14 visual", clip), ("DINOv2 ViT-S/14", dino), ("SD VAE", vae)):
        print(f"{name}: {sum(p.numel() for p in m.parameters()) / 1e6:.1f}M parameters")
    assert clip.output_dim == 1024 and dino.embed_dim == 384
    assert 80e6 < sum(p.numel() for p in vae.parameters()) < 90e6
