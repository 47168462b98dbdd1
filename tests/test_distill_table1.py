"""Table 1 end to end in one `gsv3d test` of a distill stage: the LoRA off ("SV3D (ours)") and on ("GSV3D (ours)"),
the same objects and noise, both in metrics.json, metrics.csv, metrics_per_object.csv and results.md."""

from __future__ import annotations

import csv
import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import trimesh

from gsv3d_pl.metrics.baselines import BASELINE_KIND, BASELINE_LABELS
from gsv3d_pl.metrics.columns import COLUMNS, CONSISTENCY_COLUMN, CONSISTENCY_COLUMNS, CONSISTENCY_KEYS
from gsv3d_pl.metrics.paper_tables import table1_rows
from gsv3d_pl.metrics.results import OURS_DISTILLED, OURS_UNDISTILLED, read_per_object_csv
from gsv3d_pl.orbit import NUM_FRAMES
from gsv3d_pl.stages.common import gather_views, novel_view_indices
from gsv3d_pl.stages.e2e import copy_input_scores
from gsv3d_pl.stages.heldout import mean_training_image, per_image_psnr
from tests.synthetic import SyntheticDataModule
from tests.test_distill_stage import decoder_ckpt, lora_params, make_distill  # noqa: F401 (a fixture)

KEYS = ("psnr", "ssim", "lpips", "fid", "kid", "clip_iqa", "chamfer", "iou", "fscore")


def mesh_test_data(tmp_path, n: int = 2) -> SyntheticDataModule:
    """Synthetic test objects, each with a GT mesh file (a box in the unit-bbox frame) for the geometry metrics."""
    dm = SyntheticDataModule(num_train=1, num_val=1, num_test=n, batch_size=1)
    dm.setup()
    for i, item in enumerate(dm.ds["test"].items):
        path = tmp_path / f"gt{i}.ply"
        trimesh.creation.box([0.6, 0.5 + 0.1 * i, 0.4]).export(path)
        item["mesh_path"] = str(path)
    return dm


