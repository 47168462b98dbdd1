"""SV3DStage: the EDM loss learns, export -> SV3D(unet_path) round trip, resume with EMA, 8 latent channels, LoRA."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from diffusers import AutoencoderKL

from gsv3d_pl.models import SV3D, VAE, CLIPImageEmbedder
from gsv3d_pl.stages.sv3d_stage import SV3DStage
from tests.synthetic import SyntheticDataModule, collate, synthetic_sample

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_stage(vae: VAE | None = None, latent_channels: int = 4, **kw) -> SV3DStage:
    torch.manual_seed(0)
    sv3d = SV3D("tiny", cfg_dropout=0.0, latent_channels=latent_channels)
    kw = {"val_sample_steps": 2, "warmup_steps": 1, "lr": 1e-3, **kw}
    return SV3DStage(vae=vae or VAE("tiny"), clip=CLIPImageEmbedder("tiny"), sv3d=sv3d, **kw)


@pytest.fixture(scope="module")
def vae_x4_c8(tmp_path_factory) -> VAE:
    """A ×4, 8-latent-channel VAE folder (the lead's miniature: 64² images -> 16×16×8 latents), loaded as 'pretrained'."""
    folder = tmp_path_factory.mktemp("vae_x4_c8")
    torch.manual_seed(5)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), layers_per_block=1,
                  latent_channels=8, norm_num_groups=4, sample_size=64).save_pretrained(folder)
    return VAE("pretrained", path=str(folder), scaling_factor=4.0)


def fixed_loss(stage: SV3DStage, batch: dict, seeds=range(6)) -> float:
    """EDM loss averaged over fixed σ/noise draws (no cond noise), so that two calls compare like with like."""
    aug = torch.full((batch["cond_image"].shape[0],), 1e-5)
    with torch.no_grad():
        return sum(float(stage.edm_loss(batch, torch.Generator().manual_seed(s), aug)[0]) for s in seeds) / len(seeds)


def train_steps(stage: SV3DStage, batch: dict, steps: int) -> None:
    opt = stage.configure_optimizers()["optimizer"]
    stage.train()
    for _ in range(steps):
        opt.zero_grad()
        stage.edm_loss(batch)[0].backward()
        opt.step()
    stage.eval()


