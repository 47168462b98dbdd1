"""metrics.json / metrics.csv / metrics_per_object.csv / results.md: the run's numbers next to the paper's table.

``metrics.json`` schema (consumed by ``gsv3d report``)::

    {"psnr": {"value": float, "num_objects": int, "num_views": int}, "ssim": {...}, "lpips": {...},
     "fid": {...}, "kid": {...}, "clip_iqa": {...}, "chamfer": {...}, "iou": {...}, "fscore": {...},
     "meta": {"fscore_tau": 0.05, "smoke": bool, "ckpt_path": str | None, "config": str | None,
              "num_missed_objects": int, "missed_objects": [uid, ...], ...}}

**Variants** (Table 1 end to end: DistillStage's ``test_variants``). When ``test_step`` scores several variants of
the model on the same objects and seeds (:data:`TEST_VARIANTS`: ``undistilled`` = the LoRA off, ``distilled`` = on),
metrics.json adds ``"variants": {name: {<metric>: {...}, ..., "meta": {...}}}`` and ``meta.test_variants`` /
``meta.primary_variant``; the top-level metrics and the per-variant part of ``meta`` (missed objects, KID std)
are :func:`primary_variant`'s (the distilled model), so a reader of the top-level keys (``gsv3d report``) gets the
method's numbers. metrics.csv and metrics_per_object.csv then carry a ``variant`` column, and results.md prints
one row of ours per variant (:data:`VARIANT_LABELS`) under the paper's rows.

**3D consistency (ours, no GT)** (:mod:`gsv3d_pl.metrics.consistency`): when the stage returns it (DistillStage,
per variant), metrics.json has ``consistency_psnr`` / ``consistency_ssim`` ({"value", "num_objects", "num_views"};
``num_views`` counts the scored orbit frames), metrics.csv and metrics_per_object.csv carry them, and results.md
prints them in a table of their own under Table 1 (the paper has no such column): one row per row of ours.

**Model-free baselines** (:mod:`gsv3d_pl.metrics.baselines`): ``"baselines": {"copy_input": {"psnr": {...},
"ssim": {...}, "lpips": {...}}, "mean_image": {..., "meta": {"train_objects": int, ...}}}`` (or ``{"skipped":
reason}``), scored by AppearanceMetrics on the same novel views as the model; results.md prints them as Table 1's
rows "copy the input image (no model)" and "mean training image (no model)", Type "ours, no model". When a row of
ours has the 3D consistency, Table 1 also gets its PSNR as a last column (–: the paper's rows, the model-free rows).

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
from gsv3d_pl.metrics.baselines import BASELINE_KIND, BASELINE_LABELS, BASELINES
from gsv3d_pl.metrics.columns import (
    COLUMNS,
    CONSISTENCY_COLUMN,
    CONSISTENCY_COLUMNS,
    CONSISTENCY_LABEL,
    METRIC_KEYS,
    PER_OBJECT_KEYS,
    USER_STUDY_COLUMNS,
)
from gsv3d_pl.metrics.geometry import MISSED_RULE
from gsv3d_pl.metrics.paper_tables import CITATION, table1_rows

__all__ = ["METRIC_KEYS", "PAPER_ROWS", "PER_OBJECT_FILE", "OURS_UNDISTILLED", "OURS_DISTILLED", "TEST_VARIANTS",
           "VARIANT_LABELS", "primary_variant", "merge_metrics", "results_markdown", "metrics_csv", "per_object_csv",
           "read_per_object_csv", "read_per_object_variants"]

PER_OBJECT_FILE = "metrics_per_object.csv"

# The paper's Table 1 rows, {method: {metrics.json key: value}} (the data and its citation: paper_tables.py).
PAPER_ROWS: dict[str, dict[str, float]] = {r.name: dict(r.values) for r in table1_rows()}

# Labels of the two rows of ours that Table 1 end to end compares (image -> SV3D -> decoder, the same objects and
# seeds): pass them with their metrics.json dicts as ``results_markdown(data, ours={...})``.
OURS_UNDISTILLED = "SV3D (ours, undistilled: LoRA off)"
OURS_DISTILLED = "GSV3D (ours, distilled)"

#: The variants DistillStage's ``gsv3d test`` can score (its ``test_variants``), with their results.md labels.
TEST_VARIANTS: tuple[str, ...] = ("undistilled", "distilled")
VARIANT_LABELS: dict[str, str] = {"undistilled": OURS_UNDISTILLED, "distilled": OURS_DISTILLED}

# meta keys of the evaluation as a whole; every other meta key of a variant's callback is that variant's own.
_SHARED_META = ("eval_id", "ckpt_path", "config", "smoke")


def primary_variant(variants: Sequence[str]) -> str:
    """The variant whose numbers are also metrics.json's top-level ones: ``distilled`` when it was scored (the
    method's result), else the last one."""
    variants = list(variants)
    if not variants:
        raise ValueError("primary_variant: no variants")
    return "distilled" if "distilled" in variants else variants[-1]

