"""What ``gsv3d predict`` writes for one image: the .ply, a turntable, the SV3D views and the Gaussians' renders.

Every output folder is written atomically (:func:`atomic_output_dir`): the files go to a temporary sibling that
takes the target's place only once all of them are written, so a failed or interrupted run leaves no partial
folder and an existing result untouched.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from gsv3d_pl.inference.pipeline import Prediction
from gsv3d_pl.io import atomic_dir
from gsv3d_pl.orbit import NUM_FRAMES

__all__ = ["atomic_output_dir", "write_prediction"]

_GRID_ROW = 7  # orbit frames per row of the views/renders/depth grids (21 = 3 rows)


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder next to ``out_dir``; on success it replaces ``out_dir``, on any error it is
    deleted, so a failed run leaves no partial folder (and an existing ``out_dir`` untouched).

    With ``overwrite=False`` an existing ``out_dir`` is an error (raised before anything is written).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass --overwrite or choose another --out")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder")
    with atomic_dir(out_dir) as tmp:
        yield Path(tmp)


def _fov_deg(cams) -> float:
    """Vertical FoV (degrees) of the first camera: 2·atan(H / (2 fy))."""
    return math.degrees(2 * math.atan(cams.height / (2 * float(cams.K[0, 1, 1]))))


@torch.no_grad()
def write_prediction(pred: Prediction, out_dir: str | os.PathLike, turntable_frames: int = 60, fps: int = 24,
                     render_size: int | None = None, video_format: str = "mp4", background: float = 1.0,
                     overwrite: bool = True, backend: str = "auto", mesh=None) -> dict[str, Path]:
    """Write one prediction's files into ``out_dir``, atomically (all or nothing).

    Files:
        ``gaussians.ply`` (standard 3DGS layout), ``turntable.mp4`` (``.gif`` without ffmpeg or with
        ``video_format="gif"``; a 360° orbit at the input elevation, ``turntable_frames`` frames),
        ``views.png`` (the 21 SV3D frames decoded by the VAE, 7 per row, frame 20 = input last),
        ``renders.png`` / ``depth.png`` (the Gaussians rendered at the same 21 cameras: colour, and
        colourised depth: red near, blue far), ``input.png`` (the preprocessed input); with ``mesh`` (an
        :class:`gsv3d_pl.export.ExportSettings`) also ``mesh.glb``, the textured mesh of the Gaussians
        (:func:`gsv3d_pl.export.export_mesh`, docs/export.md).
    Returns:
        name -> final path of each file.
    """
    from gsv3d_pl import viz
    from gsv3d_pl.cameras import orbit_cameras
    from gsv3d_pl.render import render

    if video_format not in ("mp4", "gif"):
        raise ValueError(f"video_format must be mp4 or gif, got {video_format!r}")
    if turntable_frames < 1:
        raise ValueError(f"turntable_frames must be >= 1, got {turntable_frames}")
    S = int(render_size or pred.image.shape[-1])
    out_dir = Path(out_dir)
    gs = pred.gaussians
    radius, fov = float(pred.cameras.radii[0]), _fov_deg(pred.cameras)
    cams = orbit_cameras(NUM_FRAMES, pred.elevation_deg, radius, fov, S, S).to(gs.means.device)
    # 7 views per rasterizer call bounds memory at large render sizes.
    rgb, alpha, depth = (t.cpu() for t in render(gs, cams.c2w, cams.K, S, S, background=float(background),
                                                 backend=backend, chunk_views=_GRID_ROW))  # [21, 3|1|1, S, S]
    rgb = rgb.clamp(0, 1)
    frames = viz.render_turntable(gs, turntable_frames, pred.elevation_deg, radius, fov, S, background,
                                  backend=backend)  # [F, S, S, 3]

    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        gs.detach().to("cpu").save_ply(tmp / "gaussians.ply")
        viz.save_image(pred.image, tmp / "input.png")
        viz.save_image(viz.make_grid(pred.frames, nrow=_GRID_ROW), tmp / "views.png")
        viz.save_image(viz.make_grid(rgb, nrow=_GRID_ROW), tmp / "renders.png")
        viz.save_image(viz.make_grid(viz.colorize_depth(depth, alpha), nrow=_GRID_ROW), tmp / "depth.png")
        video = viz.save_video(frames, tmp / f"turntable.{video_format}", fps=fps)
        names = ["gaussians.ply", "input.png", "views.png", "renders.png", "depth.png", video.name]
        if mesh is not None:
            from gsv3d_pl.export import NoSurfaceError, export_mesh

            try:
                export_mesh(gs.detach().to("cpu"), tmp / "mesh.glb", mesh)
                names.append("mesh.glb")
            except NoSurfaceError as e:  # the prediction itself is still worth keeping
                print(f"warning: {out_dir}: no mesh.glb: {e} (--mesh-iso)", file=sys.stderr)
    return {Path(n).stem: out_dir / n for n in names}
