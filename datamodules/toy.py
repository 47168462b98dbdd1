"""Procedural toy objects written into the Objaverse cache layout (the embedded default dataset).

``generate_toy_objects(root, num_objects=64)`` writes deterministic GLB files to
``<root>/hf-objaverse-v1/glbs/000-toy/<uid>.glb`` together with ``object-paths.json.gz`` and an
``lvis-annotations.json.gz`` (one category per shape family), so the tiny configs exercise exactly the code path
of real Objaverse (``objaverse.load_objects`` / ``load_lvis_annotations`` with ``_VERSIONED_PATH`` redirected).

Objects are single primitives and composites (boxes, spheres, cylinders, cones, tori, capsules, snowmen, tables,
mushrooms, dumbbells, towers, arrows, lamps), each part a separate scene node with its own transform and one of:
a checker texture, a stripe texture (both via per-face box-projected UVs, so no seams), vertex colours (a height
gradient) or a flat baseColorFactor. Textures make views at different azimuths differ, which the GS decoder
must learn; part sizes are kept moderate so the objects stay in the SV3D orbit's field of view.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os

import numpy as np

from gsv3d_pl.io import atomic_write

__all__ = ["generate_toy_objects", "toy_uid", "TOY_FAMILIES", "TOY_VERSION"]

TOY_VERSION = 1
TOY_DIR = "000-toy"

_PALETTE = np.array([
    [230, 57, 70], [241, 143, 1], [246, 211, 45], [106, 176, 76], [42, 157, 143], [69, 123, 157],
    [29, 53, 87], [155, 93, 229], [241, 91, 181], [120, 85, 60], [230, 230, 230], [60, 60, 60],
], dtype=np.uint8)


def toy_uid(index: int, seed: int = 0) -> str:
    """32-hex-digit uid (the shape of an Objaverse uid) for toy object ``index``."""
    return hashlib.md5(f"gsv3d-toy-v{TOY_VERSION}-{seed}-{index}".encode()).hexdigest()


def _texture(rng: np.random.Generator, kind: str, size: int = 64):
    """A small RGB PIL image: checker or stripes in two palette colours."""
    from PIL import Image

    c = _PALETTE[rng.choice(len(_PALETTE), 2, replace=False)]  # [2, 3]
    n = int(rng.choice([2, 4, 8]))
    yy, xx = np.mgrid[0:size, 0:size] * n // size  # [size, size]
    if kind == "checker":
        idx = (xx + yy) % 2
    else:
        idx = xx % 2 if rng.random() < 0.5 else yy % 2
    return Image.fromarray(c[idx].astype(np.uint8))


def _box_uv(mesh):
    """Unmerge faces and give each a UV from box projection along its dominant normal axis (no seams)."""
    import trimesh

    normals = np.asarray(mesh.vertex_normals)[mesh.faces].reshape(-1, 3)  # smooth shading survives the unmerge
    verts = np.asarray(mesh.vertices)[mesh.faces].reshape(-1, 3)  # [3F, 3]
    axis = np.repeat(np.abs(mesh.face_normals).argmax(1), 3)  # [3F]
    lo, ext = mesh.bounds[0], np.maximum(mesh.extents.max(), 1e-6)
    p = (verts - lo) / ext  # [3F, 3] in [0, 1]
    uv = np.where(axis[:, None] == 0, p[:, [2, 1]], np.where(axis[:, None] == 1, p[:, [0, 2]], p[:, [0, 1]]))
    faces = np.arange(len(verts)).reshape(-1, 3)
    out = trimesh.Trimesh(verts, faces, vertex_normals=normals, process=False)
    return out, uv


def _part(shape: str, rng: np.random.Generator):
    import trimesh

    c = trimesh.creation
    if shape == "box":
        return c.box(extents=rng.uniform(0.35, 1.0, 3))
    if shape == "sphere":
        return c.icosphere(subdivisions=2, radius=rng.uniform(0.3, 0.5))
    if shape == "cylinder":
        return c.cylinder(radius=rng.uniform(0.15, 0.4), height=rng.uniform(0.4, 1.0), sections=24)
    if shape == "cone":
        return c.cone(radius=rng.uniform(0.2, 0.45), height=rng.uniform(0.5, 1.0), sections=24)
    if shape == "torus":
        return c.torus(major_radius=rng.uniform(0.3, 0.4), minor_radius=rng.uniform(0.07, 0.15),
                       major_sections=24, minor_sections=12)
    if shape == "capsule":
        return c.capsule(height=rng.uniform(0.3, 0.7), radius=rng.uniform(0.15, 0.3), count=[16, 16])
    raise ValueError(shape)


def _rot(axis: str, deg: float) -> np.ndarray:
    import trimesh

    v = {"x": [1, 0, 0], "y": [0, 1, 0], "z": [0, 0, 1]}[axis]
    return trimesh.transformations.rotation_matrix(np.deg2rad(deg), v)


def _tr(x, y, z) -> np.ndarray:
    T = np.eye(4)
    T[:3, 3] = [x, y, z]
    return T


def _y_up(mesh):
    """trimesh's cylinders/cones/capsules stand along +Z; our world is +Y up."""
    mesh.apply_transform(_rot("x", -90))
    return mesh


