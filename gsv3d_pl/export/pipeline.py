"""Gaussians -> textured mesh, end to end: the settings, the steps in order, their timings.

    density + iso-surface (surface.py) -> drop floaters -> simplify -> UV atlas (atlas.py) -> texel map
    -> render the Gaussians at the bake views and project (bake.py) -> fill unseen texels and gutters
    -> .glb / .obj (writer.py)

The defaults are recorded, with the reason for each, in ``configs/README.md`` ("Mesh export"); ``docs/export.md``
describes the steps and the measured times.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gsv3d_pl.export.atlas import rasterize_atlas, uv_unwrap
from gsv3d_pl.export.bake import bake_cameras, bake_texture, fill_texture
from gsv3d_pl.export.settings import ExportSettings
from gsv3d_pl.export.surface import drop_small_components, extract_surface, simplify_mesh, surface_grid
from gsv3d_pl.export.writer import build_trimesh, write_mesh

__all__ = ["ExportSettings", "TexturedMesh", "gaussians_to_mesh", "export_mesh", "STEPS"]

STEPS = ("density + iso-surface", "simplify", "uv atlas", "texel map", "bake", "fill", "write")


@dataclass
class TexturedMesh:
    """The export's result: a UV-mapped mesh and its texture."""

    vertices: np.ndarray  # [V, 3] float32 world (the Gaussians' frame)
    faces: np.ndarray  # [F, 3] int64, counter-clockwise seen from outside
    uvs: np.ndarray  # [V, 2] float32, v up
    normals: np.ndarray  # [V, 3] float32
    texture: np.ndarray  # [T, T, 3] uint8, row 0 = top
    seen_fraction: float = 0.0  # covered texels that some bake view saw (the rest came from nearby Gaussians)
    timings: dict[str, float] = field(default_factory=dict)  # step -> seconds

    def to_trimesh(self):
        return build_trimesh(self.vertices, self.faces, self.uvs, self.texture, self.normals)


def gaussians_to_mesh(gaussians, settings: ExportSettings | None = None, progress: bool = False) -> TexturedMesh:
    """Run every step but the write on an unbatched :class:`~gsv3d_pl.gaussians.Gaussians`.

    Raises:
        NoSurfaceError (a ValueError): the density never reaches ``settings.iso``.
    """
    from tqdm.auto import tqdm

    s = settings or ExportSettings()
    s.check()
    if gaussians.batch_shape:
        raise ValueError(f"export: expected one unbatched Gaussian set, got batch shape {tuple(gaussians.batch_shape)}")
    g = gaussians.detach().to("cpu")
    times: dict[str, float] = {}
    bar = tqdm(total=len(STEPS) - 1, desc="export", disable=not progress, leave=False)

    def step(name: str, t0: float) -> float:
        times[name] = time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix_str(f"{name} {times[name]:.1f}s")
        return time.perf_counter()

    try:
        t = time.perf_counter()
        grid = surface_grid(g.means, g.scales, g.opacities, s.resolution)
        v, f = extract_surface(g.means, g.quats, g.scales, g.opacities, grid, iso=s.iso, filter_voxels=s.filter,
                               inset=s.inset)
        v, f = drop_small_components(v, f, s.min_component)
        t = step("density + iso-surface", t)
        v, f = simplify_mesh(v, f, s.faces)
        t = step("simplify", t)
        uvm = uv_unwrap(v, f, s.texture_size)
        t = step("uv atlas", t)
        texels = rasterize_atlas(uvm, s.texture_size)
        t = step("texel map", t)
        radius = float(np.linalg.norm(uvm.vertices - grid.center[None], axis=-1).max())
        c2w, K = bake_cameras(grid.center, radius, s.bake_views, s.bake_size)
        colour, weight = bake_texture(g, texels, c2w, K, s.bake_size, depth_tolerance=s.depth_tolerance * grid.voxel,
                                      angle_power=s.angle_power, backend=s.backend)
        t = step("bake", t)
        texture = fill_texture(colour, weight, texels, g)
        step("fill", t)
    finally:
        bar.close()
    covered = max(int(texels.covered.sum()), 1)
    return TexturedMesh(vertices=uvm.vertices, faces=uvm.faces, uvs=uvm.uvs, normals=uvm.normals, texture=texture,
                        seen_fraction=float((weight > 0).sum() / covered), timings=times)


def export_mesh(gaussians, out: str | os.PathLike, settings: ExportSettings | None = None,
                progress: bool = False) -> tuple[TexturedMesh, list[Path]]:
    """:func:`gaussians_to_mesh`, then write ``out`` (.glb or .obj by suffix), atomically.

    Returns:
        (the mesh with ``timings["write"]`` filled in, the paths written).
    """
    from gsv3d_pl.export.writer import MESH_SUFFIXES

    out = Path(out)
    if out.suffix.lower() not in MESH_SUFFIXES:  # fail before the (slow) export
        raise ValueError(f"{out}: unknown mesh format {out.suffix!r}; use one of {', '.join(MESH_SUFFIXES)}")
    s = settings or ExportSettings()
    mesh = gaussians_to_mesh(gaussians, s, progress)
    t = time.perf_counter()
    paths = write_mesh(out, mesh.to_trimesh(), unlit=s.unlit)
    mesh.timings["write"] = time.perf_counter() - t
    return mesh, paths
