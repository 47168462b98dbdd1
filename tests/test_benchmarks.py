"""The benchmark scripts run and print their tables (tiny sizes; the numbers themselves are not asserted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_render_prints_views_per_second():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_render.py"), "--sizes", "32", "64", "--views", "4",
         "--repeats", "1", "--faces", "2000", "--cycles-views", "0", "--no-loader"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    rates = {int(m.group(1)): float(m.group(2))
             for m in re.finditer(r"(\d+)x\1: +([\d.]+) views/s", out.stdout)}
    assert set(rates) == {32, 64} and all(r > 0 for r in rates.values()), out.stdout
    assert "Blender Cycles anchor: skipped" in out.stdout


def test_operating_point_prints_the_baselines_and_ceilings():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "operating_point.py"), "--resolutions", "32",
                          "--objects", "6"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    row = next(line for line in out.stdout.splitlines() if line.strip().startswith("32x32"))
    vals = {k: float(v) for k, v in re.findall(r"(nearest input view|tiny VAE|\d+x\d+ ceiling) ([\d.]+)", row)}
    assert {"nearest input view", "tiny VAE", "4x4 ceiling", "8x8 ceiling", "16x16 ceiling"} <= set(vals), row
    assert vals["4x4 ceiling"] < vals["8x8 ceiling"] < vals["16x16 ceiling"]  # more numbers carry more


def test_bench_hardening_prints_its_tables():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_hardening.py"), "--sizes-mb", "1",
                          "--repeats", "1", "--entries", "5", "--no-preprocess"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    row = re.search(r"1MB +([\d.]+) +([\d.]+) +([\d.]+)", out.stdout)
    assert row and all(float(v) > 0 for v in row.groups()), out.stdout
    assert re.search(r"\.npz index +[\d.]+ µs +\.npy header +[\d.]+ µs", out.stdout), out.stdout