# Geometry details a GeometryMetrics record adds to the per-object CSV, after the columns of the table.
_DETAIL_KEYS = ("num_views", "missed", "num_pred_points", "chamfer_acc", "chamfer_comp", "precision", "recall",
                "watertight")
_MAX_LISTED_MISSED = 10


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _run_cells(data: Mapping, columns: Sequence = COLUMNS) -> list[str]:
    return [c.format((data.get(c.key) or {}).get("value")) for c in columns]


def _baseline_lines(baselines: Mapping, columns: Sequence, note: str) -> tuple[list[str], list[str]]:
    """Table 1's model-free rows (:data:`BASELINES` order; "–" in every column they are not scored in) and a line
    for each one that was skipped, with why."""
    rows, skipped = [], []
    for name in (*[b for b in BASELINES if b in baselines], *[b for b in baselines if b not in BASELINES]):
        label = BASELINE_LABELS.get(name, f"{name} (no model)")
        rows.append(_row([BASELINE_KIND, label + note, *_run_cells(baselines[name], columns)]))
        if "skipped" in baselines[name]:
            skipped.append(f"{label}: not scored: {baselines[name]['skipped']}.")
    return rows, skipped


def _missed_line(meta: Mapping, label: str | None = None) -> str | None:
    if "num_missed_objects" not in meta:  # no GeometryMetrics in this evaluation
        return None
    n = int(meta["num_missed_objects"])
    thr = (meta.get("geometry") or {}).get("alpha_threshold", 0.5)
    head = f"{label}: missed objects" if label else "Missed objects"
    line = f"{head} (no rendered pixel with alpha > {thr}, i.e. no predicted surface): {n}"
    uids = list(meta.get("missed_objects") or [])
    if uids:
        shown = ", ".join(uids[:_MAX_LISTED_MISSED]) + (", ..." if len(uids) > _MAX_LISTED_MISSED else "")
        line += f" ({shown}; all in {PER_OBJECT_FILE}, column `missed`)"
    return line + f". A missed object is scored as: {MISSED_RULE}; the means include it."


def _consistency_table(rows: Sequence[tuple[str, Mapping]]) -> list[str]:
    """results.md's table of :data:`CONSISTENCY_COLUMNS` for the (label, metrics.json dict) rows of ours that have
    them; nothing when none has."""
    rows = [(label, d) for label, d in rows if any(c.key in d for c in CONSISTENCY_COLUMNS)]
    if not rows:
        return []
    frames = sorted({(d.get(c.key) or {}).get("num_views") for _, d in rows for c in CONSISTENCY_COLUMNS} - {None})
    return ["", f"{CONSISTENCY_LABEL}: the decoder's Gaussians rendered at the generated orbit frames it did not read, "
            "against those frames (VAE-decoded); no ground truth is read, so it measures the orbit's agreement with "
            "itself, not fidelity to the object. Not a metric of the paper (its rows have none). Scored frames: "
            f"{', '.join(map(str, frames)) or '–'}.", "",
            _row(["Method", *(c.header() for c in CONSISTENCY_COLUMNS)]),
            "|" + "---|" * (len(CONSISTENCY_COLUMNS) + 1),
            *(_row([label, *(c.format((d.get(c.key) or {}).get("value")) for c in CONSISTENCY_COLUMNS)])
              for label, d in rows)]


