"""Metric callbacks with a tiny fake LightningModule (its test_step returns the novel-view result)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import trimesh
from torch.utils.data import DataLoader, Dataset

from gsv3d_pl import DecoderStage
from gsv3d_pl.metrics.results import read_per_object_csv
from gsv3d_pl.weights import MissingWeightsError

ROOT = Path(__file__).resolve().parents[1]

RES, VIEWS, NG = 24, 3, 1200


_OBJECTS: dict[tuple[int, str], dict] = {}


def make_object(i: int, root: Path) -> dict:
    key = (i, str(root))
    if key not in _OBJECTS:
        _OBJECTS[key] = _make_object(i, Path(root))
    return _OBJECTS[key]


def _make_object(i: int, root: Path) -> dict:
    """One fake evaluated object: a GT mesh file (un-normalised) and precomputed 'predicted' renders of
    Gaussians sampled on its surface, with GT images = the prediction plus noise."""
    from gsv3d_pl.cameras import cameras_from_spherical
    from gsv3d_pl.gaussians import Gaussians
    from gsv3d_pl.orbit import DEFAULT_RADIUS, FOV_DEG
    from gsv3d_pl.render import render

    rng = np.random.default_rng(i)
    mesh = trimesh.creation.box(rng.uniform(0.4, 1.0, size=3))
    center = mesh.bounds.mean(0)
    scale = 1.0 / (mesh.bounds[1] - mesh.bounds[0]).max()
    norm = trimesh.Trimesh((mesh.vertices - center) * scale, mesh.faces)
    offset = rng.normal(size=3)
    path = root / f"obj{i}.ply"
    trimesh.Trimesh(norm.vertices / scale + offset, norm.faces).export(path)
    pts, _ = trimesh.sample.sample_surface(norm, NG, seed=i)
    g = torch.Generator().manual_seed(i)
    means = torch.tensor(pts, dtype=torch.float32)
    quats = torch.nn.functional.normalize(torch.randn(NG, 4, generator=g), dim=-1)
    scales = torch.full((NG, 3), 0.03)
    opac = torch.full((NG,), 0.9)
    colors = torch.rand(NG, 3, generator=g)
    cams = cameras_from_spherical([20.0, -20.0, 40.0], [30.0 + i, 150.0, 270.0], DEFAULT_RADIUS, FOV_DEG, RES, RES)
    rgb, alpha, depth = render(Gaussians(means, quats, scales, opac, colors), cams.c2w, cams.K, RES, RES)
    pred = rgb.contiguous()  # [V, 3, H, W]
    gt = (pred + 0.05 * torch.randn(pred.shape, generator=g)).clamp(0, 1)
    return {
        "uid": f"obj{i}", "mesh_path": str(path),
        "norm_center": torch.tensor(offset, dtype=torch.float32), "norm_scale": torch.tensor(scale, dtype=torch.float32),
        "pred_images": pred, "gt_images": gt, "cond_image": pred[0].clone(),  # the "input image" (not a GT view)
        "pred_alphas": alpha.contiguous(), "pred_depths": depth.contiguous(),
        "eval_c2w": cams.c2w, "eval_K": cams.K,
        "g_means": means, "g_quats": quats, "g_scales": scales, "g_opac": opac, "g_colors": colors,
    }


def missed(obj: dict) -> dict:
    """The same object as a prediction with no surface: nothing rendered (alpha 0, white), zero-opacity Gaussians."""
    return {**obj, "pred_alphas": torch.zeros_like(obj["pred_alphas"]), "pred_depths": torch.zeros_like(obj["pred_depths"]),
            "pred_images": torch.ones_like(obj["pred_images"]), "g_opac": torch.zeros_like(obj["g_opac"])}


class FakeData(Dataset):
    def __init__(self, root: str, n: int, missed_uids: tuple[str, ...] = ()):
        self.items = [make_object(i, Path(root)) for i in range(n)]  # eagerly, outside the test loop
        self.items = [missed(o) if o["uid"] in missed_uids else o for o in self.items]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class FakeStage(pl.LightningModule):
    """Returns the novel-view result (gsv3d_pl.batch.NOVEL_VIEW_KEYS) from precomputed renders; no metric attributes."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def _step(self, batch):
        from gsv3d_pl.gaussians import Gaussians

        return {
            "pred_images": batch["pred_images"], "gt_images": batch["gt_images"],
            "pred_alphas": batch["pred_alphas"], "pred_depths": batch["pred_depths"],
            "gt_alphas": batch["pred_alphas"], "gt_depths": batch["pred_depths"],
            "eval_c2w": batch["eval_c2w"], "eval_K": batch["eval_K"], "input_images": batch["gt_images"][:, :1],
            "gaussians": Gaussians(batch["g_means"], batch["g_quats"], batch["g_scales"], batch["g_opac"],
                                   batch["g_colors"]),
        }

    def test_step(self, batch, batch_idx):
        return self._step(batch)

    def validation_step(self, batch, batch_idx):
        return self._step(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def run_eval(root: str, out: str, n: int, devices: int, batch_size: int = 1, missed_uids: tuple[str, ...] = ()) -> dict:
    """Evaluate ``n`` fake objects with both callbacks (smoke image metrics); returns metrics.json."""
    from callbacks.metrics import AppearanceMetrics, GeometryMetrics

    cbs = [AppearanceMetrics(mode="smoke", kid_subsets=20),
           GeometryMetrics(num_gt_points=5000, num_pred_points=5000, iou_resolution=32)]
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", callbacks=cbs,
        default_root_dir=out, logger=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.test(FakeStage(), DataLoader(FakeData(root, n, missed_uids), batch_size=batch_size), verbose=False)
    return json.loads((Path(out) / "metrics.json").read_text())


KEYS = ("psnr", "ssim", "lpips", "fid", "kid", "clip_iqa", "chamfer", "iou", "fscore")


def test_callbacks_write_metrics_files(tmp_path):
    out = tmp_path / "run"
    (out / "metrics.json").parent.mkdir()
    (out / "metrics.json").write_text(json.dumps({"psnr": {"value": 99.0}, "meta": {"eval_id": "old"}}))
    data = run_eval(str(tmp_path), str(out), n=2, devices=1, batch_size=2)
    for k in KEYS:
        assert set(data[k]) == {"value", "num_objects", "num_views"}, k
        assert data[k]["num_objects"] == 2 and data[k]["num_views"] == 2 * VIEWS
        assert np.isfinite(data[k]["value"]), k
    assert data["psnr"]["value"] != 99.0  # the previous evaluation's file was replaced, not merged
    assert data["meta"]["smoke"] is True and data["meta"]["fscore_tau"] == 0.05
    # the callback's plumbing (un-normalising nothing, channel dims, per-object means) vs a direct computation
    from gsv3d_pl.gaussians import Gaussians
    from gsv3d_pl.metrics.geometry import evaluate_geometry, load_normalized_mesh

    direct = []
    for i in range(2):
        o = make_object(i, tmp_path)
        mesh = load_normalized_mesh(o["mesh_path"], o["norm_center"], o["norm_scale"])
        g = Gaussians(o["g_means"], o["g_quats"], o["g_scales"], o["g_opac"], o["g_colors"])
        direct.append(evaluate_geometry(o["pred_depths"][:, 0], o["pred_alphas"][:, 0], o["eval_c2w"], o["eval_K"], g,
                                        mesh, num_gt_points=5000, num_pred_points=5000, iou_resolution=32))
    for k in ("chamfer", "iou", "fscore"):
        assert data[k]["value"] == pytest.approx(np.mean([d[k] for d in direct]), rel=1e-6), k
    assert data["chamfer"]["value"] < 0.06 and data["fscore"]["value"] > 0.6 and data["iou"]["value"] > 0.5
    assert 20 < data["psnr"]["value"] < 35  # noise σ = 0.05 -> about 26 dB
    csv = (out / "metrics.csv").read_text().splitlines()
    assert csv[0] == "metric,value,num_objects,num_views" and len(csv) == 10
    md = (out / "results.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| ours | **this run"))
    cells = [c.strip() for c in row.strip("|").split("|")][2:]
    assert len(cells) == 9 and all(c not in ("", "–") for c in cells)
    assert "SMOKE" in row and "F-Score@0.05↑" in md and "| GSV3D (paper) | 20.390 | 0.884" in md
    assert "n/a" not in md and "Missed objects (no rendered pixel with alpha > 0.5, i.e. no predicted surface): 0." in md
    assert data["meta"]["num_missed_objects"] == 0 and data["meta"]["missed_objects"] == []
    per_obj = read_per_object_csv(out / "metrics_per_object.csv")
    assert list(per_obj) == ["obj0", "obj1"]
    for k in ("psnr", "ssim", "lpips", "clip_iqa", "chamfer", "iou", "fscore"):  # the mean of the objects' values
        assert np.mean([r[k] for r in per_obj.values()]) == pytest.approx(data[k]["value"], rel=1e-9), k
    assert per_obj["obj0"]["chamfer"] == direct[0]["chamfer"] and per_obj["obj1"]["num_views"] == VIEWS

    # the model-free rows: the batch's cond_image copied to every view (by hand here); no datamodule, so no
    # training images: the mean-image row is there, "–", with the reason
    objs = [make_object(i, tmp_path) for i in range(2)]
    hand = np.mean([float(-10 * torch.log10((o["cond_image"].clamp(0, 1)[None] - o["gt_images"]).square()
                                            .mean(dim=(1, 2, 3))).mean()) for o in objs])
    assert data["baselines"]["copy_input"]["psnr"]["value"] == pytest.approx(hand, rel=1e-5)
    assert data["baselines"]["copy_input"]["psnr"]["num_views"] == 2 * VIEWS
    assert data["baselines"]["mean_image"]["skipped"].startswith("no training images")
    copy_row = next(line for line in md.splitlines() if line.startswith("| ours, no model | copy the input image"))
    assert f"| {data['baselines']['copy_input']['psnr']['value']:.3f} |" in copy_row
    assert "| ours, no model | mean training image (no model)" in md and "mean training image (no model): not scored" in md


