"""`gsv3d report`: synthetic sweep folders -> the paper's ablation table (mean ± std, missing/failed shown)."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import pytest

from gsv3d_pl.metrics.columns import ABLATION_COLUMNS
from gsv3d_pl.sweep import ABLATION_LABELS, SweepError, collect_results, format_table
from gsv3d_pl.tools import report as report_tool

ROWS = ["w/o RGB loss", "w/o Depth loss", "N = 8", "N = 4", "w/o DINO encoder", "Full Model"]


def metrics_json(psnr: float, **other: float | None) -> dict:
    values = {"psnr": psnr, "ssim": 0.88, "lpips": 0.023, "fid": 50.79, "kid": 0.21, "clip_iqa": 0.839,
              "chamfer": 0.1, "iou": 0.721, "fscore": 0.661, **other}
    out = {k: {"value": v, "num_objects": 10, "num_views": 200} for k, v in values.items()}
    out["meta"] = {"fscore_tau": 0.05, "smoke": False, "ckpt_path": None, "config": None}
    return out


def make_sweep_dir(root: Path, runs: list[str], seeds: list[int], manifest: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if manifest:
        tasks = [{"index": i, "run": r, "seed": s, "run_dir": str(root / r / f"seed{s}")}
                 for i, (r, s) in enumerate((r, s) for r in runs for s in seeds)]
        (root / "sweep.json").write_text(json.dumps({
            "name": root.name, "seeds": seeds, "runs": [{"name": r, "label": ABLATION_LABELS[r]} for r in runs],
            "tasks": tasks}))
    return root


def put(root: Path, run: str, seed: int, data: dict | str | None = None, failed: str | None = None) -> Path:
    d = root / run / f"seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    if data is not None:
        (d / "metrics.json").write_text(data if isinstance(data, str) else json.dumps(data))
    if failed is not None:
        (d / "FAILED").write_text(failed)
    return d


def table_rows(md: str, paper: bool = False) -> dict[str, list[str]]:
    """Our rows of the table (with ``paper``, also the paper's "<label> (paper)" rows)."""
    lines = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| Method")]
    rows = {}
    for ln in lines:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if paper or not cells[0].endswith("(paper)"):
            rows[cells[0]] = cells[1:]
    return rows


def test_full_table_mean_std(tmp_path):
    runs = list(ABLATION_LABELS)
    root = make_sweep_dir(tmp_path / "abl", runs, [0, 1, 2])
    psnrs = {}
    for i, run in enumerate(runs):
        for s in range(3):
            psnrs.setdefault(run, []).append(18.0 + i + 0.25 * s * s)
            put(root, run, s, metrics_json(psnrs[run][-1], fid=40.0 + s))
    md = format_table(collect_results(root), "md")
    rows = table_rows(md)
    assert list(rows) == ROWS  # the paper's row order and names
    header = next(ln for ln in md.splitlines() if ln.startswith("| Method"))
    assert [c.strip() for c in header.strip("|").split("|")][1:] == [c.header() for c in ABLATION_COLUMNS]
    for run in runs:
        cell = rows[ABLATION_LABELS[run]][0]
        assert cell == f"{statistics.mean(psnrs[run]):.3f} ± {statistics.stdev(psnrs[run]):.3f}"
        assert rows[ABLATION_LABELS[run]][3] == "41.00 ± 1.00"  # FID, 2 decimals as in the paper
        assert rows[ABLATION_LABELS[run]][5] == "0.100 ± 0.000"  # CD
    assert "Incomplete" not in md
    # the paper's Table 2 row under each of ours, as published (appearance only: – for the geometry columns)
    both = table_rows(md, paper=True)
    assert list(both) == [x for r in ROWS for x in (r, f"{r} (paper)")]
    assert both["w/o RGB loss (paper)"] == ["19.551", "0.872", "0.027", "53.89", "0.27", "–", "–", "–"]
    assert both["N = 4 (paper)"][:5] == ["19.548", "0.874", "0.027", "57.85", "0.42"]
    assert both["Full Model (paper)"][:5] == ["20.390", "0.884", "0.023", "50.79", "0.21"]
    assert "Table 2, as published" in md and "ICCV 2025" in md and "KID is in percent" in md
    assert "(paper)" not in format_table(collect_results(root), "md", paper=False)


def test_missing_failed_running_are_shown(tmp_path):
    runs = list(ABLATION_LABELS)
    root = make_sweep_dir(tmp_path / "abl", runs, [0, 1])
    put(root, "full", 0, metrics_json(20.0))
    put(root, "full", 1, metrics_json(21.0))
    put(root, "no_rgb", 0, metrics_json(17.0))          # seed 1 never started
    put(root, "no_depth", 0, failed="fit: exit 1 at line 40")
    put(root, "no_depth", 1, failed="test: exit 1 at line 60")
    put(root, "n8", 0)                                   # folder, no metrics: running (or killed)
    (put(root, "no_dino", 1) / "test.done").touch()      # tested, but no metrics written
    put(root, "n8", 1, "{not json")                      # unreadable
    put(root, "n4", 0, metrics_json(19.0, fid=None))     # a metric not computed
    put(root, "n4", 1, metrics_json(19.5, fid=None))
    # no_dino seed 0: nothing at all
    md = format_table(collect_results(root), "md")
    rows = table_rows(md)
    assert list(rows) == ["w/o RGB loss (1/2 seeds)", "w/o Depth loss", "N = 8", "N = 4", "w/o DINO encoder",
                          "Full Model"]
    assert rows["w/o RGB loss (1/2 seeds)"][0] == "17.000"  # one seed: no std
    assert set(rows["w/o Depth loss"]) == {"failed"}
    assert set(rows["N = 8"]) == {"invalid"}
    assert rows["N = 4"][0] == "19.250 ± 0.354" and rows["N = 4"][3] == "n/a"
    assert set(rows["w/o DINO encoder"]) == {"failed"}
    assert rows["Full Model"][0] == "20.500 ± 0.707"
    notes = md.split("Incomplete runs:")[1]
    assert "w/o RGB loss (no_rgb) seed 1: not started" in notes
    assert "fit: exit 1 at line 40" in notes and "test: exit 1 at line 60" in notes
    assert "N = 8 (n8) seed 0: no metrics.json yet" in notes and "seed 1:" in notes
    assert "w/o DINO encoder (no_dino) seed 0: not started" in notes
    assert "seed 1: `gsv3d test` finished but wrote no metrics.json" in notes


def test_csv_format(tmp_path):
    root = make_sweep_dir(tmp_path / "abl", ["n4", "full"], [0, 1])
    put(root, "full", 0, metrics_json(20.0))
    put(root, "full", 1, metrics_json(22.0))
    put(root, "n4", 0, metrics_json(19.0))
    rows = list(csv.DictReader(io.StringIO(format_table(collect_results(root), "csv"))))
    assert [r["row"] for r in rows] == ["N = 4", "Full Model"]
    assert rows[1]["status"] == "ok" and float(rows[1]["psnr_mean"]) == 21.0
    assert float(rows[1]["psnr_std"]) == pytest.approx(2 ** 0.5)
    assert rows[0]["status"] == "partial" and rows[0]["num_ok"] == "1" and rows[0]["num_seeds"] == "2"
    assert rows[0]["psnr_std"] == ""


def test_without_manifest_scans_folders(tmp_path):
    root = tmp_path / "copied"
    put(root, "full", 0, metrics_json(20.0))
    put(root, "n8", 0, metrics_json(19.0))
    put(root, "custom_run", 3, metrics_json(18.0))
    md = format_table(collect_results(root))
    assert list(table_rows(md)) == ["N = 8", "Full Model", "custom_run"]
    assert list(table_rows(md, paper=True)) == ["N = 8", "N = 8 (paper)", "Full Model", "Full Model (paper)",
                                                "custom_run"]  # the paper has no row for a run of one's own


def test_not_a_sweep_folder(tmp_path):
    with pytest.raises(SweepError, match="no sweep.json"):
        collect_results(tmp_path)


def test_cli(tmp_path, capsys):
    root = make_sweep_dir(tmp_path / "abl", ["full", "n4"], [0])
    put(root, "full", 0, metrics_json(20.0))
    out_file = tmp_path / "table.md"
    assert report_tool.main([str(root), "--output", str(out_file)]) == 0
    printed = capsys.readouterr().out
    assert "| Full Model" in printed and "missing" in printed and out_file.read_text() == printed
    assert report_tool.main([str(root), "--strict"]) == 1
    capsys.readouterr()
    assert report_tool.main([str(root), "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("row,run,status")
    assert report_tool.main([str(tmp_path / "nope")]) == 2


def test_model_free_rows_and_consistency_column(tmp_path):
    """Table 2 carries the Full row's model-free baselines (mean ± std over its seeds, – where not scored) under the
    runs, and each row's 3D consistency (ours, no GT) as a last column; both in the CSV too."""
    from gsv3d_pl.metrics.baselines import BASELINE_LABELS
    from gsv3d_pl.metrics.columns import CONSISTENCY_COLUMN

    root = make_sweep_dir(tmp_path / "abl", ["no_rgb", "full"], [0, 1])
    for s in (0, 1):
        for run, cons in (("no_rgb", 22.0 + s), ("full", 24.0 + 2 * s)):
            data = metrics_json(19.0 + s, consistency_psnr=cons)
            if run == "full":  # the model-free rows come from the reference row only
                data["baselines"] = {
                    "copy_input": {k: {"value": v, "num_objects": 10, "num_views": 200}
                                   for k, v in {"psnr": 12.0 + s, "ssim": 0.7, "lpips": 0.3}.items()},
                    "mean_image": {"skipped": "no training images"} if s else
                    {"psnr": {"value": 10.5, "num_objects": 10, "num_views": 200}}}
            put(root, run, s, data)
    results = collect_results(root)
    md = format_table(results)
    header = next(ln for ln in md.splitlines() if ln.startswith("| Method"))
    assert [c.strip() for c in header.strip("|").split("|")][1:] == [c.header() for c in ABLATION_COLUMNS] + [
        CONSISTENCY_COLUMN.header()]
    rows = table_rows(md, paper=True)
    assert list(rows) == ["w/o RGB loss", "w/o RGB loss (paper)", "Full Model", "Full Model (paper)",
                          BASELINE_LABELS["copy_input"], BASELINE_LABELS["mean_image"]]
    assert rows["w/o RGB loss"][-1] == "22.500 ± 0.707" and rows["Full Model"][-1] == "25.000 ± 1.414"
    assert rows["Full Model (paper)"][-1] == "–"  # the paper has no consistency column
    copy = rows[BASELINE_LABELS["copy_input"]]
    assert copy[:3] == ["12.500 ± 0.707", "0.700 ± 0.000", "0.300 ± 0.000"] and set(copy[3:]) == {"–"}
    mean = rows[BASELINE_LABELS["mean_image"]]
    assert mean[0] == "10.500" and set(mean[1:]) == {"–"}  # one seed scored it: no std
    assert "model-free baselines, scored by the Full Model row" in md and "ours, not the paper's" in md
    out = list(csv.DictReader(io.StringIO(format_table(results, "csv"))))
    assert [r["run"] for r in out] == ["no_rgb", "full", "full:copy_input", "full:mean_image"]
    assert float(out[1]["consistency_psnr_mean"]) == 25.0 and float(out[2]["psnr_mean"]) == 12.5
    assert out[3]["status"] == "partial" and out[3]["num_ok"] == "1"
    # a decoder-only sweep (no consistency, no baselines): the table is the paper's columns alone
    plain = make_sweep_dir(tmp_path / "plain", ["full"], [0])
    put(plain, "full", 0, metrics_json(20.0))
    md = format_table(collect_results(plain))
    assert "consistency" not in md and "no model" not in md
