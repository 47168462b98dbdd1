"""The export's settings: one dataclass, no heavy imports (the CLI builds its flags from these defaults).

Each default, and where it came from, is recorded in ``configs/README.md`` ("Mesh export").
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ExportSettings"]


@dataclass
class ExportSettings:
    """Every setting of the export (CLI flags of ``gsv3d export-mesh``; defaults: configs/README.md)."""

    resolution: int = 128  # grid cells per side of the object's bounding cube
    iso: float = 0.5  # density level of the surface
    filter: float = 0.5  # low-pass of the density, in voxels
    inset: float = 0.4  # fraction of the way each vertex moves inward to the density's ridge (the centres)
    faces: int = 20_000  # target triangle count after simplification
    texture_size: int = 1024  # texture side in texels
    bake_views: int = 16  # cameras on a sphere the texture is baked from
    bake_size: int = 512  # pixels per side of each bake render
    min_component: float = 0.005  # pieces with fewer than this fraction of the faces are dropped (floaters)
    depth_tolerance: float = 4.0  # voxels a texel may be off the rendered depth and still count as seen
    angle_power: float = 2.0  # view weight cos(angle)^p
    unlit: bool = False  # mark the glTF material KHR_materials_unlit
    backend: str = "auto"  # rasterizer backend of the bake renders

    def check(self) -> None:
        """Raise ValueError naming the flag of the first out-of-range setting."""
        for name, lo in (("resolution", 8), ("faces", 4), ("texture_size", 16), ("bake_views", 1), ("bake_size", 16)):
            if int(getattr(self, name)) < lo:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(self, name)}")
        if not self.filter > 0:
            raise ValueError(f"--filter must be > 0 (voxels), got {self.filter}")
        if not self.iso > 0:
            raise ValueError(f"--iso must be > 0 (a density level), got {self.iso}")
        if not 0 <= self.inset <= 1:
            raise ValueError(f"--inset must be in [0, 1] (a fraction of the way to the density's ridge), "
                             f"got {self.inset}")
        if not 0 <= self.min_component < 1:
            raise ValueError(f"--min-component must be in [0, 1), got {self.min_component}")
