"""``gsv3d report runs/NAME [--format md|csv] [--output FILE] [--strict] [--reference RUN] [--no-paired]``.

Gathers every run's ``metrics.json`` of a sweep folder into the paper's ablation table (rows ``w/o RGB loss``,
``w/o Depth loss``, ``N = 8``, ``N = 4``, ``w/o DINO encoder``, ``Full Model``, each with the paper's Table 2 row
beside it; columns PSNR SSIM LPIPS FID KID CD IoU F-Score; mean ± std over seeds), then compares each row with
``full`` object by object (mean per-object difference with a bootstrap 95% interval, from the
``metrics_per_object.csv`` files). A chained sweep's rows come from its last tested stage (end to end). Missing,
running and failed runs are shown as such.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gsv3d_pl.io import write_text_atomic
from gsv3d_pl.sweep import SweepError, collect_results, format_table
from gsv3d_pl.sweep.paired import BOOTSTRAP_RESAMPLES


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gsv3d report", description=__doc__.split("\n\n")[1])
    parser.add_argument("sweep_dir", help="a sweep folder written by `gsv3d sweep`, e.g. runs/ablations")
    parser.add_argument("--format", choices=("md", "csv"), default="md")
    parser.add_argument("--output", default=None, help="also write the table to this file")
    parser.add_argument("--strict", action="store_true", help="exit 1 unless every run x seed has metrics")
    parser.add_argument("--reference", default="full", help="the run the paired comparison is against (md only)")
    parser.add_argument("--no-paired", action="store_true", help="leave out the paired per-object comparison")
    parser.add_argument("--bootstrap", type=int, default=BOOTSTRAP_RESAMPLES,
                        help=f"bootstrap resamples of the paired comparison (default {BOOTSTRAP_RESAMPLES})")
    args = parser.parse_args(argv)

    if not Path(args.sweep_dir).is_dir():
        print(f"gsv3d report: error: {args.sweep_dir} is not a folder", file=sys.stderr)
        return 2
    if args.bootstrap < 100:
        print("gsv3d report: error: --bootstrap must be >= 100", file=sys.stderr)
        return 2
    try:
        results = collect_results(args.sweep_dir)
    except SweepError as e:
        print(f"gsv3d report: error: {e}", file=sys.stderr)
        return 2
    if not args.no_paired and args.reference not in {r.name for r in results}:
        print(f"gsv3d report: note: no run {args.reference!r} in {args.sweep_dir}: no paired comparison "
              f"(runs: {', '.join(r.name for r in results)}; pick one with --reference)", file=sys.stderr)
    table = format_table(results, args.format, paired=not args.no_paired, reference=args.reference,
                         num_resamples=args.bootstrap)
    print(table, end="")
    if args.output:
        write_text_atomic(args.output, table)
    if args.strict and any(r.num_ok < len(r.seeds) for r in results):
        return 1
    return 0
