"""Evaluation metrics: geometry (Chamfer, F-Score, volume IoU), the image-metric factory, the metric columns, result
files, and the paper's published tables as data (:mod:`gsv3d_pl.metrics.paper_tables`).

``gsv3d_pl.metrics.image`` pulls in torchmetrics/open_clip: import it (or ``build_image_metrics``) explicitly.
"""

from gsv3d_pl.metrics.columns import ABLATION_COLUMNS, COLUMNS, METRIC_KEYS, Column
from gsv3d_pl.metrics.geometry import (
    MISSED_RULE,
    chamfer_distance,
    depth_to_points,
    evaluate_geometry,
    f_score,
    gaussian_occupancy,
    load_normalized_mesh,
    mesh_occupancy,
    sample_surface,
    volume_iou,
)
from gsv3d_pl.metrics.paper_tables import CITATION, PaperRow, table1_rows, table2_row, table2_rows
from gsv3d_pl.metrics.results import PAPER_ROWS, merge_metrics, results_markdown

__all__ = [
    "chamfer_distance",
    "f_score",
    "volume_iou",
    "depth_to_points",
    "gaussian_occupancy",
    "mesh_occupancy",
    "load_normalized_mesh",
    "sample_surface",
    "evaluate_geometry",
    "MISSED_RULE",
    "Column",
    "COLUMNS",
    "ABLATION_COLUMNS",
    "METRIC_KEYS",
    "PAPER_ROWS",
    "CITATION",
    "PaperRow",
    "table1_rows",
    "table2_rows",
    "table2_row",
    "merge_metrics",
    "results_markdown",
]
