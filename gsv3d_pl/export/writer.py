"""Write a textured mesh: glTF binary (.glb, the texture embedded) or Wavefront OBJ (.obj + .mtl + .png).

Every file goes through :func:`gsv3d_pl.io.atomic_write`, so a failed export leaves an existing result untouched.
The material is a plain PBR base-colour texture, metallic 0, roughness 1. The baked colours are the Gaussians'
*radiance* (their training views were lit), so a viewer that lights the mesh again darkens it a little; glTF
viewers that honour ``KHR_materials_unlit`` (written with ``unlit=True``) show the colours as baked.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from gsv3d_pl.io import atomic_write

__all__ = ["MESH_SUFFIXES", "build_trimesh", "write_mesh"]

MESH_SUFFIXES = (".glb", ".obj")


def build_trimesh(vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray, texture: np.ndarray,
                  normals: np.ndarray | None = None):
    """A ``trimesh.Trimesh`` with ``TextureVisuals``.

    Args:
        vertices: [V, 3] float, faces: [F, 3] int (counter-clockwise seen from outside), uvs: [V, 2] (v up),
        texture: [T, T, 3] uint8 image (row 0 = top), normals: optional [V, 3] vertex normals.
    """
    import trimesh
    from PIL import Image

    mat = trimesh.visual.material.PBRMaterial(baseColorTexture=Image.fromarray(texture), baseColorFactor=[255] * 4,
                                              metallicFactor=0.0, roughnessFactor=1.0, doubleSided=False)
    mesh = trimesh.Trimesh(vertices=np.asarray(vertices, np.float64), faces=np.asarray(faces, np.int64),
                           vertex_normals=normals, process=False)
    mesh.visual = trimesh.visual.TextureVisuals(uv=np.asarray(uvs, np.float64), material=mat)
    return mesh


def _add_unlit(glb: bytes) -> bytes:
    """Mark every material of a GLB ``KHR_materials_unlit`` (rewrites the JSON chunk, keeps the binary one)."""
    magic, version, _ = struct.unpack_from("<III", glb, 0)
    json_len, json_type = struct.unpack_from("<II", glb, 12)
    if magic != 0x46546C67 or json_type != 0x4E4F534A:
        raise ValueError("not a GLB (bad magic or first chunk)")
    doc = json.loads(glb[20:20 + json_len].decode("utf-8"))
    rest = glb[20 + json_len:]
    for m in doc.get("materials", []):
        m.setdefault("extensions", {})["KHR_materials_unlit"] = {}
    used = doc.setdefault("extensionsUsed", [])
    if "KHR_materials_unlit" not in used:
        used.append("KHR_materials_unlit")
    body = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    body += b" " * (-len(body) % 4)  # chunks are 4-byte aligned; JSON pads with spaces
    out = struct.pack("<II", len(body), json_type) + body + rest
    return struct.pack("<III", magic, version, 12 + len(out)) + out


def write_mesh(path: str | os.PathLike, mesh, unlit: bool = False) -> list[Path]:
    """Write ``mesh`` (from :func:`build_trimesh`) by the suffix of ``path``: ``.glb`` or ``.obj``.

    ``.obj`` also writes ``<stem>.mtl`` and the texture ``<stem>.png`` beside it (OBJ cannot embed images).
    Returns the paths written.
    """
    import trimesh

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".glb":
        data = trimesh.exchange.gltf.export_glb(trimesh.Scene(mesh), include_normals=mesh.vertex_normals is not None)
        if unlit:
            data = _add_unlit(data)
        with atomic_write(path, "wb") as f:
            f.write(data)
        return [path]
    if suffix == ".obj":
        text, files = trimesh.exchange.obj.export_obj(mesh, include_normals=True, include_texture=True,
                                                      return_texture=True, mtl_name=f"{path.stem}.mtl")
        # trimesh names the texture after the material (material_0.png); name it after the mesh instead, so two
        # exports into one folder do not share (and overwrite) one texture file.
        mtl_name = f"{path.stem}.mtl"
        renames = {n: f"{path.stem}.png" if len(files) == 2 else f"{path.stem}_{n}"
                   for n in files if n != mtl_name}
        mtl = files[mtl_name].decode("utf-8")
        for old, new in renames.items():
            mtl = mtl.replace(old, new)
        written = []
        for name, blob in files.items():
            target = path.with_name(renames.get(name, name))
            with atomic_write(target, "wb") as f:
                f.write(mtl.encode("utf-8") if name == mtl_name else blob)
            written.append(target)
        with atomic_write(path, "w") as f:  # last: a reader never finds an .obj without its .mtl
            f.write(text)
        return written + [path]
    raise ValueError(f"{path}: unknown mesh format {path.suffix!r}; use one of {', '.join(MESH_SUFFIXES)}")
