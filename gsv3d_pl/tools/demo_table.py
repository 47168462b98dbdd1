"""The one table ``make demo`` ends with: baselines, decoder, undistilled and distilled pipeline, held-out.

    python -m gsv3d_pl.tools.demo_table [--decoder runs/decoder_mini/heldout_eval.json]
                                        [--e2e runs/distill_mini/heldout_e2e.json [MORE SEEDS' ...]]
                                        [--vae runs/vae_mini/vae_eval.json]

With several ``--e2e`` files (stage 2 at several seeds: ``make demo-seeds``) the table is the first one's, followed
by the undistilled and distilled PSNR as mean ± sample std over the seeds and their paired difference.

The "3D consistency (ours, no GT)" rows (:mod:`gsv3d_pl.metrics.consistency`: the decoder's renders at the generated
orbit frames it did not read vs those frames; no ground truth) appear when heldout_e2e.json has them (files written
before the metric existed do not).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from gsv3d_pl.metrics.columns import CONSISTENCY_LABEL
from gsv3d_pl.sweep.paired import paired_t_interval


def _read(path: str, what: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"demo table: {p} not found ({what}); run `make demo` (or the stage that writes it) first")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"demo table: {p} is not valid JSON ({e}); rerun the stage that writes it") from e


def rows(decoder: dict, e2e: dict, vae: dict | None = None) -> list[tuple[str, str, str, str]]:
    """(what, task, PSNR, SSIM) rows; every number comes from the JSON files."""
    f = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    g = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    out = []
    if vae:
        out.append(("VAE reconstruction (its own input)", "autoencode", f(vae["psnr"]), "—"))
    out += [
        ("mean training image", "novel views", f(decoder["baseline_psnr"]), g(decoder.get("baseline_ssim"))),
        ("nearest of the 4 GT input views", "4 views -> novel", f(decoder["nearest_input_psnr"]),
         g(decoder.get("nearest_input_ssim"))),
        ("GS decoder on the 4 GT input views", "4 views -> novel", f(decoder["psnr"]), g(decoder["ssim"])),
        ("copy the input image", "1 image -> novel", f(e2e["copy_input_psnr"]), g(e2e.get("copy_input_ssim"))),
        ("SV3D -> decoder, undistilled", "1 image -> novel", f(e2e["undistilled_psnr"]), g(e2e["undistilled_ssim"])),
        ("SV3D+LoRA -> decoder, distilled", "1 image -> novel", f(e2e["psnr"]), g(e2e["ssim"])),
    ]
    if _has_consistency(e2e):
        out += [(f"{CONSISTENCY_LABEL}, undistilled", "orbit self-check", f(e2e["undistilled_consistency_psnr"]),
                 g(e2e["undistilled_consistency_ssim"])),
                (f"{CONSISTENCY_LABEL}, distilled", "orbit self-check", f(e2e["consistency_psnr"]),
                 g(e2e["consistency_ssim"]))]
    return out


def _has_consistency(e2e: dict) -> bool:
    return "consistency_psnr" in e2e and "undistilled_consistency_psnr" in e2e


def ci(diffs: list[float]) -> str:
    """``+0.12 dB, 95% CI [+0.05, +0.19]`` (Student t over the seeds), flagged when the interval excludes 0."""
    m, lo, hi = paired_t_interval(diffs)
    flag = "excludes 0" if lo > 0 or hi < 0 else "includes 0"
    return f"{m:+.2f} dB, 95% CI [{lo:+.2f}, {hi:+.2f}] ({flag})"


def seed_summary(e2es: list[dict]) -> str:
    """Undistilled / distilled PSNR over stage-2 seeds: mean ± sample std, and the paired gain (per seed, and its mean
    with a 95% t-interval over the seeds), beside
    copying the input image (the same for every seed: it needs no model)."""
    und = [e["undistilled_psnr"] for e in e2es]
    dis = [e["psnr"] for e in e2es]
    gain = [d - u for d, u in zip(dis, und)]
    ms = lambda v: f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}"  # noqa: E731
    seeds = ", ".join(str(e.get("seed", "?")) for e in e2es)
    out = (f"  over {len(e2es)} stage-2 seeds ({seeds}): undistilled {ms(und)} dB, distilled {ms(dis)} dB; "
           f"paired gain {ci(gain)} ({', '.join(f'{g:+.2f}' for g in gain)}); copy the input image "
           f"{e2es[0]['copy_input_psnr']:.2f} dB")
    if all(_has_consistency(e) for e in e2es):
        c_und = [e["undistilled_consistency_psnr"] for e in e2es]
        c_dis = [e["consistency_psnr"] for e in e2es]
        c_gain = [d - u for d, u in zip(c_dis, c_und)]
        out += (f"\n  {CONSISTENCY_LABEL} over the same seeds: undistilled {ms(c_und)} dB, distilled {ms(c_dis)} dB; "
                f"paired gain {ci(c_gain)} ({', '.join(f'{g:+.2f}' for g in c_gain)})")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decoder", default="runs/decoder_mini/heldout_eval.json")
    ap.add_argument("--e2e", nargs="+", default=["runs/distill_mini/heldout_e2e.json"],
                    help="stage 2's heldout_e2e.json; more files (other seeds) add mean ± std over them")
    ap.add_argument("--vae", default="runs/vae_mini/vae_eval.json")
    a = ap.parse_args(argv)
    dec = _read(a.decoder, "stage 1's held-out evaluation")
    e2es = [_read(p, "stage 2's end-to-end evaluation") for p in a.e2e]
    e2e = e2es[0]
    for p, other in zip(a.e2e[1:], e2es[1:]):  # a paired comparison needs the same objects and views
        if (other.get("num_objects"), other.get("num_views")) != (e2e.get("num_objects"), e2e.get("num_views")):
            raise SystemExit(f"demo table: {p} scored {other.get('num_objects')} objects / {other.get('num_views')} "
                             f"views, {a.e2e[0]} {e2e.get('num_objects')} / {e2e.get('num_views')}: rerun stage 2 "
                             "of both on the same toy set")
    vae = _read(a.vae, "the VAE stage's evaluation") if Path(a.vae).is_file() else None
    table = rows(dec, e2e, vae)
    print(f"\nHeld-out toy objects ({e2e['num_objects']} objects, {e2e['num_views']} novel views at "
          f"{e2e['resolution'][0]}x{e2e['resolution'][1]}):")
    w = max(len(r[0]) for r in table)
    print(f"  {'':<{w}}  {'task':<17} {'PSNR dB':>8} {'SSIM':>6}")
    for r in table:
        print(f"  {r[0]:<{w}}  {r[1]:<17} {r[2]:>8} {r[3]:>6}")
    print(f"  decoder vs nearest input: {dec['psnr'] - dec['nearest_input_psnr']:+.2f} dB; distilled vs "
          f"undistilled: {e2e['psnr'] - e2e['undistilled_psnr']:+.2f} dB; distilled vs mean image: "
          f"{e2e['psnr'] - e2e['baseline_psnr']:+.2f} dB")
    if _has_consistency(e2e):
        print(f"  {CONSISTENCY_LABEL}, distilled vs undistilled: "
              f"{e2e['consistency_psnr'] - e2e['undistilled_consistency_psnr']:+.2f} dB")
    if len(e2es) > 1:
        print(seed_summary(e2es))
    return 0


if __name__ == "__main__":
    sys.exit(main())
