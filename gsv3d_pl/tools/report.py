"""``gsv3d report runs/NAME [--format md|csv] [--output FILE] [--strict]``.

Gathers every run's ``metrics.json`` of a sweep folder into the paper's ablation table (rows ``w/o RGB loss``,
``w/o Depth loss``, ``N = 8``, ``N = 4``, ``w/o DINO encoder``, ``Full Model``; columns PSNR SSIM LPIPS FID KID
CD IoU F-Score; mean ± std over seeds). Missing, running and failed runs are shown as such.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gsv3d_pl.io import write_text_atomic
from gsv3d_pl.sweep import SweepError, collect_results, format_table


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gsv3d report", description=__doc__.split("\n\n")[1])
    parser.add_argument("sweep_dir", help="a sweep folder written by `gsv3d sweep`, e.g. runs/ablations")
    parser.add_argument("--format", choices=("md", "csv"), default="md")
    parser.add_argument("--output", default=None, help="also write the table to this file")
    parser.add_argument("--strict", action="store_true", help="exit 1 unless every run x seed has metrics")
    args = parser.parse_args(argv)

    if not Path(args.sweep_dir).is_dir():
        print(f"gsv3d report: error: {args.sweep_dir} is not a folder", file=sys.stderr)
        return 2
    try:
        results = collect_results(args.sweep_dir)
    except SweepError as e:
        print(f"gsv3d report: error: {e}", file=sys.stderr)
        return 2
    table = format_table(results, args.format)
    print(table, end="")
    if args.output:
        write_text_atomic(args.output, table)
    if args.strict and any(r.num_ok < len(r.seeds) for r in results):
        return 1
    return 0
