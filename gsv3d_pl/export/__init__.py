"""Gaussians -> textured mesh (``gsv3d export-mesh``, ``gsv3d predict --mesh``), on CPU, offline.

One concept per module: :mod:`.surface` (density grid, iso-surface, simplification), :mod:`.atlas` (UV atlas and
its texel map), :mod:`.bake` (texture from the Gaussians' renders, hole filling), :mod:`.writer` (.glb / .obj),
:mod:`.pipeline` (the steps in order), :mod:`.settings` (the settings), :mod:`.roundtrip` (checks against the
Gaussians' renders). Usage and measured numbers: ``docs/export.md``.

The names below are imported on first use, so ``from gsv3d_pl.export.settings import ExportSettings`` (argument
parsers) does not load torch, numba or OpenGL.
"""

from __future__ import annotations

import importlib

__all__ = ["ExportSettings", "TexturedMesh", "export_mesh", "gaussians_to_mesh", "NoSurfaceError", "STEPS"]

_WHERE = {"ExportSettings": "settings", "TexturedMesh": "pipeline", "export_mesh": "pipeline",
          "gaussians_to_mesh": "pipeline", "STEPS": "pipeline", "NoSurfaceError": "surface"}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"gsv3d_pl.export.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'gsv3d_pl.export' has no attribute {name!r}")
