"""A sweep folder's results: every run × seed's ``metrics.json`` -> the paper's ablation table (``gsv3d report``).

Rows are the runs (the paper's ablation labels), columns :data:`gsv3d_pl.metrics.columns.ABLATION_COLUMNS`; each
cell is ``mean ± sample std`` over the seeds that have numbers. Seeds that are missing, still running or failed
are shown as such and listed under the table. Under each run the paper has a row for, the paper's own number
(Table 2, :func:`gsv3d_pl.metrics.paper_tables.table2_rows`) is printed as ``<label> (paper)``.
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
from typing import Any

from gsv3d_pl.metrics.columns import ABLATION_COLUMNS
from gsv3d_pl.metrics.paper_tables import CITATION, table2_row
from gsv3d_pl.sweep.spec import ABLATION_LABELS, MANIFEST, SweepError

__all__ = ["RunResult", "collect_results", "format_table"]


@dataclass
class RunResult:
    """One run's row: per-seed status (``ok`` | ``missing`` | ``running`` | ``failed`` | ``invalid``) and the
    metric values of the ``ok`` seeds."""

    name: str
    label: str
    seeds: dict[int, str] = field(default_factory=dict)
    values: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def num_ok(self) -> int:
        return sum(s == "ok" for s in self.seeds.values())


def _read_metrics(path: Path) -> dict[str, float | None]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    out: dict[str, float | None] = {}
    for key in (c.key for c in ABLATION_COLUMNS):
        entry = data.get(key)
        value = entry.get("value") if isinstance(entry, dict) else entry
        if value is None or (isinstance(value, (int, float)) and math.isfinite(value)):
            out[key] = None if value is None else float(value)
        else:
            raise ValueError(f"{key}.value is {value!r}, expected a finite number")
    return out


def collect_results(sweep_dir: str | os.PathLike) -> list[RunResult]:
    """Every run × seed of a sweep folder, in the sweep's order. Uses ``sweep.json`` (written by ``gsv3d sweep``)
    to know what was expected, so a task that never started shows as ``missing``; without it, scans
    ``<dir>/<run>/seed<k>/``. Status of a task: ``ok`` (metrics.json read), ``failed`` (a ``FAILED`` marker),
    ``invalid`` (unreadable metrics.json), ``running`` (folder exists, no metrics yet), ``missing`` (no folder)."""
    sweep_dir = Path(sweep_dir)
    manifest_path = sweep_dir / MANIFEST
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
            runs = [(r["name"], r["label"]) for r in manifest["runs"]]
            tasks = [(t["run"], int(t["seed"]), Path(t["run_dir"])) for t in manifest["tasks"]]
        except (ValueError, KeyError, TypeError) as e:
            raise SweepError(f"{manifest_path}: not a gsv3d sweep manifest ({e}); regenerate it with `gsv3d sweep`") \
                from e
        # Resolve the run folders relative to where the sweep folder is now (it may have been copied).
        tasks = [(r, s, sweep_dir / r / f"seed{s}") if not d.is_dir() else (r, s, d) for r, s, d in tasks]
    else:
        tasks = sorted(
            (p.parent.name, int(p.name[4:]), p)
            for p in sweep_dir.glob("*/seed*")
            if p.is_dir() and p.name[4:].isdigit()
        )
        if not tasks:
            raise SweepError(f"{sweep_dir}: no {MANIFEST} and no <run>/seed<k>/ folders: is this a sweep folder?")
        names = list(dict.fromkeys(r for r, _, _ in tasks))
        order = list(ABLATION_LABELS)
        names.sort(key=lambda n: (order.index(n) if n in order else len(order), n))
        runs = [(n, ABLATION_LABELS.get(n, n)) for n in names]
    results = {name: RunResult(name, label) for name, label in runs}
    for run, seed, run_dir in tasks:
        res = results[run]
        metrics = run_dir / "metrics.json"
        if metrics.is_file():
            try:
                values = _read_metrics(metrics)
            except (ValueError, OSError) as e:
                res.seeds[seed] = "invalid"
                res.notes.append(f"seed {seed}: {metrics}: {e}")
                continue
            res.seeds[seed] = "ok"
            for key, v in values.items():
                if v is not None:
                    res.values.setdefault(key, []).append(v)
        elif (run_dir / "FAILED").is_file():
            res.seeds[seed] = "failed"
            reason = (run_dir / "FAILED").read_text().strip()
            res.notes.append(f"seed {seed}: failed: {reason} (logs: {sweep_dir}/slurm/)")
        elif (run_dir / "test.done").is_file():
            res.seeds[seed] = "failed"
            res.notes.append(f"seed {seed}: `gsv3d test` finished but wrote no metrics.json (are the metric callbacks "
                             f"in the config?)")
        elif run_dir.is_dir():
            res.seeds[seed] = "running"
            res.notes.append(f"seed {seed}: no metrics.json yet (still running, or killed: see {sweep_dir}/slurm/)")
        else:
            res.seeds[seed] = "missing"
            res.notes.append(f"seed {seed}: not started ({run_dir} does not exist)")
    return list(results.values())


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


def format_table(results: Sequence[RunResult], fmt: str = "md", paper: bool = True) -> str:
    """The ablation table. ``md``: one row per run, ``mean ± std`` over the seeds with numbers (std only with
    ≥ 2 seeds), ``(k/n seeds)`` when some are missing, a status word when none has numbers, then notes naming
    every missing/failed seed; with ``paper``, the paper's Table 2 row under each run that has one (``–`` for the
    columns Table 2 does not report). ``csv``: machine-readable, one row per run with ``<metric>_mean``, ``<metric>_std``,
    ``num_ok``, ``num_seeds`` and ``status`` columns."""
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        header = ["row", "run", "status", "num_ok", "num_seeds"]
        for col in ABLATION_COLUMNS:
            header += [f"{col.key}_mean", f"{col.key}_std"]
        writer.writerow(header)
        for res in results:
            status = "ok" if res.num_ok == len(res.seeds) else (_status_word(res) if not res.num_ok else "partial")
            row: list[Any] = [res.label, res.name, status, res.num_ok, len(res.seeds)]
            for col in ABLATION_COLUMNS:
                vals = res.values.get(col.key)
                if vals:
                    mean, std = _mean_std(vals)
                    row += [repr(mean), "" if std is None else repr(std)]
                else:
                    row += ["", ""]
            writer.writerow(row)
        return buf.getvalue()
    if fmt != "md":
        raise ValueError(f"unknown format {fmt!r}: use 'md' or 'csv'")

    header = ["Method", *(c.header() for c in ABLATION_COLUMNS)]
    rows = []
    for res in results:
        if not res.num_ok:
            rows.append([res.label, *([_status_word(res)] * len(ABLATION_COLUMNS))])
            continue
        partial = f" ({res.num_ok}/{len(res.seeds)} seeds)" if res.num_ok < len(res.seeds) else ""
        row = [res.label + partial]
        for col in ABLATION_COLUMNS:
            vals = res.values.get(col.key)
            if not vals:
                row.append("n/a")
                continue
            mean, std = _mean_std(vals)
            row.append(col.format(mean) + ("" if std is None else f" ± {col.format(std)}"))
        rows.append(row)
    if paper:
        rows = _with_paper_rows(results, rows)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    seeds = sorted({len(r.seeds) for r in results})
    out.append("")
    out.append(f"mean ± sample std over {'/'.join(map(str, seeds))} seed(s); n/a: metric not computed.")
    if paper and any(table2_row(r.name) for r in results):
        out.append(f"(paper): {CITATION}, Table 2, as published (its test set; appearance only, – = not reported; "
                   "its KID is in percent, ours is the raw MMD²: ×100 to compare).")
    notes = [f"- {r.label} ({r.name}) {n}" for r in results for n in r.notes]
    if notes:
        out += ["", "Incomplete runs:", *notes]
    return "\n".join(out) + "\n"


def _with_paper_rows(results: Sequence[RunResult], rows: list[list[str]]) -> list[list[str]]:
    """``rows`` (one per run, in ``results``' order) with the paper's Table 2 row after each run that has one."""
    out = []
    for res, row in zip(results, rows, strict=True):
        out.append(row)
        ref = table2_row(res.name)
        if ref is not None:
            out.append([f"{res.label} (paper)",
                        *(c.format(ref.values[c.key]) if c.key in ref.values else "–" for c in ABLATION_COLUMNS)])
    return out
