"""The metric columns, defined once: ``metrics.json`` key, table header, decimals, direction and who computes it.

``results.md`` (:mod:`gsv3d_pl.metrics.results`), the sweep's ablation table (``gsv3d report``) and the metric
callbacks all read this table, so a column's name, order and precision cannot disagree between them. Decimals
follow the paper's Table 1 (FID and KID with 2, the rest with 3).

    for col in COLUMNS: col.key, col.header(), col.format(0.2134)     # "kid", "KID↓", "0.21"
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Column", "COLUMNS", "ABLATION_COLUMNS", "USER_STUDY_COLUMNS", "CONSISTENCY_COLUMNS", "CONSISTENCY_COLUMN",
           "CONSISTENCY_KEYS", "CONSISTENCY_LABEL", "METRIC_KEYS", "PER_IMAGE_KEYS", "SET_KEYS", "GEOMETRY_KEYS",
           "PER_OBJECT_KEYS"]

# What computes a column: the mean of a per-image score over all (object, view) images; a statistic of the whole
# set of views (feature distributions); or the mean of a per-object geometry score.
# A column of a metric that a callback of its own computes (docs/extending.md) is "external": the built-in
# callbacks compute exactly the per_image / set / geometry columns and leave it alone.
# "user_study": a rating of the paper's participants (Table 1's last two columns); no run computes it.
# "consistency": ours, not the paper's: the stage's no-GT 3D-consistency score of a generated orbit
# (gsv3d_pl.metrics.consistency), per image, passed through by AppearanceMetrics when the stage returns it.
PER_IMAGE, SET, GEOMETRY, EXTERNAL, USER_STUDY, CONSISTENCY = ("per_image", "set", "geometry", "external",
                                                              "user_study", "consistency")


@dataclass(frozen=True)
class Column:
    """One metric column.

    Attributes:
        key: the ``metrics.json`` key (also ``val/<key>`` in the logs).
        name: the paper's column name, without the arrow.
        decimals: digits after the point in tables.
        higher_is_better: the arrow: ↑ when True, ↓ when False.
        kind: ``"per_image"`` | ``"set"`` | ``"geometry"`` | ``"external"`` | ``"user_study"`` |
            ``"consistency"`` (see above).
        thresholded: the header names the threshold it was computed at (F-Score@τ).
    """

    key: str
    name: str
    decimals: int
    higher_is_better: bool
    kind: str
    thresholded: bool = False

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"

    def header(self, tau: float | None = None) -> str:
        """``"PSNR↑"``; a thresholded column given ``tau`` reads ``"F-Score@0.05↑"``."""
        at = f"@{tau}" if self.thresholded and tau is not None else ""
        return f"{self.name}{at}{self.arrow}"

    def format(self, value: float | None, missing: str = "–") -> str:
        """``value`` with this column's decimals; ``missing`` for None, NaN or inf."""
        if value is None or not math.isfinite(float(value)):
            return missing
        return f"{float(value):.{self.decimals}f}"


# The paper's Table 1, in its order.
COLUMNS: tuple[Column, ...] = (
    Column("psnr", "PSNR", 3, True, PER_IMAGE),
    Column("ssim", "SSIM", 3, True, PER_IMAGE),
    Column("lpips", "LPIPS", 3, False, PER_IMAGE),
    Column("fid", "FID", 2, False, SET),
    Column("kid", "KID", 2, False, SET),
    Column("clip_iqa", "CLIP-IQA", 3, True, PER_IMAGE),
    Column("chamfer", "CD", 3, False, GEOMETRY),
    Column("iou", "IoU", 3, True, GEOMETRY),
    Column("fscore", "F-Score", 3, True, GEOMETRY, thresholded=True),
)

# The paper's ablation table has every column of Table 1 but CLIP-IQA.
ABLATION_COLUMNS: tuple[Column, ...] = tuple(c for c in COLUMNS if c.key != "clip_iqa")

# The user study of the paper's Table 1: only the paper's rows have it (gsv3d_pl.metrics.paper_tables).
USER_STUDY_COLUMNS: tuple[Column, ...] = (
    Column("app_score", "App. score", 3, True, USER_STUDY),
    Column("geo_score", "Geo. score", 3, True, USER_STUDY),
)

# Ours, no paper value: not a column of the paper's Table 1 (COLUMNS) but a table of its own in results.md, under it.
CONSISTENCY_LABEL = "3D consistency (ours, no GT)"
CONSISTENCY_COLUMNS: tuple[Column, ...] = (
    Column("consistency_psnr", f"{CONSISTENCY_LABEL} PSNR", 3, True, CONSISTENCY),
    Column("consistency_ssim", f"{CONSISTENCY_LABEL} SSIM", 3, True, CONSISTENCY),
)
CONSISTENCY_KEYS: tuple[str, ...] = tuple(c.key for c in CONSISTENCY_COLUMNS)
# The one of them the tables print beside the paper's columns (Table 1 in results.md, Table 2 of `gsv3d report`).
CONSISTENCY_COLUMN: Column = CONSISTENCY_COLUMNS[0]

# Every metrics.json metric this project writes, in file order (the paper's columns, then ours).
METRIC_KEYS: tuple[str, ...] = tuple(c.key for c in COLUMNS) + CONSISTENCY_KEYS
PER_IMAGE_KEYS: tuple[str, ...] = tuple(c.key for c in COLUMNS if c.kind == PER_IMAGE)  # AppearanceMetrics
SET_KEYS: tuple[str, ...] = tuple(c.key for c in COLUMNS if c.kind == SET)  # AppearanceMetrics (FID, KID)
GEOMETRY_KEYS: tuple[str, ...] = tuple(c.key for c in COLUMNS if c.kind == GEOMETRY)  # GeometryMetrics
# The columns with a value per object (metrics_per_object.csv): FID and KID are statistics of the whole set of views.
PER_OBJECT_KEYS: tuple[str, ...] = tuple(c.key for c in COLUMNS if c.kind in (PER_IMAGE, GEOMETRY)) + CONSISTENCY_KEYS
