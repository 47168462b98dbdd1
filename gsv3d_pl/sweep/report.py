"""A sweep folder's results: every run × seed's ``metrics.json`` -> the paper's ablation table (``gsv3d report``).

Rows are the runs (the paper's ablation labels, in the paper's order), columns
:data:`gsv3d_pl.metrics.columns.ABLATION_COLUMNS`; each cell is ``mean ± sample std`` over the seeds that have
numbers. Seeds that are missing, still running or failed are shown as such and listed under the table. Under each
run the paper has a row for, the paper's own number (Table 2, :func:`gsv3d_pl.metrics.paper_tables.table2_rows`)
is printed as ``<label> (paper)``. Under the table, each row is compared with the ``full`` run object by object
(:mod:`gsv3d_pl.sweep.paired`: mean per-object difference and its bootstrap 95% interval, from the
``metrics_per_object.csv`` files).

Beside the paper's columns, a last column "3D consistency (ours, no GT) PSNR" (each row's ``consistency_psnr``: the
top level of its metrics.json, i.e. the distilled variant's; present when some row has it), and under the runs the
model-free rows of :mod:`gsv3d_pl.metrics.baselines`, "copy the input image (no model)" and "mean training image
(no model)": the ``baselines`` of the reference (Full) run's metrics.json, ``mean ± std`` over its seeds, scored on
its test views (PSNR, SSIM, LPIPS; "–" elsewhere). Rows below them have learned nothing about the unseen sides.

A chained sweep's task is scored by its result stage (the last stage with ``test: true``, e.g. ``distill``: image
-> SV3D with LoRA -> decoder, end to end); the manifest names it and each task's result folder. Stages a run shares
with another run's identical one (:mod:`gsv3d_pl.sweep.dedupe`) are read from that run's folder, and listed under
the table (``w/o RGB loss/decoder = Full Model/decoder (identical resolved config; ...)``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gsv3d_pl.metrics.baselines import BASELINE_KEYS, BASELINE_LABELS, BASELINES
from gsv3d_pl.metrics.columns import ABLATION_COLUMNS, CONSISTENCY_COLUMN, PER_OBJECT_KEYS, Column
from gsv3d_pl.metrics.paper_tables import CITATION, table2_row
from gsv3d_pl.metrics.results import PER_OBJECT_FILE, read_per_object_csv
from gsv3d_pl.sweep.dedupe import SharedStage
from gsv3d_pl.sweep.paired import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, PairedDiff, paired_bootstrap, paired_differences
from gsv3d_pl.sweep.spec import ABLATION_LABELS, MANIFEST, SweepError

__all__ = ["RunResult", "collect_results", "format_table", "paired_comparison", "PAIRED_COLUMNS"]

# The columns with a value per object (FID and KID are statistics of the whole set of views): the paired comparison.
# The 3D consistency last (ours, no GT): shown only when some row has it.
PAIRED_COLUMNS: tuple[Column, ...] = (*(c for c in ABLATION_COLUMNS if c.key in PER_OBJECT_KEYS), CONSISTENCY_COLUMN)
# The table's columns a run's metrics.json is read for: the paper's, then the consistency (a distill stage's).
_READ_COLUMNS: tuple[Column, ...] = (*ABLATION_COLUMNS, CONSISTENCY_COLUMN)


@dataclass
class RunResult:
    """One run's row: per-seed status (``ok`` | ``missing`` | ``running`` | ``failed`` | ``invalid``), the
    metric values of the ``ok`` seeds, and for each ``ok`` seed the folder its metrics came from (where the
    per-object CSV is). ``stage``: the chained sweep's stage that scored it (None: a single-stage sweep).
    ``shared``: its stages that are another run's identical ones (trained once, in that run's folder).
    ``baselines``: the model-free baselines its ``ok`` seeds scored, {name: {metric key: [value per seed]}}."""

    name: str
    label: str
    seeds: dict[int, str] = field(default_factory=dict)
    values: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    result_dirs: dict[int, Path] = field(default_factory=dict)
    stage: str | None = None
    shared: list[SharedStage] = field(default_factory=list)
    baselines: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    @property
    def num_ok(self) -> int:
        return sum(s == "ok" for s in self.seeds.values())


def _read_baselines(data: dict) -> dict[str, dict[str, float]]:
    """{baseline: {key: value}} of a metrics.json's ``baselines`` (skipped ones and non-finite values left out: a
    model-free row must not make a run's row invalid)."""
    out: dict[str, dict[str, float]] = {}
    for name, part in (data.get("baselines") or {}).items():
        if not isinstance(part, dict):
            continue
        for key in BASELINE_KEYS:
            value = (part.get(key) or {}).get("value") if isinstance(part.get(key), dict) else None
            if isinstance(value, (int, float)) and math.isfinite(value):
                out.setdefault(name, {})[key] = float(value)
    return out


