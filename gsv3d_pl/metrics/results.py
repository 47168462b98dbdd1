"""metrics.json / metrics.csv / results.md: the run's numbers next to the paper's table.

``metrics.json`` schema (consumed by ``gsv3d report``)::

    {"psnr": {"value": float, "num_objects": int, "num_views": int}, "ssim": {...}, "lpips": {...},
     "fid": {...}, "kid": {...}, "clip_iqa": {...}, "chamfer": {...}, "iou": {...}, "fscore": {...},
     "meta": {"fscore_tau": 0.05, "smoke": bool, "ckpt_path": str | None, "config": str | None, ...}}

Several callbacks contribute to one evaluation (appearance and geometry). Each merges its metrics
into the file; ``meta.eval_id`` identifies the evaluation so that a previous run's numbers are never
mixed in. All files are written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from gsv3d_pl.io import write_json_atomic, write_text_atomic
from gsv3d_pl.metrics.columns import COLUMNS, METRIC_KEYS

__all__ = ["METRIC_KEYS", "PAPER_ROWS", "NOT_IN_DOCS", "merge_metrics", "results_markdown", "metrics_csv"]

NOT_IN_DOCS = "n/a (fill from the paper, Table 1)"

# The paper's reported rows (GSV3D, ICCV 2025, Table 1). Only the GSV3D row is in this project's sources; the
# baselines' numbers are NOT invented here: None prints NOT_IN_DOCS.
PAPER_ROWS: dict[str, dict[str, float | None]] = {
    "GA": dict.fromkeys(METRIC_KEYS),
    "TGS": dict.fromkeys(METRIC_KEYS),
    "LGM": dict.fromkeys(METRIC_KEYS),
    "Zero123Plus": dict.fromkeys(METRIC_KEYS),
    "Era3D": dict.fromkeys(METRIC_KEYS),
    "SV3D": dict.fromkeys(METRIC_KEYS),
    "GSV3D": {"psnr": 20.390, "ssim": 0.884, "lpips": 0.023, "fid": 50.79, "kid": 0.21, "clip_iqa": 0.839,
              "chamfer": 0.100, "iou": 0.721, "fscore": 0.661},
}


def results_markdown(data: dict) -> str:
    """The paper's table (Markdown) with this run's row appended, from a metrics.json dict."""
    meta = data.get("meta", {})
    tau = meta.get("fscore_tau", 0.05)
    headers = ["Method"] + [c.header(tau) for c in COLUMNS]
    smoke = bool(meta.get("smoke"))
    run_label = "**this run (SMOKE: random-init metric networks, not comparable)**" if smoke else "**this run**"
    lines = ["# Results", ""]
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|" + "---|" * len(headers))
    for name, row in PAPER_ROWS.items():
        cells = [c.format(row.get(c.key), missing="n/a") for c in COLUMNS]
        lines.append(f"| {name} (paper) | " + " | ".join(cells) + " |")
    run_cells = [c.format((data.get(c.key) or {}).get("value")) for c in COLUMNS]
    lines.append(f"| {run_label} | " + " | ".join(run_cells) + " |")
    counts = {k: data[k] for k in METRIC_KEYS if k in data}
    n_obj = sorted({v.get("num_objects") for v in counts.values()})
    n_views = sorted({v.get("num_views") for v in counts.values()})
    lines += [
        "",
        f"Evaluated objects: {', '.join(map(str, n_obj)) or '–'}; novel views: {', '.join(map(str, n_views)) or '–'}.",
        "",
        "Units and protocol (docs/evaluation.md):",
        "- PSNR in dB, per image (data range 1) then averaged; SSIM with data range 1; LPIPS AlexNet on [0, 1] "
        "inputs; all on the rendered novel views vs the GT renders, images in [0, 1].",
        "- FID and KID over all rendered vs all GT novel views (torchmetrics; KID is the raw mean MMD², "
        "subset size min(1000, #views)). The paper does not state its KID scaling.",
        "- CLIP-IQA: antonym-prompt score ('Good photo.' / 'Bad photo.') on open_clip RN50, in (0, 1).",
        f"- CD: symmetric Chamfer distance, mean L2 (not squared) both ways, averaged, in unit-bbox units "
        f"(object bbox centred, largest side 1). F-Score at τ = {tau} (unit-bbox units). IoU: volume IoU on a "
        "64³ grid over [-0.5, 0.5]³.",
        f"- n/a = {NOT_IN_DOCS}: the baselines' numbers are not in this project's sources and are not invented "
        "here (gsv3d_pl.metrics.results.PAPER_ROWS).",
        f"- Checkpoint: {meta.get('ckpt_path')}; config: {meta.get('config')}.",
    ]
    if smoke:
        lines.append("- SMOKE: LPIPS/FID/KID/CLIP-IQA used random-init feature extractors; only PSNR, SSIM and the "
                     "geometry metrics are meaningful.")
    return "\n".join(lines) + "\n"


def metrics_csv(data: dict) -> str:
    """metric,value,num_objects,num_views rows (one per metric present)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["metric", "value", "num_objects", "num_views"])
    for k in METRIC_KEYS:
        if k in data:
            w.writerow([k, data[k]["value"], data[k]["num_objects"], data[k]["num_views"]])
    return buf.getvalue()


def merge_metrics(run_dir: str | os.PathLike, metrics: dict[str, dict], meta: dict) -> dict:
    """Merge ``metrics`` ({key: {"value", "num_objects", "num_views"}}) and ``meta`` into
    ``run_dir/metrics.json`` and rewrite metrics.csv and results.md. An existing file from another
    evaluation (different ``meta["eval_id"]``) is replaced, not merged. Returns the merged dict."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.json"
    data: dict = {}
    if path.exists():
        try:
            old = json.loads(path.read_text())
            if old.get("meta", {}).get("eval_id") == meta.get("eval_id"):
                data = old
        except (OSError, ValueError):
            data = {}
    data.update(metrics)
    data["meta"] = {**data.get("meta", {}), **meta}
    data["meta"]["smoke"] = bool(data["meta"].get("smoke", False) or meta.get("smoke", False))
    ordered = {k: data[k] for k in METRIC_KEYS if k in data}
    ordered.update({k: v for k, v in data.items() if k not in ordered})
    write_json_atomic(path, ordered, allow_nan=True)
    write_text_atomic(run_dir / "metrics.csv", metrics_csv(ordered))
    write_text_atomic(run_dir / "results.md", results_markdown(ordered))
    return ordered