def _layout(family: str, rng: np.random.Generator) -> list[tuple[str, np.ndarray, dict]]:
    """Parts of one object: (primitive shape, node transform [4, 4], creation overrides)."""
    u = rng.uniform
    if family in ("box", "sphere", "cylinder", "cone", "torus", "capsule"):
        R = _rot("y", u(0, 360)) @ _rot("x", u(-25, 25)) if family in ("box", "torus", "capsule") else _rot("y", u(0, 360))
        return [(family, R, {})]
    if family == "snowman":
        r = [u(0.35, 0.45), u(0.25, 0.32), u(0.15, 0.22)]
        y = [0.0, r[0] + r[1] * 0.8, r[0] + 1.6 * r[1] + r[2] * 0.8]
        return [("sphere", _tr(0, y[i], 0), {"radius": r[i]}) for i in range(3)]
    if family == "table":
        w, d, h = u(0.8, 1.2), u(0.5, 0.9), u(0.4, 0.7)
        parts = [("box", _tr(0, h, 0), {"extents": [w, 0.08, d]})]
        for sx in (-1, 1):
            for sz in (-1, 1):
                parts.append(("cylinder", _tr(sx * (w / 2 - 0.08), h / 2, sz * (d / 2 - 0.08)),
                              {"radius": 0.04, "height": h}))
        return parts
    if family == "mushroom":
        h = u(0.4, 0.7)
        return [("cylinder", _tr(0, h / 2, 0), {"radius": u(0.08, 0.15), "height": h}),
                ("cone", _tr(0, h, 0), {"radius": u(0.35, 0.5), "height": u(0.3, 0.5)})]
    if family == "dumbbell":
        L = u(0.6, 0.9)
        return [("cylinder", _rot("z", 90), {"radius": 0.06, "height": L}),
                ("sphere", _tr(-L / 2, 0, 0), {"radius": u(0.15, 0.25)}),
                ("box", _tr(L / 2, 0, 0) @ _rot("y", 45), {"extents": [0.3, 0.3, 0.3]})]
    if family == "tower":
        parts, y = [], 0.0
        for k in range(int(rng.integers(2, 5))):
            s = 0.7 * (0.8 ** k)
            h = u(0.15, 0.3)
            parts.append(("box", _tr(0, y + h / 2, 0) @ _rot("y", u(0, 90)), {"extents": [s, h, s]}))
            y += h
        return parts
    if family == "arrow":
        L = u(0.5, 0.8)
        return [("cylinder", _tr(0, L / 2, 0), {"radius": 0.07, "height": L}),
                ("cone", _tr(0, L, 0), {"radius": 0.2, "height": 0.35})]
    if family == "lamp":
        return [("cylinder", _tr(0, 0.03, 0), {"radius": 0.3, "height": 0.06}),
                ("cylinder", _tr(0, 0.4, 0), {"radius": 0.04, "height": 0.75}),
                ("torus", _tr(0, 0.8, 0), {"major_radius": 0.25, "minor_radius": 0.06})]
    raise ValueError(family)


TOY_FAMILIES = ("box", "sphere", "cylinder", "cone", "torus", "capsule", "snowman", "table", "mushroom",
                "dumbbell", "tower", "arrow", "lamp")


def _make_part(shape: str, overrides: dict, rng: np.random.Generator):
    import trimesh

    c = trimesh.creation
    if not overrides:
        mesh = _part(shape, rng)
    elif shape == "sphere":
        mesh = c.icosphere(subdivisions=2, radius=overrides["radius"])
    elif shape == "box":
        mesh = c.box(extents=overrides["extents"])
    elif shape == "cylinder":
        mesh = c.cylinder(radius=overrides["radius"], height=overrides["height"], sections=24)
    elif shape == "cone":
        mesh = c.cone(radius=overrides["radius"], height=overrides["height"], sections=24)
    elif shape == "torus":
        mesh = c.torus(major_radius=overrides["major_radius"], minor_radius=overrides["minor_radius"],
                       major_sections=24, minor_sections=12)
    else:
        raise ValueError(shape)
    if shape in ("cylinder", "cone", "capsule"):
        mesh = _y_up(mesh)
    if shape == "cone":
        mesh.apply_translation([0, 0, 0])  # cone base at y = 0, tip up: stacks on whatever is below
    return mesh