def test_missed_object_keeps_the_means_finite_and_is_counted(tmp_path):
    """A good and a missed object (nothing rendered): finite means, missed count 1, the rule's values per object."""
    out = tmp_path / "run"
    data = run_eval(str(tmp_path), str(out), n=2, devices=1, batch_size=2, missed_uids=("obj1",))
    for k in KEYS:
        assert np.isfinite(data[k]["value"]) and data[k]["num_objects"] == 2, k
    assert data["meta"]["num_missed_objects"] == 1 and data["meta"]["missed_objects"] == ["obj1"]
    from gsv3d_pl.gaussians import Gaussians
    from gsv3d_pl.metrics.geometry import evaluate_geometry, load_normalized_mesh, sample_surface

    o = missed(make_object(1, tmp_path))
    mesh = load_normalized_mesh(o["mesh_path"], o["norm_center"], o["norm_scale"])
    gt_dist = np.linalg.norm(sample_surface(mesh, 5000, seed=0), axis=1)
    rule_cd = 0.5 * (gt_dist.min() + gt_dist.mean())  # CD against a single point at the origin
    o0 = make_object(0, tmp_path)
    good = evaluate_geometry(o0["pred_depths"][:, 0], o0["pred_alphas"][:, 0], o0["eval_c2w"], o0["eval_K"],
                             Gaussians(o0["g_means"], o0["g_quats"], o0["g_scales"], o0["g_opac"], o0["g_colors"]),
                             load_normalized_mesh(o0["mesh_path"], o0["norm_center"], o0["norm_scale"]),
                             num_gt_points=5000, num_pred_points=5000, iou_resolution=32)
    assert data["chamfer"]["value"] == pytest.approx(0.5 * (good["chamfer"] + rule_cd), rel=1e-9)
    assert data["fscore"]["value"] == pytest.approx(0.5 * good["fscore"], rel=1e-9)
    assert data["iou"]["value"] == pytest.approx(0.5 * good["iou"], rel=1e-9)

    rows = list(csv.DictReader((out / "metrics_per_object.csv").open()))
    assert [r["uid"] for r in rows] == ["obj0", "obj1"]
    assert {"uid", "psnr", "ssim", "lpips", "clip_iqa", "chamfer", "iou", "fscore", "missed"} <= set(rows[0])
    assert "fid" not in rows[0] and "kid" not in rows[0]  # set statistics: no per-object value
    bad = {k: float(v) for k, v in rows[1].items() if k != "uid"}
    assert bad["missed"] == 1 and bad["fscore"] == bad["iou"] == bad["precision"] == bad["recall"] == 0
    assert bad["chamfer"] == pytest.approx(rule_cd, rel=1e-12) and bad["num_pred_points"] == 0
    assert float(rows[0]["missed"]) == 0 and float(rows[0]["chamfer"]) == pytest.approx(good["chamfer"], rel=1e-12)
    assert all(np.isfinite(float(v)) for r in rows for k, v in r.items() if k != "uid")

    md = (out / "results.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| ours | **this run"))
    assert "–" not in row and "inf" not in row and "nan" not in row.lower()
    assert "no predicted surface): 1 (obj1;" in md and "CD against a single predicted point at the origin" in md


