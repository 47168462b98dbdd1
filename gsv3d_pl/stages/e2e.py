"""The paper's evaluation in miniature: image -> SV3D(+LoRA) -> decoder -> novel views, on held-out objects.

One function, :func:`end_to_end_evaluation`, scores the distill stage's whole pipeline twice on the same
objects, views and sampler seeds: with the LoRA (``psnr``, ``ssim``) and with it switched off
(``undistilled_psnr``, ``undistilled_ssim``). The difference is the paper's claim: does geometric
distillation make SV3D's orbit more 3D-consistent? Beside them, the baselines that need no model:

- ``copy_input_psnr``: the input image scored as every novel view (what image-to-3D must beat);
- ``nearest_input_psnr``: the nearest of the N ground-truth input views (an upper-bound-like reference: the
  pipeline sees only the one input image, so this baseline knows more than it does);
- ``baseline_psnr``: the mean training image.

And one score that reads no ground truth, "3D consistency (ours, no GT)" (:mod:`gsv3d_pl.metrics.consistency`): the
decoder's Gaussians rendered at the generated orbit frames it did not read, against those frames
(``consistency_psnr`` / ``consistency_ssim`` with the LoRA, ``undistilled_consistency_*`` without,
``consistency_gain_db`` their PSNR difference): the paper's claim measured on the orbit itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from gsv3d_pl.stages.common import gather_views, novel_view_indices
from gsv3d_pl.stages.heldout import heldout_evaluation, per_image_psnr, per_image_ssim

__all__ = ["end_to_end_evaluation", "copy_input_scores", "adapters_disabled"]


@contextlib.contextmanager
def adapters_disabled(unet: nn.Module):
    """Within: the UNet's LoRA adapters are off (diffusers' PEFT integration); on again on exit."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


@torch.no_grad()
def copy_input_scores(test_loader, max_objects: int | None = None) -> tuple[Tensor, Tensor, int]:
    """PSNR and SSIM [M] of the conditioning image (``cond_image`` [B, 3, H, W]) copied to every novel view."""
    psnr, ssim, objects = [], [], 0
    for batch in test_loader:
        if max_objects is not None and objects >= max_objects:
            break
        novel = novel_view_indices(batch["input_indices"], batch["target_images"].shape[1])  # [B, V]
        gt = gather_views(batch["target_images"].float(), novel)  # [B, V, 3, H, W]
        copy = batch["cond_image"].float()[:, None].expand_as(gt)  # [B, V, 3, H, W]
        if max_objects is not None:
            gt, copy = gt[: max_objects - objects], copy[: max_objects - objects]
        objects += gt.shape[0]
        psnr.append(per_image_psnr(copy.flatten(0, 1), gt.flatten(0, 1)))
        ssim.append(per_image_ssim(copy.flatten(0, 1), gt.flatten(0, 1)))
    if not psnr:
        raise RuntimeError("end-to-end evaluation: the test dataloader is empty (no held-out objects)")
    return torch.cat(psnr), torch.cat(ssim), objects


@torch.no_grad()
def end_to_end_evaluation(
    evaluate: Callable[[dict], dict],
    unet: nn.Module,
    test_loader,
    train_loader,
    device: torch.device,
    max_objects: int | None = None,
) -> dict:
    """Score the pipeline with and without the LoRA, against the no-model baselines, on the same held-out views.

    Args:
        evaluate: multi-view batch -> novel-view result (``DistillStage.evaluate_novel_views`` with a fixed seed).
        unet: the UNet whose adapters are switched off for the undistilled run.
        test_loader / train_loader: the test split (scored) and the training split (mean-image baseline).
    Returns:
        {"psnr", "ssim", "undistilled_psnr", "undistilled_ssim", "distill_gain_db", "copy_input_psnr",
        "copy_input_ssim", "nearest_input_psnr", "baseline_psnr", "baseline_ssim", "num_objects", "num_views",
        "resolution", "gain_over_copy_input_db", "gain_over_baseline_db"}; when ``evaluate`` returns the
        3D-consistency scores also {"consistency_psnr", "consistency_ssim", "undistilled_consistency_psnr",
        "undistilled_consistency_ssim", "consistency_gain_db", "consistency_num_frames"}.
    """
    dist = heldout_evaluation(evaluate, test_loader, train_loader, device, max_objects)
    with adapters_disabled(unet):
        base = heldout_evaluation(evaluate, test_loader, train_loader, device, max_objects)
    c_psnr, c_ssim, n_obj = copy_input_scores(test_loader, max_objects)
    if n_obj != dist["num_objects"] or c_psnr.numel() != dist["num_views"]:
        raise RuntimeError("end-to-end evaluation: the copy-input baseline saw other views than the pipeline")
    out = {
        "psnr": dist["psnr"], "ssim": dist["ssim"],
        "undistilled_psnr": base["psnr"], "undistilled_ssim": base["ssim"],
        "distill_gain_db": dist["psnr"] - base["psnr"],
        "copy_input_psnr": float(c_psnr.mean()), "copy_input_ssim": float(c_ssim.mean()),
        "nearest_input_psnr": dist["nearest_input_psnr"],
        "baseline_psnr": dist["baseline_psnr"], "baseline_ssim": dist["baseline_ssim"],
        "num_objects": dist["num_objects"], "num_views": dist["num_views"], "resolution": dist["resolution"],
    }
    out["gain_over_copy_input_db"] = out["psnr"] - out["copy_input_psnr"]
    out["gain_over_baseline_db"] = out["psnr"] - out["baseline_psnr"]
    if "consistency_psnr" in dist and "consistency_psnr" in base:  # the same orbit frames, with and without the LoRA
        out.update({
            "consistency_psnr": dist["consistency_psnr"], "consistency_ssim": dist["consistency_ssim"],
            "undistilled_consistency_psnr": base["consistency_psnr"],
            "undistilled_consistency_ssim": base["consistency_ssim"],
            "consistency_gain_db": dist["consistency_psnr"] - base["consistency_psnr"],
            "consistency_num_frames": dist["consistency_num_frames"],
        })
    return out
