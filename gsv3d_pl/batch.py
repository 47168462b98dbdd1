"""The multi-view batch and the novel-view result: every key, its shape, dtype, meaning and who reads it.

A datamodule for either stage yields :class:`MultiViewBatch` dicts; a stage's ``validation_step`` /
``test_step`` returns a :class:`NovelViews` dict, which the metric and image callbacks consume. Shapes are
per batch (a dataset item has the same keys without the leading ``B``):

- ``B`` objects, ``Q`` target views per object (the 21 orbit frames first, then extra views),
  ``N`` input views, ``V = Q − N`` novel (non-input) views, ``F = 21 − N`` orbit frames that are not inputs;
- images ``H × W`` (the render resolution), latents ``h × w`` (H / the VAE factor), 4 channels.

Images are float32 RGB in [0, 1], channels-first; depth is planar camera z in world units (0 off-surface);
cameras are OpenCV camera-to-world matrices with pixel-centre intrinsics (``docs/conventions.md``).

:func:`check_batch` validates a batch against this table (keys, ranks, and that B, Q, N, H, W agree), so a
new datamodule fails with a message that names the key instead of a shape error deep inside a loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict

import torch
from torch import Tensor

from gsv3d_pl.orbit import NUM_FRAMES

__all__ = ["Key", "BATCH_KEYS", "NOVEL_VIEW_KEYS", "MultiViewBatch", "NovelViews", "check_batch",
           "check_novel_views", "BatchError"]


@dataclass(frozen=True)
class Key:
    """One key of a batch dict: shape (symbols B, Q, N, V, H, W, h, w), dtype, meaning and readers."""

    shape: tuple[str, ...] | None  # None: not a tensor (e.g. a list of strings)
    dtype: str
    meaning: str
    read_by: str
    optional: bool = False


BATCH_KEYS: dict[str, Key] = {
    "uid": Key(None, "list[str]", "object id (identifies objects across ranks and in per-object metrics)",
               "metric callbacks"),
    "mesh_path": Key(None, "list[str]", "the object's mesh file (geometry metrics sample GT points from it)",
                     "GeometryMetrics"),
    "norm_center": Key(("B", "3"), "float32", "world = (mesh − norm_center) · norm_scale: the unit-cube "
                       "normalisation of the mesh", "GeometryMetrics"),
    "norm_scale": Key(("B",), "float32", "see norm_center", "GeometryMetrics"),
    "input_indices": Key(("B", "N"), "int64", "which of the Q target views are the decoder's inputs (distinct; "
                         "orbit frames < 21 for the distill stage)", "both stages, callbacks"),
    "input_images": Key(("B", "N", "3", "H", "W"), "float32", "the input views (= target_images[input_indices])",
                        "DecoderStage (without a latent cache), visuals"),
    "input_c2w": Key(("B", "N", "4", "4"), "float32", "the input views' cameras", "DecoderStage"),
    "input_K": Key(("B", "N", "3", "3"), "float32", "the input views' intrinsics at H × W", "DecoderStage"),
    "cond_image": Key(("B", "3", "H", "W"), "float32", "the conditioning image R = orbit frame 20 (the input "
                      "view): DINO tokens for the decoder, CLIP + VAE conditioning for SV3D", "both stages"),
    "target_images": Key(("B", "Q", "3", "H", "W"), "float32", "all Q views: the 21 orbit frames, then extra "
                         "views", "both stages"),
    "target_alphas": Key(("B", "Q", "1", "H", "W"), "float32", "silhouettes in [0, 1]", "both stages"),
    "target_depths": Key(("B", "Q", "1", "H", "W"), "float32", "planar camera z, 0 off-surface", "both stages"),
    "target_c2w": Key(("B", "Q", "4", "4"), "float32", "the Q views' cameras", "both stages"),
    "target_K": Key(("B", "Q", "3", "3"), "float32", "the Q views' intrinsics at H × W", "both stages"),
    "orbit_polars_rad": Key(("B", str(NUM_FRAMES)), "float32", "SV3D's camera input: radians(90 − elevation) "
                            "per orbit frame", "DistillStage"),
    "orbit_azimuths_rad": Key(("B", str(NUM_FRAMES)), "float32", "SV3D's camera input: azimuth relative to the "
                              "input view", "DistillStage"),
    "target_latents": Key(("B", "Q", "C", "h", "w"), "float32", "scaled VAE latents of the Q views (C = 4 for SD's VAE), present when "
                          "the datamodule caches them (``set_latent_encoder``)", "both stages", optional=True),
}

NOVEL_VIEW_KEYS: dict[str, Key] = {
    "pred_images": Key(("B", "V", "3", "H", "W"), "float32", "rendered novel views, clamped to [0, 1]",
                       "metric callbacks, visuals"),
    "pred_alphas": Key(("B", "V", "1", "H", "W"), "float32", "rendered accumulated opacity", "GeometryMetrics"),
    "pred_depths": Key(("B", "V", "1", "H", "W"), "float32", "rendered expected depth (Σwz / Σw)",
                       "GeometryMetrics, visuals"),
    "gt_images": Key(("B", "V", "3", "H", "W"), "float32", "ground truth of the novel views", "metric callbacks"),
    "gt_alphas": Key(("B", "V", "1", "H", "W"), "float32", "ground-truth silhouettes", "GeometryMetrics"),
    "gt_depths": Key(("B", "V", "1", "H", "W"), "float32", "ground-truth depth", "GeometryMetrics"),
    "eval_c2w": Key(("B", "V", "4", "4"), "float32", "the novel views' cameras", "GeometryMetrics"),
    "eval_K": Key(("B", "V", "3", "3"), "float32", "the novel views' intrinsics", "GeometryMetrics"),
    "novel_indices": Key(("B", "V"), "int64", "which target views the novel views are", "visuals"),
    "input_images": Key(("B", "N", "3", "H", "W"), "float32", "the input views (for image grids)", "visuals"),
    "gaussians": Key(None, "Gaussians", "the predicted Gaussians, batch shape [B] (detached)",
                     "GeometryMetrics, visuals (.ply / turntable)"),
    # DistillStage only (a generated orbit to check): gsv3d_pl.metrics.consistency
    "consistency_psnr": Key(("B", "F"), "float32", "3D consistency (ours, no GT): PSNR (dB) of the Gaussians "
                            "rendered at each orbit frame the decoder did not read vs that generated frame, "
                            "VAE-decoded", "AppearanceMetrics, held-out evaluation", optional=True),
    "consistency_ssim": Key(("B", "F"), "float32", "3D consistency (ours, no GT): SSIM of the same pairs",
                            "AppearanceMetrics, held-out evaluation", optional=True),
}


class MultiViewBatch(TypedDict, total=False):
    """A collated multi-view batch; see :data:`BATCH_KEYS` for every key's shape and meaning."""

    uid: list[str]
    mesh_path: list[str]
    norm_center: Tensor
    norm_scale: Tensor
    input_indices: Tensor
    input_images: Tensor
    input_c2w: Tensor
    input_K: Tensor
    cond_image: Tensor
    target_images: Tensor
    target_alphas: Tensor
    target_depths: Tensor
    target_c2w: Tensor
    target_K: Tensor
    orbit_polars_rad: Tensor
    orbit_azimuths_rad: Tensor
    target_latents: Tensor


