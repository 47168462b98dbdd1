"""The model-free rows of `gsv3d test` ("copy the input image", "mean training image"): gsv3d_pl/metrics/baselines.py
and AppearanceMetrics' scoring of them, against hand computations on constructed batches; their rows in results.md."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader
from torchmetrics.functional.image import structural_similarity_index_measure

from gsv3d_pl.metrics.baselines import (
    BASELINE_KIND,
    BASELINE_LABELS,
    copy_input_views,
    mean_image_views,
    training_mean_image,
)
from gsv3d_pl.metrics.columns import COLUMNS, CONSISTENCY_COLUMN
from gsv3d_pl.metrics.results import results_markdown

B, V, H, W = 2, 3, 16, 16
CPU = SimpleNamespace(device=torch.device("cpu"))  # what the callback reads of the LightningModule


def _hand_psnr(pred: torch.Tensor, gt: torch.Tensor) -> float:
    """Mean over (object, view) of −10·log10(MSE): pred, gt [B, V, 3, H, W]."""
    mse = (pred - gt).square().mean(dim=(2, 3, 4))  # [B, V]
    return float((-10.0 * torch.log10(mse)).mean())


class TrainData:
    """A datamodule stub whose training loader shuffles (as the real ones do)."""

    def __init__(self, images: torch.Tensor):  # [n, Q, 3, H, W]
        self.images = images

    def train_dataloader(self) -> DataLoader:
        return DataLoader([{"target_images": x} for x in self.images], batch_size=2, shuffle=True)


def _callback(baselines=("copy_input", "mean_image")):
    from callbacks.metrics import AppearanceMetrics

    cb = AppearanceMetrics(mode="smoke", kid_subsets=2, baselines=list(baselines))
    cb.setup(None, None, "test")  # the smoke metric networks
    return cb


def test_copy_input_baseline_equals_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    cond = torch.rand(B, 3, H, W, generator=g)
    gt = torch.rand(B, V, 3, H, W, generator=g)
    views = copy_input_views(cond, gt)
    assert views.shape == gt.shape and all(torch.equal(views[b, v], cond[b]) for b in range(B) for v in range(V))
    with pytest.raises(ValueError, match="does not match"):
        copy_input_views(cond[:, :, :8], gt)

    cb = _callback(["copy_input"])
    out = {"gt_images": gt, "pred_images": torch.zeros_like(gt)}  # the baseline reads the GT only
    batch = {"uid": ["a", "b"], "cond_image": cond}
    cb._update_baselines(CPU, {"variants": {"undistilled": out, "distilled": out}}, batch)  # once, not per variant
    cb._update_baselines(CPU, out, batch)  # a repeated uid (DDP pads the last batch) counts once
    res = cb.baseline_results(None)
    assert list(res) == ["copy_input"]
    copy = res["copy_input"]
    assert copy["psnr"]["value"] == pytest.approx(_hand_psnr(cond[:, None].expand_as(gt), gt), rel=1e-5)
    ssim = structural_similarity_index_measure(cond[:, None].expand_as(gt).flatten(0, 1), gt.flatten(0, 1),
                                               data_range=1.0, reduction="none")
    assert copy["ssim"]["value"] == pytest.approx(float(ssim.mean()), rel=1e-5)
    assert copy["lpips"]["value"] > 0 and "clip_iqa" not in copy  # no no-reference score of a copied photo
    assert all(copy[k]["num_objects"] == B and copy[k]["num_views"] == B * V for k in ("psnr", "ssim", "lpips"))


def test_mean_image_baseline_uses_the_first_training_objects_in_order_and_equals_a_hand_computation():
    g = torch.Generator().manual_seed(1)
    train = torch.rand(5, 4, 3, H, W, generator=g)  # 5 objects, 4 views each
    mean, n = training_mean_image(TrainData(train), max_objects=3)
    assert n == 3 and torch.allclose(mean, train[:3].mean(dim=(0, 1)), atol=1e-6)  # dataset order, not shuffled
    gt = torch.rand(B, V, 3, H, W, generator=g)
    assert torch.equal(mean_image_views(mean, gt)[1, 2], mean)
    with pytest.raises(ValueError, match="another resolution"):
        mean_image_views(mean[:, :8], gt)

    cb = _callback()
    cb.baseline_max_objects = 3
    trainer = SimpleNamespace(datamodule=TrainData(train))
    cb.on_test_epoch_start(trainer, CPU)
    cb._update_baselines(CPU, {"gt_images": gt}, {"uid": ["a", "b"]})  # no cond_image: copy_input is skipped
    res = cb.baseline_results(trainer)
    expected = train[:3].mean(dim=(0, 1))[None, None].expand_as(gt)
    assert res["mean_image"]["psnr"]["value"] == pytest.approx(_hand_psnr(expected, gt), rel=1e-5)
    assert res["mean_image"]["meta"] == {"train_objects": 3, "max_objects": 3}
    assert res["copy_input"] == {"skipped": "the test batch has no 'cond_image' (gsv3d_pl.batch.BATCH_KEYS)"}


def test_a_baseline_without_inputs_is_skipped_with_its_reason():
    from callbacks.metrics import AppearanceMetrics

    with pytest.raises(ValueError, match="unknown baselines"):
        AppearanceMetrics(mode="smoke", baselines=["nearest_input"])
    cb = _callback()
    trainer = SimpleNamespace(datamodule=None)  # trainer.test(model, dataloaders=...)
    cb.on_test_epoch_start(trainer, CPU)
    res = cb.baseline_results(trainer)
    assert res["mean_image"]["skipped"].startswith("no training images (LookupError")
    assert res["copy_input"] == {"skipped": "no test batch was scored"}
    assert _callback([]).baseline_results(trainer) is None  # none requested: no `baselines` key at all


def test_results_md_prints_the_model_free_rows_and_the_consistency_column():
    stat = lambda v: {"value": v, "num_objects": 2, "num_views": 6}  # noqa: E731
    part = {"psnr": stat(15.0), "ssim": stat(0.8), "consistency_psnr": stat(24.5), "consistency_ssim": stat(0.9)}
    data = {"variants": {"undistilled": {**part, "meta": {}}, "distilled": {**part, "psnr": stat(16.0), "meta": {}}},
            **part, "psnr": stat(16.0),
            "baselines": {"copy_input": {"psnr": stat(12.25), "ssim": stat(0.7), "lpips": stat(0.31)},
                          "mean_image": {"skipped": "no training images (ValueError: empty split)"}},
            "meta": {"fscore_tau": 0.05, "test_variants": ["undistilled", "distilled"]}}
    lines = results_markdown(data).splitlines()
    header = next(ln for ln in lines if ln.startswith("| Type | Method |"))
    assert [c.strip() for c in header.strip("|").split("|")][2:] == [*(c.header(0.05) for c in COLUMNS),
                                                                     CONSISTENCY_COLUMN.header()]
    rows = {c[1]: c[2:] for c in ([x.strip() for x in ln.strip("|").split("|")] for ln in lines
                                  if ln.startswith("| ") and len(ln.split("|")) == len(header.split("|")))}
    assert rows["GSV3D (paper)"][-1] == "–" and rows["GSV3D (ours, distilled)"][0] == "16.000"
    assert rows["GSV3D (ours, distilled)"][-1] == rows["SV3D (ours, undistilled: LoRA off)"][-1] == "24.500"
    copy = rows[BASELINE_LABELS["copy_input"]]
    assert copy[:3] == ["12.250", "0.700", "0.310"] and set(copy[3:]) == {"–"}  # consistency too: no model
    assert set(rows[BASELINE_LABELS["mean_image"]]) == {"–"}
    assert sum(ln.startswith(f"| {BASELINE_KIND} | ") for ln in lines) == 2
    assert "mean training image (no model): not scored: no training images (ValueError: empty split)." in lines
