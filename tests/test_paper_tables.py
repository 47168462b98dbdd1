"""The paper's Table 1 and Table 2 as data, and results.md printing them (no "n/a" left for the paper's rows)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gsv3d_pl.metrics.columns import COLUMNS, USER_STUDY_COLUMNS
from gsv3d_pl.metrics.paper_tables import (
    CITATION,
    TABLE1_KEYS,
    TABLE2_KEYS,
    PaperRow,
    table1_rows,
    table2_row,
    table2_rows,
)
from gsv3d_pl.metrics.results import OURS_DISTILLED, OURS_UNDISTILLED, PAPER_ROWS, results_markdown

ROOT = Path(__file__).resolve().parents[1]

# A few of the published numbers, typed in from the paper (GSV3D, ICCV 2025) independently of the data module.
TABLE1_SPOT = {
    ("GA", "psnr"): 15.201, ("GA", "fid"): 95.47, ("GA", "geo_score"): 5.000,
    ("TGS", "kid"): 1.28, ("TGS", "chamfer"): 0.272,
    ("LGM", "fid"): 61.66, ("LGM", "kid"): 0.45,
    ("Zero123Plus", "iou"): 0.525, ("Zero123Plus", "app_score"): 2.088,
    ("Era3D", "psnr"): 14.993, ("Era3D", "fscore"): 0.256,
    ("SV3D", "clip_iqa"): 0.816, ("SV3D", "app_score"): 4.231,
    ("GSV3D", "psnr"): 20.390, ("GSV3D", "iou"): 0.721, ("GSV3D", "geo_score"): 6.692,
}
TABLE2_SPOT = {("no_rgb", "psnr"): 19.551, ("no_depth", "kid"): 0.32, ("n8", "fid"): 55.49, ("n4", "ssim"): 0.874,
               ("no_dino", "fid"): 55.20, ("full", "lpips"): 0.023}


def test_table1_rows_are_the_papers():
    rows = table1_rows()
    assert [r.name for r in rows] == ["GA", "TGS", "LGM", "Zero123Plus", "Era3D", "SV3D", "GSV3D"]
    assert [r.kind for r in rows] == ["3D", "3D", "2D", "2D", "2D", "2D", "2D-3D"]
    assert all(r.table == 1 and tuple(r.values) == TABLE1_KEYS and r.meaning for r in rows)
    by_name = {r.name: r for r in rows}
    for (name, key), value in TABLE1_SPOT.items():
        assert by_name[name].values[key] == value, (name, key)
    assert PAPER_ROWS["TGS"]["ssim"] == 0.872 and set(PAPER_ROWS) == set(by_name)
    assert "ICCV 2025" in CITATION and "Geometric Distillation" in CITATION
    with pytest.raises(TypeError):
        by_name["GA"].values["psnr"] = 0.0  # read-only: the published numbers are not edited in place


def test_table2_rows_are_the_papers_and_full_equals_table1_gsv3d():
    rows = table2_rows()
    assert [r.run for r in rows] == ["no_rgb", "no_depth", "n8", "n4", "no_dino", "full"]
    assert [r.name for r in rows] == ["w/o RGB loss", "w/o Depth loss", "N = 8", "N = 4", "w/o DINO encoder",
                                      "Full model (GSV3D)"]
    assert all(r.table == 2 and tuple(r.values) == TABLE2_KEYS for r in rows)
    for (run, key), value in TABLE2_SPOT.items():
        assert table2_row(run).values[key] == value, (run, key)
    gsv3d = next(r for r in table1_rows() if r.name == "GSV3D")
    assert {k: gsv3d.values[k] for k in TABLE2_KEYS} == dict(table2_row("full").values)
    assert table2_row("my_run") is None
    assert "distillation loss" in table2_row("no_depth").meaning


def test_row_keys_are_checked():
    with pytest.raises(ValueError, match="keys"):
        PaperRow(2, "x", "g", "m", {"psnr": 1.0})


def test_results_md_prints_every_paper_number_and_no_na():
    data = {"psnr": {"value": 12.5, "num_objects": 2, "num_views": 8}, "meta": {"fscore_tau": 0.05}}
    ours = {OURS_UNDISTILLED: {"psnr": {"value": 11.0, "num_objects": 2, "num_views": 8}},
            OURS_DISTILLED: {"psnr": {"value": 12.0, "num_objects": 2, "num_views": 8}}}
    md = results_markdown(data, ours=ours)
    assert "n/a" not in md and "ICCV 2025" in md and "Table 1" in md
    lines = md.splitlines()
    for r in table1_rows():
        row = next(ln for ln in lines if ln.startswith(f"| {r.kind} | {r.name} (paper) |"))
        cells = [c.strip() for c in row.strip("|").split("|")][2:]
        assert cells == [c.format(r.values[c.key]) for c in COLUMNS]
        assert [float(c) for c in cells] == [r.values[c.key] for c in COLUMNS]  # printed exactly, no rounding
        study = next(ln for ln in lines if ln.startswith(f"| {r.name} | "))
        assert [float(c) for c in study.strip("|").split("|")[1:]] == [r.values[c.key] for c in USER_STUDY_COLUMNS]
    assert "| 3D | GA (paper) | 15.201 | 0.834 | 0.039 | 95.47 | 1.17 | 0.805 | 0.197 | 0.502 | 0.303 |" in md
    assert "| SV3D | 4.231 | 2.923 |" in md
    # the rows of ours: the hook for Table 1 end to end, then this run
    ours_rows = [ln.split("|")[2].strip() for ln in lines if ln.startswith("| ours |")]
    assert ours_rows == [OURS_UNDISTILLED, OURS_DISTILLED, "**this run**"]


def test_project_does_not_point_at_files_outside_the_clone():
    """The paper's numbers live in the package; a user's clone has no shared folder beside it."""
    needles = ("../" + "shared", "/work/" + "shared", "PAPER_" + "TABLES")
    hits = []
    for sub in ("gsv3d_pl", "callbacks", "datamodules", "configs", "docs", "scripts", "benchmarks"):
        for path in (ROOT / sub).rglob("*"):
            if path.suffix in (".py", ".md", ".yaml", ".yml", ".txt", ".sh", ".cfg", ".toml") and path.is_file():
                text = path.read_text(errors="replace")
                hits += [f"{path.relative_to(ROOT)}: {n}" for n in needles if n in text]
    for name in ("README.md", "Makefile", "pyproject.toml", "setup.cfg"):
        text = (ROOT / name).read_text(errors="replace") if (ROOT / name).exists() else ""
        hits += [f"{name}: {n}" for n in needles if n in text]
    assert not hits, hits
