"""Stage 2: geometric distillation of the frozen GS decoder into SV3D with LoRA (GSV3D Sec. 3).

Per object: z_gt = VAE latents of the 21 orbit frames; σ ~ exp(N(p_mean, p_std)); D = SV3D's EDM
denoiser prediction of the clean latents; ``L_2D = mean(λ(σ)·(D − z_gt)²)`` with λ = 1 (the paper's plain
diffusion loss, ``l2d_weighting: none``) or EDM's (σ²+1)/σ² (``edm``). N frames of D go through the frozen
decoder (with DINO tokens of the input view R) to Gaussians, rendered at all Q views: ``L_3D`` as in stage 1.
``L_distill = λ_2D · L_2D + λ_3D · L_3D [+ λ_KL · KL]``. The paper leaves the recipe underdetermined; its unknowns are
keys (:mod:`gsv3d_pl.stages.distill_terms`): ``l3d_mode`` ``one_step`` (the paper's wording: L_3D renders D at a
training σ, optionally drawn from its own distribution, weighted by min-SNR-γ, applied with a probability) or
``sampler`` (DRaFT-K: L_3D renders an orbit sampled from noise with the LoRA on, backpropagated through the last K
of S sampler steps; L_2D or a KL to the base model anchors it). Every ``diagnostics_every`` steps the norm of each
term's gradient on the LoRA is logged (:mod:`gsv3d_pl.stages.distill_diagnostics`). L_3D (one-step) leaves out the objects whose conditioning was dropped for
classifier-free guidance (``mask_l3d_cfg_dropped``: D of an unconditioned sample is not a reconstruction of
*this* image's object, so its 3D target says nothing) and, optionally, those whose σ is above ``sigma_3d_max``
(at large σ, D is a blurry mean and its 3D reconstruction carries little signal). The frozen decoder is
gradient-checkpointed while L_3D backpropagates through it (``decoder_gradient_checkpointing``).

``gsv3d test`` scores each test batch once per entry of ``test_variants``: ``undistilled`` (the LoRA
switched off: SV3D as it was) and ``distilled`` (the LoRA on), with the same conditioning and the same sampler
seed, so Table 1's "SV3D" and "GSV3D" rows of ours come from one run on the same objects and noise.

Only the LoRA parameters train; checkpoints hold them (and the optimizer state) only, and the end of fit
exports the adapter with diffusers' ``save_lora_adapter`` into ``<run>/lora/``.
"""

from __future__ import annotations

import json
import logging
import os

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from gsv3d_pl.batch import MultiViewBatch
from gsv3d_pl.io import atomic_dir
from gsv3d_pl.metrics.results import TEST_VARIANTS
from gsv3d_pl.models import SV3D, VAE, CLIPImageEmbedder, DINOEncoder
from gsv3d_pl.models.frozen import fingerprint, freeze
from gsv3d_pl.models.sv3d import LOSS_WEIGHTINGS
from gsv3d_pl.orbit import INPUT_FRAME, NUM_FRAMES
from gsv3d_pl.stages.common import (
    StageBase,
    check_dino,
    check_vae_factor,
    gather_views,
    orbit_latents,
    sample_view_subset,
    sv3d_conditioning,
)
from gsv3d_pl.stages.distill_diagnostics import term_grad_norms, write_diagnostics
from gsv3d_pl.stages.distill_eval import DistillEvaluation
from gsv3d_pl.stages.distill_terms import L3D_MODES, kl_anchor, min_snr_weight, one_step_prediction, sampler_orbit
from gsv3d_pl.stages.handoff import DECODER_CKPT_KEY, load_decoder
from gsv3d_pl.stages.losses import L3DWeights, render_loss
from gsv3d_pl.weights import WeightSpec

__all__ = ["DistillStage"]

log = logging.getLogger(__name__)


