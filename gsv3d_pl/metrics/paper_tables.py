"""The paper's published numbers as data: GSV3D (ICCV 2025), Table 1 (comparison) and Table 2 (ablations).

Source: :data:`CITATION`. The values are copied exactly as printed in the paper; they were measured on the
paper's own protocol (single image -> 3D, Google Scanned Objects test set), not on this project's objects, so a
run of ours is comparable with them only in trend. What the paper leaves unstated (the Chamfer variant, the
F-Score τ, the IoU grid, KID's scaling in Table 1) is listed in ``docs/evaluation.md``.

    for row in table1_rows(): row.name, row.kind, row.values["psnr"]        # "GA", "3D", 15.201
    table2_rows()[0].run, table2_rows()[0].values["kid"]                    # "no_rgb", 0.27 (percent)

Keys of ``values`` are the ``metrics.json`` keys of :mod:`gsv3d_pl.metrics.columns` (plus ``app_score`` and
``geo_score``, the user study of Table 1, :data:`~gsv3d_pl.metrics.columns.USER_STUDY_COLUMNS`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = ["CITATION", "TABLE1_KEYS", "TABLE2_KEYS", "PaperRow", "table1_rows", "table2_rows", "table2_row"]

CITATION = (
    "GSV3D: \"Gaussian Splatting-based Geometric Distillation with Stable Video Diffusion for Single-Image 3D "
    "Object Generation\", ICCV 2025 (arXiv:2503.06136)"
)

# Column keys of each table, in the paper's order.
TABLE1_KEYS: tuple[str, ...] = ("psnr", "ssim", "lpips", "fid", "kid", "clip_iqa", "chamfer", "iou", "fscore",
                                "app_score", "geo_score")
TABLE2_KEYS: tuple[str, ...] = ("psnr", "ssim", "lpips", "fid", "kid")  # Table 2 reports appearance only


@dataclass(frozen=True)
class PaperRow:
    """One row of one of the paper's tables.

    Attributes:
        table: 1 or 2 (the paper's table number).
        name: the row's name as the paper prints it ("GA", "w/o RGB loss", "Full model (GSV3D)").
        kind: Table 1's "Type" column ("3D", "2D", "2D-3D"); Table 2's row group ("Geometric distillation", ...).
        meaning: what the row is, in a sentence.
        values: {metrics.json key: the published number}.
        run: Table 2 only: the name of this project's sweep run for the row (``configs/ablations/<run>.yaml``).
    """

    table: int
    name: str
    kind: str
    meaning: str
    values: Mapping[str, float] = field(repr=False)
    run: str | None = None

    def __post_init__(self) -> None:
        keys = TABLE1_KEYS if self.table == 1 else TABLE2_KEYS
        if tuple(self.values) != keys:  # a typo in the data below must fail at import, not print a blank cell
            raise ValueError(f"paper table {self.table}, row {self.name!r}: keys {tuple(self.values)} != {keys}")
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))


def _t1(name: str, kind: str, meaning: str, *numbers: float) -> PaperRow:
    return PaperRow(1, name, kind, meaning, dict(zip(TABLE1_KEYS, numbers, strict=True)))


def _t2(run: str, name: str, group: str, meaning: str, *numbers: float) -> PaperRow:
    return PaperRow(2, name, group, meaning, dict(zip(TABLE2_KEYS, numbers, strict=True)), run=run)


_3D = "a 3D method (the paper's Type '3D'): it outputs a 3D representation directly"
_2D = "a 2D method (the paper's Type '2D'): multi-view images from a 2D diffusion model, then 3D"

# Table 1: comparison with other methods. Columns: PSNR↑ SSIM↑ LPIPS↓ FID↓ KID↓ CLIP-IQA↑ CD↓ IoU↑ F-Score↑,
# then the user study: App. score↑ Geo. score↑ (ratings of the paper's participants, not computed metrics).
_TABLE1: tuple[PaperRow, ...] = (
    _t1("GA", "3D", f"GA, {_3D}", 15.201, 0.834, 0.039, 95.47, 1.17, 0.805, 0.197, 0.502, 0.303, 3.154, 5.000),
    _t1("TGS", "3D", f"TGS, {_3D}", 18.874, 0.872, 0.032, 85.25, 1.28, 0.812, 0.272, 0.415, 0.232, 4.000, 3.846),
    _t1("LGM", "2D", f"LGM, {_2D}", 17.013, 0.845, 0.033, 61.66, 0.45, 0.819, 0.238, 0.431, 0.308, 3.538, 4.000),
    _t1("Zero123Plus", "2D", f"Zero123Plus, {_2D}",
        15.787, 0.827, 0.037, 82.80, 0.82, 0.825, 0.165, 0.525, 0.409, 2.088, 2.154),
    _t1("Era3D", "2D", f"Era3D, {_2D}", 14.993, 0.830, 0.040, 90.35, 0.92, 0.811, 0.229, 0.436, 0.256, 3.846, 2.418),
    _t1("SV3D", "2D", f"SV3D without the paper's distillation, {_2D}",
        17.772, 0.863, 0.034, 74.86, 0.80, 0.816, 0.200, 0.418, 0.311, 4.231, 2.923),
    _t1("GSV3D", "2D-3D", "the paper's method: SV3D fine-tuned with LoRA by geometric distillation through the "
        "GS decoder, image -> SV3D -> GS decoder -> 3D Gaussians",
        20.390, 0.884, 0.023, 50.79, 0.21, 0.839, 0.100, 0.721, 0.661, 6.308, 6.692),
)

# Table 2: ablations, appearance only. Columns: PSNR↑ SSIM↑ LPIPS↓ FID↓ KID(%)↓ (KID in percent, as printed).
# Every row is scored end to end (image -> SV3D with LoRA -> GS decoder -> rendered views).
_DISTILL = ("drops this term of L_3D inside stage 2's distillation loss L_distill = L_2D + λ_3D · (L_rgb + "
            "λ_depth · L_depth); the decoder is trained normally")
_FRAMES = "the GS decoder reads N = {} generated frames at inference (the paper notes artefacts and blur)"
_TABLE2: tuple[PaperRow, ...] = (
    _t2("no_rgb", "w/o RGB loss", "Geometric distillation", f"L_rgb {_DISTILL}", 19.551, 0.872, 0.027, 53.89, 0.27),
    _t2("no_depth", "w/o Depth loss", "Geometric distillation", f"L_depth {_DISTILL}",
        19.826, 0.877, 0.025, 53.20, 0.32),
    _t2("n8", "N = 8", "Number of frames", _FRAMES.format(8), 19.733, 0.877, 0.026, 55.49, 0.34),
    _t2("n4", "N = 4", "Number of frames", _FRAMES.format(4), 19.548, 0.874, 0.027, 57.85, 0.42),
    _t2("no_dino", "w/o DINO encoder", "DINO encoder", "the GS decoder without the DINO features of the input image",
        19.508, 0.876, 0.027, 55.20, 0.30),
    _t2("full", "Full model (GSV3D)", "—", "the full method; equals Table 1's GSV3D row",
        20.390, 0.884, 0.023, 50.79, 0.21),
)


def table1_rows() -> tuple[PaperRow, ...]:
    """Table 1 of :data:`CITATION`, its seven rows in the paper's order (GSV3D last)."""
    return _TABLE1


def table2_rows() -> tuple[PaperRow, ...]:
    """Table 2 of :data:`CITATION` (ablations), its six rows in the paper's order (the full model last)."""
    return _TABLE2


def table2_row(run: str) -> PaperRow | None:
    """Table 2's row for this project's sweep run name (``no_rgb``, ``no_depth``, ``n8``, ``n4``, ``no_dino``,
    ``full``); None for a run the paper has no row for."""
    return next((r for r in _TABLE2 if r.run == run), None)