def results_markdown(data: dict, ours: Mapping[str, dict] | None = None) -> str:
    """The paper's Table 1 (Markdown) with this run's row appended, from a metrics.json dict.

    ``ours``: further rows of ours, {label: metrics.json dict}, printed under the paper's rows and before this
    run's, e.g. ``{OURS_UNDISTILLED: sv3d_data, OURS_DISTILLED: gsv3d_data}`` for Table 1 end to end.
    A ``data`` with ``variants`` (one ``gsv3d test`` of several variants) prints one row per variant, labelled by
    :data:`VARIANT_LABELS`, instead of a "this run" row (whose numbers would repeat the primary variant's).
    """
    meta = data.get("meta", {})
    tau = meta.get("fscore_tau", 0.05)
    smoke = bool(meta.get("smoke"))
    smoke_note = " (SMOKE: random-init metric networks, not comparable)" if smoke else ""
    run_label = f"**this run{smoke_note}**"
    variants: dict = data.get("variants") or {}
    order = [v for v in meta.get("test_variants", []) if v in variants] + \
        [v for v in variants if v not in meta.get("test_variants", [])]
    labels = {v: VARIANT_LABELS.get(v, f"ours ({v})") + smoke_note for v in order}
    model_rows = [*(ours or {}).values(), *(variants[v] for v in order), *([] if order else [data])]
    # the 3D consistency beside the other columns of each row of ours (when one has it): it is no column of the
    # paper's, so the paper's and the model-free rows read "–" there
    columns = (*COLUMNS, *((CONSISTENCY_COLUMN,) if any(CONSISTENCY_COLUMN.key in d for d in model_rows) else ()))
    lines = ["# Results", "", f"The paper's rows: {CITATION}, Table 1, as published (its protocol and test set, "
             "Google Scanned Objects). The rows of ours are measured on this evaluation's objects.", ""]
    lines.append(_row(["Type", "Method", *(c.header(tau) for c in columns)]))
    lines.append("|" + "---|" * (len(columns) + 2))
    for r in table1_rows():
        # .get: a column added for a metric of one's own (docs/extending.md) has no paper value ("–")
        lines.append(_row([r.kind, f"{r.name} (paper)", *(c.format(r.values.get(c.key)) for c in columns)]))
    for label, other in (ours or {}).items():
        lines.append(_row(["ours", label, *_run_cells(other, columns)]))
    for v in order:
        lines.append(_row(["ours", labels[v], *_run_cells(variants[v], columns)]))
    if not order:
        lines.append(_row(["ours", run_label, *_run_cells(data, columns)]))
    baseline_rows, skipped = _baseline_lines(data.get("baselines") or {}, columns, smoke_note)
    lines += baseline_rows
    if baseline_rows:
        lines += ["", f"Rows \"{BASELINE_KIND}\": no model at all, scored on the same novel views and ground truth "
                  "as the rows of ours: every novel view predicted by the input image (`cond_image`) or by the "
                  "per-pixel mean of the training views (PSNR, SSIM, LPIPS only). A row of ours below them has "
                  "learned nothing about the object's unseen sides.", *skipped]
    if len(columns) > len(COLUMNS):
        lines += ["", f"Last column: {CONSISTENCY_LABEL}, PSNR (dB) of each row of ours; see the table below."]

    # no smoke note there: PSNR and SSIM need no metric network
    lines += _consistency_table([*(ours or {}).items(),
                                 *((VARIANT_LABELS.get(v, f"ours ({v})"), variants[v]) for v in order),
                                 *([] if order else [("**this run**", data)])])
    lines += ["", "The paper's user study (Table 1, last two columns: participants' ratings, not computed metrics):",
              "", _row(["Method", *(c.header() for c in USER_STUDY_COLUMNS)]),
              "|" + "---|" * (len(USER_STUDY_COLUMNS) + 1)]
    lines += [_row([r.name, *(c.format(r.values[c.key]) for c in USER_STUDY_COLUMNS)]) for r in table1_rows()]

    counts = {c.key: data[c.key] for c in COLUMNS if c.key in data}  # the novel views (consistency: orbit frames)
    n_obj = sorted({v.get("num_objects") for v in counts.values()})
    n_views = sorted({v.get("num_views") for v in counts.values()})
    lines += ["", f"Evaluated objects: {', '.join(map(str, n_obj)) or '–'}; "
                  f"novel views: {', '.join(map(str, n_views)) or '–'}."]
    if order:
        lines += ["", f"The rows of ours are one `gsv3d test` of the same pipeline (image -> SV3D -> GS decoder) with "
                      f"the LoRA off ({OURS_UNDISTILLED}) and on ({OURS_DISTILLED}): the same objects, views, "
                      "conditioning and sampler seeds. Variants scored: " + ", ".join(order) + "."]
        missed_lines = [_missed_line(variants[v].get("meta") or {}, labels[v]) for v in order]
    else:
        missed_lines = [_missed_line(meta)]
    lines += [x for m in missed_lines if m for x in ("", m)]
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
        f"- Per-object scores: {PER_OBJECT_FILE} (one row per uid"
        + (" and variant, column `variant`)." if order else ")."),
        f"- Checkpoint: {meta.get('ckpt_path')}; config: {meta.get('config')}.",
    ]
    if smoke:
        lines.append("- SMOKE: LPIPS/FID/KID/CLIP-IQA used random-init feature extractors; only PSNR, SSIM and the "
                     "geometry metrics are meaningful.")
    return "\n".join(lines) + "\n"


