"""ObjaverseDataModule: prepare (bad files, resume, manifest), sample keys and shapes, splits, loaders, latent cache,
CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

import datamodules.render_cache as render_cache
from datamodules import ObjaverseDataModule
from gsv3d_pl.batch import check_batch

RES = 32
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_mesh_dir(d):
    """Good and bad files in a plain folder: texture, vertex colours, two nodes; no faces, truncated, missing .bin."""
    d.mkdir(parents=True, exist_ok=True)
    box = trimesh.creation.box(extents=[1.0, 0.7, 0.5])
    img = np.zeros((16, 16, 3), np.uint8)
    img[::2] = [255, 128, 0]
    box.visual = trimesh.visual.TextureVisuals(
        uv=(box.vertices[:, :2] + 0.5), material=trimesh.visual.material.PBRMaterial(baseColorTexture=Image.fromarray(img)))
    (d / "textured.glb").write_bytes(trimesh.Scene(box).export(file_type="glb"))
    sph = trimesh.creation.icosphere(subdivisions=2)
    sph.visual = trimesh.visual.ColorVisuals(sph, vertex_colors=np.tile([[0, 200, 50, 255]], (len(sph.vertices), 1)))
    (d / "vcolor.glb").write_bytes(trimesh.Scene(sph).export(file_type="glb"))
    scene = trimesh.Scene()
    scene.add_geometry(trimesh.creation.box(), node_name="a", geom_name="a")
    T = np.eye(4)
    T[:3, 3] = [1.5, 0.5, 0.0]
    scene.add_geometry(trimesh.creation.icosphere(), node_name="b", geom_name="b", transform=T)
    (d / "twonode.glb").write_bytes(scene.export(file_type="glb"))
    (d / "nofaces.glb").write_bytes(trimesh.Scene(trimesh.PointCloud(np.random.rand(10, 3))).export(file_type="glb"))
    b = trimesh.creation.box().export(file_type="glb")
    (d / "truncated.glb").write_bytes(b[: len(b) // 2])
    (d / "nobin.gltf").write_bytes(trimesh.Scene(trimesh.creation.box()).export(file_type="gltf")["model.gltf"])
    return {"textured", "vcolor", "twonode"}, {"nofaces", "truncated", "nobin"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("dm")
    good, bad = _write_mesh_dir(root / "meshes")
    dm = ObjaverseDataModule(num_input_views=4, resolution=RES, num_extra_views=2, cache_dir=str(root / "cache"),
                             mesh_dir=str(root / "meshes"), toy_objects=8, batch_size=2, num_workers=0,
                             val_fraction=0.2, test_fraction=0.2)
    dm.prepare_data()
    return dm, good, bad, root


def test_prepare_and_skipped(prepared):
    dm, good, bad, _ = prepared
    assert dm.prepare_stats["rendered"] == 8 + len(good)
    assert dm.prepare_stats["skipped"] == len(bad)
    recs = [json.loads(x) for x in open(os.path.join(dm.cache_path, "skipped.jsonl"))]
    assert {r["uid"] for r in recs} == bad and all(r["reason"] for r in recs)
    reasons = {r["uid"]: r["reason"] for r in recs}
    assert reasons["nofaces"] == "no faces" and "FileNotFoundError" in reasons["nobin"]
    manifest = json.load(open(os.path.join(dm.cache_path, "manifest.json")))
    assert manifest["settings"]["resolution"] == RES


def test_sample_keys_and_shapes(prepared):
    dm, good, _, _ = prepared
    dm.setup("fit")
    assert sum(len(v) for v in dm.splits.values()) == 8 + len(good)
    assert all(len(v) > 0 for v in dm.splits.values())
    ds = dm._dataset("train")
    Q, N = 23, 4
    s = ds[0]
    shapes = {"input_indices": (N,), "input_images": (N, 3, RES, RES), "input_c2w": (N, 4, 4), "input_K": (N, 3, 3),
              "cond_image": (3, RES, RES), "target_images": (Q, 3, RES, RES), "target_alphas": (Q, 1, RES, RES),
              "target_depths": (Q, 1, RES, RES), "target_c2w": (Q, 4, 4), "target_K": (Q, 3, 3),
              "orbit_polars_rad": (21,), "orbit_azimuths_rad": (21,), "norm_center": (3,), "norm_scale": ()}
    for k, shp in shapes.items():
        assert tuple(s[k].shape) == shp, k
    assert s["input_indices"].max() < 21
    torch.testing.assert_close(s["input_images"], s["target_images"][s["input_indices"]])
    torch.testing.assert_close(s["cond_image"], s["target_images"][20])
    assert abs(s["orbit_azimuths_rad"][20].item()) < 1e-6
    # no blank views, white background, depth only where covered
    assert (s["target_alphas"].flatten(1).amax(1) > 0.5).all()
    bgmask = s["target_alphas"][:, 0] == 0
    assert torch.allclose(s["target_images"].permute(0, 2, 3, 1)[bgmask], torch.ones(3))
    assert (s["target_depths"][:, 0][bgmask] == 0).all()
    d = s["target_depths"][s["target_alphas"] > 0.99]
    assert d.min() > 2.0 - 0.9 and d.max() < 2.0 + 0.9
    # val uses fixed, evenly spaced inputs including the conditioning frame
    v = dm._dataset("val")[0]
    assert v["input_indices"].tolist() == dm.eval_input_indices and 20 in dm.eval_input_indices
    # default collate
    batch = next(iter(dm.train_dataloader()))
    assert batch["target_images"].shape == (2, Q, 3, RES, RES) and len(batch["uid"]) == 2


def test_batch_follows_batch_keys(prepared):
    """A dataset item and a collated batch pass gsv3d_pl.batch.check_batch (every key, rank and size agrees)."""
    dm, *_ = prepared
    dm.setup("fit")
    Q, N = 23, 4
    item_sizes = check_batch(dm._dataset("val")[0], batched=False)
    assert {k: item_sizes[k] for k in ("Q", "N", "H", "W")} == {"Q": Q, "N": N, "H": RES, "W": RES}
    batch = next(iter(dm.train_dataloader()))
    assert check_batch(batch)["B"] == 2


def test_split_is_deterministic(prepared):
    dm, *_ = prepared
    dm.setup()
    a = {k: [u for u, _ in v] for k, v in dm.splits.items()}
    dm2 = ObjaverseDataModule(**{**dm.hparams, "num_workers": 0})
    dm2.setup()
    assert a == {k: [u for u, _ in v] for k, v in dm2.splits.items()}


def test_workers_and_latent_cache(prepared):
    dm, *_ = prepared
    dm.setup()
    calls = []

    def encode(x):  # [B, 3, H, W] -> [B, 4, H/8, W/8]
        calls.append(len(x))
        return torch.nn.functional.avg_pool2d(torch.cat([x, x[:, :1]], 1), 8)

    dm.num_workers = 2
    dm.set_latent_encoder(encode, key="fakevae")
    batch = next(iter(dm.train_dataloader()))
    assert batch["target_latents"].shape == (2, 23, 4, RES // 8, RES // 8)
    n_calls = len(calls)
    assert n_calls > 0
    dm.set_latent_encoder(encode, key="fakevae")  # cached: no new encoding
    next(iter(dm.val_dataloader()))
    assert len(calls) == n_calls
    dm.num_workers = 0


def test_resume_renders_only_missing(tmp_path, monkeypatch):
    kw = dict(resolution=16, num_extra_views=0, cache_dir=str(tmp_path / "cache"), toy_objects=6, num_workers=0)
    dm = ObjaverseDataModule(**kw)
    real = render_cache.render_object_to_cache
    count = {"n": 0}

    def flaky(*a, **k):
        if count["n"] == 3:
            raise KeyboardInterrupt  # the user hits ^C mid-prepare
        count["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(render_cache, "render_object_to_cache", flaky)
    with pytest.raises(KeyboardInterrupt):
        dm.prepare_data()
    monkeypatch.setattr(render_cache, "render_object_to_cache", real)
    # no half-written files left behind (gsv3d_pl.io names its temporaries .tmp_<name>.*)
    assert not [f for _, _, fs in os.walk(dm.cache_path) for f in fs if f.startswith(".tmp") or f.endswith(".tmp")]
    dm = ObjaverseDataModule(**kw)
    dm.prepare_data()
    assert dm.prepare_stats["rendered"] == 3 and dm.prepare_stats["cached"] == 6
    dm.prepare_data()
    assert dm.prepare_stats["rendered"] == 0
    # a renderer setting change gets a new cache folder
    assert ObjaverseDataModule(**{**kw, "resolution": 24}).cache_path != dm.cache_path


def test_missing_uids_fail_fast(tmp_path):
    from datamodules.toy import generate_toy_objects

    uids = generate_toy_objects(tmp_path / "ov", 3)
    os.remove(tmp_path / "ov" / "hf-objaverse-v1" / "glbs" / "000-toy" / f"{uids[1]}.glb")
    (tmp_path / "uids.txt").write_text("\n".join(uids) + "\n")
    dm = ObjaverseDataModule(resolution=16, cache_dir=str(tmp_path / "cache"), objaverse_root=str(tmp_path / "ov"),
                             uids_file=str(tmp_path / "uids.txt"))
    with pytest.raises(FileNotFoundError, match=r"1 of 3 objects .*download=true"):
        dm.prepare_data()


@pytest.mark.slow  # a fresh interpreter importing lightning: ~15-60 s on 2 busy cores
def test_cli_prepare(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
model:
  class_path: lightning.pytorch.demos.boring_classes.BoringModel  # parsed as `gsv3d fit` would, never built
data:
  class_path: datamodules.ObjaverseDataModule
  init_args:
    toy_objects: 3
    resolution: 16
    num_extra_views: 0
    cache_dir: {tmp_path / 'cache'}
""")
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-m", "gsv3d_pl", "data", "prepare", "--config", str(cfg)],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("rendered=3 skipped=0 repaired=0 cache=") and os.path.isdir(last.split("cache=")[1])


@pytest.mark.parametrize("bad", [0, 5])
def test_bad_supersample_names_the_key(tmp_path, bad):
    with pytest.raises(ValueError, match=r"data\.init_args\.supersample must be in 1\.\.4"):
        ObjaverseDataModule(toy_objects=2, resolution=32, cache_dir=str(tmp_path), supersample=bad)
