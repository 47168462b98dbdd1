"""Held-out novel-view evaluation at the end of a decoder fit, with the "mean training image" baseline.

Protocol (one number per quantity, written to ``<run>/heldout_eval.json``):

- Objects: the datamodule's **test** split (objects never seen in training), at most ``max_objects``.
- Views: each object's **novel** views, i.e. all Q target views except its N input views.
- PSNR: per image (3 x H x W, data range 1), then averaged over all (object, view) images; the same
  convention as torchmetrics' ``PeakSignalNoiseRatio(dim=(1, 2, 3))``.
- SSIM: torchmetrics' ``structural_similarity_index_measure(data_range=1.0)`` per image, averaged.
- Baselines, scored on the same objects and views with the same PSNR/SSIM:

  - **nearest input view** (the strongest trivial one): each novel view is predicted by the object's input
    view whose camera looks in the nearest direction (largest cosine between the cameras' +Z axes). It
    needs no 3D at all; a decoder that does not beat it has not learned to reconstruct.
  - **mean training image**: one image, the per-pixel mean of every target view of every **training**
    object (at most ``baseline_max_objects``). A decoder that learned nothing object-specific scores about
    this.
- 3D consistency (ours, no GT; :mod:`gsv3d_pl.metrics.consistency`): when ``evaluate`` returns it (the distill
  stage: a generated orbit), ``consistency_psnr`` / ``consistency_ssim`` are its per-image values averaged over all
  (object, unread orbit frame) images, as PSNR is; ``consistency_num_frames`` counts those images.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from gsv3d_pl.metrics.columns import CONSISTENCY_KEYS
from gsv3d_pl.stages.common import gather_views

__all__ = ["per_image_psnr", "per_image_ssim", "mean_training_image", "nearest_input_views", "heldout_evaluation"]


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


def nearest_input_views(input_images: Tensor, input_c2w: Tensor, eval_c2w: Tensor) -> tuple[Tensor, Tensor]:
    """The input view whose camera looks in the nearest direction, for each evaluated view.

    Args:
        input_images: [B, N, 3, H, W]; input_c2w: [B, N, 4, 4]; eval_c2w: [B, V, 4, 4] (OpenCV: +Z forward).
    Returns:
        images [B, V, 3, H, W] and the chosen input index per view [B, V].
    """
    fwd_in = F.normalize(input_c2w[..., :3, 2].float(), dim=-1)  # [B, N, 3] viewing directions
    fwd_ev = F.normalize(eval_c2w[..., :3, 2].float(), dim=-1)  # [B, V, 3]
    idx = torch.einsum("bvc,bnc->bvn", fwd_ev, fwd_in).argmax(dim=-1)  # [B, V]
    return gather_views(input_images, idx), idx


@torch.no_grad()
def heldout_evaluation(
    evaluate: Callable[[dict], dict],
    test_loader,
    train_loader,
    device: torch.device,
    max_objects: int | None = None,
    baseline_max_objects: int | None = None,
) -> dict:
    """Score ``evaluate`` on held-out objects against the nearest-input-view and mean-training-image baselines.

    Args:
        evaluate: multi-view batch (on ``device``) -> the novel-view result (``gsv3d_pl.batch.NOVEL_VIEW_KEYS``:
            ``pred_images``, ``gt_images`` [B, V, 3, H, W], ``input_images`` [B, N, 3, H, W], ``eval_c2w``
            [B, V, 4, 4]); the batch gives ``input_c2w`` [B, N, 4, 4].
        test_loader / train_loader: dataloaders of the test split and of the training split.
    Returns:
        {"psnr", "ssim", "nearest_input_psnr", "nearest_input_ssim", "baseline_psnr", "baseline_ssim",
        "psnr_gain_db", "gain_over_nearest_input_db", "num_objects", "num_views", "baseline_num_objects",
        "resolution"}; ``baseline_*`` is the mean training image. Plus ``consistency_psnr``, ``consistency_ssim``
        and ``consistency_num_frames`` when ``evaluate`` returns the 3D-consistency scores (module docstring).
    """
    mean_img, n_train = mean_training_image(train_loader, baseline_max_objects)  # [3, H, W]
    psnr, ssim, b_psnr, b_ssim, n_psnr, n_ssim = [], [], [], [], [], []
    cons: dict[str, list[Tensor]] = {}  # {consistency key: per-image values [M'] per batch}
    objects = 0
    for batch in test_loader:
        if max_objects is not None and objects >= max_objects:
            break
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        out = evaluate(batch)
        pred, gt = out["pred_images"], out["gt_images"]  # [B, V, 3, H, W] each
        near, _ = nearest_input_views(out["input_images"], batch["input_c2w"], out["eval_c2w"])  # [B, V, 3, H, W]
        if max_objects is not None:
            pred, gt, near = (x[: max_objects - objects] for x in (pred, gt, near))
        for k in CONSISTENCY_KEYS:
            if k in out:  # [B, F] -> the kept objects' images
                cons.setdefault(k, []).append(out[k][: pred.shape[0]].flatten().float().cpu())
        objects += pred.shape[0]
        pred, gt, near = (x.flatten(0, 1).float().cpu() for x in (pred, gt, near))  # [M, 3, H, W]
        if mean_img.shape != gt.shape[1:]:
            raise RuntimeError(f"held-out evaluation: train images {tuple(mean_img.shape)} vs test {tuple(gt.shape[1:])}")
        base = mean_img.expand_as(gt)
        psnr.append(per_image_psnr(pred, gt))
        ssim.append(per_image_ssim(pred, gt))
        b_psnr.append(per_image_psnr(base, gt))
        b_ssim.append(per_image_ssim(base, gt))
        n_psnr.append(per_image_psnr(near, gt))
        n_ssim.append(per_image_ssim(near, gt))
    if not psnr:
        raise RuntimeError("held-out evaluation: the test dataloader is empty (no held-out objects)")
    psnr_t, ssim_t, bp, bs, np_, ns = (torch.cat(x) for x in (psnr, ssim, b_psnr, b_ssim, n_psnr, n_ssim))
    out = {
        "psnr": float(psnr_t.mean()),
        "ssim": float(ssim_t.mean()),
        "nearest_input_psnr": float(np_.mean()),
        "nearest_input_ssim": float(ns.mean()),
        "baseline_psnr": float(bp.mean()),
        "baseline_ssim": float(bs.mean()),
        "num_objects": int(objects),
        "num_views": int(psnr_t.numel()),
        "baseline_num_objects": int(n_train),
        "resolution": list(mean_img.shape[1:]),
    }
    out["psnr_gain_db"] = out["psnr"] - out["baseline_psnr"]
    out["gain_over_nearest_input_db"] = out["psnr"] - out["nearest_input_psnr"]
    if cons:
        if any(len(v) != len(psnr) for v in cons.values()):
            raise RuntimeError("held-out evaluation: some batches returned the 3D-consistency scores and some not")
        values = {k: torch.cat(v) for k, v in cons.items()}
        out.update({k: float(v.mean()) for k, v in values.items()})
        out["consistency_num_frames"] = int(values["consistency_psnr"].numel())
    return out