def run_test(stage, dm, out) -> pl.Trainer:
    from callbacks.metrics import AppearanceMetrics, GeometryMetrics

    cbs = [AppearanceMetrics(mode="smoke", kid_subsets=10),
           GeometryMetrics(num_gt_points=2000, num_pred_points=2000, iou_resolution=16)]
    trainer = pl.Trainer(accelerator="cpu", callbacks=cbs, default_root_dir=str(out), logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.test(stage, datamodule=dm, verbose=False)
    return trainer


def test_gsv3d_test_of_a_distill_stage_scores_the_lora_off_and_on(decoder_ckpt, tmp_path):  # noqa: F811
    dm = mesh_test_data(tmp_path)
    stage = make_distill(decoder_ckpt)
    assert stage.test_variants == ("undistilled", "distilled")
    with torch.no_grad():  # a "trained" LoRA: the distilled pipeline differs from SV3D's
        g = torch.Generator().manual_seed(0)
        for n, p in sorted(lora_params(stage).items()):
            if "lora_B" in n:
                p.copy_(2.0 * torch.randn(p.shape, generator=g))
    trainer = run_test(stage, dm, tmp_path / "run")
    data = json.loads((tmp_path / "run" / "metrics.json").read_text())

    # metrics.json: both variants, every column; the top level is the distilled model's (what `gsv3d report` reads)
    assert list(data["variants"]) == ["undistilled", "distilled"]
    assert data["meta"]["test_variants"] == ["undistilled", "distilled"] and data["meta"]["primary_variant"] == "distilled"
    for v, part in data["variants"].items():
        assert all(k in part and part[k]["num_objects"] == 2 for k in KEYS), (v, sorted(part))
        assert np.isfinite(part["psnr"]["value"]) and "num_missed_objects" in part["meta"]
    off, on = data["variants"]["undistilled"], data["variants"]["distilled"]
    assert all(data[k] == on[k] for k in KEYS)
    assert data["meta"]["num_missed_objects"] == on["meta"]["num_missed_objects"]
    # the switch really turns the LoRA off (the tiny random decoder barely reacts to its latents: small but far above
    # the agreement with a LoRA-free pipeline below)
    assert abs(off["psnr"]["value"] - on["psnr"]["value"]) > 1e-4
    cm = trainer.callback_metrics
    assert float(cm["test/psnr"]) == pytest.approx(float(cm["test/distilled/psnr"]))
    assert float(cm["test/undistilled/psnr"]) == pytest.approx(off["psnr"]["value"], rel=1e-5)

    # the LoRA-off variant is exactly SV3D without an adapter on the same objects and noise: a fresh (zero) LoRA
    fresh = make_distill(decoder_ckpt, test_variants=["distilled"])
    run_test(fresh, mesh_test_data(tmp_path), tmp_path / "fresh")
    base = json.loads((tmp_path / "fresh" / "metrics.json").read_text())
    for k in ("psnr", "ssim", "chamfer", "iou", "fscore"):
        assert base[k]["value"] == pytest.approx(off[k]["value"], rel=1e-7, abs=1e-7), k

    # metrics_per_object.csv: one row per object and variant; its means are the table's
    with open(tmp_path / "run" / "metrics_per_object.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["uid"], r["variant"]) for r in rows] == [(u, v) for u in sorted({r["uid"] for r in rows})
                                                        for v in ("undistilled", "distilled")]
    for v in ("undistilled", "distilled"):
        objs = read_per_object_csv(tmp_path / "run" / "metrics_per_object.csv", variant=v)
        assert len(objs) == 2
        for k in ("psnr", "chamfer"):
            assert np.mean([o[k] for o in objs.values()]) == pytest.approx(data["variants"][v][k]["value"], rel=1e-9)
    assert read_per_object_csv(tmp_path / "run" / "metrics_per_object.csv") == objs  # default: the primary variant

    # metrics.csv: a variant column
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        mrows = list(csv.DictReader(f))
    assert {(r["metric"], r["variant"]) for r in mrows} == {(k, v) for k in (*KEYS, *CONSISTENCY_KEYS)
                                                            for v in ("undistilled", "distilled")}

    # the model-free baselines, once for both variants, on the same novel views: "copy the input image" is the
    # held-out check's copy_input_scores; "mean training image" the mean of the (one) training object's views
    base = data["baselines"]
    assert list(base) == ["copy_input", "mean_image"]
    n_views = on["psnr"]["num_views"]
    for name, part in base.items():
        assert set(part) >= {"psnr", "ssim", "lpips"} and "skipped" not in part, name
        assert all(part[k]["num_objects"] == 2 and part[k]["num_views"] == n_views for k in ("psnr", "ssim", "lpips"))
    c_psnr, c_ssim, _ = copy_input_scores(dm.test_dataloader())
    assert base["copy_input"]["psnr"]["value"] == pytest.approx(float(c_psnr.mean()), rel=1e-4)
    assert base["copy_input"]["ssim"]["value"] == pytest.approx(float(c_ssim.mean()), rel=1e-4)
    mean_img, n_train = mean_training_image(dm.train_dataloader())
    gts = [gather_views(b["target_images"], novel_view_indices(b["input_indices"], b["target_images"].shape[1]))
           for b in dm.test_dataloader()]
    hand = torch.cat([per_image_psnr(mean_img.expand_as(g.flatten(0, 1)), g.flatten(0, 1)) for g in gts]).mean()
    assert base["mean_image"]["psnr"]["value"] == pytest.approx(float(hand), rel=1e-4)
    assert base["mean_image"]["meta"]["train_objects"] == n_train == 1

    # results.md: the paper's seven rows, then SV3D (ours) and GSV3D (ours) with their numbers and their 3D
    # consistency (a last column), then the two model-free rows; no "this run" row
    md = (tmp_path / "run" / "results.md").read_text()
    lines = md.splitlines()
    table1 = (*COLUMNS, CONSISTENCY_COLUMN)
    header = next(ln for ln in lines if ln.startswith("| Type | Method |"))
    assert [c.strip() for c in header.strip("|").split("|")[2:]] == [c.header(0.05) for c in table1]
    paper_rows = [ln for ln in lines if ln.startswith("| ") and "(paper) |" in ln]
    assert len(paper_rows) == len(table1_rows()) == 7 and all(ln.endswith("| – |") for ln in paper_rows)
    ours = [ln for ln in lines if ln.startswith("| ours |")]
    assert [ln.split("|")[2].strip().split(" (SMOKE")[0] for ln in ours] == [OURS_UNDISTILLED, OURS_DISTILLED]
    for ln, part in zip(ours, (off, on)):
        assert [c.strip() for c in ln.strip("|").split("|")[2:]] == [c.format(part[c.key]["value"]) for c in table1]
    free = [ln for ln in lines if ln.startswith(f"| {BASELINE_KIND} |")]
    assert [ln.split("|")[2].strip().split(" (SMOKE")[0] for ln in free] == [BASELINE_LABELS["copy_input"],
                                                                             BASELINE_LABELS["mean_image"]]
    for ln, part in zip(free, base.values()):  # PSNR, SSIM, LPIPS; – for every other column and the consistency
        cells = [c.strip() for c in ln.strip("|").split("|")[2:]]
        assert cells == [c.format(part[c.key]["value"]) if c.key in part else "–" for c in table1]
        assert cells[0] != "–" and cells[-1] == "–"
    assert lines.index(free[0]) == lines.index(ours[-1]) + 1  # in Table 1, under the rows of ours
    assert "this run" not in md and "n/a" not in md
    assert md.count("missed objects (no rendered pixel") == 2  # one line per variant

    # 3D consistency (ours, no GT): per variant in metrics.json, a per-object column, its own table in results.md
    frames = NUM_FRAMES - dm.kw["num_input_views"]  # the orbit frames the decoder did not read
    for v, part in data["variants"].items():
        for k in CONSISTENCY_KEYS:
            assert part[k]["num_objects"] == 2 and part[k]["num_views"] == 2 * frames, (v, k)
            assert np.isfinite(part[k]["value"]), (v, k)
            objs = read_per_object_csv(tmp_path / "run" / "metrics_per_object.csv", variant=v)
            assert np.mean([o[k] for o in objs.values()]) == pytest.approx(part[k]["value"], rel=1e-9), (v, k)
        assert float(cm[f"test/{v}/consistency_psnr"]) == pytest.approx(part["consistency_psnr"]["value"], rel=1e-5)
    assert data["consistency_psnr"] == on["consistency_psnr"]
    assert abs(off["consistency_psnr"]["value"] - on["consistency_psnr"]["value"]) > 1e-4  # the LoRA changes the orbit
    header = next(ln for ln in lines if ln.startswith("| Method | 3D consistency (ours, no GT) PSNR↑"))
    table = lines[lines.index(header) + 2: lines.index(header) + 4]
    assert [ln.split("|")[1].strip() for ln in table] == [OURS_UNDISTILLED, OURS_DISTILLED]
    for ln, part in zip(table, (off, on)):
        assert [c.strip() for c in ln.strip("|").split("|")[1:]] == [c.format(part[c.key]["value"])
                                                                    for c in CONSISTENCY_COLUMNS]
    assert f"Scored frames: {2 * frames}." in md
