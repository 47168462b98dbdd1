"""Evaluation callbacks: appearance (PSNR, SSIM, LPIPS, FID, KID, CLIP-IQA) and geometry (CD, IoU, F-Score).

Both consume what ``test_step`` (and ``validation_step``) return, the novel-view result of
:data:`gsv3d_pl.batch.NOVEL_VIEW_KEYS`::

    pred_images [B, V, 3, H, W], gt_images [B, V, 3, H, W], pred_alphas / pred_depths [B, V, 1, H, W],
    eval_c2w [B, V, 4, 4], eval_K [B, V, 3, 3], gaussians (Gaussians, batch [B])

plus these keys of the multi-view batch (:data:`gsv3d_pl.batch.BATCH_KEYS`): ``uid``, ``mesh_path``,
``norm_center`` [B, 3], ``norm_scale`` [B].

Design:
- The metric networks live in the callback (built in ``setup``), never in the LightningModule, so they
  never end up in checkpoints; ``state_dict`` of the callbacks is empty.
- Scores are kept *per object* (keyed by uid). At epoch end **every rank** gathers all ranks' records
  (``all_gather_object``), drops duplicate uids (DistributedSampler pads the last batch with repeats),
  and computes the same numbers; rank 0 writes them. So a DDP evaluation equals a 1-process one.
- ``gsv3d test`` writes ``metrics.json``, ``metrics.csv``, ``metrics_per_object.csv`` (one row per uid) and
  ``results.md`` into ``trainer.default_root_dir`` (see :mod:`gsv3d_pl.metrics.results`).
- **Variants.** A ``test_step`` may score several variants of the model on the same batch (DistillStage's
  ``test_variants``: the LoRA off and on, for Table 1's "SV3D" and "GSV3D" rows of ours). It then returns
  ``{"variants": {name: <novel-view result>}, ...}``; the callbacks keep one set of per-object records per
  variant and write each into ``metrics.json["variants"][name]``, the ``variant`` column of
  ``metrics_per_object.csv`` and one results.md row per variant (:func:`gsv3d_pl.metrics.results.merge_metrics`).
  An output without ``"variants"`` is one model, as before.
- **Model-free baselines** (:mod:`gsv3d_pl.metrics.baselines`). AppearanceMetrics also scores, in ``test``,
  "copy the input image" (the batch's ``cond_image`` as every novel view) and "mean training image" (the mean of
  the datamodule's training views) on the same novel views and GT, once per batch (every variant has the same GT),
  and writes them to ``metrics.json["baselines"]``: the rows "(no model)" of results.md and of ``gsv3d report``.
- An object whose prediction has no predicted surface (no rendered pixel with alpha > ``alpha_threshold``) is
  *missed*: GeometryMetrics scores it by :data:`gsv3d_pl.metrics.geometry.MISSED_RULE` (finite, so the means stay
  finite) and counts it in ``meta.num_missed_objects`` / ``meta.missed_objects``.
"""

from __future__ import annotations

import math
import sys
import uuid
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from gsv3d_pl.batch import BatchError, check_novel_views
from gsv3d_pl.metrics.baselines import (
    BASELINE_KEYS,
    BASELINES,
    baseline_predictions,
    summarize_baseline,
    training_mean_image,
)
from gsv3d_pl.metrics.columns import CONSISTENCY_KEYS, GEOMETRY_KEYS, PER_IMAGE_KEYS
from gsv3d_pl.metrics.geometry import MISSED_RULE, evaluate_geometry, load_normalized_mesh
from gsv3d_pl.metrics.image import build_image_metrics, image_metric_weight_specs
from gsv3d_pl.metrics.results import merge_metrics, primary_variant

__all__ = ["MetricCallback", "AppearanceMetrics", "GeometryMetrics", "gather_records", "gather_variant_records"]

_REQUIRED_OUT = ("pred_images", "gt_images", "pred_alphas", "pred_depths", "eval_c2w", "eval_K", "gaussians")


def _all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a collective call under torch.distributed), or ``[obj]`` without it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, obj)
        return parts
    return [obj]


def _merge_parts(parts: list[dict[str, dict]]) -> dict[str, dict]:
    merged: dict[str, dict] = {}
    for part in parts:
        for uid, rec in part.items():
            merged.setdefault(uid, rec)
    return dict(sorted(merged.items()))