class DistillStage(DistillEvaluation, StageBase):
    """Stage 2: LoRA on SV3D's UNet, trained with ``L_2D + λ_3D · L_3D`` through the frozen GS decoder.

    Args:
        vae, dino, clip: frozen encoders (dino None = no DINO; the stage-1 decoder must then have dino_dim None).
            They must be the encoders stage 1 used: checked against the decoder checkpoint's record.
        sv3d: the SV3D model (UNet + EDM); its base weights are frozen, LoRA is injected here.
        decoder_ckpt: the stage-1 DecoderStage checkpoint (e.g. runs/decoder_tiny/checkpoints/last.ckpt). The
            frozen decoder is rebuilt from it alone: its class, init args and weights (stage hand-off).
        decoder_classes: decoder classes outside ``gsv3d_pl`` that ``decoder_ckpt`` may name, as
            ``module.Class`` (an extension's decoder, docs/extending.md). A checkpoint naming any other class is
            refused: it is data and cannot choose code to run (docs/security.md).
        lora_rank, lora_alpha (None = rank, i.e. scale 1), lora_targets, lora_dropout: the peft LoraConfig.
        lora_sigma_max: the sampler applies the LoRA only on steps with σ ≤ this, the base model above (``sampler``
            recipes without L_2D: the adapter then acts only on the steps DRaFT-K trains); None = every step.
        num_input_views: frames of D fed to the decoder. None = the datamodule's ``input_indices`` (N random
            orbit frames per object); an int = that many distinct random orbit frames per object and step.
        lambda_3d: weight of L_3D; lambda_rgb, lambda_depth, depth_loss_on: L_3D as in stage 1.
        lambda_2d: weight of L_2D (0 = no L_2D; in ``sampler`` mode it is the anchor that keeps the LoRA a denoiser).
        l3d_mode: ``one_step`` (L_3D on the denoiser's one-step prediction D at a training σ: the paper's wording)
            or ``sampler`` (L_3D on an orbit sampled with the LoRA on, DRaFT-K through ``sampler_steps`` /
            ``sampler_grad_steps``).
        l3d_p_mean, l3d_p_std: ``one_step``: σ of L_3D's prediction ~ exp(N(l3d_p_mean, l3d_p_std)), drawn apart
            from L_2D's (one more UNet pass); None (both) = L_3D renders L_2D's own D (the paper-literal reading).
        l3d_min_snr_gamma: ``one_step``: weight each object's L_3D by min(1/σ², γ) (DiffSplat, γ = 1); None = 1.
        l3d_prob: the probability that a training step applies L_3D at all (DiffSplat applies its rendering loss
            with a probability); 1 = every step.
        sampler_steps, sampler_grad_steps: ``sampler``: S Euler steps from noise (SV3D's sampler and CFG; use the
            evaluation's ``val_sample_steps``), gradients through the last K only. K = 1 is weak on the Karras
            schedule (its σ is σ_min, where D ≈ x); K ≥ 2 is the sensible minimum.
        l3d_log: back-propagate L_3D as mean over objects of log L_3D (PSNR's form): each object's gradient divided
            by its own loss, so hard objects do not drown the rest; the logged value is unchanged.
        lambda_kl: ``sampler``: weight of the KL anchor, mean ||D_LoRA − D_base||² on the differentiated steps.
        diagnostics_every: every this many training steps, log each term's gradient norm on the LoRA (one extra
            backward per term); 0 = never. The end of fit writes ``distill_diagnostics.json`` / ``.png``.
        sigma_3d_max: apply L_3D only to objects with σ ≤ this (None = always).
        l2d_weighting: λ(σ) of L_2D: "none" (the paper's plain MSE between D and z_gt) or "edm" ((σ²+1)/σ², the
            weighting of SVD/SV3D fine-tunes, which up-weights small σ).
        mask_l3d_cfg_dropped: leave out of L_3D the objects whose conditioning (CLIP embedding and conditioning
            latent) ``sv3d.cfg_dropout`` dropped this step; they still train L_2D (the unconditional denoiser CFG
            needs). L_3D stays a mean over the batch, the dropped objects weighted 0 (as ``sigma_3d_max`` does).
        decoder_gradient_checkpointing: recompute the frozen decoder's transformer blocks in backward while L_3D
            backpropagates through it to D (the decoder's ``gradient_checkpointing``; gradients are unchanged,
            activation memory drops to one block's). Its stage-1 setting is not used here. A decoder without the
            attribute trains unchanged, with a warning.
        cond_aug: noise augmentation of the conditioning image (SV3D inference uses 1e-5).
        lr, weight_decay, betas, warmup_steps, min_lr_ratio: AdamW + warmup + cosine over the LoRA parameters.
        val_sample_steps: Euler-EDM steps of the validation sampler (generated orbit -> decoder -> novel views).
        render_chunk_views, views_per_step, background, render_backend, use_latent_cache: as in DecoderStage.
        heldout_e2e: at the end of fit, run :func:`~gsv3d_pl.stages.e2e.end_to_end_evaluation` on the test split
            (image -> SV3D with and without the LoRA -> decoder -> novel views, against copying the input image
            and the mean training image) and write ``<run>/heldout_e2e.json``.
        heldout_max_objects: cap on the held-out objects scored (None = all); e2e_seed: the evaluation sampler's seed
            (validation, ``gsv3d test`` and the held-out check): each object starts from noise seeded by (e2e_seed,
            its uid), the same with the LoRA on and off.
        test_variants: what ``gsv3d test`` scores, in this order, each on every test batch with the same conditioning
            and sampler seed: a non-empty subset of :data:`TEST_VARIANTS` (``undistilled`` = the LoRA off,
            ``distilled`` = on). Each variant's metrics go to metrics.json's ``variants``; the top-level metrics are
            :func:`primary_variant`'s.
        replace_input_frame: in validation and the end-to-end evaluation, the decoder reads the input image's own
            latent at frame ``INPUT_FRAME`` instead of the sampled one, as ``gsv3d predict`` does (its
            ``replace_input_frame``), so both score the same pipeline. Training's L_3D is unchanged (it decodes
            the denoiser's predictions of every picked frame, as the paper does).
    """

    batch_keys = ("input_indices", "input_images", "cond_image", "target_images", "target_alphas",
                  "target_depths", "target_c2w", "target_K", "orbit_polars_rad", "orbit_azimuths_rad")

    def __init__(
        self,
        vae: VAE,
        dino: DINOEncoder | None,
        clip: CLIPImageEmbedder,
        sv3d: SV3D,
        decoder_ckpt: str,
        decoder_classes: list[str] = (),
        lora_rank: int = 4,
        lora_alpha: float | None = None,
        lora_targets: list[str] = ("to_q", "to_k", "to_v", "to_out.0"),
        lora_dropout: float = 0.0,
        lora_sigma_max: float | None = None,
        l3d_log: bool = False,
        num_input_views: int | None = None,
        lambda_3d: float = 1.0,
        lambda_2d: float = 1.0,
        l3d_mode: str = "one_step",
        l3d_p_mean: float | None = None,
        l3d_p_std: float | None = None,
        l3d_min_snr_gamma: float | None = None,
        l3d_prob: float = 1.0,
        sampler_steps: int = 10,
        sampler_grad_steps: int = 2,
        lambda_kl: float = 0.0,
        diagnostics_every: int = 5,
        lambda_rgb: float = 1.0,
        lambda_depth: float = 1.0,
        depth_loss_on: str = "all",
        sigma_3d_max: float | None = None,
        cond_aug: float = 1e-5,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.0,
        val_sample_steps: int = 50,
        render_chunk_views: int | None = None,
        views_per_step: int | None = None,
        background: float = 1.0,
        render_backend: str = "auto",
        use_latent_cache: bool = True,
        heldout_e2e: bool = False,
        heldout_max_objects: int | None = None,
        e2e_seed: int = 0,
        replace_input_frame: bool = True,
        l2d_weighting: str = "none",
        mask_l3d_cfg_dropped: bool = True,
        decoder_gradient_checkpointing: bool = True,
        test_variants: list[str] = TEST_VARIANTS,
    ):
        super().__init__(lr, weight_decay, betas, warmup_steps, min_lr_ratio, background, render_chunk_views,
                         render_backend)
        for key, val in (("lambda_3d", lambda_3d), ("lambda_2d", lambda_2d), ("lambda_kl", lambda_kl),
                         ("diagnostics_every", diagnostics_every)):
            if val < 0:
                raise ValueError(f"model.init_args.{key} must be >= 0, got {val}")
        if l3d_mode not in L3D_MODES:
            raise ValueError(f"model.init_args.l3d_mode must be one of {L3D_MODES}, got {l3d_mode!r}")
        if not 0.0 <= l3d_prob <= 1.0:
            raise ValueError(f"model.init_args.l3d_prob must be in [0, 1], got {l3d_prob}")
        if (l3d_p_mean is None) != (l3d_p_std is None) or (l3d_p_std is not None and l3d_p_std < 0):
            raise ValueError("model.init_args.l3d_p_mean and l3d_p_std are set together (l3d_p_std >= 0) or both "
                             f"null (L_3D renders L_2D's prediction), got {l3d_p_mean} and {l3d_p_std}")
        if l3d_min_snr_gamma is not None and l3d_min_snr_gamma <= 0:
            raise ValueError(f"model.init_args.l3d_min_snr_gamma must be > 0 or null, got {l3d_min_snr_gamma}")
        if not 1 <= sampler_grad_steps <= sampler_steps:
            raise ValueError(f"model.init_args.sampler_grad_steps must be in [1, sampler_steps={sampler_steps}], "
                             f"got {sampler_grad_steps}")
        if num_input_views is not None and not 1 <= num_input_views <= NUM_FRAMES:
            raise ValueError(f"model.init_args.num_input_views must be in [1, {NUM_FRAMES}] (the orbit's frames) or "
                             f"null, got {num_input_views}")
        if l2d_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"model.init_args.l2d_weighting must be one of {LOSS_WEIGHTINGS}, got {l2d_weighting!r}")
        if lora_sigma_max is not None and (l3d_mode != "sampler" or lambda_2d > 0):
            raise ValueError("model.init_args.lora_sigma_max gates the LoRA by the sampler's σ: it needs "
                             f"l3d_mode 'sampler' and lambda_2d 0 (got {l3d_mode!r}, {lambda_2d}); set it to null")
        if l3d_log and render_chunk_views:
            raise ValueError("model.init_args.l3d_log needs each object's whole L_3D in one render chunk: set "
                             f"render_chunk_views to null (got {render_chunk_views})")
        variants = [str(v) for v in test_variants]
        if not variants or len(set(variants)) != len(variants) or not set(variants) <= set(TEST_VARIANTS):
            raise ValueError(f"model.init_args.test_variants must be distinct names out of {list(TEST_VARIANTS)} "
                             f"(at least one), got {list(test_variants)}")
        self.vae, self.clip, self.dino = freeze(vae), freeze(clip), freeze(dino)
        self.decoder_ckpt = str(decoder_ckpt)
        self.decoder_classes = [str(c) for c in decoder_classes]
        decoder, meta = load_decoder(decoder_ckpt, self.decoder_classes)  # fails here, at start, if unreadable
        self.decoder = freeze(decoder)
        if hasattr(decoder, "gradient_checkpointing"):
            decoder.gradient_checkpointing = bool(decoder_gradient_checkpointing)
        elif decoder_gradient_checkpointing:
            # A decoder of the user's own need not support it: checkpointing only saves memory, never changes a
            # gradient, so going on without it is safe; say so once.
            rank_zero_warn(f"model.init_args.decoder_gradient_checkpointing is true but the decoder of "
                           f"{self.decoder_ckpt!r} ({type(decoder).__name__}) has no gradient_checkpointing "
                           "attribute: L_3D backpropagates through it without checkpointing (more memory). "
                           "Set the key to false to silence this.")
        check_dino(dino, decoder, f"{DECODER_CKPT_KEY} {self.decoder_ckpt!r}")
        check_vae_factor(vae, decoder, f"{DECODER_CKPT_KEY} {self.decoder_ckpt!r}")
        self._check_encoders(meta)
        self._decoder_record = meta.get("decoder")
        self._decoder_fp = fingerprint(decoder)  # the LoRA of a checkpoint is tied to this decoder

        self.sv3d = sv3d
        self._unet_base_fp = fingerprint(sv3d.unet)  # the (unsaved) base UNet a checkpoint must match
        n_lora = sv3d.add_lora(rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout,
                               target_modules=tuple(lora_targets), sigma_max=lora_sigma_max)
        trainable = [n for n, p in self.named_parameters() if p.requires_grad]
        non_lora = [n for n in trainable if "lora_" not in n]
        assert not non_lora, f"only LoRA parameters may train, found {non_lora[:5]}"
        assert trainable, "LoRA injection produced no trainable parameters (check lora_targets)"
        self.num_lora_params = int(n_lora)
        rank_zero_info(f"[distill] LoRA rank {lora_rank} on {list(lora_targets)}: {self.num_lora_params:,} trainable "
                       f"parameters in {len(trainable)} tensors; everything else frozen")

        self.loss_weights = L3DWeights(lambda_rgb, lambda_depth, 0.0, depth_loss_on)
        self.lambda_3d, self.lambda_2d, self.lambda_kl = float(lambda_3d), float(lambda_2d), float(lambda_kl)
        self.l3d_mode = l3d_mode
        self.l3d_sigma = None if l3d_p_mean is None else (float(l3d_p_mean), float(l3d_p_std))
        self.l3d_min_snr_gamma = l3d_min_snr_gamma
        self.l3d_prob = float(l3d_prob)
        self.l3d_log = bool(l3d_log)
        self.sampler_steps, self.sampler_grad_steps = int(sampler_steps), int(sampler_grad_steps)
        self.diagnostics_every = int(diagnostics_every)
        self._diag_rows: list[dict] = []
        self.sigma_3d_max = sigma_3d_max
        self.num_input_views = num_input_views
        self.cond_aug = float(cond_aug)
        self.val_sample_steps = int(val_sample_steps)
        self.views_per_step = views_per_step
        self.use_latent_cache = use_latent_cache
        self.heldout_e2e, self.e2e_seed = bool(heldout_e2e), int(e2e_seed)
        self.replace_input_frame = bool(replace_input_frame)
        self.l2d_weighting = l2d_weighting
        self.mask_l3d_cfg_dropped = bool(mask_l3d_cfg_dropped)
        self.test_variants = tuple(variants)
        self.heldout_max_objects = heldout_max_objects
        # num_input_views is also a datamodule hparam (Lightning refuses differing duplicates): not logged here
        self.save_hyperparameters(ignore=["sv3d", "vae", "clip", "dino", "num_input_views"])

    def _check_encoders(self, meta: dict) -> None:
        """The decoder was trained on one VAE's latents (and one DINO): refuse others (tiny presets are random)."""
        want_vae = meta.get("vae_key")
        have_vae = self.vae.weights_key() if hasattr(self.vae, "weights_key") else fingerprint(self.vae)
        if want_vae is not None and want_vae != have_vae:
            raise ValueError(
                f"{DECODER_CKPT_KEY}: {self.decoder_ckpt!r} was trained on latents of another VAE (weights key {want_vae} "
                f"vs {have_vae} here). Use the same model.init_args.vae as stage 1 (random-init 'tiny' presets must "
                "be built identically, e.g. the same seed_everything)."
            )
        want_dino = meta.get("dino_fingerprint")
        if want_dino is not None and self.dino is not None and want_dino != fingerprint(self.dino):
            raise ValueError(f"{DECODER_CKPT_KEY}: {self.decoder_ckpt!r} was trained with another DINO encoder "
                             "(fingerprint mismatch); use the same model.init_args.dino as stage 1.")

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["gsv3d"] = {"stage": "distill", "unet_base_fingerprint": self._unet_base_fp,
                               "decoder_ckpt": self.decoder_ckpt, "decoder": self._decoder_record,
                               "decoder_fingerprint": self._decoder_fp, "num_lora_params": self.num_lora_params}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get("gsv3d", {})
        fp = meta.get("unet_base_fingerprint")
        if fp is not None and fp != self._unet_base_fp:
            raise ValueError(
                "this DistillStage checkpoint holds LoRA weights for another base UNet (fingerprint "
                f"{fp} vs {self._unet_base_fp}); use the same model.init_args.sv3d (and seed for 'tiny') as its run"
            )
        fp = meta.get("decoder_fingerprint")
        if fp is not None and fp != self._decoder_fp:
            raise ValueError(
                f"this DistillStage checkpoint's LoRA was distilled through another decoder than {DECODER_CKPT_KEY} "
                f"{self.decoder_ckpt!r} holds now (it was {meta.get('decoder_ckpt')!r}; was stage 1 retrained or "
                "resumed since?); point the key at the stage-1 checkpoint of that run"
            )

    @staticmethod
    def weight_specs(init_args: dict, key_prefix: str = "model") -> list[WeightSpec]:
        """The stage-1 checkpoint is an external file of this config too (``gsv3d weights`` lists it)."""
        path = init_args.get("decoder_ckpt")
        return [WeightSpec(name="stage-1 DecoderStage checkpoint (the frozen decoder)",
                           config_key=f"{key_prefix}.init_args.decoder_ckpt", explicit=path or "<unset>",
                           source="train stage 1, e.g. `gsv3d fit --config configs/decoder/tiny.yaml`")]

    def on_fit_start(self) -> None:
        for lg in self.loggers:
            lg.log_hyperparams({"num_lora_params": self.num_lora_params})

    # ---- conditioning -------------------------------------------------------------------------------------
    @torch.no_grad()
    def orbit_latents(self, batch: MultiViewBatch) -> Tensor:
        """z_gt: scaled latents of the 21 orbit frames (target views 0..20), [B, 21, 4, h, w]."""
        return orbit_latents(self.vae, batch)

    @torch.no_grad()
    def conditioning(self, batch: MultiViewBatch) -> dict[str, Tensor | None]:
        """SV3D's and the decoder's conditioning of the input view R (cond_image [B, 3, H, W] = orbit frame
        ``INPUT_FRAME``)."""
        img = batch["cond_image"].float()
        cond_aug = torch.full((img.shape[0],), self.cond_aug, device=img.device)  # [B]
        return {**sv3d_conditioning(self.vae, self.clip, batch, cond_aug),
                "dino": None if self.dino is None else self.dino(img).float()}  # dino [B, T, C]

    def pick_frames(self, batch: MultiViewBatch) -> Tensor:
        """Orbit frames of D fed to the decoder, [B, N] long."""
        if self.num_input_views is None:
            idx = batch["input_indices"].long()
            if (idx >= NUM_FRAMES).any():
                raise ValueError(f"input_indices must index orbit frames (< {NUM_FRAMES}) for the distill stage")
            return idx
        B = batch["target_images"].shape[0]
        return torch.rand(B, NUM_FRAMES, device=self.device).argsort(dim=1)[:, : self.num_input_views]

    def decode_frames(self, latents: Tensor, idx: Tensor, batch: MultiViewBatch, dino: Tensor | None):
        """Frozen decoder on frames ``idx`` [B, N] of orbit latents [B, 21, 4, h, w] -> Gaussians [B]."""
        c2w = gather_views(batch["target_c2w"].float(), idx)  # [B, N, 4, 4]
        K = gather_views(batch["target_K"].float(), idx)  # [B, N, 3, 3]
        with self.autocast():
            return self.decoder(gather_views(latents, idx), c2w, K, dino)

    # ---- training -------------------------------------------------------------------------------------------
    def distill_losses(self, batch: MultiViewBatch, generator: torch.Generator | None = None,
                       use_2d: bool = True, c: dict | None = None, keep: Tensor | None = None,
                       parts: dict | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """(L_distill, terms). ``use_2d=False`` leaves L_2D out of the returned loss (for gradient tests); ``c``:
        the batch's :meth:`conditioning` if already computed; ``keep``: [B] CFG mask (1 = conditioned) instead of
        drawing one with ``sv3d.cfg_dropout`` (tests); ``parts``: if a dict, filled with the weighted terms with
        their graphs (``l2d``, ``l3d``, ``kl``) and the σ each saw (``sigma_2d``, ``sigma_3d``), for diagnostics."""
        z_gt = self.orbit_latents(batch)  # [B, 21, C, h, w]
        c = self.conditioning(batch) if c is None else c
        B = z_gt.shape[0]
        dev = z_gt.device
        if keep is None:  # drawn here, not inside training_loss, so that L_3D knows which samples were dropped
            keep = self.sv3d.cfg_keep_mask(B, dev, generator)  # [B], all ones in eval mode
        keep = keep.to(dev).float()
        # A sampler recipe without L_2D needs no one-step prediction in training: no backward through it, and its
        # UNet pass (for the log only) runs on diagnostic steps alone.
        need_2d = not (self.training and self.l3d_mode == "sampler" and self.lambda_2d == 0)
        terms: dict[str, Tensor] = {"cfg_dropped": 1.0 - keep.mean()}
        zero = torch.zeros((), device=dev)
        loss, info = zero, {"l2d": zero, "l3d": zero, "kl": zero, "sigma_2d": None}
        if need_2d or parts is not None:
            with self.autocast(), torch.set_grad_enabled(torch.is_grad_enabled() and need_2d):
                l2d, D, sigma = self.sv3d.training_loss(z_gt, c["clip_emb"], c["cond_latent"], c["polars"],
                                                        c["azimuths"], c["cond_aug"], generator=generator,
                                                        weighting=self.l2d_weighting, keep=keep)
            terms["l2d"] = l2d.detach()
            loss = self.lambda_2d * l2d if use_2d and need_2d else zero
            info.update(l2d=loss, sigma_2d=float(sigma.float().log().mean().exp()))
        apply_3d = self.lambda_3d > 0 and (not self.training or self.l3d_prob >= 1.0 or
                                           float(torch.rand((), generator=generator)) < self.l3d_prob)
        if apply_3d and self.l3d_mode == "sampler":
            trace: list = []
            lat, sigma3 = sampler_orbit(self.sv3d, c, self.sampler_steps, self.sampler_grad_steps, generator,
                                        trace if self.lambda_kl > 0 else None)  # [B, 21, C, h, w]
            if self.replace_input_frame:  # the evaluation's pipeline: frame 20 is the input image's latent
                lat = torch.cat([lat[:, :INPUT_FRAME], self.vae.encode(batch["cond_image"].float()).float()[:, None],
                                 lat[:, INPUT_FRAME + 1:]], dim=1)
            mask = torch.ones(B, device=dev)  # [B] the sampler conditions every object (no CFG dropout)
            l3d = self._l3d(batch, lat, c, mask, terms)
            loss = loss + self.lambda_3d * l3d
            info.update(l3d=self.lambda_3d * l3d, sigma_3d=float(sigma3))
            if self.lambda_kl > 0:
                kl = kl_anchor(self.sv3d, c, trace)
                loss = loss + self.lambda_kl * kl
                terms["kl"] = kl.detach()
                info["kl"] = self.lambda_kl * kl
        elif apply_3d:
            mask = torch.ones(B, device=dev)  # [B]
            if self.l3d_sigma is not None:  # L_3D's own σ draw and one more denoiser pass
                p_mean, p_std = self.l3d_sigma
                gdev = generator.device if generator is not None else dev
                sigma = (p_mean + p_std * torch.randn(B, generator=generator, device=gdev)).exp().to(dev)  # [B]
                with self.autocast():
                    D = one_step_prediction(self.sv3d, z_gt, c, keep, sigma, generator)
            if self.sigma_3d_max is not None:
                mask = (sigma <= self.sigma_3d_max).float()
            if self.mask_l3d_cfg_dropped:
                mask = mask * keep
            if self.l3d_min_snr_gamma is not None:
                mask = mask * min_snr_weight(sigma, self.l3d_min_snr_gamma).to(dev)
            terms["l3d_fraction"] = (mask > 0).float().mean()
            if mask.any():
                l3d = self._l3d(batch, D.float(), c, mask, terms)
                loss = loss + self.lambda_3d * l3d
                info.update(l3d=self.lambda_3d * l3d, sigma_3d=float(sigma.float().log().mean().exp()))
        terms.setdefault("l3d_fraction", torch.tensor(float(apply_3d), device=dev))
        terms["loss"] = loss.detach()
        if parts is not None:
            parts.update(info)
        return loss, terms

    def _l3d(self, batch: MultiViewBatch, latents: Tensor, c: dict, mask: Tensor, terms: dict) -> Tensor:
        """L_3D of orbit latents [B, 21, C, h, w]: the decoder on the picked frames, rendered at the (subset of)
        target views against the ground truth, objects weighted by ``mask`` [B]. Adds its parts to ``terms``."""
        B = latents.shape[0]
        gaussians = self.decode_frames(latents, self.pick_frames(batch), batch, c["dino"])
        Q = batch["target_images"].shape[1]
        sub = sample_view_subset(B, Q, self.views_per_step if self.training else None, latents.device)
        tg = [batch[k].float() for k in ("target_c2w", "target_K", "target_images", "target_alphas", "target_depths")]
        if sub is not None:
            tg = [gather_views(t, sub) for t in tg]
        l3d, t3 = render_loss(gaussians, *tg, self.loss_weights, object_weights=mask, background=self.background,
                              backend=self.render_backend, chunk=self.render_chunk_views,
                              log_objects=self.l3d_log and self.training)
        terms.update({k: v.mean() for k, v in t3.items()})  # rgb, depth, any new term of L_3D
        terms["l3d"] = l3d.detach()
        return l3d

    def training_step(self, batch: MultiViewBatch, batch_idx: int) -> Tensor:
        diag = self.diagnostics_every > 0 and self.global_step % self.diagnostics_every == 0
        parts: dict | None = {} if diag else None
        loss, terms = self.distill_losses(batch, parts=parts)
        self._check_loss(terms)
        B = batch["target_images"].shape[0]
        self.log("train/loss", terms["loss"], prog_bar=True, batch_size=B)
        for k, v in terms.items():
            if k != "loss":
                self.log(f"train/{k}", v, batch_size=B, prog_bar=k in ("l2d", "l3d"))
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=B)
        if diag:
            self._log_diagnostics(parts, B)
        return loss

    def _log_diagnostics(self, parts: dict, batch_size: int) -> None:
        """Each weighted term's gradient norm on the LoRA (and the σ it saw) into metrics.csv and the run's record."""
        norms = term_grad_norms({k: parts[k] for k in ("l2d", "l3d", "kl")}, [p for _, p in self.trainable_parameters()])
        row = {"step": int(self.global_step), "sigma_2d": parts["sigma_2d"], "sigma_3d": parts.get("sigma_3d"),
               **{f"grad_{k}": v for k, v in norms.items()}}
        row["grad_ratio_3d_2d"] = norms["l3d"] / norms["l2d"] if norms["l2d"] > 0 else None
        self._diag_rows.append(row)
        for k, v in row.items():
            if k != "step" and v is not None:
                self.log(f"diag/{k}", float(v), batch_size=batch_size, on_step=True, on_epoch=False)

    # ---- export ---------------------------------------------------------------------------------------------
    def export_lora(self, out_dir: str | os.PathLike) -> str:
        """Write the adapter with diffusers' ``save_lora_adapter`` into ``out_dir`` (atomically, via a tmp dir).

        Load it back with ``unet.load_lora_adapter(out_dir, prefix=None,
        weight_name="pytorch_lora_weights.safetensors")`` (the default prefix silently loads nothing). With
        ``lora_sigma_max`` set, ``gsv3d_lora.json`` records it: the adapter is meant for sampler steps with σ ≤ it.
        """
        out_dir = os.path.abspath(os.fspath(out_dir))
        with atomic_dir(out_dir) as tmp:
            self.sv3d.unet.save_lora_adapter(tmp)
            if self.sv3d.lora_sigma_max is not None:
                with open(os.path.join(tmp, "gsv3d_lora.json"), "w") as f:
                    json.dump({"sigma_max": self.sv3d.lora_sigma_max}, f)
        return out_dir

    def on_fit_end(self) -> None:
        if self.trainer.global_rank != 0 or getattr(self.trainer, "interrupted", False):
            return
        path = self.export_lora(os.path.join(self._root_dir(), "lora"))
        if self._diag_rows:
            summ = write_diagnostics(self._diag_rows, self._root_dir())
            print(f"[distill] gradient diagnostics ({summ['num_rows']} steps; median |grad L_3D| / |grad L_2D| = "
                  f"{summ['grad_ratio_3d_2d_median']}) written to {self._root_dir()}/distill_diagnostics.json/.png",
                  flush=True)
        print(f"[distill] LoRA adapter ({self.num_lora_params:,} parameters) exported to {path}", flush=True)
        dm = getattr(self.trainer, "datamodule", None)
        if self.heldout_e2e and dm is not None and hasattr(dm, "test_dataloader"):
            self.run_e2e_eval(dm)