def _skin(mesh, rng: np.random.Generator, style: str):
    """Attach a visual: 'checker' | 'stripes' (textured), 'vertex' (vertex colours) or 'flat' (factor only)."""
    import trimesh

    if style in ("checker", "stripes"):
        mesh, uv = _box_uv(mesh)
        mat = trimesh.visual.material.PBRMaterial(baseColorTexture=_texture(rng, style), baseColorFactor=[255] * 4,
                                                  metallicFactor=0.0, roughnessFactor=1.0)
        mesh.visual = trimesh.visual.TextureVisuals(uv=uv, material=mat)
        return mesh
    if style == "vertex":
        c0, c1 = _PALETTE[rng.choice(len(_PALETTE), 2, replace=False)].astype(np.float64)
        y = mesh.vertices[:, 1]
        t = ((y - y.min()) / max(np.ptp(y), 1e-6))[:, None]
        cols = np.concatenate([(1 - t) * c0 + t * c1, np.full((len(y), 1), 255.0)], 1).astype(np.uint8)
        mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=cols)
        return mesh
    col = _PALETTE[rng.integers(len(_PALETTE))]
    mat = trimesh.visual.material.PBRMaterial(baseColorFactor=[*col.tolist(), 255], metallicFactor=0.0,
                                              roughnessFactor=1.0)
    mesh.visual = trimesh.visual.TextureVisuals(material=mat)
    return mesh


def make_toy_scene(index: int, seed: int = 0):
    """The trimesh.Scene of toy object ``index`` (deterministic) and its family name."""
    import trimesh

    rng = np.random.default_rng([seed, index, TOY_VERSION])
    family = TOY_FAMILIES[index % len(TOY_FAMILIES)]
    scene = trimesh.Scene()
    styles = ["checker", "stripes", "vertex", "flat"]
    for k, (shape, T, over) in enumerate(_layout(family, rng)):
        style = styles[int(rng.integers(0, 4))] if k else styles[(index // len(TOY_FAMILIES)) % 3]
        part = _skin(_make_part(shape, over, rng), rng, style)
        scene.add_geometry(part, node_name=f"part{k}", geom_name=f"part{k}", transform=T)
    return scene, family


def generate_toy_objects(root: str | os.PathLike, num_objects: int = 64, seed: int = 0,
                         overwrite: bool = False) -> list[str]:
    """Write ``num_objects`` toy GLBs into the Objaverse cache layout under ``root`` and return their uids.

    Layout (what ``objaverse`` 0.1.7 reads, with ``objaverse._VERSIONED_PATH = <root>/hf-objaverse-v1``):
    ``glbs/000-toy/<uid>.glb``, ``object-paths.json.gz`` (uid -> "glbs/000-toy/<uid>.glb", merged with any
    existing entries) and ``lvis-annotations.json.gz`` (family -> uids). Existing GLBs are kept unless
    ``overwrite``; the function is deterministic in (index, seed).
    """
    import trimesh

    vroot = os.path.join(os.fspath(root), "hf-objaverse-v1")
    paths_file = os.path.join(vroot, "object-paths.json.gz")
    lvis_file = os.path.join(vroot, "lvis-annotations.json.gz")
    paths: dict[str, str] = {}
    lvis: dict[str, list[str]] = {}
    for f, d in ((paths_file, paths), (lvis_file, lvis)):
        if os.path.exists(f):
            with gzip.open(f, "rt") as fh:
                d.update(json.load(fh))
    uids = []
    for i in range(int(num_objects)):
        uid = toy_uid(i, seed)
        rel = f"glbs/{TOY_DIR}/{uid}.glb"
        out = os.path.join(vroot, rel)
        family = TOY_FAMILIES[i % len(TOY_FAMILIES)]
        if overwrite or not os.path.exists(out):
            scene, family = make_toy_scene(i, seed)
            with atomic_write(out, "wb") as f:
                f.write(trimesh.exchange.gltf.export_glb(scene, include_normals=True))
        paths[uid] = rel
        cat = lvis.setdefault(f"toy_{family}", [])
        if uid not in cat:
            cat.append(uid)
        uids.append(uid)
    for f, d in ((paths_file, paths), (lvis_file, lvis)):
        with atomic_write(f, "wb") as fh:
            fh.write(gzip.compress(json.dumps(d, sort_keys=True).encode(), mtime=0))
    return uids