def _read_metrics(path: Path) -> tuple[dict[str, float | None], dict[str, dict[str, float]]]:
    """(the table's values, the model-free baselines) of a metrics.json. The values are its top level: a distill
    stage's test mirrors its distilled variant there (:func:`gsv3d_pl.metrics.results.primary_variant`)."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    out: dict[str, float | None] = {}
    for key in (c.key for c in _READ_COLUMNS):
        entry = data.get(key)
        value = entry.get("value") if isinstance(entry, dict) else entry
        if value is None or (isinstance(value, (int, float)) and math.isfinite(value)):
            out[key] = None if value is None else float(value)
        elif key == CONSISTENCY_COLUMN.key:  # ours, beside the paper's columns: not worth invalidating the row
            out[key] = None
        else:
            raise ValueError(f"{key}.value is {value!r}, expected a finite number")
    return out, _read_baselines(data)


def _relocate(sweep_dir: Path, recorded: str | None, run: str, seed: int, tail: str = "") -> Path:
    """A manifest's absolute folder, or the same folder under where the sweep folder is now (it may have been
    copied or mounted elsewhere)."""
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    return sweep_dir / run / f"seed{seed}" / tail if tail else sweep_dir / run / f"seed{seed}"


def _scan_result_dir(run_dir: Path) -> Path:
    """Without a manifest: the run folder if it has metrics.json, else its newest ``<stage>/metrics.json``."""
    if (run_dir / "metrics.json").is_file():
        return run_dir
    found = sorted(run_dir.glob("*/metrics.json"), key=lambda p: p.stat().st_mtime)
    return found[-1].parent if found else run_dir


def collect_results(sweep_dir: str | os.PathLike) -> list[RunResult]:
    """Every run × seed of a sweep folder, in the sweep's order. Uses ``sweep.json`` (written by ``gsv3d sweep``)
    to know what was expected, so a task that never started shows as ``missing``; without it, scans
    ``<dir>/<run>/seed<k>/``. Status of a task: ``ok`` (metrics.json of its result stage read), ``failed`` (a
    ``FAILED`` marker in one of its stage folders), ``invalid`` (unreadable metrics.json), ``running`` (folder
    exists, no metrics yet), ``missing`` (no folder)."""
    sweep_dir = Path(sweep_dir)
    manifest_path = sweep_dir / MANIFEST
    stage_names: list[str] = []
    result_stage: str | None = None
    shared_stages: list[SharedStage] = []
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
            runs = [(r["name"], r["label"]) for r in manifest["runs"]]
            stage_names = [st["name"] for st in manifest.get("stages", [])]
            result_stage = manifest.get("result_stage")
            shared_stages = [SharedStage(str(sh["stage"]), str(sh["run"]), str(sh["same_as"]),
                                         tuple(int(x) for x in sh["seeds"]))
                             for sh in manifest.get("shared_stages", [])]
            tasks = []
            for t in manifest["tasks"]:
                run, seed = t["run"], int(t["seed"])
                shared = dict(t.get("shared") or {})  # stage -> the run whose identical stage this task reads
                run_dir = _relocate(sweep_dir, t["run_dir"], run, seed)
                if stage_names:
                    result = _relocate(sweep_dir, t.get("result_dir"), shared.get(result_stage, run), seed,
                                       result_stage or "")
                elif "result_dir" in t:
                    result = _relocate(sweep_dir, t["result_dir"], shared.get("", run), seed)
                else:
                    result = run_dir
                # each stage's folder: this task's own, or the one of the run it shares the stage with
                stage_dirs = [run_dir.parent.parent / shared.get(s, run) / run_dir.name / s for s in stage_names] \
                    or [result]
                tasks.append((run, seed, run_dir, result, stage_dirs))
        except (ValueError, KeyError, TypeError) as e:
            raise SweepError(f"{manifest_path}: not a gsv3d sweep manifest ({e}); regenerate it with `gsv3d sweep`") \
                from e
    else:
        found = sorted(
            (p.parent.name, int(p.name[4:]), p)
            for p in sweep_dir.glob("*/seed*")
            if p.is_dir() and p.name[4:].isdigit()
        )
        if not found:
            raise SweepError(f"{sweep_dir}: no {MANIFEST} and no <run>/seed<k>/ folders: is this a sweep folder?")
        tasks = [(r, s, d, _scan_result_dir(d), [d]) for r, s, d in found]
        names = list(dict.fromkeys(r for r, _, _, _, _ in tasks))
        order = list(ABLATION_LABELS)
        names.sort(key=lambda n: (order.index(n) if n in order else len(order), n))
        runs = [(n, ABLATION_LABELS.get(n, n)) for n in names]
    results = {name: RunResult(name, label, stage=result_stage) for name, label in runs}
    for sh in shared_stages:
        if sh.run in results:
            results[sh.run].shared.append(sh)
    for run, seed, run_dir, result_dir, stage_dirs in tasks:
        _collect_task(results[run], seed, run_dir, result_dir, stage_names, sweep_dir, stage_dirs)
    return list(results.values())


def _collect_task(res: RunResult, seed: int, run_dir: Path, result_dir: Path, stage_names: list[str],
                  sweep_dir: Path, stage_dirs: list[Path] | None = None) -> None:
    """One task's status and numbers into ``res`` (see :func:`collect_results`). ``stage_dirs``: the folder of
    each stage in ``stage_names`` (another run's where the stage is shared; default: the task's own)."""
    metrics = result_dir / "metrics.json"
    stage_dirs = stage_dirs or [run_dir / s for s in stage_names] or [run_dir]
    failed = next((d for d in stage_dirs if (d / "FAILED").is_file()), None)
    if metrics.is_file():
        try:
            values, baselines = _read_metrics(metrics)
        except (ValueError, OSError) as e:
            res.seeds[seed] = "invalid"
            res.notes.append(f"seed {seed}: {metrics}: {e}")
            return
        res.seeds[seed] = "ok"
        res.result_dirs[seed] = result_dir
        for key, v in values.items():
            if v is not None:
                res.values.setdefault(key, []).append(v)
        for name, part in baselines.items():
            for key, v in part.items():
                res.baselines.setdefault(name, {}).setdefault(key, []).append(v)
    elif failed is not None:
        res.seeds[seed] = "failed"
        reason = (failed / "FAILED").read_text().strip()
        res.notes.append(f"seed {seed}: failed: {reason} (logs: {sweep_dir}/slurm/)")
    elif (result_dir / "test.done").is_file():
        res.seeds[seed] = "failed"
        res.notes.append(f"seed {seed}: `gsv3d test` finished but wrote no metrics.json (are the metric callbacks "
                         f"in the config?)")
    elif run_dir.is_dir() or any(d.is_dir() for d in stage_dirs):
        res.seeds[seed] = "running"
        done = [s for s, d in zip(stage_names, stage_dirs) if (d / "fit.done").is_file()]
        where = f"; stages with fit.done: {', '.join(done) or 'none'}" if stage_names else ""
        res.notes.append(f"seed {seed}: no metrics.json yet (still running, or killed: see {sweep_dir}/slurm/"
                         f"{where})")
    else:
        res.seeds[seed] = "missing"
        res.notes.append(f"seed {seed}: not started ({run_dir} does not exist)")


def _per_object(res: RunResult) -> dict[int, dict[str, dict[str, float]]]:
    """{seed: per-object CSV} of the ``ok`` seeds that have one."""
    out = {}
    for seed, folder in res.result_dirs.items():
        path = folder / PER_OBJECT_FILE
        if path.is_file():
            out[seed] = read_per_object_csv(path)
    return out


def paired_comparison(results: Sequence[RunResult], reference: str = "full",
                      num_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
                      ) -> dict[str, dict[str, PairedDiff | None]]:
    """Every run but ``reference`` against ``reference``, per column of :data:`PAIRED_COLUMNS`: the mean
    per-object difference (row − reference; objects paired by uid within the same seed, averaged over seeds) and
    its percentile-bootstrap 95% interval over objects (:func:`~gsv3d_pl.sweep.paired.paired_bootstrap`, fixed RNG
    ``seed``). None where no object has both values. Empty when there is no ``reference`` run with per-object
    CSVs."""
    ref = next((r for r in results if r.name == reference), None)
    ref_objects = _per_object(ref) if ref is not None else {}
    if not ref_objects:
        return {}
    out: dict[str, dict[str, PairedDiff | None]] = {}
    for res in results:
        if res.name == reference:
            continue
        objects = _per_object(res)
        row: dict[str, PairedDiff | None] = {}
        for col in PAIRED_COLUMNS:
            diffs, n_seeds = paired_differences(objects, ref_objects, col.key)
            if not diffs:
                row[col.key] = None
                continue
            mean, lo, hi = paired_bootstrap(list(diffs.values()), num_resamples, seed)
            row[col.key] = PairedDiff(col.key, mean, lo, hi, len(diffs), n_seeds)
        out[res.name] = row
    return out


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))  # sample std over seeds


def _status_word(res: RunResult) -> str:
    """What a row shows when no seed has numbers: the most telling status among its seeds."""
    for word in ("failed", "invalid", "running", "missing"):
        if word in res.seeds.values():
            return word
    return "missing"


def _columns(results: Sequence[RunResult]) -> tuple[Column, ...]:
    """The table's columns: the paper's, and the 3D consistency when some run has it (a decoder-only sweep has not)."""
    has_consistency = any(r.values.get(CONSISTENCY_COLUMN.key) for r in results)
    return (*ABLATION_COLUMNS, *((CONSISTENCY_COLUMN,) if has_consistency else ()))


def _cell(col: Column, vals: Sequence[float] | None, missing: str = "n/a") -> str:
    """``mean ± sample std`` of the seeds' values (std only with ≥ 2 seeds); ``missing`` without values."""
    if not vals:
        return missing
    mean, std = _mean_std(vals)
    return col.format(mean) + ("" if std is None else f" ± {col.format(std)}")


