"""Stage 1: train the GS decoder on multi-view renders (GSV3D Sec. 3, "GS Decoder").

Per object: N of the Q views are the input (their VAE latents + cameras, and DINO tokens of the input
view R); the decoder predicts pixel-aligned Gaussians, which are rendered at all Q views and compared
with the ground truth: ``L_3D = λ_rgb · MSE(rgb) + λ_depth · MSE(depth) [+ λ_lpips · LPIPS]``
(see :mod:`gsv3d_pl.stages.losses` for exactly which pixels the depth term covers).
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor, nn

from gsv3d_pl.batch import MultiViewBatch, NovelViews
from gsv3d_pl.io import write_json_atomic
from gsv3d_pl.models import VAE, DINOEncoder
from gsv3d_pl.models.frozen import fingerprint, freeze
from gsv3d_pl.orbit import INPUT_FRAME
from gsv3d_pl.stages.common import (
    StageBase,
    check_dino,
    check_vae_factor,
    gather_views,
    novel_view_indices,
    sample_view_subset,
)
from gsv3d_pl.stages.ema import WeightEMA
from gsv3d_pl.stages.handoff import decoder_record
from gsv3d_pl.stages.heldout import heldout_evaluation, per_image_psnr
from gsv3d_pl.stages.losses import L3DWeights, render_loss, render_views
from gsv3d_pl.stages.splat_geometry import splat_geometry_terms
from gsv3d_pl.weights import WeightSpec, resolve, torch_hub_dir

__all__ = ["DecoderStage", "lpips_weight_specs"]

log = logging.getLogger(__name__)

def lpips_weight_specs(init_args: dict, key_prefix: str = "model") -> list[WeightSpec]:
    """The LPIPS loss needs torchvision's AlexNet backbone (only when ``lambda_lpips > 0``): what
    ``DecoderStage.weight_specs`` returns for the stage at config key ``key_prefix``."""
    if not float(init_args.get("lambda_lpips", 0.0) or 0.0) > 0:
        return []
    from gsv3d_pl.weights import UrlFile

    return [WeightSpec(
        name="LPIPS loss backbone (torchvision AlexNet)",
        config_key=f"{key_prefix}.init_args.lambda_lpips",
        candidates=[torch_hub_dir() / "checkpoints" / "alexnet-owt-7be5be79.pth"],
        source="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth (into $TORCH_HOME/hub/checkpoints/)",
        fetch=UrlFile("https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
                      torch_hub_dir() / "checkpoints" / "alexnet-owt-7be5be79.pth"),
    )]


class _LPIPS(nn.Module):
    """Frozen LPIPS(alex) taking images in [0, 1]; weights resolved offline first."""

    def __init__(self):
        super().__init__()
        for spec in lpips_weight_specs({"lambda_lpips": 1.0}):
            resolve(spec)
        import lpips

        self.net = lpips.LPIPS(net="alex", verbose=False)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """a, b [M, 3, H, W] in [0, 1] -> [M]."""
        return self.net(a.float(), b.float(), normalize=True).reshape(-1)


class DecoderStage(StageBase):
    """Stage 1: the GS decoder trained with L_3D on rendered views.

    Args:
        vae: the frozen VAE that makes the input latents (``encode`` -> scaled latents).
        dino: the frozen DINO encoder for the input view R's tokens; None = no DINO (then the decoder must
            have ``dino_dim=None``).
        decoder: the GS decoder (trained): any module with ``forward(latents, c2w, K, dino_tokens) -> Gaussians``,
            a ``dino_dim`` attribute and its constructor arguments in ``config`` (see docs/extending.md). The
            checkpoint records its class and arguments, so stage 2 and predict rebuild it from the file alone.
        lambda_rgb, lambda_depth, lambda_lpips, lambda_alpha: L_3D weights; depth_loss_on: "all" | "foreground"
            (:mod:`gsv3d_pl.stages.losses`).
        lambda_splat_depth, lambda_splat_opacity: direct supervision of each pixel-aligned Gaussian by its own
            input view's GT depth and mask, without rendering (:mod:`gsv3d_pl.stages.splat_geometry`); 0 = off
            (the paper).
        supervise_input_views: False = the ``views_per_step`` supervised views are drawn from the non-input views
            only (the inputs are what the decoder reads; supervising them rewards copying). True = from all Q.
        ema_decay: keep an exponential moving average of the decoder's weights (e.g. 0.99); evaluation, the
            held-out evaluation and the checkpoint's decoder (stage 2, predict) then use it. None = off.
        lr, weight_decay, betas: AdamW; warmup_steps then cosine to ``min_lr_ratio · lr`` at the last step
            (``trainer.estimated_stepping_batches``).
        render_chunk_views: views per rasterizer call (None = all Q at once); memory is that of one chunk.
        views_per_step: supervise each object on this many of its Q views per training step, drawn at random
            (None = all Q, the paper). A CPU budget knob: the rasterizer's cost is linear in rendered views.
        background: background grey level of the renders (must match the dataset's).
        render_backend: rasterize backend ("auto": gsplat on CUDA, numba on CPU, else torch).
        use_latent_cache: ask the datamodule to cache VAE latents (``set_latent_encoder``) when it can.
        heldout_eval: at the end of fit, score novel views of held-out (test split) objects against the
            mean-training-image baseline and write ``<run>/heldout_eval.json``.
        heldout_max_objects / baseline_max_objects: caps for that evaluation (None = all).
        input_latent_noise: training only: per object, Gaussian noise of a standard deviation drawn from
            U(0, input_latent_noise) is added to the latents of every input view but one, the conditioning view
            (orbit frame 20, or a random view when frame 20 is not among the inputs). At image -> 3D that view is
            the input image's own latent and the others are SV3D's samples, which disagree with it; the decoder
            learns to trust the exact view where the others conflict. 0 = off (the paper's stage 1).
    """

    weight_specs = staticmethod(lpips_weight_specs)  # the external files `gsv3d weights` lists for this stage

    batch_keys = ("input_indices", "input_images", "input_c2w", "input_K", "cond_image", "target_images",
                  "target_alphas", "target_depths", "target_c2w", "target_K")

    def __init__(
        self,
        vae: VAE,
        dino: DINOEncoder | None,
        decoder: nn.Module,  # any decoder (docs/extending.md), not only GSDecoder
        lambda_rgb: float = 1.0,
        lambda_depth: float = 1.0,
        depth_loss_on: str = "all",
        lambda_lpips: float = 0.0,
        lambda_alpha: float = 0.0,
        lambda_splat_depth: float = 0.0,
        lambda_splat_opacity: float = 0.0,
        supervise_input_views: bool = True,
        ema_decay: float | None = None,
        lr: float = 4e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.0,
        render_chunk_views: int | None = None,
        views_per_step: int | None = None,
        background: float = 1.0,
        render_backend: str = "auto",
        use_latent_cache: bool = True,
        heldout_eval: bool = True,
        heldout_max_objects: int | None = None,
        baseline_max_objects: int | None = None,
        input_latent_noise: float = 0.0,
    ):
        super().__init__(lr, weight_decay, betas, warmup_steps, min_lr_ratio, background, render_chunk_views,
                         render_backend)
        self.decoder = decoder
        self.vae = freeze(vae)
        self.dino = freeze(dino)
        check_dino(dino, decoder, "model.init_args.decoder.init_args.dino_dim")
        check_vae_factor(vae, decoder, "model.init_args.decoder.init_args.vae_factor")
        self._decoder_record = decoder_record(decoder)  # fails here, at start, for a decoder stage 2 could not rebuild
        self.loss_weights = L3DWeights(lambda_rgb, lambda_depth, lambda_lpips, depth_loss_on, lambda_alpha)
        for k, v in (("lambda_splat_depth", lambda_splat_depth), ("lambda_splat_opacity", lambda_splat_opacity)):
            if v < 0:
                raise ValueError(f"model.init_args.{k} must be >= 0, got {v}")
        self.lambda_splat_depth, self.lambda_splat_opacity = float(lambda_splat_depth), float(lambda_splat_opacity)
        self.supervise_input_views = bool(supervise_input_views)
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"model.init_args.ema_decay must be in (0, 1) or null, got {ema_decay}")
        self.ema_decay = ema_decay
        # EMA of the decoder's weights: evaluation, the held-out eval and the stage-2 hand-off use it.
        self.decoder_ema = WeightEMA(decoder, ema_decay) if ema_decay is not None else None
        self.lpips = freeze(_LPIPS()) if lambda_lpips > 0 else None
        self.views_per_step = views_per_step
        self.use_latent_cache = use_latent_cache
        self.heldout_eval = heldout_eval
        self.heldout_max_objects = heldout_max_objects
        self.baseline_max_objects = baseline_max_objects
        if not input_latent_noise >= 0:
            raise ValueError(f"model.init_args.input_latent_noise must be >= 0, got {input_latent_noise}")
        self.input_latent_noise = float(input_latent_noise)
        self.save_hyperparameters(ignore=["decoder", "vae", "dino"])

    # ---- setup ------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"decoder.{n}", p) for n, p in self.decoder.named_parameters()]

    # ---- forward ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def input_latents(self, batch: MultiViewBatch) -> Tensor:
        """The N input views' scaled latents [B, N, 4, h, w]: from the latent cache when the batch has it."""
        idx = batch["input_indices"]  # [B, N]
        if "target_latents" in batch:
            return gather_views(batch["target_latents"], idx).float()
        imgs = batch["input_images"]  # [B, N, 3, H, W]
        lat = self.vae.encode(imgs.flatten(0, 1).float())  # [B*N, 4, h, w]
        return lat.reshape(*imgs.shape[:2], *lat.shape[1:]).float()

    @torch.no_grad()
    def dino_tokens(self, batch: MultiViewBatch) -> Tensor | None:
        """DINO patch tokens of the input view R, [B, T, C]; None without DINO."""
        return None if self.dino is None else self.dino(batch["cond_image"].float()).float()

    def forward(self, latents: Tensor, c2w: Tensor, K: Tensor, dino_tokens: Tensor | None = None):
        """latents [B, N, 4, h, w], c2w [B, N, 4, 4], K [B, N, 3, 3] (full-res), tokens [B, T, C] -> Gaussians [B]."""
        # Evaluation uses the weight average when there is one (training always uses the live weights).
        net = self.decoder_ema.module if self.decoder_ema is not None and not self.training else self.decoder
        with self.autocast():
            return net(latents, c2w, K, dino_tokens)

    def predict_gaussians(self, batch: MultiViewBatch):
        """Gaussians (batch [B]) of a multi-view batch (keys: :data:`gsv3d_pl.batch.BATCH_KEYS`)."""
        return self(self.input_latents(batch), batch["input_c2w"].float(), batch["input_K"].float(),
                    self.dino_tokens(batch))

    # ---- training -----------------------------------------------------------------------------------------
    def _targets(self, batch: MultiViewBatch, idx: Tensor | None = None) -> tuple[Tensor, ...]:
        keys = ("target_c2w", "target_K", "target_images", "target_alphas", "target_depths")
        vals = [batch[k].float() for k in keys]
        if idx is not None:
            vals = [gather_views(v, idx) for v in vals]
        return tuple(vals)

    def corrupt_input_latents(self, latents: Tensor, input_indices: Tensor,
                              generator: torch.Generator | None = None) -> Tensor:
        """latents [B, N, C, h, w] with noise on all views but the conditioning one (``input_latent_noise``)."""
        B, N = input_indices.shape
        dev = latents.device
        exact = input_indices.to(dev) == INPUT_FRAME  # [B, N]
        fallback = torch.randint(0, N, (B,), device=dev, generator=generator)  # [B]
        none = ~exact.any(dim=1)
        exact[none, fallback[none]] = True
        sigma = torch.rand(B, 1, 1, 1, 1, device=dev, generator=generator) * self.input_latent_noise  # [B,1,1,1,1]
        noise = torch.randn(latents.shape, device=dev, generator=generator) * sigma  # [B, N, C, h, w]
        return torch.where(exact[:, :, None, None, None], latents, latents + noise)

    def training_step(self, batch: MultiViewBatch, batch_idx: int) -> Tensor:
        if self.input_latent_noise > 0:
            lat = self.corrupt_input_latents(self.input_latents(batch), batch["input_indices"])
            gaussians = self(lat, batch["input_c2w"].float(), batch["input_K"].float(), self.dino_tokens(batch))
        else:
            gaussians = self.predict_gaussians(batch)
        B, Q = batch["target_images"].shape[:2]
        sub = self.supervised_views(batch)  # [B, k] or None (all Q views)
        c2w, K, rgb, alpha, depth = self._targets(batch, sub)
        loss, terms = render_loss(
            gaussians, c2w, K, rgb, alpha, depth, self.loss_weights, background=self.background,
            backend=self.render_backend, chunk=self.render_chunk_views, lpips_fn=self.lpips,
        )
        if self.lambda_splat_depth > 0 or self.lambda_splat_opacity > 0:
            idx = batch["input_indices"]  # [B, N]
            geo = splat_geometry_terms(gaussians.means, gaussians.opacities, batch["input_c2w"].float(),
                                       gather_views(batch["target_depths"].float(), idx),
                                       gather_views(batch["target_alphas"].float(), idx))
            loss = loss + (self.lambda_splat_depth * geo["splat_depth"]
                           + self.lambda_splat_opacity * geo["splat_opacity"]).mean()
            terms = terms | {k: v.detach() for k, v in geo.items()}
        self._check_loss({k: v.mean() for k, v in terms.items()} | {"total": loss.detach()})
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=B)
        for k, v in terms.items():  # every term of L_3D (rgb, depth, lpips, any new one), per-object means
            if k != "l3d":
                self.log(f"train/{k}", v.mean(), batch_size=B)
        self.log("train/psnr", -10 * torch.log10(terms["rgb"].mean().clamp_min(1e-10)), prog_bar=True, batch_size=B)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"] if self._trainer else self.lr, batch_size=B)
        return loss

    def supervised_views(self, batch: MultiViewBatch) -> Tensor | None:
        """The views rendered and supervised this step, [B, k] (None = all Q)."""
        B, Q = batch["target_images"].shape[:2]
        if self.supervise_input_views:
            return sample_view_subset(B, Q, self.views_per_step, self.device)
        novel = novel_view_indices(batch["input_indices"].to(self.device), Q)  # [B, V]
        sub = sample_view_subset(B, novel.shape[1], self.views_per_step, self.device)  # [B, k] or None
        return novel if sub is None else gather_views(novel, sub)

    def optimizer_step(self, *args, **kwargs) -> None:
        # Here rather than in on_train_batch_end: ModelCheckpoint saves in its own on_train_batch_end, which runs
        # first, so a checkpoint would hold the average one step behind the weights.
        super().optimizer_step(*args, **kwargs)
        if self.decoder_ema is not None:
            self.decoder_ema.update(self.decoder)

    # ---- evaluation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_novel_views(self, batch: MultiViewBatch) -> NovelViews:
        """Predict Gaussians and render the novel (non-input) views (keys: :data:`gsv3d_pl.batch.NOVEL_VIEW_KEYS`)."""
        gaussians = self.predict_gaussians(batch)
        Q = batch["target_images"].shape[1]
        novel = novel_view_indices(batch["input_indices"], Q)  # [B, V]
        c2w, K, gt_rgb, gt_alpha, gt_depth = self._targets(batch, novel)
        H, W = gt_rgb.shape[-2:]
        rgb, alpha, depth = render_views(gaussians, c2w, K, W, H, self.background, self.render_backend,
                                         self.render_chunk_views)  # [B, V, 3|1, H, W]
        return {
            "pred_images": rgb.clamp(0, 1), "gt_images": gt_rgb, "pred_alphas": alpha, "pred_depths": depth,
            "gt_alphas": gt_alpha, "gt_depths": gt_depth, "eval_c2w": c2w, "eval_K": K,
            "input_images": batch["input_images"], "gaussians": gaussians.detach(), "novel_indices": novel,
        }

    def _eval_step(self, batch: dict, prefix: str) -> dict:
        out = self.evaluate_novel_views(batch)
        B = out["gt_images"].shape[0]
        psnr = per_image_psnr(out["pred_images"].flatten(0, 1), out["gt_images"].flatten(0, 1))  # [B*V]
        self.log(f"{prefix}/psnr", psnr.mean(), prog_bar=True, batch_size=B, sync_dist=True)
        mse_d = (out["pred_alphas"] * out["pred_depths"] - out["gt_depths"]).square().mean()
        self.log(f"{prefix}/depth_mse", mse_d, batch_size=B, sync_dist=True)
        return out

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return self._eval_step(batch, "test")

    # ---- checkpoints / end of fit ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.decoder_ema is not None:  # load_decoder hands these weights to stage 2 and predict
            checkpoint["ema"] = self.decoder_ema.state()
        # The hand-off to stage 2 and predict (gsv3d_pl.stages.handoff): the decoder's class and init args, and
        # the identities of the frozen encoders (stage 2 refuses a decoder trained on another VAE's latents).
        checkpoint["gsv3d"] = {
            "stage": "decoder",
            "decoder": self._decoder_record,
            "vae_key": self.vae.weights_key() if hasattr(self.vae, "weights_key") else fingerprint(self.vae),
            "dino_fingerprint": fingerprint(self.dino),
            "dino_dim": getattr(self.decoder, "dino_dim", None),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.decoder_ema is not None:
            if "ema" not in checkpoint:
                raise ValueError("model.init_args.ema_decay is set but the checkpoint holds no EMA weights: it was "
                                 "trained without EMA; resume with ema_decay: null or start a new run")
            self.decoder_ema.load_state(checkpoint["ema"])

    def on_fit_end(self) -> None:
        if not self.heldout_eval or self.trainer.sanity_checking or self.trainer.global_rank != 0:
            return
        if getattr(self.trainer, "interrupted", False):  # Ctrl-C / SIGTERM: no evaluation of a partial run
            return
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "test_dataloader"):
            log.warning("held-out evaluation skipped: no datamodule with a test split")
            return
        self.run_heldout_eval(dm)

    def run_heldout_eval(self, datamodule) -> dict:
        """Score held-out novel views against the nearest-input-view and mean-training-image baselines; print
        and write heldout_eval.json."""
        datamodule.setup("test")
        was_training = self.training
        self.eval()
        try:
            res = heldout_evaluation(
                self.evaluate_novel_views, datamodule.test_dataloader(), datamodule.train_dataloader(), self.device,
                self.heldout_max_objects, self.baseline_max_objects,
            )
        finally:
            self.train(was_training)
        res["global_step"] = int(self.global_step)
        path = os.path.join(self._root_dir(), "heldout_eval.json")
        write_json_atomic(path, res)
        print(
            f"[held-out eval] {res['num_objects']} objects, {res['num_views']} novel views at "
            f"{res['resolution'][0]}x{res['resolution'][1]}: PSNR {res['psnr']:.2f} dB, SSIM {res['ssim']:.4f}"
            f"\n[held-out eval] baselines: nearest input view PSNR {res['nearest_input_psnr']:.2f} dB "
            f"(SSIM {res['nearest_input_ssim']:.4f}) -> {res['gain_over_nearest_input_db']:+.2f} dB; mean training "
            f"image PSNR {res['baseline_psnr']:.2f} dB -> {res['psnr_gain_db']:+.2f} dB"
            f"\n[held-out eval] written to {path}",
            flush=True,
        )
        return res
