"""SV3D-p on diffusers: a camera-conditioned video UNet, EDM preconditioning, training loss and sampler.

Pieces:

- :class:`SV3DUNet`: diffusers' ``UNetSpatioTemporalConditionModel`` whose ``added_time_ids`` are
  **per frame** ``(cond_aug, polar, azimuth)``, as SV3D-p does. Each is embedded sinusoidally
  (sizes ``a``, ``2a`` and ``2a`` with ``a = addition_time_embed_dim``: 256/512/512 at paper scale,
  1280 in all), goes through ``add_embedding`` and is added to that frame's time embedding. The
  sinusoids have no weights, so the state dict is the stock class's and a diffusers-format SV3D-p
  UNet folder loads with ``from_pretrained``. ``PeftAdapterMixin`` adds ``add_adapter`` /
  ``save_lora_adapter`` / ``load_lora_adapter`` (the stock class lacks it).
- :class:`EDMPreconditioner`: SVD's EDM/v-scaling with sigma_data = 1 (c_in, c_skip, c_out, c_noise),
  the log-normal training sigma and the loss weight.
- :class:`SV3D`: the UNet plus conditioning (CLIP embedding of the input view as
  ``encoder_hidden_states``, its unscaled noise-augmented VAE latent concatenated to every frame),
  classifier-free dropout, :meth:`SV3D.training_loss` (returns the denoised prediction D that
  DistillStage feeds to the GS decoder) and :meth:`SV3D.sample` (Euler over a Karras sigma schedule
  using diffusers' ``EulerDiscreteScheduler``, with SV3D's triangle CFG over frames).

Frame order is SV3D's: frame i has azimuth (i+1)·360/F relative to the input view, so the last frame
is the input view. Latents are *scaled* (× 0.18215) except the conditioning latent, which SV3D feeds
unscaled.
"""

from __future__ import annotations

import contextlib
import os

import torch
from diffusers import EulerDiscreteScheduler, UNetSpatioTemporalConditionModel
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.unets.unet_spatio_temporal_condition import UNetSpatioTemporalConditionOutput
from torch import Tensor, nn

from gsv3d_pl.hub import hub_path
from gsv3d_pl.models.edm import EDMPreconditioner, triangle_cfg_scales  # noqa: F401  (re-exported)
from gsv3d_pl.models.encoders import tiny_init_seed
from gsv3d_pl.models.lora_fold import lora_folded, lora_off
from gsv3d_pl.orbit import NUM_FRAMES
from gsv3d_pl.weights import HubFile, WeightSpec, require_files, resolve

__all__ = [
    "SV3DUNet",
    "EDMPreconditioner",
    "SV3D",
    "UNET_PRESETS",
    "LORA_TARGET_MODULES",
    "triangle_cfg_scales",
    "LOSS_WEIGHTINGS",
]

# λ(σ) of :meth:`SV3D.training_loss`: EDM's (σ²+1)/σ², or none (the plain MSE of D against z0).
LOSS_WEIGHTINGS: tuple[str, ...] = ("edm", "none")

# peft target names: these match the spatial (``attn1``/``attn2``) and temporal attention of every
# transformer block; 256 Linear layers at paper scale.
LORA_TARGET_MODULES: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

