"""Stage 2's evaluation: image -> SV3D(+LoRA) orbit -> frozen decoder -> novel views, in validation, ``gsv3d test``
and the end-of-fit held-out check (a mixin of :class:`~gsv3d_pl.stages.distill_stage.DistillStage`).

**Table 1 end to end in one ``gsv3d test``.** ``test_step`` scores every test batch once per entry of the stage's
``test_variants`` (:data:`~gsv3d_pl.metrics.results.TEST_VARIANTS`): ``undistilled`` with the LoRA adapters
switched off (SV3D as it was: Table 1's "SV3D" row of ours) and ``distilled`` with them on (the "GSV3D" row).
Both variants of a batch share

- the conditioning (computed once: the conditioning image's cond_aug noise is drawn from the global RNG),
- the sampler's starting noise, drawn **per object** (:func:`~gsv3d_pl.stages.common.object_noise`): object ``uid``
  starts from its own generator seeded by (``e2e_seed``, crc32(uid)), in validation, ``gsv3d test`` and the
  end-of-fit held-out check alike. So an object's orbit does not depend on the batch size, its place in the batch
  or the number of DDP ranks, only on the seed, its uid and the model; the two variants get the same noise, and
  a ``gsv3d test`` and the held-out check of the same seed sample the same orbits, and
- the σ/noise draw of the logged test losses (seed 1000 + batch index; these losses only, not the novel views),

so their difference is the LoRA's alone. ``test_step`` returns the primary variant's novel views at the top level
(what image callbacks read) and every variant's under ``"variants"``; the metric callbacks
(``callbacks/metrics.py``) keep one set of records per variant and write both into metrics.json, the
per-object CSV and results.md. Validation scores the distilled model only (it is a fit-time check).

**3D consistency (ours, no GT).** Beside the novel views, :meth:`evaluate_novel_views` scores how well the orbit
agrees with itself (:mod:`gsv3d_pl.metrics.consistency`): the decoder's Gaussians rendered at the orbit frames it
did not read against those generated frames, VAE-decoded; ``consistency_psnr`` / ``consistency_ssim`` [B, F] in the
result, their means in metrics.json (per variant), heldout_e2e.json and the logs (``<prefix>/consistency_psnr``).
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

from gsv3d_pl.batch import MultiViewBatch, NovelViews
from gsv3d_pl.io import write_json_atomic
from gsv3d_pl.metrics.consistency import consistency_frames, orbit_consistency
from gsv3d_pl.metrics.results import primary_variant
from gsv3d_pl.orbit import INPUT_FRAME
from gsv3d_pl.stages.common import gather_views, novel_view_indices, sample_orbit
from gsv3d_pl.stages.e2e import adapters_disabled
from gsv3d_pl.stages.heldout import per_image_psnr
from gsv3d_pl.stages.losses import render_views

__all__ = ["DistillEvaluation"]


class DistillEvaluation:
    """validation_step / test_step / run_e2e_eval of DistillStage (needs its conditioning, decoder and sv3d)."""

    @torch.no_grad()
    def generate_orbit(self, batch: MultiViewBatch, c: dict | None = None, seed: int = 0) -> Tensor:
        """Sample the 21-frame orbit latents for the batch's input views, [B, 21, 4, h, w]: each object's starting
        noise from (``seed``, its ``uid``), so an object's orbit does not depend on the batch it is in (a batch
        without ``uid``: one generator seeded by ``seed`` for the whole batch)."""
        c = self.conditioning(batch) if c is None else c
        with self.autocast():
            return sample_orbit(self.sv3d, c, self.val_sample_steps, seed, uids=batch.get("uid"))

    @torch.no_grad()
    def evaluate_novel_views(self, batch: MultiViewBatch, seed: int = 0, c: dict | None = None) -> NovelViews:
        """Image -> SV3D(+LoRA) orbit -> frozen decoder -> novel views (keys: :data:`gsv3d_pl.batch.NOVEL_VIEW_KEYS`).
        ``c``: the batch's :meth:`conditioning`, if already computed."""
        c = self.conditioning(batch) if c is None else c
        lat = self.generate_orbit(batch, c, seed)  # [B, 21, 4, h, w]
        if self.replace_input_frame:  # as `gsv3d predict` does: the input view's latent is known, not generated
            lat[:, INPUT_FRAME] = self.vae.encode(batch["cond_image"].float()).float()
        idx = batch["input_indices"].long()  # val/test: the datamodule's fixed frames
        if (idx > INPUT_FRAME).any():
            raise ValueError(f"input_indices must index orbit frames (<= {INPUT_FRAME}) for the distill stage, got "
                             f"{idx.tolist()}: the decoder reads generated orbit frames")
        gaussians = self.decode_frames(lat, idx, batch, c["dino"])
        novel = novel_view_indices(batch["input_indices"], batch["target_images"].shape[1])  # [B, V]
        c2w, K = gather_views(batch["target_c2w"].float(), novel), gather_views(batch["target_K"].float(), novel)
        gt = {k: gather_views(batch[k].float(), novel) for k in ("target_images", "target_alphas", "target_depths")}
        H, W = gt["target_images"].shape[-2:]
        rgb, alpha, depth = render_views(gaussians, c2w, K, W, H, self.background, self.render_backend,
                                         self.render_chunk_views)
        return {
            "pred_images": rgb.clamp(0, 1), "gt_images": gt["target_images"], "pred_alphas": alpha,
            "pred_depths": depth, "gt_alphas": gt["target_alphas"], "gt_depths": gt["target_depths"],
            "eval_c2w": c2w, "eval_K": K, "input_images": batch["input_images"],
            "gaussians": gaussians.detach(), "novel_indices": novel,
            **self._consistency(lat, idx, novel, rgb),
        }

    def _consistency(self, lat: Tensor, idx: Tensor, novel: Tensor, rgb: Tensor) -> dict[str, Tensor]:
        """3D consistency (ours, no GT) of the orbit ``lat`` [B, 21, C, h, w] whose frames ``idx`` [B, N] the decoder
        read; ``rgb`` [B, V, 3, H, W]: its Gaussians rendered at the novel views ``novel`` [B, V]. {} when the
        decoder read every orbit frame (nothing left to check)."""
        frames = consistency_frames(idx)  # [B, F], sorted
        F = frames.shape[1]
        if F == 0:
            return {}
        # The target views start with the 21 orbit frames and the novel views are sorted, so the unread orbit frames
        # are the first F novel views: their renders exist already (no second render of the same Gaussians).
        if not torch.equal(novel[:, :F].to(frames.device), frames):
            raise RuntimeError(f"3D consistency: the first {F} novel views {novel[:, :F].tolist()} are not the unread "
                               f"orbit frames {frames.tolist()}")
        return orbit_consistency(lat, idx, rgb[:, :F].clamp(0, 1), self.vae.decode)

    def lora_variant(self, variant: str):
        """Context in which SV3D is ``variant``: ``undistilled`` = the LoRA adapters off, ``distilled`` = on."""
        if variant == "undistilled":
            return adapters_disabled(self.sv3d.unet)
        if variant == "distilled":
            return contextlib.nullcontext()
        raise ValueError(f"unknown test variant {variant!r}; model.init_args.test_variants takes undistilled, "
                         "distilled")

    def _eval_step(self, batch: MultiViewBatch, batch_idx: int, prefixes: tuple[str, ...],
                   c: dict | None = None) -> NovelViews:
        """One variant's losses and novel views of a val/test batch, logged under each of ``prefixes``."""
        B = batch["target_images"].shape[0]
        c = self.conditioning(batch) if c is None else c
        g = torch.Generator(device=self.device).manual_seed(1000 + batch_idx)  # same σ/noise every validation
        _, terms = self.distill_losses(batch, generator=g, c=c)
        out = self.evaluate_novel_views(batch, seed=self.e2e_seed, c=c)  # per-object noise (module docstring)
        terms["psnr"] = per_image_psnr(out["pred_images"].flatten(0, 1), out["gt_images"].flatten(0, 1)).mean()
        if "consistency_psnr" in out:
            terms["consistency_psnr"] = out["consistency_psnr"].mean()
        for prefix in prefixes:
            for k in ("loss", "l2d", "l3d", "psnr", "consistency_psnr"):
                if k in terms:
                    self.log(f"{prefix}/{k}", terms[k], batch_size=B, sync_dist=True,
                             prog_bar=k == "psnr" and "/" not in prefix)
        return out

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self._eval_step(batch, batch_idx, ("val",))

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        """Every test variant on this batch (same conditioning and seeds): the primary variant's novel views, and
        all of them under ``"variants"`` ({name: NovelViews}). Logs ``test/<variant>/<k>`` and, for the primary
        variant, ``test/<k>``."""
        c = self.conditioning(batch)
        primary = primary_variant(self.test_variants)
        outs: dict[str, NovelViews] = {}
        for v in self.test_variants:
            with self.lora_variant(v):
                prefixes = (f"test/{v}", "test") if v == primary else (f"test/{v}",)
                outs[v] = self._eval_step(batch, batch_idx, prefixes, c)
        return {**outs[primary], "variants": outs}

    def run_e2e_eval(self, datamodule) -> dict:
        """Image -> SV3D(+LoRA) -> decoder on the held-out objects, with and without the LoRA, against the
        copy-the-input-image and mean-image baselines; print and write ``<run>/heldout_e2e.json``."""
        from gsv3d_pl.stages.e2e import end_to_end_evaluation

        datamodule.setup("test")
        was_training = self.training
        self.eval()
        try:
            res = end_to_end_evaluation(lambda b: self.evaluate_novel_views(b, seed=self.e2e_seed), self.sv3d.unet,
                                        datamodule.test_dataloader(), datamodule.train_dataloader(), self.device,
                                        self.heldout_max_objects)
        finally:
            self.train(was_training)
        res.update(global_step=int(self.global_step), seed=self.e2e_seed, sample_steps=self.val_sample_steps,
                   replace_input_frame=self.replace_input_frame)
        path = os.path.join(self._root_dir(), "heldout_e2e.json")
        write_json_atomic(path, res)
        lines = [f"image -> SV3D -> decoder, {res['num_objects']} held-out objects, {res['num_views']} novel views at "
                 f"{res['resolution'][0]}x{res['resolution'][1]} (seed {self.e2e_seed}):",
                 f"  distilled (LoRA on)     PSNR {res['psnr']:.2f} dB  SSIM {res['ssim']:.4f}",
                 f"  undistilled (LoRA off)  PSNR {res['undistilled_psnr']:.2f} dB  SSIM {res['undistilled_ssim']:.4f}"]
        if "consistency_psnr" in res:  # absent only when the decoder reads all 21 frames
            lines += ["  3D consistency (ours, no GT): the orbit's unread frames vs the decoder's renders there",
                      f"    distilled             PSNR {res['consistency_psnr']:.2f} dB  SSIM "
                      f"{res['consistency_ssim']:.4f}",
                      f"    undistilled           PSNR {res['undistilled_consistency_psnr']:.2f} dB  SSIM "
                      f"{res['undistilled_consistency_ssim']:.4f}  (gain {res['consistency_gain_db']:+.2f} dB)"]
        lines += [f"  copy the input image    PSNR {res['copy_input_psnr']:.2f} dB",
                  f"  mean training image     PSNR {res['baseline_psnr']:.2f} dB", f"written to {path}"]
        print("\n".join(f"[e2e eval] {ln}" for ln in lines), flush=True)
        return res
