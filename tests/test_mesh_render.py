"""Mesh renderer: camera conventions (vs trimesh ray casting and vs the Gaussian rasteriser) and real-file handling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from datamodules.mesh_render import BadMeshError, MeshRenderer, load_mesh, projection_from_K, resolve_supersampled
from gsv3d_pl.cameras import cameras_from_spherical, orbit_cameras, pixel_rays

RES = 48


def _textured_box(path, size=32):
    """A box with a half red / half blue texture (box-projected UVs): left and right halves differ."""
    img = np.zeros((size, size, 3), np.uint8)
    img[:, : size // 2] = [255, 0, 0]
    img[:, size // 2:] = [0, 0, 255]
    mesh = trimesh.creation.box(extents=[1.0, 0.6, 0.8])
    uv = (mesh.vertices[:, [0, 1]] - mesh.vertices[:, [0, 1]].min(0)) / np.ptp(mesh.vertices[:, [0, 1]], 0)
    mat = trimesh.visual.material.PBRMaterial(baseColorTexture=Image.fromarray(img), baseColorFactor=[255] * 4)
    mesh.visual = trimesh.visual.TextureVisuals(uv=uv, material=mat)
    path.write_bytes(trimesh.Scene(mesh).export(file_type="glb"))
    return path


def _vertex_color_sphere(path):
    mesh = trimesh.creation.icosphere(subdivisions=2)
    cols = np.zeros((len(mesh.vertices), 4), np.uint8)
    cols[:, 3] = 255
    cols[:, 1] = 255 * (mesh.vertices[:, 1] > 0)  # green top, black bottom
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=cols)
    path.write_bytes(trimesh.Scene(mesh).export(file_type="glb"))
    return path


def _two_node_scene(path):
    """Two unit boxes: one at the origin, one translated +3 along x and scaled 2x by its node transform."""
    scene = trimesh.Scene()
    scene.add_geometry(trimesh.creation.box(), node_name="a", geom_name="a")
    T = np.diag([2.0, 2.0, 2.0, 1.0])
    T[:3, 3] = [3.0, 0.0, 0.0]
    scene.add_geometry(trimesh.creation.box(), node_name="b", geom_name="b", transform=T)
    path.write_bytes(scene.export(file_type="glb"))
    return path


def test_projection_matches_K():
    """A camera-space point projects through the GL matrix to the pixel K gives (pixel centres at u + 0.5)."""
    K = np.array([[50.0, 0, 20.5], [0, 60.0, 17.0], [0, 0, 1]])
    P = projection_from_K(K, 40, 30, 0.1, 10.0)
    X = np.array([0.3, -0.2, 2.5, 1.0])
    clip = P @ X
    ndc = clip[:3] / clip[3]
    u = (ndc[0] + 1) / 2 * 40
    v = (ndc[1] + 1) / 2 * 30
    np.testing.assert_allclose([u, v], [50 * 0.3 / 2.5 + 20.5, 60 * -0.2 / 2.5 + 17.0], atol=1e-9)
    assert -1 < ndc[2] < 1


@pytest.mark.parametrize("supersample", [1, 2])
def test_depth_matches_ray_casting(tmp_path, supersample):
    """Planar depth at pixel centres agrees with trimesh ray casting within 1% on covered pixels.

    Single-sampled, every pixel agrees. Supersampled, a pixel whose centre lies on an edge between two surfaces
    may take either (the sub-samples vote); away from such edges it is the exact centre depth.
    """
    path = _two_node_scene(tmp_path / "two.glb")
    mesh = load_mesh(path)
    cams = cameras_from_spherical([20.0, -10.0, 35.0], [0.0, 130.0, 250.0], radius=[2.0, 1.8, 2.3],
                                  width=RES, height=RES)
    out = MeshRenderer(RES, supersample=supersample).render(mesh, cams.c2w, cams.K)
    tm = trimesh.Trimesh(np.concatenate([p.positions for p in mesh.primitives]),
                         np.concatenate([p.faces + sum(len(q.positions) for q in mesh.primitives[:i])
                                         for i, p in enumerate(mesh.primitives)]))
    # plane id per triangle (a box face is two triangles): rounded normal and offset
    planes = np.round(np.concatenate([tm.face_normals, (tm.face_normals * tm.triangles[:, 0]).sum(1, keepdims=True)],
                                     1), 4)
    plane_id = np.unique(planes, axis=0, return_inverse=True)[1].reshape(-1)
    origins, dirs, z_per_t = pixel_rays(cams.c2w, cams.K, RES, RES)  # [C, H, W, 3], ..., [C, H, W, 1]
    for c in range(len(cams)):
        o = origins[c].reshape(-1, 3).double().numpy()
        d = dirs[c].reshape(-1, 3).double().numpy()
        loc, ray_idx, tri = tm.ray.intersects_location(o, d, multiple_hits=False)
        ref = np.zeros(RES * RES)
        ref[ray_idx] = np.linalg.norm(loc - o[ray_idx], axis=-1) * z_per_t[c].reshape(-1).numpy()[ray_idx]
        pid = np.full(RES * RES, -1)
        pid[ray_idx] = plane_id[tri]
        # interior: the 3×3 neighbourhood sees one plane (no silhouette, no crease, no occlusion edge)
        padded = np.pad(pid.reshape(RES, RES), 1, constant_values=-1)
        nb = np.stack([padded[i:i + RES, j:j + RES] for i in range(3) for j in range(3)]).reshape(9, -1)
        interior = (nb == pid[None]).all(0) & (pid >= 0)
        got = out.depth[c, ..., 0].reshape(-1).numpy()
        hit = ref > 0
        assert hit.sum() > 100 and interior.sum() > 0.4 * hit.sum()
        both = hit & (got > 0)
        # pixel centres on silhouettes can go either way (rasteriser tie-breaking); that is < 2% of hits
        assert (both.sum() / hit.sum()) > 0.98
        rel = np.abs(got - ref) / np.maximum(ref, 1e-9)
        assert rel[interior].max() < 1e-4, rel[interior].max()
        within = (rel[both] < 0.01).mean()  # share of the hits within 1%, edges included
        assert within == 1.0 if supersample == 1 else within > 0.95, within
        assert (got[~hit] == 0).mean() > 0.97  # background is 0
        # alpha covers exactly where the rays hit (up to silhouette pixels)
        cov = out.alpha[c, ..., 0].reshape(-1).numpy() > 0.5
        assert (cov == hit).mean() > 0.98


@pytest.mark.parametrize("res", [32, 64])
def test_depth_bounded_at_grazing_silhouettes(tmp_path, res):
    """Silhouettes of a sphere (triangles seen edge-on) keep depths on the object: within the bounding sphere."""
    mesh = load_mesh(_vertex_color_sphere(tmp_path / "s.glb"))
    r = MeshRenderer(res, supersample=2)
    for elevation in (0.0, 10.0, 30.0):
        cams = orbit_cameras(21, elevation, width=res, height=res)
        out = r.render(mesh, cams.c2w, cams.K)
        d = out.depth[..., 0]
        dist = cams.c2w[:, :3, 3].norm(dim=-1)[:, None, None]  # [C, 1, 1]
        covered = d > 0
        assert covered.float().mean() > 0.1
        ok = (d >= dist - mesh.bounding_radius - 1e-3) & (d <= dist + mesh.bounding_radius + 1e-3)
        assert ok[covered].all(), d[covered & ~ok]
        assert torch.equal(covered, out.alpha[..., 0] > 0)  # depth exactly where some coverage is


def test_supersample_resolve_matches_numpy_reference(tmp_path):
    """The GL resolve pass (box-filtered colour, voted centre depth) equals resolve_supersampled() in numpy."""
    path = _textured_box(tmp_path / "box.glb")
    cams = orbit_cameras(3, 25.0, width=24, height=24)
    lo, hi = MeshRenderer(24, supersample=2), MeshRenderer(48, supersample=1)
    mesh = load_mesh(path)
    rgba, depth = lo.render_raw(mesh, cams.c2w, cams.K)
    # the 48² single-sample render is the sub-sample grid of the 24² one (same image plane, K scaled by 2)
    K2 = cams.K.clone()
    K2[:, :2] *= 2
    hrgba, _ = hi.render_raw(mesh, cams.c2w, K2)
    for c in range(len(cams)):
        ref_rgba, _ = resolve_supersampled(hrgba[c], np.zeros((48, 48), np.float32), 2)
        assert np.abs(ref_rgba.astype(int) - rgba[c].astype(int)).max() <= 1
    # depth voting: two surfaces in one pixel, 3 sub-samples on the far one and 1 near one -> the far one wins;
    # a 2-2 tie -> the nearer one; uncovered -> 0
    z = np.array([[2.0, 2.0, 1.5, 1.5, 0.0, 0.0],
                  [2.0, 1.0, 3.0, 3.0, 0.0, 0.0]], np.float32)
    _, d = resolve_supersampled(np.zeros((2, 6, 4), np.uint8), z, 2)
    np.testing.assert_allclose(d, [[2.0, 1.5, 0.0]])


def test_normalisation_contract(tmp_path):
    """normalised = (v - norm_center) * norm_scale for trimesh.load(path, force="mesh") vertices."""
    path = _two_node_scene(tmp_path / "two.glb")
    mesh = load_mesh(path)
    v = trimesh.load(path, force="mesh").vertices
    n = (v - mesh.norm_center) * mesh.norm_scale
    np.testing.assert_allclose(n.min(0) + n.max(0), 0, atol=1e-6)  # centred
    assert abs(np.ptp(n, 0).max() - 1.0) < 1e-6  # largest side 1
    # the node transform is applied: box b (x in [2, 4]) and a (x in [-0.5, 0.5]) -> extent 4.5 in x
    np.testing.assert_allclose(mesh.norm_scale, 1 / 4.5, rtol=1e-6)
    allpos = np.concatenate([p.positions for p in mesh.primitives])
    np.testing.assert_allclose(np.sort(allpos, 0), np.sort(n.astype(np.float32), 0), atol=1e-5)


def test_texture_orientation_and_colors(tmp_path):
    """Texture halves land on the correct sides; vertex colours and factors come through; background is white."""
    r = MeshRenderer(RES)
    cams = orbit_cameras(elevation_deg=0.0, width=RES, height=RES)[20]  # azimuth 0: looking from +Z at -Z
    out = r.render(load_mesh(_textured_box(tmp_path / "tex.glb")), cams.c2w, cams.K)
    img = out.rgb[0]
    mid = RES // 2
    left, right = img[mid, RES // 2 - 8], img[mid, RES // 2 + 8]
    # from +Z with +Y up, image-right is world +X: u increases with x -> red (u<0.5) left, blue right
    assert left[0] > 0.3 and left[2] < 0.1, left
    assert right[2] > 0.3 and right[0] < 0.1, right
    assert torch.allclose(img[0, 0], torch.ones(3))
    out = r.render(load_mesh(_vertex_color_sphere(tmp_path / "vc.glb")), cams.c2w, cams.K)
    top, bottom = out.rgb[0, RES // 2 - 8, mid], out.rgb[0, RES // 2 + 8, mid]
    assert top[1] > 0.3 and top[0] < 0.1 and bottom.max() < 0.05  # image up = world +Y = green
    black = r.render(load_mesh(_vertex_color_sphere(tmp_path / "vc.glb")), cams.c2w, cams.K, background=0.0)
    assert black.rgb[0, 0, 0].abs().max() == 0


def test_alpha_modes(tmp_path):
    """MASK discards texels under the cutoff; BLEND gives fractional alpha and no depth where transparent."""
    img = np.zeros((8, 8, 4), np.uint8)
    img[..., :3] = 200
    img[:, :4, 3] = 255  # left half opaque, right half transparent
    quad = trimesh.Trimesh([[-0.5, -0.5, 0], [0.5, -0.5, 0], [0.5, 0.5, 0], [-0.5, 0.5, 0]], [[0, 1, 2], [0, 2, 3]],
                           process=False)
    uv = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], float)
    cams = orbit_cameras(width=RES, height=RES)[20]
    res = {}
    for mode in ("MASK", "BLEND"):
        mat = trimesh.visual.material.PBRMaterial(baseColorTexture=Image.fromarray(img, "RGBA"), alphaMode=mode,
                                                  alphaCutoff=0.5)
        q = quad.copy()
        q.visual = trimesh.visual.TextureVisuals(uv=uv, material=mat)
        (tmp_path / f"{mode}.glb").write_bytes(trimesh.Scene(q).export(file_type="glb"))
        out = MeshRenderer(RES).render(load_mesh(tmp_path / f"{mode}.glb"), cams.c2w, cams.K)
        res[mode] = out
        row = RES // 2
        assert out.alpha[0, row, RES // 2 - 6, 0] > 0.99 and out.depth[0, row, RES // 2 - 6, 0] > 0
        assert out.alpha[0, row, RES // 2 + 6, 0] < 0.01 and out.depth[0, row, RES // 2 + 6, 0] == 0


def test_missing_uvs_and_normals(tmp_path):
    """A bare triangle soup (no UVs, no normals, no visual) renders with the default grey and flat shading."""
    m = trimesh.creation.icosphere(subdivisions=1)
    (tmp_path / "bare.obj").write_text("\n".join([f"v {x} {y} {z}" for x, y, z in m.vertices]
                                                 + [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in m.faces]))
    cams = orbit_cameras(width=RES, height=RES)[20]
    out = MeshRenderer(RES).render(load_mesh(tmp_path / "bare.obj"), cams.c2w, cams.K)
    assert out.alpha.mean() > 0.2
    inside = out.alpha[0, ..., 0] > 0.99
    assert out.rgb[0][inside].std(0).max() < 0.3 and out.rgb[0][inside].mean() < 0.95  # shaded, not background


@pytest.mark.parametrize("kind", ["no_faces", "truncated", "missing_bin", "nan", "too_many_faces", "empty", "missing"])
def test_bad_files_raise(tmp_path, kind):
    if kind == "no_faces":
        p = tmp_path / "pc.glb"
        p.write_bytes(trimesh.Scene(trimesh.PointCloud(np.random.rand(20, 3))).export(file_type="glb"))
    elif kind == "truncated":
        b = trimesh.creation.box().export(file_type="glb")
        p = tmp_path / "trunc.glb"
        p.write_bytes(b[: len(b) // 2])
    elif kind == "missing_bin":
        files = trimesh.Scene(trimesh.creation.box()).export(file_type="gltf")
        p = tmp_path / "model.gltf"
        p.write_bytes(files["model.gltf"])  # its .bin buffers are not written
    elif kind == "nan":
        p = tmp_path / "nan.obj"
        p.write_text("v 0 0 0\nv 1 0 0\nv nan 1 0\nf 1 2 3\n")
    elif kind == "too_many_faces":
        p = tmp_path / "big.glb"
        p.write_bytes(trimesh.creation.icosphere(subdivisions=3).export(file_type="glb"))
    elif kind == "empty":
        p = tmp_path / "empty.glb"
        p.write_bytes(b"")
    else:
        p = tmp_path / "nope.glb"
    with pytest.raises(BadMeshError) as e:
        load_mesh(p, max_faces=100)
    assert str(e.value)


def _quat_z_to(n: np.ndarray) -> np.ndarray:
    """wxyz quaternions [G, 4] rotating +Z onto the unit normals n [G, 3]."""
    w = 1.0 + n[:, 2]
    q = np.concatenate([w[:, None], np.stack([-n[:, 1], n[:, 0], np.zeros_like(w)], 1)], 1)  # (1 + z.n, z x n)
    q[w < 1e-6] = [0.0, 1.0, 0.0, 0.0]
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def test_alpha_agrees_with_gaussian_rasterizer(tmp_path):
    """Gaussians sampled densely on the surface, rasterised by gsv3d_pl.render, match the mesh alpha (IoU ≥ 0.95).

    The splats are flat and surface-aligned so that they do not dilate the silhouette; what remains is the
    rasteriser's 0.3 px² screen-space blur (a ~1 px ring), which is why the object fills a good part of a 96² image.
    A half-pixel convention mismatch would show up as mesh pixels the Gaussians miss, which must not happen.
    """
    render = pytest.importorskip("gsv3d_pl.render")
    scene = trimesh.Scene()
    scene.add_geometry(trimesh.creation.icosphere(subdivisions=3, radius=0.5), node_name="a", geom_name="a")
    T = np.eye(4)
    T[:3, 3] = [0.6, 0.2, 0.0]
    scene.add_geometry(trimesh.creation.box(extents=[0.6, 0.6, 0.6]), node_name="b", geom_name="b", transform=T)
    (tmp_path / "sb.glb").write_bytes(scene.export(file_type="glb"))
    mesh = load_mesh(tmp_path / "sb.glb")
    tm = trimesh.Trimesh(np.concatenate([p.positions for p in mesh.primitives]),
                         np.concatenate([p.faces + sum(len(q.positions) for q in mesh.primitives[:i])
                                         for i, p in enumerate(mesh.primitives)]))
    pts, face_idx = trimesh.sample.sample_surface_even(tm, 8000, seed=0)
    G = len(pts)
    spacing = float(np.sqrt(tm.area / G))
    means = torch.tensor(pts, dtype=torch.float32)  # [G, 3]
    quats = torch.tensor(_quat_z_to(tm.face_normals[face_idx]), dtype=torch.float32)  # [G, 4]
    scales = torch.tensor([0.7 * spacing, 0.7 * spacing, 1e-4]).expand(G, 3).contiguous()  # [G, 3] flat discs
    res = 96
    cams = cameras_from_spherical([15.0, -20.0], [30.0, 200.0], radius=1.5, width=res, height=res)
    _, alpha_gs, _ = render.rasterize(means, quats, scales, torch.full((G,), 0.99), torch.full((G, 3), 0.5),
                                      cams.viewmats, cams.K, res, res, backend="auto")
    alpha_mesh = MeshRenderer(res).render(mesh, cams.c2w, cams.K).alpha
    a, b = alpha_gs[..., 0] > 0.5, alpha_mesh[..., 0] > 0.5
    iou = (a & b).sum().item() / (a | b).sum().item()
    assert iou >= 0.95, iou
    assert (b & ~a).sum().item() <= 0.005 * b.sum().item()


def _box_mesh():
    from datamodules.mesh_render import MeshData, Primitive

    box = trimesh.creation.box()
    return MeshData([Primitive(box.vertices.astype(np.float32), box.vertex_normals.astype(np.float32), None,
                               np.ones((len(box.vertices), 4), np.float32), box.faces.astype(np.uint32))])


def _child_render(r, mesh, c2w, K, q):
    try:
        q.put(r.render(mesh, c2w, K).alpha.sum().item())
    except RuntimeError as e:
        q.put(str(e))


def test_renderer_in_forked_workers():
    """Built in the parent, used in a forked child (DataLoader worker): the child creates its own context."""
    import multiprocessing as mp

    from datamodules.gl_context import _CTX

    cams = orbit_cameras(width=16, height=16)[20]
    mesh, r = _box_mesh(), MeshRenderer(16)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    if _CTX["ctx"] is None:  # only meaningful when this process has not rendered yet (run alone or first)
        proc = ctx.Process(target=_child_render, args=(r, mesh, cams.c2w, cams.K, q))
        proc.start()
        got = q.get(timeout=60)
        proc.join(timeout=60)
        ref = r.render(mesh, cams.c2w, cams.K).alpha.sum().item()  # parent renders only now
        assert got == pytest.approx(ref, abs=1e-3)
    r.render(mesh, cams.c2w, cams.K)
    # after the parent has rendered, a forked llvmpipe child must fail loudly, not hang

    if "llvmpipe" in _CTX.get("renderer", ""):
        proc = ctx.Process(target=_child_render, args=(r, mesh, cams.c2w, cams.K, q))
        proc.start()
        msg = q.get(timeout=60)
        proc.join(timeout=60)
        assert "spawn" in msg