UNET_PRESETS: dict[str, dict] = {
    # Paper scale (Stability's sv3d_p.yaml as converted to diffusers): ~1.5B parameters.
    "pretrained": dict(
        in_channels=8,
        out_channels=4,
        down_block_types=(
            "CrossAttnDownBlockSpatioTemporal",
            "CrossAttnDownBlockSpatioTemporal",
            "CrossAttnDownBlockSpatioTemporal",
            "DownBlockSpatioTemporal",
        ),
        up_block_types=(
            "UpBlockSpatioTemporal",
            "CrossAttnUpBlockSpatioTemporal",
            "CrossAttnUpBlockSpatioTemporal",
            "CrossAttnUpBlockSpatioTemporal",
        ),
        block_out_channels=(320, 640, 1280, 1280),
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=1280,
        layers_per_block=2,
        cross_attention_dim=1024,
        num_attention_heads=(5, 10, 20, 20),
        num_frames=NUM_FRAMES,
    ),
    # Random init, CPU-fast. Channels are multiples of 32 (GroupNorm(32) inside the UNet); the
    # projection dim is 5 × addition_time_embed_dim (a + 2a + 2a). cross_attention_dim matches the
    # tiny CLIPImageEmbedder's embed_dim.
    "tiny": dict(
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        block_out_channels=(32, 64),
        addition_time_embed_dim=32,
        projection_class_embeddings_input_dim=160,
        layers_per_block=1,
        cross_attention_dim=64,
        num_attention_heads=(2, 4),
        num_frames=NUM_FRAMES,
    ),
}


