"""Meshes for the renderer: any trimesh-readable file -> normalised, renderable primitives (:func:`load_mesh`).

Scene graphs with node transforms, several primitives, PBR and simple materials, vertex/face colours, alpha
OPAQUE/MASK/BLEND, meshes without UVs or normals. Anything that cannot be rendered raises :class:`BadMeshError`
with a short reason (the datamodule logs it to ``skipped.jsonl``). Objects are normalised: bounding box centred at
the origin, largest side 1.

A file over ``max_faces`` is refused from its header where the format has one (:mod:`datamodules.mesh_header`),
before the whole file is parsed.

OBJ textures are looked up next to the file (trimesh's rule), then in ``../materials/textures/`` by file name:
Google Scanned Objects' ``meshes/model.mtl`` names a ``texture.png`` that lives in ``materials/textures/``.
:func:`write_y_up_copy` rotates a Z-up file (GSO's frame) into this project's +Y-up frame as a self-contained GLB.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np

from datamodules.mesh_header import face_count_lower_bound

log = logging.getLogger(__name__)

__all__ = ["BadMeshError", "MeshData", "Primitive", "load_mesh", "write_y_up_copy", "UP_AXES", "ALPHA_OPAQUE",
           "ALPHA_MASK", "ALPHA_BLEND"]


class BadMeshError(Exception):
    """An object that cannot be rendered; ``str(err)`` is the reason written to ``skipped.jsonl``."""


ALPHA_OPAQUE, ALPHA_MASK, ALPHA_BLEND = 0, 1, 2
_ALPHA_MODES = {"OPAQUE": ALPHA_OPAQUE, "MASK": ALPHA_MASK, "BLEND": ALPHA_BLEND}

# Source up axis -> the rotation [4, 4] into this project's frame (+Y up). Z-up -> Y-up is (x, y, z) -> (x, z, -y),
# the mapping glTF exporters use (Blender's -Y "front" ends up facing +Z, the azimuth-0 camera).
UP_AXES = ("y", "z")
_TO_Y_UP = {
    "y": np.eye(4),
    "z": np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]),
}


@dataclass
class Primitive:
    """One drawable piece: a trimesh geometry instanced at one scene-graph node, in normalised world coordinates.

    Attributes:
        positions: [V, 3] float32 vertex positions (normalised world frame).
        normals: [V, 3] float32 unit vertex normals (world frame).
        uvs: [V, 2] float32 texture coordinates in trimesh's convention (v = 0 at the image bottom), or None.
        colors: [V, 4] float32 RGBA in [0, 1]: vertex colour × material factor (white when absent).
        faces: [F, 3] uint32 triangle indices.
        texture: [h, w, 4] uint8 RGBA base-colour image, row 0 = top, or None.
        alpha_mode: ALPHA_OPAQUE, ALPHA_MASK or ALPHA_BLEND.
        alpha_cutoff: MASK threshold.
    """

    positions: np.ndarray
    normals: np.ndarray
    uvs: np.ndarray | None
    colors: np.ndarray
    faces: np.ndarray
    texture: np.ndarray | None = None
    alpha_mode: int = ALPHA_OPAQUE
    alpha_cutoff: float = 0.5


@dataclass
class MeshData:
    """A loaded, normalised object.

    ``norm_center`` [3] and ``norm_scale`` map the source frame to the normalised one:
    ``normalised = (v - norm_center) * norm_scale`` for the vertices ``v`` of ``trimesh.load(path, force="mesh")``
    (scene-graph transforms applied).
    """

    primitives: list[Primitive]
    norm_center: np.ndarray = field(default_factory=lambda: np.zeros(3))
    norm_scale: float = 1.0

    @property
    def num_faces(self) -> int:
        return sum(len(p.faces) for p in self.primitives)

    @property
    def bounding_radius(self) -> float:
        """Radius of the origin-centred sphere that holds every vertex (for near/far planes)."""
        return float(max(np.linalg.norm(p.positions, axis=-1).max() for p in self.primitives))


def _as_factor(value, n: int) -> np.ndarray:
    """Material factors come as uint8 (trimesh) or float; returns float32 [n] in [0, 1]."""
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if np.asarray(value).dtype == np.uint8 or arr.max(initial=0.0) > 1.0:
        arr = arr / 255.0
    out = np.ones(n, dtype=np.float32)
    out[: min(n, arr.size)] = arr[:n]
    return np.clip(out, 0.0, 1.0)


def _texture_array(image, max_size: int) -> np.ndarray | None:
    """PIL image -> [h, w, 4] uint8 (row 0 = top), downscaled so its longest side is at most ``max_size``."""
    if image is None:
        return None
    from PIL import Image

    img = image.convert("RGBA")
    if max(img.size) > max_size:
        s = max_size / max(img.size)
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BILINEAR)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def _primitive_from_trimesh(mesh, transform: np.ndarray, max_texture_size: int) -> Primitive | None:
    """A trimesh.Trimesh at a node transform [4, 4] -> Primitive in the source world frame (not yet normalised)."""
    import trimesh

    faces = np.asarray(mesh.faces, dtype=np.int64).reshape(-1, 3)
    verts = np.asarray(mesh.vertices, dtype=np.float64).reshape(-1, 3)
    if len(faces) == 0 or len(verts) == 0:
        return None
    if faces.min() < 0 or faces.max() >= len(verts):
        raise BadMeshError("face indices out of range")
    if not np.isfinite(verts).all():
        raise BadMeshError("NaN/inf vertices")
    visual = mesh.visual
    uvs = texture = None
    alpha_mode, cutoff = ALPHA_OPAQUE, 0.5
    colors = np.ones((len(verts), 4), dtype=np.float32)  # [V, 4]

    if isinstance(visual, trimesh.visual.ColorVisuals):
        if visual.kind == "face":
            # Per-face colours: give every face its own three vertices so the colour stays flat.
            fc = np.asarray(visual.face_colors, dtype=np.float32) / 255.0  # [F, 4]
            verts = verts[faces].reshape(-1, 3)
            normals = np.repeat(np.asarray(mesh.face_normals, dtype=np.float64), 3, axis=0)
            colors = np.repeat(fc, 3, axis=0)
            faces = np.arange(len(verts), dtype=np.int64).reshape(-1, 3)
            mesh = None
        elif visual.kind == "vertex":
            colors = np.asarray(visual.vertex_colors, dtype=np.float32)[:, :4] / 255.0
        if colors[:, 3].min() < 1.0:
            alpha_mode = ALPHA_BLEND
    elif isinstance(visual, trimesh.visual.TextureVisuals):
        mat = visual.material
        if visual.uv is not None and len(visual.uv) == len(verts):
            uvs = np.asarray(visual.uv, dtype=np.float32)[:, :2]
        if isinstance(mat, trimesh.visual.material.PBRMaterial):
            factor = _as_factor(mat.baseColorFactor if mat.baseColorFactor is not None else [1, 1, 1, 1], 4)
            tex_img = mat.baseColorTexture
            alpha_mode = _ALPHA_MODES.get(str(mat.alphaMode or "OPAQUE").upper(), ALPHA_OPAQUE)
            if mat.alphaCutoff is not None:
                cutoff = float(mat.alphaCutoff)
        else:  # SimpleMaterial (OBJ/MTL)
            factor = _as_factor(getattr(mat, "diffuse", None) if getattr(mat, "diffuse", None) is not None
                                else [255, 255, 255, 255], 4)
            tex_img = getattr(mat, "image", None)
        colors = colors * factor[None]
        vattr = getattr(visual, "vertex_attributes", None) or {}
        if "color" in vattr and len(vattr["color"]) == len(verts):
            colors = colors * _as_factor(vattr["color"], 4)[None] if np.ndim(vattr["color"]) == 1 else \
                colors * (np.asarray(vattr["color"], dtype=np.float32)[:, :4] / (255.0 if np.asarray(
                    vattr["color"]).dtype == np.uint8 else 1.0))
        if uvs is not None and tex_img is not None:
            texture = _texture_array(tex_img, max_texture_size)
        if texture is None:
            uvs = None
    if mesh is not None:
        normals = np.asarray(mesh.vertex_normals, dtype=np.float64)  # computed by trimesh when the file has none
    T = np.asarray(transform, dtype=np.float64)
    pos = verts @ T[:3, :3].T + T[:3, 3]  # [V, 3]
    try:
        nmat = np.linalg.inv(T[:3, :3]).T
    except np.linalg.LinAlgError:
        nmat = np.linalg.pinv(T[:3, :3]).T
    nrm = normals @ nmat.T
    nrm = nrm / np.maximum(np.linalg.norm(nrm, axis=-1, keepdims=True), 1e-12)
    if not np.isfinite(pos).all():
        raise BadMeshError("NaN/inf vertices after the node transform")
    nrm = np.nan_to_num(nrm)  # a zero normal gets half the directional light in the shader
    return Primitive(
        positions=pos.astype(np.float32), normals=nrm.astype(np.float32), uvs=uvs,
        colors=np.ascontiguousarray(colors, dtype=np.float32), faces=faces.astype(np.uint32),
        texture=texture, alpha_mode=alpha_mode, alpha_cutoff=cutoff,
    )


def load_mesh(path: str | os.PathLike, max_faces: int | None = None, max_texture_size: int = 2048,
              normalize: bool = True) -> MeshData:
    """Load a .glb/.gltf/.obj/... file with trimesh into renderable, normalised primitives.

    Args:
        path: mesh file.
        max_faces: objects with more triangles are rejected (``BadMeshError``); None = no limit.
        max_texture_size: textures are downscaled to this longest side (speed; views are ≤ 576²).
        normalize: centre the bounding box at the origin and scale its largest side to 1.
    Raises:
        BadMeshError: unreadable/corrupt file, missing external resource, empty scene, no faces, NaN/inf vertices,
            too many faces, zero-size object.
    """
    import trimesh

    if max_faces is not None:
        # Refuse a huge file from its header before trimesh parses it (1-1.5 GB for 2M faces).
        n = face_count_lower_bound(path)
        if n is not None and n > max_faces:
            raise BadMeshError(f"too many faces ({n} in the file's header > max_faces={max_faces})")
    scene = _load_scene(path)
    prims: list[Primitive] = []
    n_faces = 0
    try:
        for node in scene.graph.nodes_geometry:
            transform, geom_name = scene.graph[node]
            geom = scene.geometry.get(geom_name)
            if not isinstance(geom, trimesh.Trimesh):
                continue  # point clouds, paths: nothing to shade
            n_faces += len(geom.faces)
            if max_faces is not None and n_faces > max_faces:
                raise BadMeshError(f"too many faces (> max_faces={max_faces})")
            prim = _primitive_from_trimesh(geom, transform, max_texture_size)
            if prim is not None:
                prims.append(prim)
    except BadMeshError:
        raise
    except Exception as e:
        raise BadMeshError(f"unsupported content ({type(e).__name__}: {str(e)[:200]})") from None
    if not prims:
        raise BadMeshError("no faces")
    center, scale = np.zeros(3), 1.0
    if normalize:
        lo = np.min([p.positions[p.faces.reshape(-1)].min(0) for p in prims], axis=0)
        hi = np.max([p.positions[p.faces.reshape(-1)].max(0) for p in prims], axis=0)
        extent = float((hi - lo).max())
        if not math.isfinite(extent) or extent <= 1e-12:
            raise BadMeshError("zero-size object")
        center, scale = (lo + hi) / 2.0, 1.0 / extent
        for p in prims:
            p.positions = ((p.positions - center) * scale).astype(np.float32)
    return MeshData(prims, norm_center=np.asarray(center, dtype=np.float64), norm_scale=float(scale))


def _texture_resolver(path: str):
    """trimesh's file resolver for ``path`` plus one fallback for OBJ/MTL assets: ``<obj dir>/../materials/textures/
    <file name>`` (Google Scanned Objects' layout, whose MTL names ``texture.png`` next to the OBJ; trimesh >= 5 also
    refuses ``../`` references). Only the file name is used, so nothing outside that folder is read."""
    from pathlib import Path

    from trimesh.resolvers import FilePathResolver

    class _Resolver(FilePathResolver):
        def get(self, name: str) -> bytes:
            try:
                return super().get(name)
            except (OSError, ValueError):  # not next to the OBJ, or a ``../`` reference trimesh refuses
                alt = Path(self.parent).parent / "materials" / "textures" / Path(name.strip()).name
                if alt.is_file():
                    return alt.read_bytes()
                # trimesh only logs this at debug level and renders the object untextured
                log.warning("%s names %r, which is neither next to it nor in ../materials/textures/: rendered "
                            "without it", path, name.strip())
                raise FileNotFoundError(name) from None

    return _Resolver(path)


def _load_scene(path: str | os.PathLike):
    """``trimesh.load(path, force="scene")`` with the OBJ texture fallback; BadMeshError for missing, unreadable or
    empty files (the reasons ``skipped.jsonl`` records)."""
    import trimesh

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BadMeshError(f"file not found: {path}")
    resolver = _texture_resolver(path) if path.lower().endswith(".obj") else None
    try:
        scene = trimesh.load(path, force="scene", process=False, resolver=resolver)
    except Exception as e:  # trimesh raises many types (KeyError, ValueError, OSError, struct.error, ...)
        raise BadMeshError(f"unreadable ({type(e).__name__}: {str(e)[:200]})") from None
    if scene is None or len(scene.geometry) == 0:
        raise BadMeshError("empty scene")
    return scene


def write_y_up_copy(src: str | os.PathLike, dst: str | os.PathLike, up_axis: str = "z") -> str:
    """Write ``src`` rotated from ``up_axis`` up into this project's +Y-up frame as a self-contained GLB ``dst``.

    The rotation is baked into the vertices (no node transform), so ``trimesh.load(dst, force="mesh")`` -- what the
    geometry metrics read through the batch's ``mesh_path`` -- is in the same frame as the renders. Textures
    (the OBJ fallback of :func:`load_mesh` included) are embedded.

    Raises:
        BadMeshError: ``src`` cannot be loaded (the same reasons :func:`load_mesh` gives).
        ValueError: unknown ``up_axis``.
    """
    import trimesh

    from gsv3d_pl.io import atomic_path

    if up_axis not in _TO_Y_UP:
        raise ValueError(f"up_axis must be one of {UP_AXES}, got {up_axis!r}")
    scene = _load_scene(src)
    out = trimesh.Scene()
    for i, node in enumerate(scene.graph.nodes_geometry):
        transform, geom_name = scene.graph[node]
        geom = scene.geometry.get(geom_name)
        if geom is None:
            continue
        geom = geom.copy()
        geom.apply_transform(_TO_Y_UP[up_axis] @ np.asarray(transform, dtype=np.float64))
        out.add_geometry(geom, node_name=f"{node}_{i}", geom_name=f"{geom_name}_{i}")
    data = out.export(file_type="glb")
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(dst))), exist_ok=True)
    with atomic_path(os.fspath(dst)) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return os.fspath(dst)
