"""metrics.json / metrics.csv / metrics_per_object.csv / results.md: the run's numbers next to the paper's table.

``metrics.json`` schema (consumed by ``gsv3d report``)::

    {"psnr": {"value": float, "num_objects": int, "num_views": int}, "ssim": {...}, "lpips": {...},
     "fid": {...}, "kid": {...}, "clip_iqa": {...}, "chamfer": {...}, "iou": {...}, "fscore": {...},
     "meta": {"fscore_tau": 0.05, "smoke": bool, "ckpt_path": str | None, "config": str | None,
              "num_missed_objects": int, "missed_objects": [uid, ...], ...}}

``metrics_per_object.csv`` has one row per object (``uid`` first), every per-object column
(:data:`~gsv3d_pl.metrics.columns.PER_OBJECT_KEYS`: the per-image means and the geometry scores; FID and KID are
statistics of the whole set and have no per-object value) and the geometry details (``missed``, ``precision``,
...), for paired comparisons between runs on the same objects.

Several callbacks contribute to one evaluation (appearance and geometry). Each merges its metrics (and its
per-object columns) into the files; ``meta.eval_id`` identifies the evaluation so that a previous run's numbers are
never mixed in. All files are written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from gsv3d_pl.io import write_json_atomic, write_text_atomic
from gsv3d_pl.metrics.columns import COLUMNS, METRIC_KEYS, PER_OBJECT_KEYS, USER_STUDY_COLUMNS
from gsv3d_pl.metrics.geometry import MISSED_RULE
from gsv3d_pl.metrics.paper_tables import CITATION, table1_rows

__all__ = ["METRIC_KEYS", "PAPER_ROWS", "PER_OBJECT_FILE", "OURS_UNDISTILLED", "OURS_DISTILLED", "merge_metrics",
           "results_markdown", "metrics_csv", "per_object_csv", "read_per_object_csv"]

PER_OBJECT_FILE = "metrics_per_object.csv"

# The paper's Table 1 rows, {method: {metrics.json key: value}} (the data and its citation: paper_tables.py).
PAPER_ROWS: dict[str, dict[str, float]] = {r.name: dict(r.values) for r in table1_rows()}

# Labels of the two rows of ours that Table 1 end to end compares (image -> SV3D -> decoder, the same objects and
# seeds): pass them with their metrics.json dicts as ``results_markdown(data, ours={...})``.
OURS_UNDISTILLED = "SV3D (ours, undistilled: LoRA off)"
OURS_DISTILLED = "GSV3D (ours, distilled)"

# Geometry details a GeometryMetrics record adds to the per-object CSV, after the columns of the table.
_DETAIL_KEYS = ("num_views", "missed", "num_pred_points", "chamfer_acc", "chamfer_comp", "precision", "recall",
                "watertight")
_MAX_LISTED_MISSED = 10


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _run_cells(data: Mapping) -> list[str]:
    return [c.format((data.get(c.key) or {}).get("value")) for c in COLUMNS]


def _missed_line(meta: Mapping) -> str | None:
    if "num_missed_objects" not in meta:  # no GeometryMetrics in this evaluation
        return None
    n = int(meta["num_missed_objects"])
    thr = (meta.get("geometry") or {}).get("alpha_threshold", 0.5)
    line = f"Missed objects (no rendered pixel with alpha > {thr}, i.e. no predicted surface): {n}"
    uids = list(meta.get("missed_objects") or [])
    if uids:
        shown = ", ".join(uids[:_MAX_LISTED_MISSED]) + (", ..." if len(uids) > _MAX_LISTED_MISSED else "")
        line += f" ({shown}; all in {PER_OBJECT_FILE}, column `missed`)"
    return line + f". A missed object is scored as: {MISSED_RULE}; the means include it."


def results_markdown(data: dict, ours: Mapping[str, dict] | None = None) -> str:
    """The paper's Table 1 (Markdown) with this run's row appended, from a metrics.json dict.

    ``ours``: further rows of ours, {label: metrics.json dict}, printed under the paper's rows and before this
    run's, e.g. ``{OURS_UNDISTILLED: sv3d_data, OURS_DISTILLED: gsv3d_data}`` for Table 1 end to end.
    """
    meta = data.get("meta", {})
    tau = meta.get("fscore_tau", 0.05)
    smoke = bool(meta.get("smoke"))
    run_label = "**this run (SMOKE: random-init metric networks, not comparable)**" if smoke else "**this run**"
    lines = ["# Results", "", f"The paper's rows: {CITATION}, Table 1, as published (its protocol and test set, "
             "Google Scanned Objects). The rows of ours are measured on this evaluation's objects.", ""]
    lines.append(_row(["Type", "Method", *(c.header(tau) for c in COLUMNS)]))
    lines.append("|" + "---|" * (len(COLUMNS) + 2))
    for r in table1_rows():
        # .get: a column added for a metric of one's own (docs/extending.md) has no paper value ("–")
        lines.append(_row([r.kind, f"{r.name} (paper)", *(c.format(r.values.get(c.key)) for c in COLUMNS)]))
    for label, other in (ours or {}).items():
        lines.append(_row(["ours", label, *_run_cells(other)]))
    lines.append(_row(["ours", run_label, *_run_cells(data)]))

    lines += ["", "The paper's user study (Table 1, last two columns: participants' ratings, not computed metrics):",
              "", _row(["Method", *(c.header() for c in USER_STUDY_COLUMNS)]),
              "|" + "---|" * (len(USER_STUDY_COLUMNS) + 1)]
    lines += [_row([r.name, *(c.format(r.values[c.key]) for c in USER_STUDY_COLUMNS)]) for r in table1_rows()]

    counts = {k: data[k] for k in METRIC_KEYS if k in data}
    n_obj = sorted({v.get("num_objects") for v in counts.values()})
    n_views = sorted({v.get("num_views") for v in counts.values()})
    lines += ["", f"Evaluated objects: {', '.join(map(str, n_obj)) or '–'}; "
                  f"novel views: {', '.join(map(str, n_views)) or '–'}."]
    missed = _missed_line(meta)
    if missed:
        lines += ["", missed]
    lines += [
        "",
        "Units and protocol (docs/evaluation.md):",
        "- PSNR in dB, per image (data range 1) then averaged; SSIM with data range 1; LPIPS AlexNet on [0, 1] "
        "inputs; all on the rendered novel views vs the GT renders, images in [0, 1].",
        "- FID and KID over all rendered vs all GT novel views (torchmetrics; KID is the raw mean MMD², "
        "subset size min(1000, #views)). The paper's Table 2 gives KID in percent and its full-model row repeats "
        "Table 1's GSV3D KID (0.21), so Table 1's KID is most likely in percent too (the paper does not say): "
        "multiply ours by 100 to compare.",
        "- CLIP-IQA: antonym-prompt score ('Good photo.' / 'Bad photo.') on open_clip RN50, in (0, 1).",
        f"- CD: symmetric Chamfer distance, mean L2 (not squared) both ways, averaged, in unit-bbox units "
        f"(object bbox centred, largest side 1). F-Score at τ = {tau} (unit-bbox units). IoU: volume IoU on a "
        "64³ grid over [-0.5, 0.5]³. The paper does not state its CD variant, τ or grid.",
        f"- Per-object scores: {PER_OBJECT_FILE} (one row per uid).",
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


def _cell(v) -> str:
    if v is None:
        return ""
    f = float(v)
    return repr(int(f)) if f.is_integer() and math.isfinite(f) and abs(f) < 2**53 else repr(f)


def per_object_csv(per_object: Mapping[str, Mapping[str, float]]) -> str:
    """``uid`` then the table's per-object columns, the geometry details and any other key (sorted), one row per
    object sorted by uid. Numbers are written with ``repr`` (they read back exactly); a value an object lacks is
    empty."""
    present = {k for rec in per_object.values() for k in rec}
    known = [k for k in (*PER_OBJECT_KEYS, *_DETAIL_KEYS) if k in present]
    keys = known + sorted(present - set(known))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["uid", *keys])
    for uid in sorted(per_object):
        rec = per_object[uid]
        w.writerow([uid, *(_cell(rec.get(k)) for k in keys)])
    return buf.getvalue()


def read_per_object_csv(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """A ``metrics_per_object.csv`` back as {uid: {key: float}} (empty cells left out)."""
    with open(path, newline="") as f:
        return {row["uid"]: {k: float(v) for k, v in row.items() if k != "uid" and v not in ("", None)}
                for row in csv.DictReader(f)}


def merge_metrics(run_dir: str | os.PathLike, metrics: dict[str, dict], meta: dict,
                  per_object: Mapping[str, Mapping[str, float]] | None = None) -> dict:
    """Merge ``metrics`` ({key: {"value", "num_objects", "num_views"}}), ``meta`` and ``per_object``
    ({uid: {key: value}}) into ``run_dir/metrics.json`` and ``run_dir/metrics_per_object.csv``, and rewrite
    metrics.csv and results.md. Files from another evaluation (different ``meta["eval_id"]``) are replaced, not
    merged. Returns the merged metrics.json dict."""
    run_dir = Path(run_dir)
    path, obj_path = run_dir / "metrics.json", run_dir / PER_OBJECT_FILE
    data: dict = {}
    objects: dict[str, dict[str, float]] = {}
    if path.exists():
        try:
            old = json.loads(path.read_text())
            if old.get("meta", {}).get("eval_id") == meta.get("eval_id"):
                data = old
                if obj_path.exists():
                    objects = read_per_object_csv(obj_path)
        except (OSError, ValueError, KeyError):
            data, objects = {}, {}
    data.update(metrics)
    data["meta"] = {**data.get("meta", {}), **meta}
    data["meta"]["smoke"] = bool(data["meta"].get("smoke", False) or meta.get("smoke", False))
    ordered = {k: data[k] for k in METRIC_KEYS if k in data}
    ordered.update({k: v for k, v in data.items() if k not in ordered})
    for uid, rec in (per_object or {}).items():
        objects.setdefault(str(uid), {}).update({k: float(v) for k, v in rec.items()})
    # The per-object file first: metrics.json carries the eval_id that says whether it may be merged into.
    if objects:
        write_text_atomic(obj_path, per_object_csv(objects))
    elif obj_path.exists():  # an earlier evaluation's: it would pair the wrong numbers with this one's
        obj_path.unlink()
    write_json_atomic(path, ordered, allow_nan=True)
    write_text_atomic(run_dir / "metrics.csv", metrics_csv(ordered))
    write_text_atomic(run_dir / "results.md", results_markdown(ordered))
    return ordered