def denoise(sv3d: SV3D, latent_channels: int = 4, hw: int = 4) -> torch.Tensor:
    """The denoiser on a fixed random input: [1, 21, C, hw, hw]."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 21, latent_channels, hw, hw, generator=g)
    ang = torch.linspace(0, 6, 21)[None]
    with torch.no_grad():
        return sv3d.denoise(x, torch.tensor([1.5]), torch.randn(1, 1, 64, generator=g),
                            torch.randn(1, latent_channels, hw, hw, generator=g), ang * 0 + 1.4, ang, torch.tensor([1e-5]))


def test_training_lowers_the_edm_loss_on_a_fixed_batch():
    stage = make_stage(cond_aug=0.0)
    batch = collate([synthetic_sample(i) for i in range(2)])
    before = fixed_loss(stage, batch)
    train_steps(stage, batch, 40)
    after = fixed_loss(stage, batch)
    assert after < 0.6 * before, (before, after)


def test_fit_validates_exports_and_resumes_with_ema(tmp_path):
    stage = make_stage(ema_decay=0.9)
    dm = SyntheticDataModule(num_train=4, num_val=1, num_test=1, batch_size=2)
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "checkpoints"), save_last=True)
    trainer = pl.Trainer(max_steps=3, default_root_dir=str(tmp_path), accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         val_check_interval=3, check_val_every_n_epoch=None, callbacks=[ckpt_cb])
    trainer.fit(stage, dm)
    m = trainer.callback_metrics
    for k in ("val/loss", "val/latent_mse", "val/copy_input_latent_mse", "val/mean_latent_mse", "val/psnr",
              "val/copy_input_psnr", "val/vae_psnr"):
        assert k in m and torch.isfinite(m[k]), k
    assert stage.ema.step == 3

    # validation ran on the EMA and handed the training weights back
    ema = {n: t.clone() for n, t in stage.ema.shadow.items()}
    params = dict(stage.trainable_parameters())
    assert any(not torch.equal(ema[n], p) for n, p in params.items())

    # the export is the EMA UNet, loadable as a pretrained SV3D
    loaded = SV3D("pretrained", unet_path=str(tmp_path / "unet"), cfg_dropout=0.0)
    with stage.ema_weights():
        want = denoise(stage.sv3d)
    torch.testing.assert_close(denoise(loaded), want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(denoise(make_stage().sv3d), want)  # not the init

    # a checkpoint holds every UNet weight (full fine-tune) and the EMA; resuming restores both
    ck = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert set(ck["state_dict"]) == set(params)
    assert ck["gsv3d"]["ema"]["step"] == 3
    fresh = make_stage(ema_decay=0.9)
    t2 = pl.Trainer(max_steps=3, default_root_dir=str(tmp_path / "resume"), accelerator="cpu", logger=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    t2.fit(fresh, dm, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    for n, p in fresh.trainable_parameters():
        assert torch.equal(p, params[n]), n
        assert torch.equal(fresh.ema.shadow[n], ema[n]), n
    assert fresh.ema.step == 3


def test_lora_trains_only_lora_and_exports_merged(tmp_path):
    stage = make_stage(finetune="lora", lora_rank=4)
    trainable = [n for n, _ in stage.trainable_parameters()]
    assert trainable and all("lora_" in n for n in trainable)
    frozen_before = {n: p.clone() for n, p in stage.named_parameters() if not p.requires_grad}
    train_steps(stage, collate([synthetic_sample(0)]), 2)
    assert set(stage.state_dict()) == set(trainable)
    stage.export_unet(tmp_path / "unet")
    for n, p in stage.named_parameters():  # training and the merged export leave the base bit-identical
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), n
    loaded = SV3D("pretrained", unet_path=str(tmp_path / "unet"), cfg_dropout=0.0)
    assert not any("lora" in k for k in loaded.unet.state_dict())
    torch.testing.assert_close(denoise(loaded), denoise(stage.sv3d), rtol=1e-5, atol=1e-6)
    # the LoRA changed the output (lora_B starts at zero: this fails if the merge dropped the delta)
    torch.manual_seed(0)
    assert not torch.allclose(denoise(SV3D("tiny", cfg_dropout=0.0)), denoise(loaded), atol=1e-6)


def test_latent_channels_8_end_to_end(vae_x4_c8, tmp_path):
    stage = make_stage(vae=vae_x4_c8, latent_channels=8, val_sample_steps=1)
    assert stage.sv3d.unet.config.in_channels == 16 and stage.sv3d.unet.config.out_channels == 8
    batch = collate([synthetic_sample(0, resolution=64, num_extra_views=0)])
    loss, z0 = stage.edm_loss(batch)
    assert z0.shape == (1, 21, 8, 16, 16)
    loss.backward()
    metrics, images = stage.evaluate_orbit(batch)
    assert all(torch.isfinite(v) for v in metrics.values())
    assert images["pred_images"].shape == (1, 20, 3, 64, 64)
    stage.export_unet(tmp_path / "unet")
    loaded = SV3D("pretrained", unet_path=str(tmp_path / "unet"), latent_channels=8, cfg_dropout=0.0)
    torch.testing.assert_close(denoise(loaded, 8, 16), denoise(stage.sv3d, 8, 16), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="latent_channels"):
        SV3D("pretrained", unet_path=str(tmp_path / "unet"))  # default 4 disagrees with the folder's 8


def test_errors_name_the_config_key(vae_x4_c8):
    with pytest.raises(ValueError, match="sv3d.init_args.latent_channels: 8"):
        make_stage(vae=vae_x4_c8)  # 8-channel VAE, 4-channel UNet
    with pytest.raises(ValueError, match="finetune"):
        make_stage(finetune="partial")
    with pytest.raises(ValueError, match="ema_decay"):
        make_stage(ema_decay=1.0)
    with pytest.raises(ValueError, match="SV3D: latents must be"):
        SV3D("tiny", latent_channels=8).denoise(torch.zeros(1, 21, 4, 4, 4), torch.ones(1), torch.zeros(1, 1, 64),
                                                 torch.zeros(1, 4, 4, 4), torch.zeros(1, 21), torch.zeros(1, 21),
                                                 torch.zeros(1))
