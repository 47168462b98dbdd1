"""``gsv3d export-mesh``: a 3DGS .ply -> a textured mesh (.glb with the texture embedded, or .obj + .mtl + .png).

    gsv3d export-mesh outputs/object/gaussians.ply                  # -> outputs/object/gaussians.glb
    gsv3d export-mesh gaussians.ply --out model.obj --faces 50000 --texture-size 2048

Steps (docs/export.md): Gaussian density on a grid -> marching cubes -> simplification -> UV atlas -> texture
baked from the Gaussians' own renders -> file. CPU only, no network; the defaults and why: configs/README.md.

Exit status: 0 written; 1 the input cannot be meshed (not a 3DGS .ply, no surface at --iso); 2 usage errors.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from gsv3d_pl.export.settings import ExportSettings

__all__ = ["main", "build_parser", "add_export_flags", "settings_from_args"]

_D = ExportSettings()


def add_export_flags(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The export's settings as flags (``prefix`` e.g. "mesh-" for ``gsv3d predict --mesh-faces``)."""
    a = lambda name, **kw: p.add_argument(f"--{prefix}{name}", **kw)  # noqa: E731
    a("resolution", type=int, default=_D.resolution, help="density grid cells per side of the object's bounding cube")
    a("iso", type=float, default=_D.iso, help="density level of the surface (opacity-weighted Gaussian sum)")
    a("filter", type=float, default=_D.filter, help="isotropic low-pass of the density, in voxels")
    a("inset", type=float, default=_D.inset,
      help="fraction of the way each surface vertex moves inward to the density's ridge (the Gaussians' centres); "
           "0 keeps the iso-surface")
    a("faces", type=int, default=_D.faces, help="target triangle count after simplification")
    a("texture-size", type=int, default=_D.texture_size, help="texture side in texels")
    a("bake-views", type=int, default=_D.bake_views, help="cameras on a sphere the texture is baked from")
    a("bake-size", type=int, default=_D.bake_size, help="pixels per side of each bake render")
    a("min-component", type=float, default=_D.min_component,
      help="drop connected pieces with fewer than this fraction of the faces (floaters); 0 keeps all")
    a("unlit", action="store_true", help="mark the glTF material KHR_materials_unlit (viewers show the baked colours)")


def settings_from_args(args: argparse.Namespace, prefix: str = "") -> ExportSettings:
    """The :class:`ExportSettings` of parsed flags (see :func:`add_export_flags`)."""
    p = prefix.replace("-", "_")
    get = lambda name: getattr(args, p + name)  # noqa: E731
    return ExportSettings(resolution=get("resolution"), iso=get("iso"), filter=get("filter"), inset=get("inset"),
                          faces=get("faces"),
                          texture_size=get("texture_size"), bake_views=get("bake_views"),
                          bake_size=get("bake_size"), min_component=get("min_component"), unlit=get("unlit"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gsv3d export-mesh", description="3D Gaussians (.ply) -> textured mesh (.glb/.obj)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("ply", help="a 3DGS .ply (e.g. gsv3d predict's gaussians.ply)")
    p.add_argument("--out", default=None, help="output .glb or .obj (default: the .ply's path with .glb)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    add_export_flags(p)
    return p


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from gsv3d_pl.export import NoSurfaceError, export_mesh
    from gsv3d_pl.export.writer import MESH_SUFFIXES
    from gsv3d_pl.gaussians import Gaussians

    src = Path(args.ply)
    out = Path(args.out) if args.out else src.with_suffix(".glb")
    if out.suffix.lower() not in MESH_SUFFIXES:
        _err(f"--out {out}: unknown mesh format {out.suffix!r}; use one of {', '.join(MESH_SUFFIXES)}")
        return 2
    if out.exists() and not args.overwrite:
        _err(f"{out} exists; pass --overwrite or choose another --out")
        return 2
    settings = settings_from_args(args)
    try:
        settings.check()
    except ValueError as e:
        _err(str(e))
        return 2
    if not src.is_file():
        _err(f"{src}: no such file")
        return 2
    try:
        gaussians = Gaussians.load_ply(src)
    except ValueError as e:  # names the file and, for a non-3DGS .ply, the missing properties
        _err(f"{e}; export-mesh needs a 3DGS .ply (as written by gsv3d predict)")
        return 1
    t0 = time.perf_counter()
    try:
        mesh, paths = export_mesh(gaussians, out, settings, progress=not args.quiet)
    except NoSurfaceError as e:
        _err(f"{src}: {e}")
        return 1
    if not args.quiet:
        steps = ", ".join(f"{k} {v:.1f}s" for k, v in mesh.timings.items())
        print(f"{src} ({gaussians.num_gaussians:,} Gaussians) -> {', '.join(map(str, paths))}: {len(mesh.faces):,} "
              f"faces, {mesh.texture.shape[0]}² texture ({100 * mesh.seen_fraction:.0f}% of the texels seen by a bake "
              f"view), {time.perf_counter() - t0:.1f}s ({steps})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
