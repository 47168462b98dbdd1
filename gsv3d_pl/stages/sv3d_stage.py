"""SV3D fine-tuning: train SV3D's UNet (all weights, or a LoRA) with its own EDM loss on 21-frame orbits.

Per object: z0 = scaled VAE latents of the 21 orbit frames; the conditioning is the input view R (orbit frame
``INPUT_FRAME``): its CLIP embedding and its noise-augmented, unscaled VAE latent; the loss is
``SV3D.training_loss`` = mean(λ(σ)·(D(z0 + σn; σ) − z0)²), σ ~ exp(N(p_mean, p_std)). No GS decoder, no
rendering: this is the recipe to adapt SV3D to one's own renders (and, at miniature scale, to give the random
tiny UNet something to sample before stage 2).

Validation samples the orbit (Euler EDM, ``val_sample_steps``) and logs the latent MSE of the 20 novel frames
next to two baselines on the same batch (``val/copy_input_latent_mse``: the input view's latent at every frame;
``val/mean_latent_mse``: the object's own mean novel-frame latent, an oracle blur), and, with ``val_decode``,
the PSNR of the decoded samples / copies / VAE reconstructions against the GT frames.

The end of fit exports the UNet (the EMA weights when ``ema_decay`` is set; LoRA merged into the base weights)
as a diffusers folder that ``SV3D(unet_preset="pretrained", unet_path=<folder>)`` loads.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from gsv3d_pl.batch import MultiViewBatch
from gsv3d_pl.io import atomic_dir
from gsv3d_pl.models import SV3D, VAE, CLIPImageEmbedder
from gsv3d_pl.models.frozen import fingerprint, freeze
from gsv3d_pl.models.sv3d import LORA_TARGET_MODULES
from gsv3d_pl.orbit import INPUT_FRAME
from gsv3d_pl.stages.common import StageBase, orbit_latents, sample_orbit, sv3d_conditioning
from gsv3d_pl.stages.heldout import per_image_psnr

__all__ = ["SV3DStage", "EMA", "save_unet", "FINETUNE_MODES"]

log = logging.getLogger(__name__)

FINETUNE_MODES = ("full", "lora")
_KEY = "model.init_args"


class EMA:
    """Exponential moving average of named parameters (fp32 copies), with diffusers' EMAModel warm-up:
    decay_n = min(decay, (1 + n)/(10 + n)) at optimizer step n, so a short run is not dominated by its init."""

    def __init__(self, decay: float):
        self.decay = float(decay)
        self.shadow: dict[str, Tensor] | None = None
        self.step = 0  # the last optimizer step folded in
        self.backup: dict[str, Tensor] | None = None  # the training weights while the EMA is swapped in

    @property
    def ready(self) -> bool:
        return self.shadow is not None

    @property
    def swapped(self) -> bool:
        return self.backup is not None

    def attach(self, named: list[tuple[str, nn.Parameter]]) -> None:
        """Start from the current weights, or keep a restored state (then moved to the parameters' devices)."""
        params = dict(named)
        if self.shadow is None:
            self.shadow = {n: p.detach().float().clone() for n, p in params.items()}
            return
        if set(self.shadow) != set(params):
            diff = sorted(set(self.shadow) ^ set(params))
            raise ValueError(f"the checkpoint's EMA holds other parameters than this run trains, e.g. {diff[:3]}")
        self.shadow = {n: t.to(params[n].device, torch.float32) for n, t in self.shadow.items()}

    @torch.no_grad()
    def update(self, named: list[tuple[str, nn.Parameter]], step: int) -> None:
        if self.shadow is None or step == self.step:  # no optimizer step since (gradient accumulation)
            return
        d = min(self.decay, (1 + step) / (10 + step))
        for n, p in named:
            self.shadow[n].lerp_(p.detach().float(), 1.0 - d)
        self.step = step

    @contextlib.contextmanager
    def swapped_in(self, named: list[tuple[str, nn.Parameter]]):
        """Within: the parameters hold the EMA; the training weights come back on exit (even on error)."""
        with torch.no_grad():
            self.backup = {n: p.detach().clone() for n, p in named}
            for n, p in named:
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in named:
                    p.copy_(self.backup[n])
            self.backup = None

    def state_dict(self) -> dict:
        return {"decay": self.decay, "step": self.step,
                "shadow": None if self.shadow is None else {n: t.detach().cpu() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.shadow = None if state["shadow"] is None else {n: t.float() for n, t in state["shadow"].items()}


def save_unet(unet: nn.Module, folder: str | os.PathLike) -> None:
    """Write ``unet`` as a diffusers folder (config.json + diffusion_pytorch_model.safetensors) that
    ``SV3DUNet.from_pretrained`` loads. A peft LoRA is merged into the base weights (W + scale·B·A), without
    touching the module (its base stays bit-identical); without LoRA this is ``save_pretrained``."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import save_file

    lora = [(n, m) for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)]
    if not lora:
        unet.save_pretrained(folder)
        return
    with torch.no_grad():
        sd = {k: v.detach() for k, v in unet.state_dict().items() if "lora_" not in k}
        for name, mod in lora:
            if getattr(mod, "merged", False):
                raise RuntimeError(f"{name}: the LoRA is merged into the base weights already; unmerge it first")
            delta = sum(mod.get_delta_weight(a) for a in mod.active_adapters)
            sd[f"{name}.weight"] = sd.pop(f"{name}.base_layer.weight") + delta
            if f"{name}.base_layer.bias" in sd:
                sd[f"{name}.bias"] = sd.pop(f"{name}.base_layer.bias")
    unet.save_config(folder)
    save_file({k: v.contiguous().cpu() for k, v in sd.items()},
              os.path.join(folder, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})


class SV3DStage(StageBase):
    """Fine-tune SV3D's UNet on orbits with its EDM loss: ``finetune="full"`` (every UNet weight) or ``"lora"``.

    Args:
        vae, clip: frozen encoders (latents of the orbit frames, CLIP embedding of the input view).
        sv3d: the SV3D model; ``latent_channels`` of its UNet must match the VAE's.
        finetune: "full" trains every UNet parameter; "lora" freezes it and trains a peft LoRA
            (``lora_rank``, ``lora_alpha`` (None = rank), ``lora_targets``, ``lora_dropout``).
        cond_aug: the training noise augmentation of the conditioning image (std in [-1, 1] pixel units; the
            same value is fed to the UNet's cond_aug embedding). None (default) = per object
            σ_aug ~ exp(N(cond_aug_p_mean, cond_aug_p_std)) = exp(N(−3.0, 0.5)) (median 0.05), as public SVD
            fine-tunes sample it (SVD_Xtend ``train_svd.py``); a float = that fixed value.
        val_cond_aug: cond_aug of validation and of the export's intended use (SV3D inference: 1e-5).
        lr, weight_decay, betas, warmup_steps, min_lr_ratio: AdamW + linear warmup + cosine.
        ema_decay: None = no EMA; else the EMA of the trained parameters with decay
            min(ema_decay, (1 + n)/(10 + n)) at optimizer step n (diffusers' EMAModel warm-up). The EMA weights
            are what validation evaluates and what is exported; checkpoints hold them too.
        val_sample_steps: Euler-EDM steps of the validation sampler.
        val_decode: decode samples, copies and GT latents with the VAE for ``val/psnr`` and its baselines.
        export_dir: where the end of fit writes the diffusers UNet folder; relative = under
            ``trainer.default_root_dir`` (default ``<run>/unet``); None = no export.
        use_latent_cache: let the datamodule cache the VAE latents of every view (as the other stages).
    """

    batch_keys = ("cond_image", "target_images", "orbit_polars_rad", "orbit_azimuths_rad")

    def __init__(
        self,
        vae: VAE,
        clip: CLIPImageEmbedder,
        sv3d: SV3D,
        finetune: str = "full",
        lora_rank: int = 16,
        lora_alpha: float | None = None,
        lora_targets: list[str] = LORA_TARGET_MODULES,
        lora_dropout: float = 0.0,
        cond_aug: float | None = None,
        cond_aug_p_mean: float = -3.0,
        cond_aug_p_std: float = 0.5,
        val_cond_aug: float = 1e-5,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.0,
        ema_decay: float | None = None,
        val_sample_steps: int = 25,
        val_decode: bool = True,
        export_dir: str | None = "unet",
        use_latent_cache: bool = True,
    ):
        super().__init__(lr, weight_decay, betas, warmup_steps, min_lr_ratio, background=1.0,
                         render_chunk_views=None, render_backend="auto")  # nothing renders here
        if finetune not in FINETUNE_MODES:
            raise ValueError(f"{_KEY}.finetune must be one of {FINETUNE_MODES}, got {finetune!r}")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"{_KEY}.ema_decay must be in (0, 1) or null, got {ema_decay}")
        if cond_aug is not None and cond_aug < 0:
            raise ValueError(f"{_KEY}.cond_aug must be >= 0 or null (log-normal), got {cond_aug}")
        if val_sample_steps < 1:
            raise ValueError(f"{_KEY}.val_sample_steps must be >= 1, got {val_sample_steps}")
        self.vae, self.clip = freeze(vae), freeze(clip)
        self.sv3d = sv3d
        vae_c = getattr(getattr(getattr(vae, "vae", None), "config", None), "latent_channels", None)
        unet_c = sv3d.unet.config.out_channels
        if vae_c is not None and vae_c != unet_c:
            raise ValueError(f"the VAE ({_KEY}.vae) has {vae_c} latent channels but the SV3D UNet has {unet_c}: set "
                             f"{_KEY}.sv3d.init_args.latent_channels: {vae_c}")

        self.finetune = finetune
        self._unet_base_fp: str | None = None
        if finetune == "full":
            sv3d.requires_grad_(True)
        else:
            self._unet_base_fp = fingerprint(sv3d.unet)  # the unsaved base a LoRA checkpoint must match
            sv3d.add_lora(rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, target_modules=tuple(lora_targets))
            non_lora = [n for n, p in self.named_parameters() if p.requires_grad and "lora_" not in n]
            assert not non_lora, f"finetune='lora': only LoRA parameters may train, found {non_lora[:5]}"
        self.num_trainable_params = sum(p.numel() for _, p in self.trainable_parameters())
        if self.num_trainable_params == 0:
            raise ValueError(f"{_KEY}.finetune={finetune!r} left no trainable parameters (check lora_targets)")
        rank_zero_info(f"[sv3d] finetune={finetune}: {self.num_trainable_params:,} trainable UNet parameters")

        self.cond_aug = None if cond_aug is None else float(cond_aug)
        self.cond_aug_p_mean, self.cond_aug_p_std = float(cond_aug_p_mean), float(cond_aug_p_std)
        self.val_cond_aug = float(val_cond_aug)
        self.ema = None if ema_decay is None else EMA(float(ema_decay))
        self.val_sample_steps = int(val_sample_steps)
        self.val_decode = bool(val_decode)
        self.export_dir = export_dir
        self.use_latent_cache = use_latent_cache
        self.save_hyperparameters(ignore=["sv3d", "vae", "clip"])

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    # ---- conditioning ---------------------------------------------------------------------------------------
    def sample_cond_aug(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """[B] training cond_aug: the fixed ``cond_aug``, else log-normal(cond_aug_p_mean, cond_aug_p_std)."""
        if self.cond_aug is not None:
            return torch.full((batch_size,), self.cond_aug, device=self.device)
        gdev = generator.device if generator is not None else self.device
        z = torch.randn(batch_size, generator=generator, device=gdev).to(self.device)
        return (self.cond_aug_p_mean + self.cond_aug_p_std * z).exp()

    def conditioning(self, batch: MultiViewBatch, cond_aug: Tensor | None = None) -> dict[str, Tensor]:
        """SV3D's conditioning; ``cond_aug`` [B] default = ``val_cond_aug`` for every object."""
        if cond_aug is None:
            cond_aug = torch.full((batch["cond_image"].shape[0],), self.val_cond_aug, device=self.device)
        return sv3d_conditioning(self.vae, self.clip, batch, cond_aug)

    # ---- training ---------------------------------------------------------------------------------------------
    def edm_loss(self, batch: MultiViewBatch, generator: torch.Generator | None = None,
                 cond_aug: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(EDM loss, z0 [B, 21, C, h, w]); ``cond_aug`` None = sampled as in training."""
        z0 = orbit_latents(self.vae, batch)  # [B, 21, C, h, w]
        if cond_aug is None:
            cond_aug = self.sample_cond_aug(z0.shape[0], generator)
        c = self.conditioning(batch, cond_aug)
        with self.autocast():
            loss, _, _ = self.sv3d.training_loss(z0, c["clip_emb"], c["cond_latent"], c["polars"], c["azimuths"],
                                                 c["cond_aug"], generator=generator)
        return loss, z0

    def training_step(self, batch: MultiViewBatch, batch_idx: int) -> Tensor:
        loss, z0 = self.edm_loss(batch)
        self._check_loss({"loss": loss})
        B = z0.shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=B)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=B)
        return loss

    # ---- EMA ----------------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.ema is not None:
            self.ema.attach(self.trainable_parameters())  # keeps a state restored from a checkpoint
        for lg in self.loggers:
            lg.log_hyperparams({"num_trainable_params": self.num_trainable_params})

    def optimizer_step(self, *args, **kwargs) -> None:
        # Here rather than in on_train_batch_end: ModelCheckpoint saves in its own on_train_batch_end, which runs
        # first, so a checkpoint would hold the average one step behind the weights.
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:  # global_step counts this step only after the hook returns: + 1
            self.ema.update(self.trainable_parameters(), int(self.global_step) + 1)

    def ema_weights(self) -> contextlib.AbstractContextManager:
        """Within: the trained parameters hold their EMA (a no-op without EMA)."""
        if self.ema is None or not self.ema.ready:
            return contextlib.nullcontext()
        return self.ema.swapped_in(self.trainable_parameters())

    def on_validation_epoch_start(self) -> None:
        self._eval_ctx = contextlib.ExitStack()
        self._eval_ctx.enter_context(self.ema_weights())

    def on_validation_epoch_end(self) -> None:
        ctx, self._eval_ctx = getattr(self, "_eval_ctx", None), None
        if ctx is not None:
            ctx.close()

    on_test_epoch_start = on_validation_epoch_start
    on_test_epoch_end = on_validation_epoch_end

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None and self.ema.swapped:  # saved mid-validation: store the training weights
            checkpoint["state_dict"].update(self.ema.backup)
        super().on_save_checkpoint(checkpoint)
        checkpoint["gsv3d"] = {"stage": "sv3d", "finetune": self.finetune, "unet_base_fingerprint": self._unet_base_fp,
                               "num_trainable_params": self.num_trainable_params,
                               "ema": None if self.ema is None else self.ema.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get("gsv3d", {})
        if meta.get("stage", "sv3d") != "sv3d":
            raise ValueError(f"this is a {meta['stage']!r} checkpoint, not an SV3DStage one")
        if meta.get("finetune", self.finetune) != self.finetune:
            raise ValueError(f"the checkpoint was trained with {_KEY}.finetune={meta['finetune']!r}, this run has "
                             f"{self.finetune!r}: set the same to resume")
        fp = meta.get("unet_base_fingerprint")
        if self.finetune == "lora" and fp is not None and fp != self._unet_base_fp:
            raise ValueError(f"this checkpoint's LoRA belongs to another base UNet (fingerprint {fp} vs "
                             f"{self._unet_base_fp}); use the same {_KEY}.sv3d as its run")
        if self.ema is not None:
            if meta.get("ema") is None:
                rank_zero_warn(f"{_KEY}.ema_decay is set but the checkpoint holds no EMA: it restarts from the "
                               "checkpoint's weights")
            else:
                self.ema.load_state_dict(meta["ema"])

    # ---- evaluation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_orbit(self, batch: MultiViewBatch, batch_idx: int = 0) -> tuple[dict[str, Tensor], dict]:
        """(metrics, images) of one batch: EDM loss at fixed σ/noise, the sampled orbit's latent MSE over the
        novel frames 0..19 with its baselines and, with ``val_decode``, PSNRs of the decoded frames.

        images: ``pred_images`` / ``gt_images`` [B, 20, 3, H, W] (decoded samples, GT novel frames).
        """
        g = torch.Generator(device=self.device).manual_seed(1000 + batch_idx)  # the same σ/noise every validation
        B = batch["cond_image"].shape[0]
        aug = torch.full((B,), self.val_cond_aug, device=self.device)
        loss, z0 = self.edm_loss(batch, generator=g, cond_aug=aug)
        with self.autocast():
            x = sample_orbit(self.sv3d, self.conditioning(batch, aug), self.val_sample_steps, seed=batch_idx)
        novel = slice(0, INPUT_FRAME)  # the input view is frame 20, the last
        gt = z0[:, novel]  # [B, 20, C, h, w]
        copy = z0[:, INPUT_FRAME:INPUT_FRAME + 1]  # [B, 1, C, h, w], broadcast over frames
        mse = lambda pred: (pred - gt).square().mean()  # noqa: E731
        metrics = {"loss": loss, "latent_mse": mse(x[:, novel]), "copy_input_latent_mse": mse(copy),
                   "mean_latent_mse": mse(gt.mean(dim=1, keepdim=True))}
        images: dict = {}
        if self.val_decode:
            gt_img = batch["target_images"][:, novel].float()  # [B, 20, 3, H, W]
            dec = lambda z: self.vae.decode(z.flatten(0, 1).float()).reshape(*z.shape[:2], *gt_img.shape[2:])  # noqa: E731
            psnr = lambda img: per_image_psnr(img.expand_as(gt_img).flatten(0, 1), gt_img.flatten(0, 1)).mean()  # noqa: E731
            pred_img = dec(x[:, novel])
            metrics.update(psnr=psnr(pred_img), copy_input_psnr=psnr(dec(copy)), vae_psnr=psnr(dec(gt)))
            images = {"pred_images": pred_img, "gt_images": gt_img}
        return metrics, images

    def _eval_step(self, batch: MultiViewBatch, batch_idx: int, prefix: str) -> dict:
        metrics, images = self.evaluate_orbit(batch, batch_idx)
        B = batch["cond_image"].shape[0]
        for k, v in metrics.items():
            self.log(f"{prefix}/{k}", v, batch_size=B, sync_dist=True, prog_bar=k in ("latent_mse", "psnr"))
        return images

    def validation_step(self, batch: MultiViewBatch, batch_idx: int) -> dict:
        return self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: MultiViewBatch, batch_idx: int) -> dict:
        return self._eval_step(batch, batch_idx, "test")

    # ---- export -------------------------------------------------------------------------------------------------
    def export_unet(self, out_dir: str | os.PathLike) -> str:
        """Write the UNet (EMA weights if enabled, LoRA merged) as a diffusers folder, atomically; returns it.

        Load it with ``SV3D(unet_preset="pretrained", unet_path=out_dir, latent_channels=C)``.
        """
        out_dir = os.path.abspath(os.fspath(out_dir))
        with self.ema_weights(), atomic_dir(out_dir) as tmp:
            save_unet(self.sv3d.unet, tmp)
        return out_dir

    def export_path(self) -> str | None:
        if self.export_dir is None:
            return None
        return os.path.join(self._root_dir(), os.path.expanduser(self.export_dir))  # join keeps an absolute path

    def on_fit_end(self) -> None:
        path = self.export_path()
        if path is None or self.trainer.global_rank != 0 or getattr(self.trainer, "interrupted", False):
            return
        path = self.export_unet(path)
        which = "EMA" if self.ema is not None and self.ema.ready else "final"
        print(f"[sv3d] UNet ({self.finetune}, {which} weights) exported to {path}; use it with "
              f"--model.init_args.sv3d.init_args.unet_preset=pretrained --model.init_args.sv3d.init_args.unet_path={path}",
              flush=True)
