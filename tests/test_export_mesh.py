"""`gsv3d export-mesh` / `gsv3d predict --mesh`: Gaussians -> textured mesh (docs/export.md).

The round trip is checked on Gaussians made from a toy object (surfels on its surface with its colours): the
exported mesh, rendered by the dataset renderer, must match the Gaussians' own renders at 8 cameras.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gsv3d_pl.cameras import orbit_cameras
from gsv3d_pl.export import ExportSettings, NoSurfaceError, export_mesh
from gsv3d_pl.export.roundtrip import compare_renders, gaussians_on_mesh
from gsv3d_pl.gaussians import Gaussians
from gsv3d_pl.tools import export_mesh as tool

SMALL = ExportSettings(resolution=48, faces=2000, texture_size=256, bake_views=6, bake_size=128)


def _sphere_gaussians(n: int = 3000, radius: float = 0.3) -> Gaussians:
    """Surfels on a sphere, coloured by direction (so the texture is not constant)."""
    import trimesh

    mesh = trimesh.creation.icosphere(subdivisions=3, radius=radius)
    d = np.asarray(mesh.vertices) / radius
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=np.concatenate(
        [(d * 0.5 + 0.5) * 255, np.full((len(d), 1), 255)], 1).astype(np.uint8))
    return gaussians_on_mesh(mesh, n, seed=0)


def _toy_gaussians(index: int, n: int) -> Gaussians:
    """Gaussians on toy object ``index`` normalised like the dataset (bbox centred, largest side 1)."""
    from datamodules.toy import make_toy_scene

    scene, _ = make_toy_scene(index)
    lo, hi = scene.bounds
    T = np.eye(4)
    T[:3, :3] *= 1.0 / (hi - lo).max()
    T[:3, 3] = -(lo + hi) / 2 / (hi - lo).max()
    scene.apply_transform(T)
    return gaussians_on_mesh(scene, n, seed=0)


def _check_glb(path: Path, min_faces: int = 100, varied: bool = True) -> None:
    """The file opens in trimesh as a mesh with faces, per-vertex UVs and an embedded texture, non-constant when
    ``varied`` (an untrained tiny model's Gaussians are all sigmoid(0) grey, so its texture is flat)."""
    import trimesh

    mesh = trimesh.load(path, force="mesh")
    assert len(mesh.faces) >= min_faces
    assert mesh.visual.uv is not None and mesh.visual.uv.shape == (len(mesh.vertices), 2)
    assert 0.0 <= mesh.visual.uv.min() and mesh.visual.uv.max() <= 1.0
    tex = np.asarray(mesh.visual.material.baseColorTexture.convert("RGB"), dtype=np.float32)
    assert tex.shape[0] >= 16 and (tex.std() > 5.0 or not varied)


def test_export_glb_and_obj_open_with_uvs_and_texture(tmp_path):
    g = _sphere_gaussians()
    mesh, paths = export_mesh(g, tmp_path / "m.glb", SMALL)
    assert paths == [tmp_path / "m.glb"]
    _check_glb(tmp_path / "m.glb")
    assert set(mesh.timings) == {"density + iso-surface", "simplify", "uv atlas", "texel map", "bake", "fill", "write"}
    assert mesh.seen_fraction > 0.9  # a convex object: the bake views see (nearly) every texel
    # The surface lies on the sphere: within ~2 voxels (48³ over ~0.7) of radius 0.3.
    r = np.linalg.norm(mesh.vertices, axis=1)
    assert abs(np.median(r) - 0.3) < 0.02 and r.std() < 0.01
    # The texture follows the Gaussians' colours: the +x side is red, the -x side cyan-ish.
    import trimesh

    m = trimesh.load(tmp_path / "m.glb", force="mesh")
    col = m.visual.to_color().vertex_colors[:, :3].astype(float)
    right, left = m.vertices[:, 0] > 0.2, m.vertices[:, 0] < -0.2
    assert col[right, 0].mean() > col[left, 0].mean() + 100
    # OBJ: .obj + .mtl + a texture named after the mesh.
    _, paths = export_mesh(g, tmp_path / "o" / "model.obj", SMALL)
    assert sorted(p.name for p in paths) == ["model.mtl", "model.obj", "model.png"]
    obj = trimesh.load(tmp_path / "o" / "model.obj", force="mesh")
    assert len(obj.faces) > 100 and obj.visual.uv is not None and obj.visual.material.image is not None


def test_glb_unlit_flag_is_written(tmp_path):
    import json
    import struct

    export_mesh(_sphere_gaussians(1500), tmp_path / "u.glb", ExportSettings(**{**SMALL.__dict__, "unlit": True}))
    data = (tmp_path / "u.glb").read_bytes()
    n = struct.unpack_from("<I", data, 12)[0]
    doc = json.loads(data[20:20 + n])
    assert "KHR_materials_unlit" in doc["extensionsUsed"]
    assert all("KHR_materials_unlit" in m["extensions"] for m in doc["materials"])
    assert struct.unpack_from("<I", data, 8)[0] == len(data)  # the GLB header's length still matches
    _check_glb(tmp_path / "u.glb")


def test_no_surface_is_a_clear_error(tmp_path):
    g = _sphere_gaussians(800)
    with pytest.raises(NoSurfaceError, match="lower --iso"):
        export_mesh(g, tmp_path / "x.glb", ExportSettings(**{**SMALL.__dict__, "iso": 1e6}))
    assert not (tmp_path / "x.glb").exists()


def test_cli_errors_name_the_file_and_flag(tmp_path, capsys):
    not_3dgs = tmp_path / "points.ply"
    not_3dgs.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 0\nproperty float x\n"
                         b"property float y\nproperty float z\nend_header\n")
    assert tool.main([str(not_3dgs), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert str(not_3dgs) in err and "opacity" in err and "scale_0" in err and "3DGS" in err
    assert not (tmp_path / "points.glb").exists()

    ply = tmp_path / "g.ply"
    _sphere_gaussians(500).save_ply(ply)
    assert tool.main([str(ply), "--out", str(tmp_path / "m.stl")]) == 2
    assert "unknown mesh format '.stl'" in capsys.readouterr().err
    assert tool.main([str(ply), "--faces", "0"]) == 2
    assert "--faces must be >= 4" in capsys.readouterr().err
    assert tool.main([str(ply), "--inset", "1.5"]) == 2
    assert "--inset must be in [0, 1]" in capsys.readouterr().err
    (tmp_path / "g.glb").write_bytes(b"old")
    assert tool.main([str(ply)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert tool.main([str(tmp_path / "missing.ply")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_is_registered():
    from gsv3d_pl.cli import TOOLS

    assert TOOLS["export-mesh"][0] == "gsv3d_pl.tools.export_mesh"


@pytest.mark.slow
@pytest.mark.parametrize("index,name", [(0, "box"), (6, "snowman")])
def test_toy_roundtrip_matches_the_gaussians_renders(tmp_path, index, name):
    """Default settings, fixed toys as 20k surfels: object 0 (a checkered box) and object 6 (a snowman: a finely
    checkered sphere, whose mesh at --inset 0 missed by 1 px all round, 19.5 dB): the mesh rendered by the dataset
    renderer matches the Gaussians at 8 orbit cameras (silhouette IoU >= 0.9, PSNR >= 20 dB in the masks' union)."""
    g = _toy_gaussians(index, 20_000)
    ply = tmp_path / f"{name}.ply"
    g.save_ply(ply)
    assert tool.main([str(ply), "--quiet"]) == 0  # the CLI at its defaults, from the .ply
    _check_glb(tmp_path / f"{name}.glb", min_faces=10_000)
    cams = orbit_cameras(8, 20.0, 2.0, 33.8, 256, 256)
    m = compare_renders(Gaussians.load_ply(ply), tmp_path / f"{name}.glb", cams.c2w, cams.K, 256)
    assert m["iou"] >= 0.9 and m["iou_min"] >= 0.9, m
    assert m["psnr"] >= 20.0, m


def _surface_offset(g: Gaussians, inset: float, resolution: int = 48) -> tuple[np.ndarray, float]:
    """Marching-cubes vertices of ``g`` at ``inset`` and the grid's voxel size."""
    from gsv3d_pl.export.surface import extract_surface, surface_grid

    grid = surface_grid(g.means, g.scales, g.opacities, resolution)
    v, _ = extract_surface(g.means, g.quats, g.scales, g.opacities, grid, inset=inset)
    return v, grid.voxel


def test_inset_moves_the_surface_to_the_gaussians_centres():
    """The iso-surface of a surfel sphere lies ~1 voxel outside the centres (radius 0.3); --inset moves it that
    fraction of the way in: 1 onto the centres, the default part of the way."""
    g = _sphere_gaussians(6000)
    out = {}
    for inset in (0.0, ExportSettings().inset, 1.0):
        v, voxel = _surface_offset(g, inset)
        out[inset] = (np.median(np.linalg.norm(v, axis=1)) - 0.3) / voxel  # voxels outside the centres
    d0, dd, d1 = out[0.0], out[ExportSettings().inset], out[1.0]
    assert 0.7 < d0 < 2.0, out  # the iso-surface's bias
    assert abs(d1) < 0.25, out  # on the ridge
    assert abs(dd - (1 - ExportSettings().inset) * d0) < 0.25, out


def test_inset_keeps_a_thin_sheet_a_closed_slab():
    """An open sheet of surfels has no interior: both sides of its slab share one ridge. Even a full inset leaves
    at least ~1 voxel between them (no zero-width, self-intersecting sheet)."""
    import trimesh

    plane = trimesh.creation.box(extents=(0.6, 0.6, 1e-4))
    plane.visual = trimesh.visual.ColorVisuals(plane, face_colors=[200, 80, 40, 255])
    g = gaussians_on_mesh(plane, 4000, seed=0)
    v, voxel = _surface_offset(g, 1.0)
    inner = np.abs(v[:, :2]).max(1) < 0.2  # away from the sheet's rim
    z = np.abs(v[inner, 2]) / voxel
    assert inner.sum() > 100 and z.min() > 0.35 and np.median(z) < 1.0, (z.min(), np.median(z))


# ------------------------------------------------------------------------------------------------ predict --mesh
from tests.test_predict import demo  # noqa: E402,F401  (the module-scoped tiny demo checkpoint fixture)


@pytest.mark.slow
def test_predict_mesh_and_export_of_its_ply(demo, tmp_path, capsys):  # noqa: F811
    from gsv3d_pl.tools import predict as predict_tool
    from tests.images import write_rgba

    img = write_rgba(tmp_path / "a.png")
    out = tmp_path / "out"
    code = predict_tool.main([
        *sum((["--config", c] for c in demo["configs"]), []), "--ckpt_path", str(demo["ckpt"]),
        "--image", str(img), "--out", str(out), "--num_steps", "2", "--turntable_frames", "2",
        "--render_size", "32", "--video_format", "gif", "--quiet",
        "--mesh", "--mesh-resolution", "48", "--mesh-faces", "2000", "--mesh-texture-size", "256",
        "--mesh-bake-views", "6", "--mesh-bake-size", "128", "--mesh-iso", "0.05",
    ])
    err = capsys.readouterr().err
    assert code == 0, err
    assert (out / "gaussians.ply").exists() and (out / "mesh.glb").exists(), err
    _check_glb(out / "mesh.glb", min_faces=20, varied=False)
    # export-mesh on that prediction's .ply writes a .glb beside it
    assert tool.main([str(out / "gaussians.ply"), "--resolution", "48", "--faces", "2000", "--texture-size", "256",
                      "--bake-views", "6", "--bake-size", "128", "--iso", "0.05", "--quiet"]) == 0
    _check_glb(out / "gaussians.glb", min_faces=20, varied=False)


def test_write_prediction_with_mesh_puts_mesh_glb_beside_the_ply(tmp_path):
    """``predict --mesh``'s writer, on a hand-made prediction (no model): mesh.glb lands in the atomic folder."""
    from gsv3d_pl.inference import write_prediction
    from gsv3d_pl.inference.pipeline import Prediction
    from gsv3d_pl.tools import predict as predict_tool
    from gsv3d_pl.tools.export_mesh import settings_from_args

    cams = orbit_cameras(21, 10.0, 2.0, 33.8, 32, 32)
    pred = Prediction(image=torch.rand(3, 32, 32), alpha=torch.ones(1, 32, 32), latents=torch.zeros(21, 4, 4, 4),
                      frames=torch.rand(21, 3, 32, 32), cameras=cams, input_indices=torch.tensor([4, 9, 15, 20]),
                      gaussians=_sphere_gaussians(1500), elevation_deg=10.0)
    args = predict_tool.build_parser().parse_args(
        ["--config", "c.yaml", "--image", "a.png", "--mesh", "--mesh-resolution", "48", "--mesh-faces", "2000",
         "--mesh-texture-size", "256", "--mesh-bake-views", "6", "--mesh-bake-size", "128"])
    settings = settings_from_args(args, prefix="mesh-")
    assert (settings.resolution, settings.faces, settings.texture_size) == (48, 2000, 256)
    files = write_prediction(pred, tmp_path / "out", turntable_frames=2, video_format="gif", mesh=settings)
    assert files["mesh"] == tmp_path / "out" / "mesh.glb" and (tmp_path / "out" / "gaussians.ply").exists()
    _check_glb(files["mesh"])
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder left