def gather_records(records: dict[str, dict]) -> dict[str, dict]:
    """All ranks' per-object records merged (first occurrence of a uid wins), on every rank.

    A collective call under torch.distributed: every rank must call it.
    """
    return _merge_parts(_all_gather(records))


def gather_variant_records(records: dict[str | None, dict[str, dict]]) -> dict[str | None, dict[str, dict]]:
    """:func:`gather_records` of each variant's records ({variant: {uid: record}}), in one collective call (so a
    rank that saw no batch, or fewer variants, cannot desynchronise the ranks). Variants keep the order of their
    first appearance, rank 0 first."""
    parts = _all_gather(records)
    names: list[str | None] = []
    for part in parts:
        names += [v for v in part if v not in names]
    return {v: _merge_parts([p.get(v, {}) for p in parts]) for v in names}


def _variant_outputs(outputs: Any) -> dict[str | None, Any]:
    """{variant: novel-view result} of a step's outputs: ``outputs["variants"]`` when the stage scored several
    variants, else ``{None: outputs}``."""
    if isinstance(outputs, dict) and "variants" in outputs:
        variants = outputs["variants"]
        if not isinstance(variants, dict) or not variants or not all(isinstance(k, str) for k in variants):
            raise KeyError("metric callbacks: outputs['variants'] must be a non-empty {variant name: novel-view "
                           f"result}} dict, got {type(variants).__name__}")
        return dict(variants)
    return {None: outputs}


def _eval_id(trainer: pl.Trainer) -> str:
    """One id per evaluation run, shared by all metric callbacks of the trainer (rank 0 writes it)."""
    eid = getattr(trainer, "_gsv3d_eval_id", None)
    if eid is None:
        eid = uuid.uuid4().hex
        trainer._gsv3d_eval_id = eid
    return eid


def _config_paths() -> str | None:
    """The ``--config`` files of the command line (LightningCLI), comma-separated."""
    argv, out = sys.argv, []
    for i, a in enumerate(argv):
        if a in ("--config", "-c") and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif a.startswith("--config="):
            out.append(a.split("=", 1)[1])
    return ",".join(out) or None


def _check_outputs(outputs: Any, who: str) -> dict:
    try:  # keys and shapes (B, V, H, W agree across keys), named in the message
        check_novel_views(outputs, required=_REQUIRED_OUT)
    except BatchError as e:
        raise KeyError(f"{who}: test_step/validation_step must return the novel-view result "
                       f"(gsv3d_pl.batch.NOVEL_VIEW_KEYS) with keys {list(_REQUIRED_OUT)}: {e}") from None
    return outputs


def _uids(batch: dict, n: int) -> list[str]:
    uid = batch.get("uid") if isinstance(batch, dict) else None
    if uid is None:
        raise KeyError("metric callbacks: the batch has no 'uid' key (gsv3d_pl.batch.BATCH_KEYS); it identifies "
                       "objects across ranks")
    return [str(u) for u in (uid if isinstance(uid, (list, tuple)) else [uid] * n)]


def _stat(values: list[float], n_obj: int, n_views: int) -> dict:
    v = float(np.mean(values)) if values else float("nan")
    return {"value": v, "num_objects": int(n_obj), "num_views": int(n_views)}


