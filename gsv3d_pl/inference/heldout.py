"""Image -> 3D scored against an object's ground-truth orbit, as ``gsv3d predict`` runs it.

The object's input view (orbit frame :data:`~gsv3d_pl.orbit.INPUT_FRAME`, a clean render) goes through
:class:`~gsv3d_pl.inference.ImageTo3D`; the Gaussians are rendered at the object's other orbit cameras and scored
next to what needs no model: copying the input image to every view, the mean training image, and the empty
background.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gsv3d_pl.orbit import INPUT_FRAME, NUM_FRAMES
from gsv3d_pl.render import render
from gsv3d_pl.stages.heldout import per_image_psnr

__all__ = ["NOVEL_FRAMES", "OrbitScore", "score_orbit_prediction"]

NOVEL_FRAMES = [q for q in range(NUM_FRAMES) if q != INPUT_FRAME]  # the orbit frames the input does not show


@dataclass
class OrbitScore:
    """Per-view PSNR [20] of one object's prediction and of its no-model baselines, and what was rendered."""

    prediction: Tensor  # [20] the Gaussians rendered at the novel orbit frames
    copy_input: Tensor  # [20] the input image as every view
    mean_image: Tensor  # [20] the mean training image as every view
    background: Tensor  # [20] the empty background (white) as every view
    input_image: Tensor  # [3, H, W]
    gt: Tensor  # [21, 3, H, W] the ground-truth orbit
    frames: Tensor  # [21, 3, H, W] SV3D's decoded orbit
    renders: Tensor  # [21, 3, H, W] the Gaussians at the 21 orbit cameras


@torch.no_grad()
def score_orbit_prediction(pipe, batch: dict, b: int, mean_image: Tensor, num_steps: int = 10, seed: int = 0,
                           background: float = 1.0) -> OrbitScore:
    """Predict object ``b`` of a multi-view batch from its input view and score the novel orbit frames.

    Args:
        pipe: an :class:`~gsv3d_pl.inference.ImageTo3D`.
        batch: a test batch (:data:`gsv3d_pl.batch.BATCH_KEYS`): ``cond_image`` [B, 3, H, W], ``orbit_polars_rad``
            [B, 21], ``target_images`` / ``target_c2w`` / ``target_K`` whose first 21 views are the orbit.
        mean_image: [3, H, W] the mean training image.
        num_steps, seed: SV3D sampling steps and seed.
        background: the renders' background grey level (the dataset's).
    """
    img = batch["cond_image"][b].float()  # [3, H, W]
    elev = 90.0 - float(torch.rad2deg(batch["orbit_polars_rad"][b, INPUT_FRAME]))
    pred = pipe(img, elevation_deg=elev, seed=seed, num_steps=num_steps, progress=False)
    c2w, K = batch["target_c2w"][b, :NUM_FRAMES].float(), batch["target_K"][b, :NUM_FRAMES].float()
    H, W = img.shape[-2:]
    rgb = render(pred.gaussians, c2w, K, W, H, background).rgb.clamp(0, 1)  # [21, 3, H, W]
    gt = batch["target_images"][b, :NUM_FRAMES].float()  # [21, 3, H, W]
    novel = gt[NOVEL_FRAMES]  # [20, 3, H, W]

    def const(x: Tensor) -> Tensor:
        return per_image_psnr(x.expand(len(NOVEL_FRAMES), -1, -1, -1), novel)

    return OrbitScore(per_image_psnr(rgb[NOVEL_FRAMES], novel), const(img), const(mean_image.float()),
                      const(torch.full_like(img, background)), img, gt, pred.frames.float(), rgb)