def test_callback_errors_are_clear(tmp_path):
    from callbacks.metrics import AppearanceMetrics, GeometryMetrics

    cb = GeometryMetrics()
    with pytest.raises(KeyError, match="NOVEL_VIEW_KEYS"):
        cb._update(FakeStage(), {"pred_images": 0}, {})
    # pretrained metrics with hidden weights stop at setup, before any test batch runs
    os.environ_backup = dict(os.environ)
    try:
        os.environ["TORCH_HOME"] = str(tmp_path / "empty")
        os.environ["HF_HUB_CACHE"] = str(tmp_path / "empty_hf")
        trainer = pl.Trainer(accelerator="cpu", callbacks=[AppearanceMetrics()], logger=False,
                             default_root_dir=str(tmp_path), enable_progress_bar=False)
        with pytest.raises(MissingWeightsError, match="alexnet-owt-7be5be79.pth"):
            trainer.test(FakeStage(), DataLoader(FakeData(str(tmp_path), 1)), verbose=False)
    finally:
        os.environ.clear()
        os.environ.update(os.environ_backup)


def test_metric_networks_are_not_in_the_module_or_checkpoint(tmp_path):
    from callbacks.metrics import AppearanceMetrics

    cb = AppearanceMetrics(mode="smoke")
    module = FakeStage()
    trainer = pl.Trainer(accelerator="cpu", callbacks=[cb], logger=False, default_root_dir=str(tmp_path),
                         enable_progress_bar=False)
    cb.setup(trainer, module, "test")
    assert cb._metrics is not None
    assert set(module.state_dict()) == {"dummy"} and cb.state_dict() == {}