def _baseline_rows(results: Sequence[RunResult], columns: Sequence[Column], reference: str
                   ) -> tuple[list[list[str]], RunResult | None]:
    """The model-free rows (from the ``reference`` run's seeds; "–" in the columns a baseline is not scored in) and
    that run; no rows when it scored none."""
    ref = next((r for r in results if r.name == reference), None)
    if ref is None or not ref.baselines:
        return [], ref
    names = [b for b in BASELINES if b in ref.baselines] + [b for b in ref.baselines if b not in BASELINES]
    rows = [[BASELINE_LABELS.get(n, f"{n} (no model)"),
             *(_cell(c, ref.baselines[n].get(c.key), "–") for c in columns)] for n in names]
    return rows, ref


def format_table(results: Sequence[RunResult], fmt: str = "md", paper: bool = True, paired: bool = True,
                 reference: str = "full", num_resamples: int = BOOTSTRAP_RESAMPLES) -> str:
    """The ablation table. ``md``: one row per run, ``mean ± std`` over the seeds with numbers (std only with
    ≥ 2 seeds), ``(k/n seeds)`` when some are missing, a status word when none has numbers, then notes naming
    every missing/failed seed; with ``paper``, the paper's Table 2 row under each run that has one (``–`` for the
    columns Table 2 does not report); the model-free rows of the ``reference`` run under all runs (module
    docstring); with ``paired``, a second table comparing each run with ``reference`` object by object
    (:func:`paired_comparison`). ``csv``: machine-readable, one row per run with ``<metric>_mean``,
    ``<metric>_std`` (the consistency's too, empty without it), ``num_ok``, ``num_seeds`` and ``status`` columns,
    then one row per model-free baseline (``run`` = ``<reference>:<baseline>``)."""
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        header = ["row", "run", "status", "num_ok", "num_seeds"]
        for col in _READ_COLUMNS:
            header += [f"{col.key}_mean", f"{col.key}_std"]
        writer.writerow(header)

        def stats(values: dict[str, list[float]]) -> list[str]:
            cells: list[str] = []
            for col in _READ_COLUMNS:
                vals = values.get(col.key)
                if vals:
                    mean, std = _mean_std(vals)
                    cells += [repr(mean), "" if std is None else repr(std)]
                else:
                    cells += ["", ""]
            return cells

        for res in results:
            status = "ok" if res.num_ok == len(res.seeds) else (_status_word(res) if not res.num_ok else "partial")
            writer.writerow([res.label, res.name, status, res.num_ok, len(res.seeds), *stats(res.values)])
        ref = next((r for r in results if r.name == reference), None)
        for name, values in (ref.baselines.items() if ref is not None else ()):
            n = max((len(v) for v in values.values()), default=0)
            writer.writerow([BASELINE_LABELS.get(name, name), f"{reference}:{name}", "ok" if n == len(ref.seeds)
                             else "partial", n, len(ref.seeds), *stats(values)])
        return buf.getvalue()
    if fmt != "md":
        raise ValueError(f"unknown format {fmt!r}: use 'md' or 'csv'")

    columns = _columns(results)
    header = ["Method", *(c.header() for c in columns)]
    rows = []
    for res in results:
        if not res.num_ok:
            rows.append([res.label, *([_status_word(res)] * len(columns))])
            continue
        partial = f" ({res.num_ok}/{len(res.seeds)} seeds)" if res.num_ok < len(res.seeds) else ""
        rows.append([res.label + partial, *(_cell(c, res.values.get(c.key)) for c in columns)])
    if paper:
        rows = _with_paper_rows(results, rows, columns)
    baseline_rows, ref = _baseline_rows(results, columns, reference)
    out = _markdown(header, rows + baseline_rows)
    seeds = sorted({len(r.seeds) for r in results})
    out.append("")
    out.append(f"mean ± sample std over {'/'.join(map(str, seeds))} seed(s); n/a: metric not computed.")
    if CONSISTENCY_COLUMN in columns:
        out.append(f"{CONSISTENCY_COLUMN.header()}: ours, not the paper's: the decoder's renders against the generated "
                   "orbit frames it did not read (no ground truth; the distilled model's; docs/evaluation.md).")
    if baseline_rows:
        out.append(f"The rows \"(no model)\" are model-free baselines, scored by the {ref.label} row's `gsv3d test` "
                   f"on its test views (mean ± std over its seeds; PSNR, SSIM, LPIPS only, – elsewhere): every novel "
                   "view predicted by the input image or by the mean training image. Rows with another N score other "
                   "novel views.")
    stages = sorted({r.stage for r in results if r.stage})
    if stages:
        out.append(f"Every row is scored by `gsv3d test` of the chain's stage {', '.join(stages)} "
                   f"(<run>/seed<k>/{stages[0]}/metrics.json).")
    shared = [sh for r in results for sh in r.shared]
    if shared:
        labels = {r.name: r.label for r in results}
        out.append("Trained once, shared with another row (read from that row's folder): "
                   + "; ".join(sh.describe(labels) for sh in shared) + ".")
    if paper and any(table2_row(r.name) for r in results):
        out.append(f"(paper): {CITATION}, Table 2, as published (its test set; appearance only, – = not reported; "
                   "its KID is in percent, ours is the raw MMD²: ×100 to compare).")
    if paired:
        out += _paired_section(results, reference, num_resamples)
    notes = [f"- {r.label} ({r.name}) {n}" for r in results for n in r.notes]
    if notes:
        out += ["", "Incomplete runs:", *notes]
    return "\n".join(out) + "\n"


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return out + ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]


