"""The miniature's image VAE: the patch codec, its training stage, the diffusers folder it exports and how the
other stages load it (VAE(preset="pretrained", path=...))."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch

from gsv3d_pl.models import VAE
from gsv3d_pl.models.patch_vae import PatchAutoencoder
from gsv3d_pl.stages.heldout import per_image_psnr
from gsv3d_pl.stages.vae_stage import VAEStage, bilinear_ceiling
from tests.synthetic import SyntheticDataModule, synthetic_sample

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _images(n: int = 3) -> torch.Tensor:
    return torch.cat([synthetic_sample(i, resolution=32)["target_images"] for i in range(n)])  # [n·Q, 3, 32, 32]


def test_patch_pca_is_the_best_linear_code_and_beats_the_bilinear_reference():
    x = _images()
    ae = PatchAutoencoder(patch_size=4, latent_channels=8)
    rec = lambda: ((ae.decode(ae.encode(2 * x - 1).latent_dist.mode()).sample + 1) / 2)  # noqa: E731
    with torch.no_grad():
        random_psnr = per_image_psnr(rec(), x).mean()
        ae.init_pca(2 * x - 1)
        pca_psnr = per_image_psnr(rec(), x).mean()
    ref = per_image_psnr(bilinear_ceiling(x, 4), x).mean()
    assert pca_psnr > random_psnr + 1.0
    assert pca_psnr > ref + 1.0, (float(pca_psnr), float(ref))  # 8 numbers per 4×4 patch beat the area average
    z = ae.encode(2 * x - 1).latent_dist.mode()
    assert z.shape == (x.shape[0], 8, 8, 8)
    # PCA codes are decorrelated: the channel covariance is diagonal.
    c = torch.cov(z.permute(1, 0, 2, 3).flatten(1))
    off = c - torch.diag(torch.diag(c))
    assert off.abs().max() < 1e-3 * c.diag().max()


def test_patch_codec_rejects_too_many_channels():
    with pytest.raises(ValueError, match="latent_channels"):
        PatchAutoencoder(patch_size=2, latent_channels=13)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short VAEStage fit on synthetic renders: (stage, run folder)."""
    root = tmp_path_factory.mktemp("vae_run")
    torch.manual_seed(0)
    stage = VAEStage(PatchAutoencoder(patch_size=4, latent_channels=8), lambda_l1=0.0, lambda_kl=0.0,
                     images_per_object=4, lr=1e-3, warmup_steps=1, init_batches=2, scaling_batches=2)
    dm = SyntheticDataModule(num_train=4, num_val=2, num_test=2, batch_size=2, resolution=32)
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, default_root_dir=str(root), limit_val_batches=1,
                         num_sanity_val_steps=0, val_check_interval=2, enable_model_summary=False)
    trainer.fit(stage, datamodule=dm)
    return stage, root


def test_vae_stage_exports_a_folder_the_vae_loads_with_unit_std_latents(trained):
    stage, root = trained
    report = json.loads((root / "vae_eval.json").read_text())
    assert report["psnr"] > report["bilinear_ceiling_psnr"] + 1.0  # the trained code beats the no-model reference
    assert report["downsample"] == 4 and report["latent_channels"] == 8
    folder = root / "vae"
    assert (folder / "config.json").is_file() and (folder / "diffusion_pytorch_model.safetensors").is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp_")]  # written atomically

    vae = VAE("pretrained", path=str(folder))  # scaling_factor: None -> the folder's
    assert isinstance(vae.vae, PatchAutoencoder) and vae.downsample == 4
    assert vae.scaling_factor == pytest.approx(report["scaling_factor"])
    x = torch.cat([b["target_images"].flatten(0, 1) for b in stage.trainer.datamodule.train_dataloader()])
    z = vae.encode(x)
    assert z.shape == (x.shape[0], 8, 8, 8)
    assert 0.7 < float(z.std()) < 1.4  # scaled latents have ~unit std, as EDM's sigma_data = 1 assumes
    rec = vae.decode(z)
    assert per_image_psnr(rec, x).mean() > per_image_psnr(bilinear_ceiling(x, 4), x).mean()
    # The same weights as the trained module.
    assert torch.allclose(vae.vae.encoder.weight, stage.vae.encoder.weight)


def test_pretrained_vae_folder_of_an_unknown_class_is_refused(tmp_path):
    PatchAutoencoder(patch_size=2, latent_channels=4).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "_class_name": "VQModel"}))
    with pytest.raises(ValueError, match="VQModel"):
        VAE("pretrained", path=str(tmp_path))


def test_vae_stage_rejects_images_not_divisible_by_the_factor():
    stage = VAEStage(PatchAutoencoder(patch_size=4, latent_channels=4))
    with pytest.raises(ValueError, match="multiple of the VAE's downsampling factor 4"):
        stage._images({"target_images": torch.rand(1, 2, 3, 30, 30)}, None)