class SV3DUNet(UNetSpatioTemporalConditionModel, PeftAdapterMixin):
    """SV3D-p's UNet: the stock SVD UNet with per-frame camera conditioning and LoRA support.

    Same constructor, config and state dict as ``UNetSpatioTemporalConditionModel`` (no ``__init__``
    override, so ``from_pretrained``/``from_config`` work unchanged); the forward requires
    ``projection_class_embeddings_input_dim == 5 * addition_time_embed_dim`` (checked by :class:`SV3D`
    at construction).
    """

    def camera_embedding(self, added_time_ids: Tensor) -> Tensor:
        """Per-frame sinusoidal embedding of (cond_aug, polar, azimuth), before ``add_embedding``.

        Args:
            added_time_ids: [B, F, 3] (cond_aug, polar_rad, azimuth_rad) per frame.
        Returns:
            [B, F, 5a] float32: cat(emb_a(cond_aug), emb_2a(polar), emb_2a(azimuth)).
        """
        if added_time_ids.ndim != 3 or added_time_ids.shape[-1] != 3:
            raise ValueError(f"added_time_ids must be [B, F, 3] (cond_aug, polar, azimuth), got {tuple(added_time_ids.shape)}")
        a = self.config.addition_time_embed_dim
        if self.config.projection_class_embeddings_input_dim != 5 * a:
            raise ValueError(
                f"SV3DUNet: projection_class_embeddings_input_dim must be 5 * addition_time_embed_dim "
                f"(cond_aug a + polar 2a + azimuth 2a) = {5 * a}, got {self.config.projection_class_embeddings_input_dim}"
                " (an SV3D-u or SVD checkpoint is not camera-conditioned)"
            )
        B, F, _ = added_time_ids.shape
        ids = added_time_ids.float()  # angles stay fp32: fp16 sinusoids of radians lose the high bands
        # The parent's add_time_proj (a wide) embeds cond_aug; the angles use the same weight-free
        # sinusoids at 2a, so the state dict stays the stock one.
        emb = lambda v, d: get_timestep_embedding(v.reshape(-1), d, flip_sin_to_cos=True, downscale_freq_shift=0)
        cond_aug = self.add_time_proj(ids[..., 0].reshape(-1))  # [B*F, a]
        polar = emb(ids[..., 1], 2 * a)  # [B*F, 2a]
        azimuth = emb(ids[..., 2], 2 * a)  # [B*F, 2a]
        return torch.cat([cond_aug, polar, azimuth], dim=-1).reshape(B, F, -1)  # [B, F, 5a]

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | float,
        encoder_hidden_states: Tensor,
        added_time_ids: Tensor,
        return_dict: bool = True,
    ) -> UNetSpatioTemporalConditionOutput | tuple:
        """Run the UNet.

        Args:
            sample: [B, F, C_in, h, w] noisy (preconditioned) latents concatenated with the conditioning latent.
            timestep: [B] or scalar, the noise level input (EDM c_noise = 0.25·ln σ).
            encoder_hidden_states: [B, S, D] CLIP image embedding (S = 1 for SV3D).
            added_time_ids: [B, F, 3] per-frame (cond_aug, polar_rad, azimuth_rad); [B, 3] is
                broadcast over frames.
        Returns:
            ``UNetSpatioTemporalConditionOutput(sample=[B, F, C_out, h, w])`` or a 1-tuple.
        """
        B, F = sample.shape[:2]
        if added_time_ids.ndim == 2:
            added_time_ids = added_time_ids[:, None].expand(B, F, added_time_ids.shape[-1])
        if added_time_ids.shape[:2] != (B, F):
            raise ValueError(f"added_time_ids {tuple(added_time_ids.shape)} does not match sample batch/frames {(B, F)}")

        # 1. Embeddings: time per sample, camera per frame.
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(-1).expand(B) if t.numel() == 1 else t.reshape(B)
        t_emb = self.time_proj(t).to(sample.dtype)  # [B, c0]
        emb = self.time_embedding(t_emb)  # [B, 4*c0]
        cam = self.camera_embedding(added_time_ids).to(emb.dtype)  # [B, F, 5a]
        aug = self.add_embedding(cam.flatten(0, 1))  # [B*F, 4*c0]
        emb = emb.repeat_interleave(F, dim=0) + aug  # [B*F, 4*c0]
        ehs = encoder_hidden_states.repeat_interleave(F, dim=0)  # [B*F, S, D]

        # 2. UNet body (the same block calls as the stock forward).
        x = self.conv_in(sample.flatten(0, 1))  # [B*F, c0, h, w]
        indicator = torch.zeros(B, F, dtype=x.dtype, device=x.device)  # all frames are video frames
        up_factor = 2**self.num_upsamplers
        forward_size = any(s % up_factor != 0 for s in x.shape[-2:])
        skips = (x,)
        for block in self.down_blocks:
            kw = dict(encoder_hidden_states=ehs) if getattr(block, "has_cross_attention", False) else {}
            x, res = block(hidden_states=x, temb=emb, image_only_indicator=indicator, **kw)
            skips += res
        x = self.mid_block(hidden_states=x, temb=emb, encoder_hidden_states=ehs, image_only_indicator=indicator)
        for i, block in enumerate(self.up_blocks):
            res = skips[-len(block.resnets):]
            skips = skips[: -len(block.resnets)]
            size = skips[-1].shape[2:] if (forward_size and i < len(self.up_blocks) - 1) else None
            kw = dict(encoder_hidden_states=ehs) if getattr(block, "has_cross_attention", False) else {}
            x = block(hidden_states=x, temb=emb, res_hidden_states_tuple=res, upsample_size=size,
                      image_only_indicator=indicator, **kw)
        x = self.conv_out(self.conv_act(self.conv_norm_out(x)))  # [B*F, C_out, h, w]
        x = x.reshape(B, F, *x.shape[1:])  # [B, F, C_out, h, w]
        if not return_dict:
            return (x,)
        return UNetSpatioTemporalConditionOutput(sample=x)


# ----------------------------------------------------------------------------- weights

_UNET_SOURCE = (
    "a diffusers-format SV3D-p UNet folder (config.json + diffusion_pytorch_model.safetensors, or its fp16 "
    "variant), e.g. `huggingface-cli download chenguolin/sv3d-diffusers --include 'unet/*'` (converted from "
    "stabilityai/sv3d sv3d_p.safetensors; accept the SV3D licence first)"
)
# Any one of these in the folder; the last is diffusers' `variant="fp16"` file name.
_UNET_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                 "diffusion_pytorch_model.fp16.safetensors")


