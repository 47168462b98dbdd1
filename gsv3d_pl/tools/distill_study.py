"""Stage 2's recipes side by side: each recipe at several seeds on the same SV3D, decoder and objects.

    python -m gsv3d_pl.tools.distill_study [--base configs/distill/mini.yaml] [--seeds 0 1 2]
                                          [--out runs/distill_study] RECIPE.yaml [RECIPE.yaml ...]

A recipe is a config overlay of the base (``configs/distill/recipes/*.yaml``: the keys it changes). Each (recipe,
seed) runs ``gsv3d fit --config BASE --config RECIPE --seed_everything=S --model.init_args.e2e_seed=S`` in
``<out>/<recipe>/seed<S>``, two at a time on one core each (:mod:`gsv3d_pl.tools.run_parallel`); a run whose
``heldout_e2e.json`` exists is kept (an interrupted study resumes). The table, ``<out>/study.md`` and ``study.json``:
per recipe, distilled − undistilled held-out PSNR and 3D-consistency PSNR, each as the mean over seeds with a
paired 95% t-interval (the seed's own undistilled run is its pair), the wall time per run and the median
‖∇L_3D‖/‖∇L_2D‖ on the LoRA (``distill_diagnostics.json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from gsv3d_pl.io import write_json_atomic, write_text_atomic
from gsv3d_pl.sweep.paired import paired_t_interval

__all__ = ["summarize_recipe", "main"]

def summarize_recipe(runs: list[dict]) -> dict:
    """One recipe's seeds (each: heldout_e2e.json + ``wall_s`` + ``grad_ratio``) -> the study's row."""
    out: dict = {"seeds": len(runs)}
    for key, dist, base in (("psnr", "psnr", "undistilled_psnr"),
                            ("consistency", "consistency_psnr", "undistilled_consistency_psnr")):
        pairs = [(r[dist], r[base]) for r in runs if r.get(dist) is not None and r.get(base) is not None]
        if pairs:
            m, lo, hi = paired_t_interval([a - b for a, b in pairs])
            out[key] = {"distilled": statistics.fmean(a for a, _ in pairs),
                        "undistilled": statistics.fmean(b for _, b in pairs), "gain": m, "lo": lo, "hi": hi,
                        "per_seed": [a - b for a, b in pairs]}
    walls = [r["wall_s"] for r in runs if r.get("wall_s")]
    out["wall_s"] = statistics.median(walls) if walls else None
    ratios = [r["grad_ratio"] for r in runs if r.get("grad_ratio") is not None]
    out["grad_ratio_3d_2d"] = statistics.median(ratios) if ratios else None
    return out


def _fmt_gain(d: dict | None) -> str:
    if not d:
        return "—"
    star = " **excl. 0**" if d["lo"] > 0 or d["hi"] < 0 else ""
    return f"{d['gain']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]{star}"


def table(rows: dict[str, dict]) -> str:
    lines = ["| recipe | seeds | distilled − undistilled PSNR, 95% CI | distilled / undistilled | "
             "consistency gain (ours, no GT), 95% CI | time per run | median ‖∇L_3D‖/‖∇L_2D‖ |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        p = r.get("psnr") or {}
        du = f"{p['distilled']:.2f} / {p['undistilled']:.2f} dB" if p else "—"
        t = f"{r['wall_s'] / 60:.1f} min" if r.get("wall_s") else "—"
        g = r.get("grad_ratio_3d_2d")
        lines.append(f"| {name} | {r['seeds']} | {_fmt_gain(r.get('psnr'))} | {du} | {_fmt_gain(r.get('consistency'))} "
                     f"| {t} | {'—' if g is None else f'{g:.3g}'} |")
    return "\n".join(lines)


def _record(run: Path) -> dict | None:
    e2e = run / "heldout_e2e.json"
    if not e2e.is_file():
        return None
    rec = json.loads(e2e.read_text())
    meta = run / "study_run.json"
    if meta.is_file():
        rec.update(json.loads(meta.read_text()))
    diag = run / "distill_diagnostics.json"
    if diag.is_file():
        rec["grad_ratio"] = json.loads(diag.read_text()).get("grad_ratio_3d_2d_median")
    return rec


def main(argv: list[str] | None = None) -> int:
    from gsv3d_pl.tools.run_parallel import fit_job, run_jobs

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="+", help="recipe overlays (configs/distill/recipes/*.yaml)")
    ap.add_argument("--base", default="configs/distill/mini.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/distill_study")
    ap.add_argument("--parallel", type=int, default=2, help="runs at once, one thread each")
    ap.add_argument("--report-only", action="store_true", help="only tabulate the runs already there")
    args, extra = ap.parse_known_args(argv)
    out = Path(args.out)
    for r in args.recipes:
        if not Path(r).is_file():
            raise SystemExit(f"distill study: recipe {r} not found")
    todo = [(Path(r).stem, r, s) for r in args.recipes for s in args.seeds
            if _record(out / Path(r).stem / f"seed{s}") is None]
    if todo and not args.report_only:
        print(f"[study] {len(todo)} runs to do ({args.parallel} at a time)", flush=True)
    for i in range(0, 0 if args.report_only else len(todo), args.parallel):
        chunk = todo[i: i + args.parallel]
        jobs = []
        for name, recipe, s in chunk:
            root = out / name / f"seed{s}"
            jobs.append(fit_job(args.base, 1, ["--config", recipe, f"--seed_everything={s}",
                                               f"--model.init_args.e2e_seed={s}",
                                               f"--trainer.default_root_dir={root}", *extra]))
            jobs[-1].name = f"{name}/s{s}"
        t0 = time.time()
        rc = run_jobs(jobs)
        wall = time.time() - t0
        for name, _, s in chunk:  # side by side: each run's time is the pair's wall time
            root = out / name / f"seed{s}"
            if (root / "heldout_e2e.json").is_file():
                write_json_atomic(root / "study_run.json", {"wall_s": wall, "parallel": len(chunk)})
        if rc != 0:
            print(f"[study] a run failed (exit {rc}); its fit.log is under {out}", file=sys.stderr)
            return rc
    rows = {}
    for r in args.recipes:
        name = Path(r).stem
        runs = [rec for s in args.seeds if (rec := _record(out / name / f"seed{s}")) is not None]
        if runs:
            rows[name] = summarize_recipe(runs)
    md = table(rows)
    print(md)
    write_json_atomic(out / "study.json", rows)
    write_text_atomic(out / "study.md", md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