def _format_diff(col: Column, value: float) -> str:
    """A difference with the column's decimals; one too small for them (but not 0) in e-notation, so that a real
    but tiny difference (an interval that excludes 0) never reads "0.000 [0.000, 0.000]*"."""
    if value != 0.0 and abs(value) < 0.5 * 10.0 ** -col.decimals:
        return f"{value:.1e}"
    return col.format(value + 0.0)  # + 0.0: no "-0.000"


def _paired_section(results: Sequence[RunResult], reference: str, num_resamples: int) -> list[str]:
    """The per-object comparison with ``reference`` (empty when it has no per-object CSVs or is the only row)."""
    comparison = paired_comparison(results, reference, num_resamples)
    if not comparison:
        return []
    ref_label = next(r.label for r in results if r.name == reference)
    # the paper's columns always (n/a: a CSV without them), the consistency only where some row has it
    cols = [c for c in PAIRED_COLUMNS if c is not CONSISTENCY_COLUMN
            or any(d.get(c.key) is not None for d in comparison.values())]
    header = ["Difference", *(f"Δ{c.header()}" for c in cols), "objects × seeds"]
    rows = []
    for res in results:
        if res.name not in comparison:
            continue
        diffs = comparison[res.name]
        cells = []
        for col in cols:
            d = diffs.get(col.key)
            cells.append("n/a" if d is None else f"{_format_diff(col, d.mean)} [{_format_diff(col, d.lo)}, "
                         f"{_format_diff(col, d.hi)}]{'*' if d.excludes_zero else ''}")
        sizes = {(d.num_objects, d.num_seeds) for d in diffs.values() if d is not None}
        count = ", ".join(f"{n} × {k}" for n, k in sorted(sizes)) if sizes else "no per-object CSV"
        rows.append([f"{res.label} − {ref_label}", *cells, count])  # not the bare label: one row per name
    return ["", f"Paired comparison with {ref_label} ({reference}): Δ = row − {ref_label} on the same object "
            "(object id) and seed, averaged over seeds; mean Δ [95% CI: percentile bootstrap over objects, "
            f"{num_resamples} resamples, RNG seed {BOOTSTRAP_SEED}]; * = the interval excludes 0. From each "
            f"task's {PER_OBJECT_FILE}; FID and KID are statistics of the whole set of views (no per-object value).",
            "", *_markdown(header, rows)]


def _with_paper_rows(results: Sequence[RunResult], rows: list[list[str]],
                     columns: Sequence[Column] = ABLATION_COLUMNS) -> list[list[str]]:
    """``rows`` (one per run, in ``results``' order) with the paper's Table 2 row after each run that has one."""
    out = []
    for res, row in zip(results, rows, strict=True):
        out.append(row)
        ref = table2_row(res.name)
        if ref is not None:
            out.append([f"{res.label} (paper)",
                        *(c.format(ref.values[c.key]) if c.key in ref.values else "–" for c in columns)])
    return out