class MetricCallback(pl.Callback):
    """Base of the metric callbacks: per-object records for the current test/validation epoch, a DDP gather,
    and ``metrics.json`` / ``results.md`` at the end of ``test``.

    A new metric implements two methods (``docs/extending.md``): ``object_records`` turns one batch's
    novel-view result into ``{uid: record}``, and ``aggregate`` turns every object's record into
    ``({metric_key: {"value", "num_objects", "num_views"}}, meta)``. Give the key a column in
    :mod:`gsv3d_pl.metrics.columns` to see it in the tables. Optionally ``per_object`` turns the records into
    ``{uid: {key: float}}`` for ``metrics_per_object.csv`` (default: nothing).
    """

    def __init__(self, on_validation: bool = False, write_results: bool = True):
        super().__init__()
        self.on_validation = on_validation
        self.write_results = write_results
        self._records: dict[str | None, dict[str, dict]] = {}  # {variant (None: one model): {uid: record}}
        self.last_metrics: dict[str, dict] = {}  # the primary variant's (or the one model's)
        self.last_variant_metrics: dict[str, dict[str, dict]] = {}  # {variant: metrics}, when variants were scored

    def object_records(self, outputs: dict, batch: dict, device: torch.device) -> dict[str, dict]:
        raise NotImplementedError

    def aggregate(self, records: dict[str, dict]) -> tuple[dict[str, dict], dict]:
        raise NotImplementedError

    def per_object(self, records: dict[str, dict]) -> dict[str, dict[str, float]]:
        """{uid: {column key: float}}: this callback's columns of ``metrics_per_object.csv``."""
        return {}

    def baseline_results(self, trainer: pl.Trainer) -> dict[str, dict] | None:
        """metrics.json's ``baselines`` of this test ({name: {key: stat} | {"skipped": reason}}), or None (this
        callback scores none). Called on every rank at the end of ``test`` (it may gather across ranks)."""
        return None

    def _update(self, pl_module, outputs, batch) -> None:
        for variant, out in _variant_outputs(outputs).items():
            who = type(self).__name__ + ("" if variant is None else f" (variant {variant!r})")
            out = _check_outputs(out, who)
            recs = self._records.setdefault(variant, {})
            for uid, rec in self.object_records(out, batch, pl_module.device).items():
                recs.setdefault(uid, rec)

    def _finish(self, trainer: pl.Trainer) -> dict[str | None, tuple[dict, dict, dict[str, dict]]]:
        """{variant: (metrics, meta, records)} of the epoch (one entry, None, for a one-model output)."""
        by_variant = gather_variant_records(self._records)  # collective: every rank
        self._records = {}
        if None in by_variant and len(by_variant) > 1:
            raise KeyError(f"{type(self).__name__}: some test/validation steps returned 'variants' and some did not")
        out = {v: (*self.aggregate(recs), recs) for v, recs in by_variant.items()}
        names = [v for v in out if v is not None]
        self.last_variant_metrics = {v: out[v][0] for v in names}
        if out:
            self.last_metrics = out[primary_variant(names) if names else None][0]
        return out

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._records = {}
        _eval_id(trainer)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update(pl_module, outputs, batch)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        results = self._finish(trainer)
        baselines = self.baseline_results(trainer)  # collective: every rank, before rank 0 alone writes
        if not (self.write_results and trainer.is_global_zero):
            return
        shared = {"eval_id": _eval_id(trainer), "ckpt_path": trainer.ckpt_path, "config": _config_paths()}
        names = [v for v in results if v is not None]
        for variant, (metrics, meta, records) in results.items():
            merge_metrics(trainer.default_root_dir, metrics, {**meta, **shared}, self.per_object(records),
                          variant=variant, variants=names or None, baselines=baselines)
            rank_zero_info(f"{type(self).__name__}" + ("" if variant is None else f" [{variant}]") + ": " + ", ".join(
                f"{k}={v['value']:.4f}" for k, v in metrics.items()) + f" -> {trainer.default_root_dir}/metrics.json")

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._records = {}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.on_validation and not trainer.sanity_checking:
            self._update(pl_module, outputs, batch)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self.on_validation or trainer.sanity_checking:
            return
        # Identical on every rank after the gather, so no further reduction is needed.
        for variant, (metrics, _, _) in self._finish(trainer).items():
            prefix = "val" if variant is None else f"val/{variant}"
            for k, v in metrics.items():
                if math.isfinite(v["value"]):
                    pl_module.log(f"{prefix}/{k}", v["value"], sync_dist=False, rank_zero_only=False)


