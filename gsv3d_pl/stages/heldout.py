"""Held-out novel-view evaluation at the end of a decoder fit, with the "mean training image" baseline.

Protocol (one number per quantity, written to ``<run>/heldout_eval.json``):

- Objects: the datamodule's **test** split (objects never seen in training), at most ``max_objects``.
- Views: each object's **novel** views, i.e. all Q target views except its N input views.
- PSNR: per image (3 x H x W, data range 1), then averaged over all (object, view) images; the same
  convention as torchmetrics' ``PeakSignalNoiseRatio(dim=(1, 2, 3))``.
- SSIM: torchmetrics' ``structural_similarity_index_measure(data_range=1.0)`` per image, averaged.
- Baseline: one image, the per-pixel mean of every target view of every **training** object
  (at most ``baseline_max_objects``), scored as the prediction for every held-out novel view with the
  same PSNR/SSIM. A decoder that learned nothing object-specific scores about this.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["per_image_psnr", "per_image_ssim", "mean_training_image", "heldout_evaluation"]


def per_image_psnr(pred: Tensor, gt: Tensor) -> Tensor:
    """PSNR (dB) of each image: pred, gt [M, 3, H, W] in [0, 1] -> [M]."""
    mse = (pred.float().clamp(0, 1) - gt.float()).square().flatten(1).mean(dim=1)  # [M]
    return -10.0 * torch.log10(mse.clamp_min(1e-10))


def per_image_ssim(pred: Tensor, gt: Tensor) -> Tensor:
    """SSIM of each image (torchmetrics, Gaussian window 11, data range 1): [M, 3, H, W] x2 -> [M]."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(
        pred.float().clamp(0, 1), gt.float(), data_range=1.0, reduction="none"
    ).reshape(-1)


def mean_training_image(loader, max_objects: int | None = None) -> tuple[Tensor, int]:
    """Per-pixel mean of all ``target_images`` in ``loader`` (multi-view batches, :data:`gsv3d_pl.batch.BATCH_KEYS`).

    Returns the mean image [3, H, W] (float64 accumulation) and the number of objects used.
    """
    acc, count, objects = None, 0, 0
    for batch in loader:
        imgs = batch["target_images"]  # [B, Q, 3, H, W]
        if max_objects is not None:
            imgs = imgs[: max(0, max_objects - objects)]
        if imgs.shape[0] == 0:
            break
        s = imgs.double().sum(dim=(0, 1))  # [3, H, W]
        acc = s if acc is None else acc + s
        count += imgs.shape[0] * imgs.shape[1]
        objects += imgs.shape[0]
        if max_objects is not None and objects >= max_objects:
            break
    if acc is None:
        raise RuntimeError("held-out evaluation: the training dataloader is empty; no baseline image")
    return (acc / count).float(), objects


@torch.no_grad()
def heldout_evaluation(
    predict_novel: Callable[[dict], tuple[Tensor, Tensor]],
    test_loader,
    train_loader,
    device: torch.device,
    max_objects: int | None = None,
    baseline_max_objects: int | None = None,
) -> dict:
    """Score ``predict_novel`` on held-out objects against the mean-training-image baseline.

    Args:
        predict_novel: multi-view batch (on ``device``) -> (pred [B, V, 3, H, W], gt [B, V, 3, H, W]) for the
            novel (non-input) views.
        test_loader / train_loader: dataloaders of the test split and of the training split.
    Returns:
        {"psnr", "ssim", "baseline_psnr", "baseline_ssim", "psnr_gain_db", "num_objects", "num_views",
        "baseline_num_objects", "resolution"}.
    """
    mean_img, n_train = mean_training_image(train_loader, baseline_max_objects)  # [3, H, W]
    psnr, ssim, b_psnr, b_ssim = [], [], [], []
    objects = 0
    for batch in test_loader:
        if max_objects is not None and objects >= max_objects:
            break
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        pred, gt = predict_novel(batch)  # [B, V, 3, H, W] each
        if max_objects is not None:
            pred, gt = pred[: max_objects - objects], gt[: max_objects - objects]
        objects += pred.shape[0]
        pred, gt = pred.flatten(0, 1).float().cpu(), gt.flatten(0, 1).float().cpu()  # [M, 3, H, W]
        if mean_img.shape != gt.shape[1:]:
            raise RuntimeError(f"held-out evaluation: train images {tuple(mean_img.shape)} vs test {tuple(gt.shape[1:])}")
        base = mean_img.expand_as(gt)
        psnr.append(per_image_psnr(pred, gt))
        ssim.append(per_image_ssim(pred, gt))
        b_psnr.append(per_image_psnr(base, gt))
        b_ssim.append(per_image_ssim(base, gt))
    if not psnr:
        raise RuntimeError("held-out evaluation: the test dataloader is empty (no held-out objects)")
    psnr_t, ssim_t, bp, bs = (torch.cat(x) for x in (psnr, ssim, b_psnr, b_ssim))
    out = {
        "psnr": float(psnr_t.mean()),
        "ssim": float(ssim_t.mean()),
        "baseline_psnr": float(bp.mean()),
        "baseline_ssim": float(bs.mean()),
        "num_objects": int(objects),
        "num_views": int(psnr_t.numel()),
        "baseline_num_objects": int(n_train),
        "resolution": list(mean_img.shape[1:]),
    }
    out["psnr_gain_db"] = out["psnr"] - out["baseline_psnr"]
    return out