def metrics_csv(data: dict) -> str:
    """metric,value,num_objects,num_views rows (one per metric present); with ``variants``, a fifth column
    ``variant`` and one row per variant and metric (the top-level numbers repeat the primary variant's)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    variants = data.get("variants") or {}
    w.writerow(["metric", "value", "num_objects", "num_views", *(["variant"] if variants else [])])
    for name, part in (variants.items() if variants else [(None, data)]):
        for k in METRIC_KEYS:
            if k in part:
                w.writerow([k, part[k]["value"], part[k]["num_objects"], part[k]["num_views"],
                            *([name] if variants else [])])
    return buf.getvalue()


def _cell(v) -> str:
    if v is None:
        return ""
    f = float(v)
    return repr(int(f)) if f.is_integer() and math.isfinite(f) and abs(f) < 2**53 else repr(f)


def _variant_rank(v: str | None) -> tuple[int, str]:
    return (TEST_VARIANTS.index(v) if v in TEST_VARIANTS else len(TEST_VARIANTS), v or "")


def per_object_csv(per_object: Mapping[str, Mapping[str, float]],
                   by_variant: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None) -> str:
    """``uid`` then the table's per-object columns, the geometry details and any other key (sorted), one row per
    object sorted by uid. Numbers are written with ``repr`` (they read back exactly); a value an object lacks is
    empty. ``by_variant`` ({variant: {uid: {key: value}}}) adds a ``variant`` column after ``uid`` and one row per
    object and variant (an object's variants adjacent, in :data:`TEST_VARIANTS` order); ``per_object`` must then
    be empty."""
    if by_variant and per_object:
        raise ValueError("per_object_csv: give per_object (no variants) or by_variant, not both")
    rows = ([(uid, v, rec) for v, recs in by_variant.items() for uid, rec in recs.items()] if by_variant else
            [(uid, None, rec) for uid, rec in per_object.items()])
    rows.sort(key=lambda r: (r[0], _variant_rank(r[1])))
    present = {k for _, _, rec in rows for k in rec}
    known = [k for k in (*PER_OBJECT_KEYS, *_DETAIL_KEYS) if k in present]
    keys = known + sorted(present - set(known))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["uid", *(["variant"] if by_variant else []), *keys])
    for uid, v, rec in rows:
        w.writerow([uid, *([v] if by_variant else []), *(_cell(rec.get(k)) for k in keys)])
    return buf.getvalue()


def read_per_object_variants(path: str | os.PathLike) -> dict[str | None, dict[str, dict[str, float]]]:
    """A ``metrics_per_object.csv`` back as {variant: {uid: {key: float}}} (empty cells left out); a file without
    a ``variant`` column gives {None: {uid: ...}}."""
    out: dict[str | None, dict[str, dict[str, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            v = row.get("variant")
            out.setdefault(v, {})[row["uid"]] = {k: float(x) for k, x in row.items()
                                                 if k not in ("uid", "variant") and x not in ("", None)}
    return out


def read_per_object_csv(path: str | os.PathLike, variant: str | None = None) -> dict[str, dict[str, float]]:
    """A ``metrics_per_object.csv`` back as {uid: {key: float}} (empty cells left out). A file with a ``variant``
    column gives ``variant``'s rows; ``variant=None`` then means :func:`primary_variant`'s (the distilled model,
    as metrics.json's top-level numbers)."""
    parts = read_per_object_variants(path)
    if None in parts or not parts:
        if variant is not None:
            raise KeyError(f"{path}: no variant column (one model was scored), so variant={variant!r} is not in it")
        return parts.get(None, {})
    name = primary_variant(sorted(parts, key=_variant_rank)) if variant is None else variant
    if name not in parts:
        raise KeyError(f"{path}: no rows of variant {name!r}; it has {sorted(parts)}")
    return parts[name]


def merge_metrics(run_dir: str | os.PathLike, metrics: dict[str, dict], meta: dict,
                  per_object: Mapping[str, Mapping[str, float]] | None = None, variant: str | None = None,
                  variants: Sequence[str] | None = None, baselines: Mapping[str, dict] | None = None) -> dict:
    """Merge ``metrics`` ({key: {"value", "num_objects", "num_views"}}), ``meta`` and ``per_object``
    ({uid: {key: value}}) into ``run_dir/metrics.json`` and ``run_dir/metrics_per_object.csv``, and rewrite
    metrics.csv and results.md. Files from another evaluation (different ``meta["eval_id"]``) are replaced, not
    merged. Returns the merged metrics.json dict.

    ``variant``: these numbers are that variant's, one of ``variants`` (every variant of the evaluation, in order;
    default just this one): they go to ``data["variants"][variant]`` (``meta`` but its shared keys eval_id,
    ckpt_path, config, smoke to its ``"meta"``), and the top level mirrors :func:`primary_variant`'s.

    ``baselines``: the model-free baselines of the evaluation (:mod:`gsv3d_pl.metrics.baselines`), written to
    ``data["baselines"]`` (one per evaluation, whatever the variant; None leaves what is there)."""
    run_dir = Path(run_dir)
    path, obj_path = run_dir / "metrics.json", run_dir / PER_OBJECT_FILE
    data: dict = {}
    objects: dict[str | None, dict[str, dict[str, float]]] = {}
    if path.exists():
        try:
            old = json.loads(path.read_text())
            if old.get("meta", {}).get("eval_id") == meta.get("eval_id"):
                data = old
                if obj_path.exists():
                    objects = read_per_object_variants(obj_path)
        except (OSError, ValueError, KeyError):
            data, objects = {}, {}
    if (variant is None) != ("variants" not in data) and data:
        raise ValueError(f"merge_metrics: {path} of evaluation {meta.get('eval_id')} mixes numbers with and "
                         "without a variant; every metric callback of one evaluation must see the same outputs")
    smoke = bool(data.get("meta", {}).get("smoke", False) or meta.get("smoke", False))
    if variant is None:
        data.update(metrics)
        data["meta"] = {**data.get("meta", {}), **meta}
    else:
        order = list(variants or [variant])
        if variant not in order:
            raise ValueError(f"merge_metrics: variant {variant!r} is not one of variants {order}")
        part = data.setdefault("variants", {}).setdefault(variant, {})
        part.update(metrics)
        part["meta"] = {**part.get("meta", {}), **{k: v for k, v in meta.items() if k not in _SHARED_META}}
        primary = primary_variant(order)
        data["meta"] = {**data.get("meta", {}), **{k: v for k, v in meta.items() if k in _SHARED_META},
                        "test_variants": order, "primary_variant": primary}
        if primary in data["variants"]:  # the top level mirrors the primary variant (what `gsv3d report` reads)
            top = data["variants"][primary]
            data.update({k: v for k, v in top.items() if k != "meta"})
            data["meta"].update(top["meta"])
    data["meta"]["smoke"] = smoke
    if baselines is not None:
        data["baselines"] = dict(baselines)
    ordered = {k: data[k] for k in METRIC_KEYS if k in data}
    ordered.update({k: v for k, v in data.items() if k not in ordered and k != "meta"})
    ordered["meta"] = data["meta"]
    for uid, rec in (per_object or {}).items():
        objects.setdefault(variant, {}).setdefault(str(uid), {}).update({k: float(v) for k, v in rec.items()})
    # The per-object file first: metrics.json carries the eval_id that says whether it may be merged into.
    if any(objects.values()):
        if variant is None:
            write_text_atomic(obj_path, per_object_csv(objects.get(None, {})))
        else:
            write_text_atomic(obj_path, per_object_csv({}, by_variant={v: r for v, r in objects.items() if v}))
    elif obj_path.exists():  # an earlier evaluation's: it would pair the wrong numbers with this one's
        obj_path.unlink()
    write_json_atomic(path, ordered, allow_nan=True)
    write_text_atomic(run_dir / "metrics.csv", metrics_csv(ordered))
    write_text_atomic(run_dir / "results.md", results_markdown(ordered))
    return ordered