class AppearanceMetrics(MetricCallback):
    """PSNR, SSIM, LPIPS, FID, KID and CLIP-IQA of the rendered novel views vs the GT views.

    When the stage's result carries the 3D-consistency scores (``consistency_psnr`` / ``consistency_ssim``
    [B, F]: DistillStage, :mod:`gsv3d_pl.metrics.consistency`), they are passed through as two more metrics (mean
    over all (object, frame) images, per variant) and per-object columns: the stage computed them (it holds the
    generated orbit and the VAE), so they need no metric network and are valid in smoke mode too.

    Args:
        mode: "pretrained" (published networks from local files) or "smoke" (random-init, pipeline check).
        lpips_backbone_path, inception_path, clip_iqa_path: explicit local weight files; default: the
            standard caches ($TORCH_HOME/hub/checkpoints, the HF cache). See ``gsv3d weights``.
        clip_iqa_model: open_clip model name for CLIP-IQA ("RN50-quickgelu" = OpenAI RN50).
        kid_subset_size, kid_subsets: KID's subset size (capped at the number of views) and count.
        baselines: the model-free baselines ``test`` scores beside the model, ``copy_input`` and ``mean_image``
            (:mod:`gsv3d_pl.metrics.baselines`); ``[]`` scores none.
        baseline_max_objects: the mean training image averages the first this many training objects (dataset
            order; None = all): a full pass over a large training set at test time buys nothing over 1024 objects.
        on_validation: also compute (and log as ``val/<metric>``) during validation.
        write_results: write metrics.json/csv and results.md at the end of ``test``.
    """

    def __init__(
        self,
        mode: str = "pretrained",
        lpips_backbone_path: str | None = None,
        inception_path: str | None = None,
        clip_iqa_path: str | None = None,
        clip_iqa_model: str = "RN50-quickgelu",
        kid_subset_size: int = 1000,
        kid_subsets: int = 100,
        baselines: Sequence[str] = BASELINES,
        baseline_max_objects: int | None = 1024,
        on_validation: bool = False,
        write_results: bool = True,
    ):
        super().__init__(on_validation, write_results)
        unknown = [b for b in baselines if b not in BASELINES]
        if unknown:
            raise ValueError(f"AppearanceMetrics: unknown baselines {unknown}; choose from {list(BASELINES)}")
        self.baselines = tuple(dict.fromkeys(baselines))
        self.baseline_max_objects = baseline_max_objects
        self._baseline_records: dict[str, dict[str, dict]] = {}  # {baseline: {uid: {key: per-view values [V]}}}
        self._baseline_skipped: dict[str, str] = {}  # {baseline: why it is not scored}
        self._mean_image: torch.Tensor | None = None  # [3, H, W], for the test epoch
        self._train_objects = 0
        self.mode = mode
        self.kwargs = dict(mode=mode, lpips_backbone_path=lpips_backbone_path, inception_path=inception_path,
                           clip_iqa_path=clip_iqa_path, clip_iqa_model=clip_iqa_model,
                           kid_subset_size=kid_subset_size, kid_subsets=kid_subsets)
        self._metrics = None  # built in setup: never an attribute of the LightningModule

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage in ("test", "validate") or self.on_validation:
            if self._metrics is None:  # raises MissingWeightsError listing every missing file, at start
                self._metrics = build_image_metrics(**self.kwargs, key_prefix="trainer.callbacks[*].init_args.")

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        super().on_test_epoch_start(trainer, pl_module)
        self._baseline_records, self._baseline_skipped, self._mean_image = {}, {}, None
        if "mean_image" in self.baselines:
            try:
                self._mean_image, self._train_objects = training_mean_image(trainer.datamodule,
                                                                            self.baseline_max_objects)
            except Exception as e:  # noqa: BLE001 - a model-free row must never fail a model's test; its row says why
                self._skip_baseline("mean_image", f"no training images ({type(e).__name__}: {e})")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if self.baselines:
            self._update_baselines(pl_module, outputs, batch)

    def _skip_baseline(self, name: str, reason: str) -> None:
        if name not in self._baseline_skipped:
            self._baseline_skipped[name] = reason
            rank_zero_warn(f"AppearanceMetrics: baseline {name!r} not scored: {reason}")

    @torch.no_grad()
    def _update_baselines(self, pl_module, outputs, batch) -> None:
        """Score the model-free baselines on this batch's novel views: once, whatever the number of variants (they
        share the objects, views and GT)."""
        gt = next(iter(_variant_outputs(outputs).values()))["gt_images"]  # [B, V, 3, H, W]
        todo = [n for n in self.baselines if n not in self._baseline_skipped]
        preds, why_not = baseline_predictions(todo, batch, gt, self._mean_image)
        for name, reason in why_not.items():
            self._skip_baseline(name, reason)
        for name, pred in preds.items():  # [B, V, 3, H, W]
            recs = self._baseline_records.setdefault(name, {})
            for b, uid in enumerate(_uids(batch, gt.shape[0])):
                if uid not in recs:
                    s = self._metrics.per_image(pred[b].to(pl_module.device), gt[b].to(pl_module.device),
                                                with_clip_iqa=False)
                    recs[uid] = {k: s[k].double().cpu().numpy() for k in BASELINE_KEYS}

    def baseline_results(self, trainer):
        if not self.baselines:
            return None
        parts = _all_gather((self._baseline_records, self._baseline_skipped, self._train_objects))
        self._baseline_records, self._mean_image = {}, None
        out: dict[str, dict] = {}
        for name in self.baselines:
            reason = next((p[1][name] for p in parts if name in p[1]), None)
            recs = _merge_parts([p[0].get(name, {}) for p in parts])
            if reason is not None or not recs:  # a baseline of some objects only would mislead: all or none
                out[name] = {"skipped": reason or "no test batch was scored"}
                continue
            out[name] = summarize_baseline(recs)
            if name == "mean_image":
                out[name]["meta"] = {"train_objects": int(parts[0][2]), "max_objects": self.baseline_max_objects}
        return out

    @torch.no_grad()
    def object_records(self, outputs, batch, device):
        # The module reaches its device after the callbacks' setup, so follow it here.
        if next(self._metrics.parameters()).device != device:
            self._metrics.to(device)
        pred, gt = outputs["pred_images"], outputs["gt_images"]  # [B, V, 3, H, W]
        B = pred.shape[0]
        recs = {}
        for b, uid in enumerate(_uids(batch, B)):
            p, g = pred[b].to(device), gt[b].to(device)  # [V, 3, H, W]
            s = self._metrics.per_image(p, g)  # dict of [V]
            recs[uid] = {
                **{k: v.double().cpu().numpy() for k, v in s.items()},
                **{k: outputs[k][b].double().cpu().numpy() for k in CONSISTENCY_KEYS if k in outputs},  # [F]
                "fake": self._metrics.features(p).cpu(),  # [V, d]
                "real": self._metrics.features(g).cpu(),  # [V, d]
            }
        return recs

    def aggregate(self, records):
        n_obj = len(records)
        if n_obj == 0:
            return {}, {"smoke": self.mode == "smoke"}
        n_views = int(sum(len(r["psnr"]) for r in records.values()))
        out = {}
        for k in PER_IMAGE_KEYS:  # mean over all (object, view) images
            out[k] = _stat(list(np.concatenate([r[k] for r in records.values()])), n_obj, n_views)
        real = torch.cat([r["real"] for r in records.values()])  # [n_views, d]
        fake = torch.cat([r["fake"] for r in records.values()])
        fid, kid, kid_std = self._metrics.fid_kid(real, fake)
        out["fid"] = {"value": fid, "num_objects": n_obj, "num_views": n_views}
        out["kid"] = {"value": kid, "num_objects": n_obj, "num_views": n_views}
        for k in CONSISTENCY_KEYS:  # only when every object has it: a mean over some objects would mislead
            if all(k in r for r in records.values()):
                vals = np.concatenate([r[k] for r in records.values()])  # all (object, orbit frame) images
                out[k] = _stat(list(vals), n_obj, len(vals))
        meta = {"smoke": self.mode == "smoke", "appearance_mode": self.mode, "kid_std": kid_std,
                "kid_subset_size": min(self.kwargs["kid_subset_size"], n_views)}
        return out, meta

    def per_object(self, records):
        # The mean over the object's views of each per-image score (FID/KID are set statistics: none per object).
        return {uid: {**{k: float(np.mean(r[k])) for k in (*PER_IMAGE_KEYS, *CONSISTENCY_KEYS) if k in r},
                      "num_views": float(len(r["psnr"]))}
                for uid, r in records.items()}