def _unet_spec(unet_path: str | os.PathLike | None, key_prefix: str = "model.init_args.sv3d") -> WeightSpec:
    return WeightSpec(
        name="SV3D-p UNet (diffusers format)",
        config_key=f"{key_prefix}.init_args.unet_path",
        candidates=[hub_path("chenguolin/sv3d-diffusers", "unet")],
        source=_UNET_SOURCE,
        explicit=unet_path,
        fetch=HubFile("chenguolin/sv3d-diffusers", "*", subfolder="unet"),
    )


# ----------------------------------------------------------------------------- SV3D wrapper


class SV3D(nn.Module):
    """SV3D-p: camera-conditioned video diffusion over the 21-frame orbit, with EDM training and sampling.

    Args:
        unet_preset: "tiny" (random init, CPU-fast) or "pretrained" (diffusers-format SV3D-p folder).
        unet_path: the folder for "pretrained"; default: the HF cache of ``chenguolin/sv3d-diffusers``/unet.
        p_mean, p_std: log-normal training sigma (0.7 / 1.6 as public SVD/SV3D fine-tunes use).
        cfg_dropout: probability, per sample, of dropping *both* the CLIP embedding and the conditioning
            latent (zeroed, as the sampler's unconditional branch) during training.
        sigma_min, sigma_max, rho: the Karras sampling schedule (SV3D: 0.002, 700, 7).
        num_steps: default sampling steps (50).
        min_cfg, max_cfg: triangle CFG scales over frames (1.0 -> 2.5 -> 1.0).
        gradient_checkpointing: enable diffusers' checkpointing inside the UNet blocks.
        latent_channels: C, the VAE's latent channels. Builds the tiny UNet (in 2C: noisy + conditioning latent,
            out C); a pretrained UNet must already have them (SV3D-p: 4).
    """

    @staticmethod
    def weight_specs(init_args: dict, key_prefix: str = "model.init_args.sv3d") -> list[WeightSpec]:
        """The files an ``SV3D(**init_args)`` at config key ``key_prefix`` needs (none for the tiny preset)."""
        if init_args.get("unet_preset", "tiny") == "tiny":
            return []
        return [_unet_spec(init_args.get("unet_path"), key_prefix)]

    def __init__(
        self,
        unet_preset: str = "tiny",
        unet_path: str | None = None,
        p_mean: float = 0.7,
        p_std: float = 1.6,
        cfg_dropout: float = 0.1,
        sigma_min: float = 0.002,
        sigma_max: float = 700.0,
        rho: float = 7.0,
        num_steps: int = 50,
        min_cfg: float = 1.0,
        max_cfg: float = 2.5,
        gradient_checkpointing: bool = False,
        latent_channels: int = 4,
    ):
        super().__init__()
        if unet_preset not in UNET_PRESETS:
            raise ValueError(f"SV3D: unknown unet_preset {unet_preset!r}; choose one of {sorted(UNET_PRESETS)}")
        if unet_preset == "tiny":
            if unet_path is not None:
                raise ValueError("SV3D: unet_path is only read with unet_preset='pretrained'")
            C = int(latent_channels)
            with tiny_init_seed(4):  # the base UNet is not in stage-2 checkpoints (LoRA only)
                self.unet = SV3DUNet(**{**UNET_PRESETS["tiny"], "in_channels": 2 * C, "out_channels": C})
        else:
            spec = _unet_spec(unet_path)
            folder = resolve(spec)  # raises MissingWeightsError naming model.init_args.sv3d.init_args.unet_path
            weights = require_files(folder, spec, ["config.json"], _UNET_WEIGHTS)
            variant = "fp16" if weights.name == _UNET_WEIGHTS[-1] else None
            self.unet = SV3DUNet.from_pretrained(str(folder), variant=variant)
            have = (self.unet.config.in_channels, self.unet.config.out_channels)
            if have != (2 * latent_channels, latent_channels):
                raise ValueError(f"SV3D: the UNet at {folder} has in/out channels {have}, not (2C, C) for "
                                 f"latent_channels={latent_channels}: set model.init_args.sv3d.init_args.latent_channels "
                                 f"to {have[1]}")
        a = self.unet.config.addition_time_embed_dim
        if self.unet.config.projection_class_embeddings_input_dim != 5 * a:
            raise ValueError(
                f"SV3D: the UNet at {unet_path} has projection_class_embeddings_input_dim "
                f"{self.unet.config.projection_class_embeddings_input_dim}, expected 5 * {a} (SV3D-p's per-frame "
                "cond_aug/polar/azimuth); SV3D-u and SVD checkpoints are not camera-conditioned"
            )
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.edm = EDMPreconditioner(p_mean, p_std)
        if not 0.0 <= cfg_dropout < 1.0:
            raise ValueError(f"SV3D: cfg_dropout must be in [0, 1), got {cfg_dropout}")
        self.cfg_dropout = float(cfg_dropout)
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self.num_steps = int(num_steps)
        self.min_cfg, self.max_cfg = float(min_cfg), float(max_cfg)
        self.lora_sigma_max: float | None = None  # add_lora(sigma_max=): the sampler's steps the adapter acts on

    # ------------------------------------------------------------------ LoRA

    def add_lora(self, rank: int = 4, alpha: float | None = None, dropout: float = 0.0,
                 target_modules: tuple[str, ...] = LORA_TARGET_MODULES, adapter_name: str = "default",
                 sigma_max: float | None = None) -> int:
        """Freeze the UNet and add a peft LoRA adapter (rank ``rank``, scale alpha/rank, alpha default = rank)
        on the spatial and temporal attention projections. Returns the number of trainable parameters.

        ``sigma_max``: if set, :meth:`sample` applies the adapter only on steps with σ ≤ it (the base model above)."""
        from peft import LoraConfig

        if sigma_max is not None and not sigma_max > 0:
            raise ValueError(f"SV3D.add_lora: sigma_max must be > 0 or None, got {sigma_max}")
        self.lora_sigma_max = None if sigma_max is None else float(sigma_max)

        self.unet.requires_grad_(False)
        cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                         init_lora_weights="gaussian", target_modules=list(target_modules))
        self.unet.add_adapter(cfg, adapter_name=adapter_name)
        return sum(p.numel() for p in self.unet.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ denoiser

    def denoise(
        self,
        x_noisy: Tensor,
        sigma: Tensor,
        clip_emb: Tensor,
        cond_latent: Tensor,
        polars_rad: Tensor,
        azimuths_rad: Tensor,
        cond_aug: Tensor,
    ) -> Tensor:
        """EDM denoiser D(x; σ): the predicted clean *scaled* latents of every frame.

        Args:
            x_noisy: [B, F, C, h, w] noisy scaled latents x = z0 + σ·n (C = the UNet's out_channels).
            sigma: [B] noise levels (or a scalar).
            clip_emb: [B, 1, D] CLIP image embedding of the input view (zeros = unconditional).
            cond_latent: [B, C, h, w] *unscaled* VAE latent of the noise-augmented input view.
            polars_rad: [B, F] polar angles, radians(90 - elevation).
            azimuths_rad: [B, F] azimuths relative to the input view, radians.
            cond_aug: [B] (or scalar) the noise-augmentation level used for ``cond_latent``.
        Returns:
            D: [B, F, C, h, w], dtype of ``x_noisy``.
        """
        B, F = x_noisy.shape[:2]
        C = self.unet.config.out_channels
        if x_noisy.ndim != 5 or x_noisy.shape[2] != C:
            raise ValueError(f"SV3D: latents must be [B, F, {C}, h, w] (the UNet's out_channels = latent_channels), "
                             f"got {tuple(x_noisy.shape)}: do the VAE's latent channels match the UNet's?")
        if cond_latent.shape != (B, *x_noisy.shape[2:]):
            raise ValueError(f"cond_latent must be [B, C, h, w] = {(B, *x_noisy.shape[2:])}, got {tuple(cond_latent.shape)}")
        D_cross = self.unet.config.cross_attention_dim
        if clip_emb.ndim != 3 or clip_emb.shape[0] != B or clip_emb.shape[-1] != D_cross:
            raise ValueError(f"clip_emb must be [B, 1, {D_cross}] (the UNet's cross_attention_dim), got {tuple(clip_emb.shape)}")
        dev, dt = x_noisy.device, self.unet.dtype
        sigma = torch.as_tensor(sigma, device=dev, dtype=torch.float32).reshape(-1).expand(B)  # [B]
        cond_aug = torch.as_tensor(cond_aug, device=dev, dtype=torch.float32).reshape(-1).expand(B)  # [B]
        c_skip, c_out, c_in, c_noise = (c.view(B, 1, 1, 1, 1) for c in self.edm.scalings(sigma))
        inp = torch.cat([c_in * x_noisy.float(), cond_latent.float()[:, None].expand(B, F, *cond_latent.shape[1:])],
                        dim=2)  # [B, F, 2C, h, w]
        ids = torch.stack([cond_aug[:, None].expand(B, F), polars_rad.to(dev).float().expand(B, F),
                           azimuths_rad.to(dev).float().expand(B, F)], dim=-1)  # [B, F, 3], fp32
        out = self.unet(inp.to(dt), c_noise.reshape(B), clip_emb.to(dt), ids).sample  # [B, F, C, h, w]
        D = c_skip * x_noisy.float() + c_out * out.float()  # [B, F, C, h, w]
        return D.to(x_noisy.dtype)

    # ------------------------------------------------------------------ training

    def cfg_keep_mask(self, batch_size: int, device=None, generator: torch.Generator | None = None) -> Tensor:
        """[B] float mask of the samples whose conditioning is kept (1) or dropped for CFG (0): each dropped with
        probability ``cfg_dropout`` in training mode, none in eval mode (or with ``cfg_dropout`` 0)."""
        if not (self.training and self.cfg_dropout > 0):
            return torch.ones(batch_size, device=device)
        gdev = generator.device if generator is not None else device
        return (torch.rand(batch_size, generator=generator, device=gdev) >= self.cfg_dropout).float().to(device)

    def training_loss(
        self,
        z0: Tensor,
        clip_emb: Tensor,
        cond_latent: Tensor,
        polars_rad: Tensor,
        azimuths_rad: Tensor,
        cond_aug: Tensor,
        generator: torch.Generator | None = None,
        weighting: str = "edm",
        keep: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Diffusion loss mean(λ(σ)·(D − z0)²), σ ~ exp(N(p_mean, p_std)).

        Args:
            z0: [B, F, C, h, w] ground-truth scaled latents of the orbit.
            clip_emb, cond_latent, polars_rad, azimuths_rad, cond_aug: as in :meth:`denoise`.
            generator: optional RNG for σ, the noise and the CFG-dropout mask.
            weighting: λ(σ): "edm" = (σ²+1)/σ² (EDM/SVD), "none" = 1 (a plain MSE of D against z0).
            keep: [B] CFG mask (1 = conditioned, 0 = CLIP embedding and conditioning latent zeroed), e.g. from
                :meth:`cfg_keep_mask` when the caller needs to know which samples were dropped; None = drawn here
                (after σ and the noise) with :meth:`cfg_keep_mask`.
        Returns:
            loss (scalar), D [B, F, C, h, w] (the prediction of z0, for L_3D), sigma [B].
        """
        if weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"SV3D.training_loss: weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
        B = z0.shape[0]
        dev = z0.device
        gdev = generator.device if generator is not None else dev
        sigma = self.edm.sample_sigma(B, device=dev, generator=generator)  # [B]
        noise = torch.randn(z0.shape, generator=generator, device=gdev, dtype=torch.float32).to(dev)
        x = z0.float() + sigma.view(B, 1, 1, 1, 1) * noise  # [B, F, C, h, w]
        if keep is None:
            keep = self.cfg_keep_mask(B, dev, generator)  # [B]
        keep = keep.to(dev).float()
        if not bool((keep == 1).all()):
            clip_emb = clip_emb * keep.view(B, 1, 1).to(clip_emb.dtype)
            cond_latent = cond_latent * keep.view(B, 1, 1, 1).to(cond_latent.dtype)
        D = self.denoise(x, sigma, clip_emb, cond_latent, polars_rad, azimuths_rad, cond_aug).float()
        sq = (D - z0.float()) ** 2  # [B, F, C, h, w]
        loss = (self.edm.loss_weight(sigma).view(B, 1, 1, 1, 1) * sq).mean() if weighting == "edm" else sq.mean()
        return loss, D, sigma

    # ------------------------------------------------------------------ sampling

    def make_scheduler(self) -> EulerDiscreteScheduler:
        """diffusers' Euler scheduler set up as EDM: Karras sigmas in [sigma_min, sigma_max] (ρ = 7), final σ = 0.

        ``prediction_type="sample"`` because :meth:`denoise` already returns D (CFG is applied to D,
        as Stability's sampler does); the scheduler then takes the Euler step x + (x − D)/σ · (σ' − σ).
        """
        if self.rho != 7.0:
            raise ValueError("SV3D: diffusers' Karras schedule uses rho = 7; other values are not supported")
        return EulerDiscreteScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="sample",
            use_karras_sigmas=True, sigma_min=self.sigma_min, sigma_max=self.sigma_max,
            timestep_spacing="linspace", final_sigmas_type="zero",
        )

    def sample(
        self,
        clip_emb: Tensor,
        cond_latent: Tensor,
        polars_rad: Tensor,
        azimuths_rad: Tensor,
        cond_aug: Tensor | float = 1e-5,
        num_steps: int | None = None,
        min_cfg: float | None = None,
        max_cfg: float | None = None,
        latents: Tensor | None = None,
        generator: torch.Generator | None = None,
        progress: bool = True,
        grad_last: int = 0,
        trace: list | None = None,
    ) -> Tensor:
        """Generate the orbit's scaled latents with Euler EDM and triangle CFG.

        Args:
            clip_emb: [B, 1, D]; cond_latent: [B, C, h, w] unscaled; polars_rad, azimuths_rad: [B, F].
            cond_aug: [B] or scalar (SV3D inference: 1e-5).
            num_steps, min_cfg, max_cfg: override the constructor's defaults.
            latents: optional [B, F, C, h, w] unit-variance starting noise (scaled by σ_max here).
            progress: show a tqdm bar over the steps.
            grad_last: K > 0 runs the last K sampler steps with autograd on (DRaFT-K, Clark et al. 2023): the
                result is differentiable with respect to the UNet's trainable parameters through those K steps
                only; the state entering them is a constant (the truncation). 0 (default): no graph at all.
            trace: if a list, each step run with autograd appends ``(x [B, F, C, h, w], sigma [B], D)``: the
                state it read (a constant), its σ and its guided prediction (for a KL anchor on those steps).
        Returns:
            [B, F, C, h, w] scaled latents (decode with ``VAE.decode``). As in Stability's script, the
            caller may replace the last (input-view) frame with the input image after decoding.
        """
        from tqdm.auto import tqdm

        B, F = azimuths_rad.shape
        C, (h, w) = self.unet.config.out_channels, cond_latent.shape[-2:]
        dev = cond_latent.device
        sched = self.make_scheduler()
        sched.set_timesteps(num_steps or self.num_steps, device=dev)
        sched.set_begin_index(0)  # timesteps above the beta schedule's range repeat; index by position
        sigmas = sched.sigmas.to(dev)  # [S+1], last = 0
        S = len(sched.timesteps)
        if not 0 <= grad_last <= S:
            raise ValueError(f"SV3D.sample: grad_last must be in [0, {S}] (the sampler's steps), got {grad_last}")
        if latents is None:
            gdev = generator.device if generator is not None else dev
            latents = torch.randn(B, F, C, h, w, generator=generator, device=gdev).to(dev)
        x = latents.float() * sigmas[0]  # [B, F, C, h, w]
        guide = self.guidance(clip_emb, cond_latent, polars_rad, azimuths_rad, cond_aug, B, F,
                               self.min_cfg if min_cfg is None else min_cfg,
                               self.max_cfg if max_cfg is None else max_cfg)
        for i, t in enumerate(tqdm(sched.timesteps, disable=not progress, desc="SV3D sampling")):
            grad = i >= S - grad_last
            with torch.set_grad_enabled(grad), self._adapter_mode(float(sigmas[i]), grad):
                if i == S - grad_last:
                    x = x.detach()  # the truncation: nothing before the last K steps is differentiated
                sched.scale_model_input(x, t)  # bookkeeping only; denoise() applies c_in itself
                sigma = sigmas[i].expand(B)
                D = self.guided_denoise(x, sigma, guide)
                if trace is not None and torch.is_grad_enabled():
                    trace.append((x.detach(), sigma, D))
                x = sched.step(D, t, x).prev_sample.float()
        return x

    def _adapter_mode(self, sigma: float, grad: bool):
        """A sampler step's LoRA: off above ``lora_sigma_max`` (the adapter acts only where it was trained),
        folded into the base weights on steps without autograd (same output, a third less time), else as is."""
        if self.lora_sigma_max is not None and sigma > self.lora_sigma_max:
            return lora_off(self.unet)
        return contextlib.nullcontext() if grad else lora_folded(self.unet)

    def guidance(self, clip_emb: Tensor, cond_latent: Tensor, polars_rad: Tensor, azimuths_rad: Tensor,
                  cond_aug: Tensor | float, B: int, F: int, min_cfg: float, max_cfg: float) -> dict:
        """The sampler's conditioning: per-frame CFG scales [F] and, with CFG, the [uncond; cond] inputs."""
        scales = triangle_cfg_scales(F, min_cfg, max_cfg).to(cond_latent.device)  # [F]
        cond_aug = torch.as_tensor(cond_aug, device=cond_latent.device, dtype=torch.float32).reshape(-1).expand(B)
        use_cfg = bool((scales > 1.0).any())
        if use_cfg:  # one UNet call on [uncond; cond]
            return {"scales": scales, "cfg": True, "clip": torch.cat([torch.zeros_like(clip_emb), clip_emb]),
                    "lat": torch.cat([torch.zeros_like(cond_latent), cond_latent]),
                    "pol": torch.cat([polars_rad, polars_rad]), "azi": torch.cat([azimuths_rad, azimuths_rad]),
                    "aug": torch.cat([cond_aug, cond_aug])}
        return {"scales": scales, "cfg": False, "clip": clip_emb, "lat": cond_latent, "pol": polars_rad,
                "azi": azimuths_rad, "aug": cond_aug}

    def guided_denoise(self, x: Tensor, sigma: Tensor, guide: dict) -> Tensor:
        """D(x; σ) with SV3D's triangle CFG (``guide`` from :meth:`guidance`): x [B, F, C, h, w] -> [B, F, C, h, w]."""
        if not guide["cfg"]:
            return self.denoise(x, sigma, guide["clip"], guide["lat"], guide["pol"], guide["azi"], guide["aug"]).float()
        F = x.shape[1]
        D_u, D_c = self.denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), guide["clip"], guide["lat"], guide["pol"],
                                guide["azi"], guide["aug"]).float().chunk(2)
        return D_u + guide["scales"].view(1, F, 1, 1, 1) * (D_c - D_u)  # [B, F, C, h, w]