_DDP_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from test_metrics_callbacks import run_eval
if __name__ == "__main__":
    run_eval({root!r}, sys.argv[2], n=3, devices=int(sys.argv[1]))
"""


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(tmp_path):
    """3 objects on 2 ranks: the DistributedSampler pads with a repeat, which the uid dedup removes."""
    script = tmp_path / "ddp_eval.py"
    script.write_text(_DDP_SCRIPT.format(tests=str(Path(__file__).parent), root=str(tmp_path)))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"run{devices}"
        subprocess.run([sys.executable, str(script), str(devices), str(out)], check=True, env=env,
                       cwd=str(Path(__file__).parents[1]), timeout=600)
        results[devices] = json.loads((out / "metrics.json").read_text())
    for k in KEYS:
        assert results[2][k]["num_objects"] == results[1][k]["num_objects"] == 3
        assert results[2][k]["value"] == pytest.approx(results[1][k]["value"], rel=1e-5, abs=1e-7), k
    copy = [results[d]["baselines"]["copy_input"]["psnr"] for d in (1, 2)]  # gathered across ranks, deduplicated
    assert copy[0]["num_objects"] == copy[1]["num_objects"] == 3
    assert copy[1]["value"] == pytest.approx(copy[0]["value"], rel=1e-5)


class MissesObjects(DecoderStage):
    """The tiny decoder, except that it misses every object whose uid starts with "missed": its Gaussians get zero
    opacity, so nothing is rendered (as a decoder that fails on an unfamiliar object would). For `gsv3d test`."""

    def predict_gaussians(self, batch):
        g = super().predict_gaussians(batch)
        drop = torch.tensor([str(u).startswith("missed") for u in batch["uid"]], device=g.opacities.device)
        g.opacities = torch.where(drop[:, None], torch.zeros_like(g.opacities), g.opacities)
        return g


@pytest.mark.slow
def test_gsv3d_test_on_a_mesh_folder_with_a_missed_object(tmp_path):
    """`gsv3d test` (tiny decoder config) on a folder of three meshes, one of which the decoder misses: finite CD,
    IoU and F-Score, the missed count in metrics.json and results.md, one per-object CSV row per mesh."""
    meshes = tmp_path / "meshes"
    meshes.mkdir()
    trimesh.creation.box([0.8, 0.5, 0.6]).export(meshes / "box.obj")
    trimesh.creation.cylinder(0.3, 0.9).export(meshes / "cylinder.obj")
    trimesh.creation.icosphere(2, 0.5).export(meshes / "missed_sphere.obj")
    run = tmp_path / "run"
    args = ["test", "--config", "configs/decoder/tiny.yaml", "--model.class_path=test_metrics_callbacks.MissesObjects",
            f"--trainer.default_root_dir={run}", "--data.init_args.toy_objects=null",
            f"--data.init_args.mesh_dir={meshes}", f"--data.init_args.cache_dir={tmp_path / 'cache'}",
            "--data.init_args.val_fraction=0", "--data.init_args.test_fraction=1.0", "--data.init_args.num_workers=0"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    res = subprocess.run([sys.executable, "-m", "gsv3d_pl", *args], cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    data = json.loads((run / "metrics.json").read_text())
    for k in ("chamfer", "iou", "fscore"):
        assert np.isfinite(data[k]["value"]) and data[k]["num_objects"] == 3, (k, data[k])
    assert data["meta"]["num_missed_objects"] == 1 and data["meta"]["missed_objects"] == ["missed_sphere"]
    per_obj = read_per_object_csv(run / "metrics_per_object.csv")
    assert sorted(per_obj) == ["box", "cylinder", "missed_sphere"]
    assert [per_obj[u]["missed"] for u in ("box", "cylinder", "missed_sphere")] == [0, 0, 1]
    sphere = per_obj["missed_sphere"]
    assert sphere["fscore"] == sphere["iou"] == 0 and sphere["chamfer"] == pytest.approx(0.5, abs=0.02)  # radius 0.5
    assert np.mean([r["chamfer"] for r in per_obj.values()]) == pytest.approx(data["chamfer"]["value"], rel=1e-9)
    md = (run / "results.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| ours | **this run"))
    assert "–" not in row and "no predicted surface): 1 (missed_sphere;" in md and "n/a" not in md
