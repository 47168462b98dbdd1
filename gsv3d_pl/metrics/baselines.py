"""The model-free rows of the tables: "copy the input image" and "mean training image", scored like the model.

Why: a PSNR of 17 dB means nothing on its own. Copying the one input image to every novel view already gets some
of the way (the object's colours, its silhouette near the input camera); the mean training image gets the
background and the typical object's place. A pipeline that does not beat them has learned nothing about the
object's unseen sides, and the tables should say so next to its row. So ``gsv3d test`` (AppearanceMetrics)
scores both on exactly the novel views and ground truth the model is scored on, with the same per-image metrics
(PSNR, SSIM, LPIPS of :meth:`gsv3d_pl.metrics.image.ImageMetrics.per_image`), and writes them to metrics.json::

    "baselines": {"copy_input": {"psnr": {"value", "num_objects", "num_views"}, "ssim": {...}, "lpips": {...}},
                  "mean_image": {"psnr": {...}, "ssim": {...}, "lpips": {...},
                                 "meta": {"train_objects": 64, "max_objects": 1024}}}

A baseline that could not be scored is ``{"skipped": "<reason>"}`` (a batch without ``cond_image``; a datamodule
without a training split, e.g. the GSO preset, whose every object is a test object): its row then reads "–" and
results.md gives the reason, so the row's absence is visible.

- ``copy_input``: the conditioning image ``cond_image`` [B, 3, H, W] (SV3D's input view R) as every novel view:
  what :func:`gsv3d_pl.stages.e2e.copy_input_scores` scores for the end-of-fit held-out check.
- ``mean_image``: one image, the per-pixel mean of every target view of the first ``max_objects`` training
  objects (:func:`gsv3d_pl.stages.heldout.mean_training_image`), read in the dataset's order (an unshuffled
  loader), so every DDP rank and every run of the same data uses the same image.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

__all__ = ["BASELINES", "BASELINE_LABELS", "BASELINE_KIND", "BASELINE_KEYS", "copy_input_views", "mean_image_views",
           "baseline_predictions", "unshuffled", "training_mean_image", "summarize_baseline"]

#: The model-free baselines, in table order.
BASELINES: tuple[str, ...] = ("copy_input", "mean_image")
#: Their rows' labels in results.md (Table 1) and `gsv3d report` (Table 2).
BASELINE_LABELS: dict[str, str] = {"copy_input": "copy the input image (no model)",
                                   "mean_image": "mean training image (no model)"}
#: Table 1's "Type" cell of those rows: measured by us, with no model.
BASELINE_KIND = "ours, no model"
#: The metrics.json keys a baseline is scored with (CLIP-IQA is left out: a no-reference score of a copied image
#: rates the input photo, not a method; FID/KID of one repeated image are degenerate).
BASELINE_KEYS: tuple[str, ...] = ("psnr", "ssim", "lpips")


def copy_input_views(cond_image: Tensor, gt_images: Tensor) -> Tensor:
    """The "copy the input image" prediction: cond_image [B, 3, H, W] -> [B, V, 3, H, W] (a view, like gt_images)."""
    if cond_image.dim() != 4 or gt_images.dim() != 5 or cond_image.shape[0] != gt_images.shape[0] \
            or cond_image.shape[1:] != gt_images.shape[2:]:
        raise ValueError(f"copy the input image: cond_image {tuple(cond_image.shape)} does not match the novel views "
                         f"{tuple(gt_images.shape)} ([B, 3, H, W] vs [B, V, 3, H, W])")
    return cond_image.to(gt_images.device, gt_images.dtype)[:, None].expand_as(gt_images)


def mean_image_views(mean_image: Tensor, gt_images: Tensor) -> Tensor:
    """The "mean training image" prediction: mean_image [3, H, W] -> [B, V, 3, H, W] (a view, like gt_images)."""
    if mean_image.dim() != 3 or gt_images.dim() != 5 or mean_image.shape != gt_images.shape[2:]:
        raise ValueError(f"mean training image: the training views are {tuple(mean_image.shape)}, the novel views "
                         f"{tuple(gt_images.shape[2:])} (another resolution?)")
    return mean_image.to(gt_images.device, gt_images.dtype)[None, None].expand_as(gt_images)


def baseline_predictions(names: Iterable[str], batch: Mapping, gt_images: Tensor, mean_image: Tensor | None
                         ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The baselines' predictions of a test batch's novel views, {name: [B, V, 3, H, W]}, and {name: why not} for
    those that cannot be made (no ``cond_image`` in the batch; no mean image, or one of another resolution)."""
    preds: dict[str, Tensor] = {}
    why_not: dict[str, str] = {}
    for name in names:
        if name not in BASELINES:
            raise ValueError(f"unknown baseline {name!r}; the baselines are {list(BASELINES)}")
        try:
            if name == "copy_input":
                if not isinstance(batch, Mapping) or "cond_image" not in batch:
                    raise ValueError("the test batch has no 'cond_image' (gsv3d_pl.batch.BATCH_KEYS)")
                preds[name] = copy_input_views(batch["cond_image"], gt_images)
            else:
                if mean_image is None:
                    raise ValueError("no mean training image")
                preds[name] = mean_image_views(mean_image, gt_images)
        except ValueError as e:  # the row reads "–" with this reason; the model's rows are unaffected
            why_not[name] = str(e)
    return preds, why_not


def unshuffled(loader: Iterable) -> Iterable:
    """``loader`` in its dataset's order: a DataLoader over the same dataset, batch size, workers and collate, without
    shuffling (a training loader shuffles; the first ``max_objects`` must be the same objects on every rank and run).
    Anything that is not a map-style DataLoader is returned as is."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return loader
    return DataLoader(loader.dataset, batch_size=loader.batch_size or 1, shuffle=False,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      worker_init_fn=loader.worker_init_fn)


@torch.no_grad()
def training_mean_image(datamodule, max_objects: int | None) -> tuple[Tensor, int]:
    """The mean training image [3, H, W] of ``datamodule``'s training split and the number of objects it averages.

    Raises LookupError without a datamodule (``trainer.test(model, dataloaders=...)``); whatever the datamodule's
    ``train_dataloader`` raises for a missing or empty training split; RuntimeError for an empty loader."""
    from gsv3d_pl.stages.heldout import mean_training_image  # here: results.py and `gsv3d report` import the labels

    if datamodule is None or not hasattr(datamodule, "train_dataloader"):
        raise LookupError("the trainer has no datamodule with a train_dataloader")
    return mean_training_image(unshuffled(datamodule.train_dataloader()), max_objects)


def summarize_baseline(records: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, dict]:
    """{uid: {key: per-view values [V]}} -> {key: {"value", "num_objects", "num_views"}} for :data:`BASELINE_KEYS`:
    the mean over all (object, view) images, as the model's per-image columns."""
    out: dict[str, dict] = {}
    n_obj = len(records)
    for key in BASELINE_KEYS:
        if n_obj and all(key in r for r in records.values()):
            vals = np.concatenate([np.asarray(r[key], dtype=np.float64).reshape(-1) for r in records.values()])
            out[key] = {"value": float(vals.mean()) if vals.size else float("nan"), "num_objects": n_obj,
                        "num_views": int(vals.size)}
    return out