class _NovelViewsBase(TypedDict):
    pred_images: Tensor
    pred_alphas: Tensor
    pred_depths: Tensor
    gt_images: Tensor
    gt_alphas: Tensor
    gt_depths: Tensor
    eval_c2w: Tensor
    eval_K: Tensor
    novel_indices: Tensor
    input_images: Tensor
    gaussians: Any


class NovelViews(_NovelViewsBase, total=False):
    """What a stage's ``validation_step`` / ``test_step`` returns; see :data:`NOVEL_VIEW_KEYS` (the keys below are
    the optional ones; ``total=False`` rather than ``NotRequired``, which Python 3.10 lacks)."""

    consistency_psnr: Tensor
    consistency_ssim: Tensor


class BatchError(KeyError):
    """A batch that does not follow :data:`BATCH_KEYS` / :data:`NOVEL_VIEW_KEYS`; the message names the key."""

    def __str__(self) -> str:  # KeyError quotes its message; print it as written
        return str(self.args[0]) if self.args else ""


def _check(d: dict, table: dict[str, Key], what: str, batched: bool, required: tuple[str, ...] | None) -> dict[str, int]:
    if not isinstance(d, dict):
        raise BatchError(f"{what}: expected a dict, got {type(d).__name__}")
    names = tuple(k for k, spec in table.items() if not spec.optional) if required is None else required
    missing = [k for k in names if k not in d]
    if missing:
        raise BatchError(f"{what}: missing key(s) {missing}; every key and its shape is listed in gsv3d_pl.batch "
                         f"(have {sorted(d)})")
    sizes: dict[str, int] = {}
    for key, spec in table.items():
        if key not in d or spec.shape is None:
            continue
        shape = spec.shape if batched else spec.shape[1:]
        x = d[key]
        if not torch.is_tensor(x):
            raise BatchError(f"{what}: {key!r} must be a tensor of shape {list(shape)}, got {type(x).__name__}")
        if x.dim() != len(shape):
            raise BatchError(f"{what}: {key!r} has shape {list(x.shape)}, expected {list(shape)}")
        for sym, n in zip(shape, x.shape):
            if sym.isdigit():
                if int(sym) != n:
                    raise BatchError(f"{what}: {key!r} has shape {list(x.shape)}, expected {list(shape)}")
            elif sizes.setdefault(sym, n) != n:
                raise BatchError(f"{what}: {key!r} has {sym} = {n} in shape {list(x.shape)}, but an earlier key "
                                 f"has {sym} = {sizes[sym]} (expected {list(shape)})")
        if spec.dtype.startswith("float") and not x.is_floating_point():
            raise BatchError(f"{what}: {key!r} must be floating point, got {x.dtype}")
        if spec.dtype == "int64" and (x.is_floating_point() or x.is_complex()):
            raise BatchError(f"{what}: {key!r} must be an integer tensor, got {x.dtype}")
    return sizes


def check_batch(batch: dict, batched: bool = True, required: tuple[str, ...] | None = None) -> dict[str, int]:
    """Validate a multi-view batch (``batched=False``: one dataset item) against :data:`BATCH_KEYS`.

    ``required`` defaults to every non-optional key. Returns the sizes found, e.g. ``{"B": 4, "Q": 25, ...}``.
    Raises :class:`BatchError` naming the key.
    """
    sizes = _check(batch, BATCH_KEYS, "multi-view batch", batched, required)
    if "Q" in sizes and sizes["Q"] < NUM_FRAMES and "orbit_polars_rad" in batch:
        raise BatchError(f"multi-view batch: target views must start with the {NUM_FRAMES} orbit frames, "
                         f"got Q = {sizes['Q']}")
    return sizes


def check_novel_views(out: dict, required: tuple[str, ...] | None = None) -> dict[str, int]:
    """Validate a stage's novel-view result against :data:`NOVEL_VIEW_KEYS`; raises :class:`BatchError`."""
    return _check(out, NOVEL_VIEW_KEYS, "novel-view result", True, required)