class GeometryMetrics(MetricCallback):
    """Chamfer distance, volume IoU and F-Score@τ of the predicted Gaussians vs the GT mesh (unit-bbox frame).

    Args:
        tau: F-Score threshold in unit-bbox units (0.05 = 5% of the largest bbox side).
        num_gt_points: points sampled on the GT surface (fixed seed).
        num_pred_points: cap on back-projected predicted points (uniform subsample, fixed seed); None = all.
        alpha_threshold: pixels with rendered alpha above it are back-projected.
        iou_resolution: voxels per axis of the IoU grid over [-0.5, 0.5]³.
        density_threshold: Gaussian density level of the predicted surface shell.
        mesh_occupancy_method: "parity" (default) or "winding"; see ``gsv3d_pl.metrics.geometry.mesh_occupancy``.
        on_validation, write_results: as for :class:`AppearanceMetrics`.

    A *missed* object (no rendered pixel with alpha > ``alpha_threshold``: no predicted surface) is scored by
    :data:`gsv3d_pl.metrics.geometry.MISSED_RULE` (CD against a single point at the origin, F-Score 0, IoU 0) and
    included in the means, which therefore stay finite; ``meta.num_missed_objects`` counts such objects and
    ``meta.missed_objects`` lists their uids.
    """

    def __init__(
        self,
        tau: float = 0.05,
        num_gt_points: int = 100_000,
        num_pred_points: int | None = 100_000,
        alpha_threshold: float = 0.5,
        iou_resolution: int = 64,
        density_threshold: float = 0.5,
        mesh_occupancy_method: str = "parity",
        on_validation: bool = False,
        write_results: bool = True,
    ):
        super().__init__(on_validation, write_results)
        self.tau = tau
        self.kwargs = dict(tau=tau, num_gt_points=num_gt_points, num_pred_points=num_pred_points,
                           alpha_threshold=alpha_threshold, iou_resolution=iou_resolution,
                           density_threshold=density_threshold, mesh_occupancy_method=mesh_occupancy_method)

    @torch.no_grad()
    def object_records(self, outputs, batch, device):
        for key in ("mesh_path", "norm_center", "norm_scale"):
            if key not in batch:
                raise KeyError(f"GeometryMetrics: the batch has no {key!r} (gsv3d_pl.batch.BATCH_KEYS); it is "
                               "needed to load the GT mesh in the unit-bbox frame")
        depth, alpha = outputs["pred_depths"], outputs["pred_alphas"]  # [B, V, 1, H, W]
        B = depth.shape[0]
        recs = {}
        for b, uid in enumerate(_uids(batch, B)):
            mesh = load_normalized_mesh(batch["mesh_path"][b], batch["norm_center"][b], batch["norm_scale"][b])
            g = outputs["gaussians"][b]
            res = evaluate_geometry(
                depth[b, :, 0].float(), alpha[b, :, 0].float(), outputs["eval_c2w"][b].float(),
                outputs["eval_K"][b].float(), g.detach(), mesh, **self.kwargs,
            )
            recs[uid] = {**res, "num_views": int(depth.shape[1])}
        return recs

    def aggregate(self, records):
        n_obj = len(records)
        meta = {"fscore_tau": self.tau}
        if n_obj == 0:
            return {}, meta
        n_views = int(sum(r["num_views"] for r in records.values()))
        out = {k: _stat([r[k] for r in records.values()], n_obj, n_views) for k in GEOMETRY_KEYS}
        missed = [uid for uid, r in records.items() if r.get("missed")]
        if missed:
            rank_zero_warn(f"GeometryMetrics: {len(missed)} of {n_obj} objects have no predicted surface (no pixel "
                           f"with alpha > {self.kwargs['alpha_threshold']}), e.g. {missed[0]}; scored as {MISSED_RULE}")
        meta.update({
            "num_missed_objects": len(missed),
            "missed_objects": missed,
            "num_non_watertight": int(sum(1 - r["watertight"] for r in records.values())),
            "geometry": {k: self.kwargs[k] for k in ("num_gt_points", "num_pred_points", "alpha_threshold",
                                                     "iou_resolution", "density_threshold",
                                                     "mesh_occupancy_method")},
        })
        return out, meta

    def per_object(self, records):
        keys = (*GEOMETRY_KEYS, "missed", "num_pred_points", "chamfer_acc", "chamfer_comp", "precision", "recall",
                "watertight", "num_views")
        return {uid: {k: float(r[k]) for k in keys if k in r} for uid, r in records.items()}


def _appearance_specs(init_args: dict, key_prefix: str) -> list:
    """The metric networks' files an ``AppearanceMetrics(**init_args)`` at config key ``key_prefix`` needs."""
    a = init_args or {}
    return image_metric_weight_specs(a.get("mode", "pretrained"), a.get("lpips_backbone_path"),
                                     a.get("inception_path"), a.get("clip_iqa_path"), f"{key_prefix}.init_args.")


AppearanceMetrics.weight_specs = staticmethod(_appearance_specs)  # what `gsv3d weights` lists for it
