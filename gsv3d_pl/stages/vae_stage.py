"""Stage 0 (miniature only): train a small image autoencoder on the dataset's renders, export it as a diffusers folder.

Why: at paper scale the VAE is SD's, frozen. The CPU miniature cannot afford SD's VAE, and a *random* tiny VAE
neither reconstructs (6 dB) nor carries much of the image in its latents, which starves the GS decoder
(``docs/miniature.md``). This stage trains an autoencoder (the miniature's: a linear patch codec,
:mod:`gsv3d_pl.models.patch_vae`; a diffusers ``AutoencoderKL`` works too) with SD's recipe minus the
perceptual and GAN terms (L1 + MSE + a small KL), then writes ``<run>/<export_dir>/`` (``config.json`` +
``diffusion_pytorch_model.safetensors``) with ``scaling_factor`` set so that scaled latents have unit std,
as SD's 0.18215 does for its VAE. The later stages load that folder through the same ``from_pretrained`` path
as SD's VAE: ``VAE(preset="pretrained", path=<run>/vae)``.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsv3d_pl.batch import MultiViewBatch
from gsv3d_pl.io import atomic_dir, write_json_atomic
from gsv3d_pl.models.encoders import autoencoder_downsample
from gsv3d_pl.stages.common import StageBase, sample_view_subset
from gsv3d_pl.stages.heldout import per_image_psnr

__all__ = ["VAEStage", "bilinear_ceiling"]

log = logging.getLogger(__name__)


def bilinear_ceiling(images: Tensor, factor: int) -> Tensor:
    """The no-model reference a VAE must beat: images [M, 3, H, W] area-averaged by ``factor`` and bilinearly
    upsampled back, [M, 3, H, W] (what an (H/factor)² grid per channel carries with a linear read-out)."""
    small = F.interpolate(images, scale_factor=1.0 / factor, mode="area")  # [M, 3, H/f, W/f]
    return F.interpolate(small, size=images.shape[-2:], mode="bilinear", align_corners=False)


class VAEStage(StageBase):
    """Train a diffusers ``AutoencoderKL`` on rendered views; export it for ``VAE(preset="pretrained", path=...)``.

    Args:
        autoencoder: the model trained: :class:`~gsv3d_pl.models.patch_vae.PatchAutoencoder` (the miniature's)
            or a diffusers ``AutoencoderKL`` (anything with their ``encode(x).latent_dist`` / ``decode(z).sample``
            interface, ``save_pretrained`` and ``register_to_config``).
        lambda_l1, lambda_mse: reconstruction weights on images in [-1, 1] (SD's VAE: L1 + LPIPS + GAN; the
            miniature drops the perceptual and adversarial terms).
        lambda_kl: KL weight, per latent element (SD: 1e-6), so the posterior stays a near-deterministic code.
        images_per_object: random views of each object's Q per step (a batch is B·images_per_object images).
        lr, weight_decay, betas, warmup_steps, min_lr_ratio: AdamW with warmup + cosine (as the other stages).
        export_dir: the diffusers folder written at the end of fit, relative to ``trainer.default_root_dir``.
        scaling_batches: training batches whose latent std sets ``scaling_factor`` (= 1 / std) at export.
        init_batches: training batches for a data-dependent start when the autoencoder has ``init_pca``
            (PatchAutoencoder: the closed-form patch PCA); 0 = its random init. Skipped on resume.
    """

    batch_keys = ("target_images",)

    def __init__(
        self,
        autoencoder: nn.Module,
        lambda_l1: float = 1.0,
        lambda_mse: float = 1.0,
        lambda_kl: float = 1e-6,
        images_per_object: int = 8,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 20,
        min_lr_ratio: float = 0.1,
        export_dir: str = "vae",
        scaling_batches: int = 8,
        init_batches: int = 8,
    ):
        super().__init__(lr, weight_decay, betas, warmup_steps, min_lr_ratio, background=1.0,
                         render_chunk_views=None, render_backend="auto")
        self.save_hyperparameters(ignore=["autoencoder"])
        self.vae = autoencoder
        self.factor = autoencoder_downsample(autoencoder)
        self.lambda_l1, self.lambda_mse, self.lambda_kl = float(lambda_l1), float(lambda_mse), float(lambda_kl)
        self.images_per_object = int(images_per_object)
        self.export_dir = export_dir
        self.scaling_batches = int(scaling_batches)
        self.init_batches = int(init_batches)
        self.use_latent_cache = False  # this stage trains the encoder: nothing to cache

    def on_fit_start(self) -> None:
        if self.init_batches <= 0 or not hasattr(self.vae, "init_pca") or self.trainer.global_step > 0:
            return  # a resumed run keeps its trained weights
        images = []
        for i, batch in enumerate(self.trainer.datamodule.train_dataloader()):
            if i >= self.init_batches:
                break
            images.append(self._images({"target_images": batch["target_images"].to(self.device)}, None))
        self.vae.init_pca(2 * torch.cat(images) - 1)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.vae.named_parameters())

    # ---- steps ---------------------------------------------------------------------------------------------
    def _images(self, batch: MultiViewBatch, k: int | None) -> Tensor:
        """``k`` random views per object (None = all), flattened: [M, 3, H, W] in [0, 1]."""
        imgs = batch["target_images"].float()  # [B, Q, 3, H, W]
        idx = sample_view_subset(imgs.shape[0], imgs.shape[1], k, device=imgs.device)  # [B, k] or None
        if idx is not None:
            imgs = imgs[torch.arange(imgs.shape[0], device=imgs.device)[:, None], idx]
        if imgs.shape[-1] % self.factor or imgs.shape[-2] % self.factor:
            raise ValueError(f"VAEStage: the image size {tuple(imgs.shape[-2:])} must be a multiple of the VAE's "
                             f"downsampling factor {self.factor} (model.init_args.autoencoder)")
        return imgs.flatten(0, 1)

    def losses(self, images: Tensor) -> dict[str, Tensor]:
        """images [M, 3, H, W] in [0, 1] -> the loss terms (and ``psnr`` of the sampled reconstruction)."""
        x = 2 * images - 1
        post = self.vae.encode(x).latent_dist
        rec = self.vae.decode(post.sample()).sample  # [M, 3, H, W] in ~[-1, 1]
        l1, mse = F.l1_loss(rec, x), F.mse_loss(rec, x)
        kl = post.kl().mean() / post.mean[0].numel()  # per latent element
        loss = self.lambda_l1 * l1 + self.lambda_mse * mse + self.lambda_kl * kl
        with torch.no_grad():
            psnr = per_image_psnr(((rec + 1) / 2).clamp(0, 1), images).mean()
        return {"loss": loss, "l1": l1, "mse": mse, "kl": kl, "psnr": psnr}

    def training_step(self, batch: MultiViewBatch, batch_idx: int) -> Tensor:
        terms = self.losses(self._images(batch, self.images_per_object))
        self._check_loss(terms)
        B = batch["target_images"].shape[0]
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items() if k != "psnr"}, batch_size=B)
        self.log("train/psnr", terms["psnr"], prog_bar=True, batch_size=B)
        return terms["loss"]

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """images [M, 3, H, W] in [0, 1] -> the posterior mode decoded, [M, 3, H, W] in [0, 1]."""
        z = self.vae.encode(2 * images - 1).latent_dist.mode()  # [M, C, H/f, W/f]
        return ((self.vae.decode(z).sample + 1) / 2).clamp(0, 1)

    def validation_step(self, batch: MultiViewBatch, batch_idx: int) -> dict:
        images = self._images(batch, None)  # every view of the validation objects
        psnr = per_image_psnr(self.reconstruct(images), images)  # [M]
        ref = per_image_psnr(bilinear_ceiling(images, self.factor), images)
        B = batch["target_images"].shape[0]
        self.log("val/psnr", psnr.mean(), prog_bar=True, batch_size=B)
        self.log("val/bilinear_ceiling_psnr", ref.mean(), batch_size=B)
        return {"psnr": psnr, "bilinear_ceiling_psnr": ref}

    # ---- export --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def latent_std(self, loader, max_batches: int) -> float:
        """Std of the posterior-mode latents over up to ``max_batches`` batches of ``loader``."""
        n, s, s2 = 0, 0.0, 0.0
        for i, batch in enumerate(loader):
            if i >= max_batches:
                break
            images = self._images({k: v.to(self.device) for k, v in batch.items() if k == "target_images"}, None)
            z = self.vae.encode(2 * images - 1).latent_dist.mode().double()
            n, s, s2 = n + z.numel(), s + z.sum().item(), s2 + (z * z).sum().item()
        if n == 0:
            raise RuntimeError("VAEStage: no training batch to measure the latent std on")
        mean = s / n
        return max(s2 / n - mean * mean, 1e-12) ** 0.5

    def export(self, out_dir: str | os.PathLike, scaling_factor: float) -> str:
        """Write the diffusers folder (atomically) with ``scaling_factor`` in its config; returns its path."""
        self.vae.register_to_config(scaling_factor=float(scaling_factor))
        with atomic_dir(out_dir) as tmp:
            self.vae.save_pretrained(tmp, safe_serialization=True)
        return os.fspath(out_dir)

    def on_fit_end(self) -> None:
        if not self.trainer.is_global_zero:
            return
        self.vae.eval()
        dm = self.trainer.datamodule
        std = self.latent_std(dm.train_dataloader(), self.scaling_batches)
        out = os.path.join(self.trainer.default_root_dir, self.export_dir)
        self.export(out, 1.0 / std)
        # The held-out score of the exported VAE against the no-model reference, on the validation objects.
        psnr, ref = [], []
        for batch in dm.val_dataloader():
            images = self._images({"target_images": batch["target_images"].to(self.device)}, None)
            psnr.append(per_image_psnr(self.reconstruct(images), images))
            ref.append(per_image_psnr(bilinear_ceiling(images, self.factor), images))
        psnr, ref = torch.cat(psnr), torch.cat(ref)
        report = {"psnr": psnr.mean().item(), "bilinear_ceiling_psnr": ref.mean().item(),
                  "num_images": int(psnr.numel()), "scaling_factor": 1.0 / std, "latent_std_unscaled": std,
                  "downsample": self.factor, "latent_channels": int(self.vae.config.latent_channels),
                  "folder": out}
        write_json_atomic(os.path.join(self.trainer.default_root_dir, "vae_eval.json"), report)
        log.info("VAE exported to %s: held-out reconstruction %.2f dB (bilinear from the %d× grid: %.2f dB)",
                 out, report["psnr"], self.factor, report["bilinear_ceiling_psnr"])
        print(f"[gsv3d] VAE -> {out}: held-out reconstruction PSNR {report['psnr']:.2f} dB over "
              f"{report['num_images']} views (bilinear from the latent grid: {report['bilinear_ceiling_psnr']:.2f} dB)")
