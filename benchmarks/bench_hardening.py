"""What the hardening costs and saves: checkpoint writes, cache checks, and image preprocessing memory.

    python benchmarks/bench_hardening.py                          # this checkout
    git worktree add /tmp/old <rev>                               # optional: an older checkout beside it
    python benchmarks/bench_hardening.py --baseline /tmp/old      # preprocessing measured in both, side by side

Prints three tables:
1. checkpoint save time, Lightning's ``TorchCheckpointIO`` against the project's ``AtomicCheckpointIO`` (temp file
   beside the target, fsync, rename), medians over ``--repeats``, per checkpoint size;
2. the per-entry cost of the cache checks that ``data prepare`` and dataset setup run (``.npz`` index, ``.npy``
   header);
3. peak RSS (VmHWM) and time of ``preprocess_image`` on generated large or oddly shaped PNGs, each in a fresh
   process (the process's own import cost is printed as the first row).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_checkpoints(sizes_mb: list[int], repeats: int, folder: Path) -> None:
    import torch
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    from gsv3d_pl.checkpoints import AtomicCheckpointIO

    print("1. checkpoint save (median ms; TMPDIR as set)")
    print(f"   {'size':>8}  {'Lightning':>10}  {'atomic':>10}  {'ratio':>6}")
    for mb in sizes_mb:
        ckpt = {"state_dict": {"w": torch.ones(mb * 2**18)}, "global_step": 1}  # float32: mb MiB
        lit = _median_ms(lambda c=ckpt: TorchCheckpointIO().save_checkpoint(c, folder / "a.ckpt"), repeats)
        ours = _median_ms(lambda c=ckpt: AtomicCheckpointIO().save_checkpoint(c, folder / "b.ckpt"), repeats)
        print(f"   {mb:>6}MB  {lit:>10.1f}  {ours:>10.1f}  {ours / lit:>6.2f}")


def bench_cache_checks(num: int, folder: Path) -> None:
    from datamodules.latent_cache import check_latent_file
    from datamodules.render_cache import _NPZ_MEMBERS, check_object_file

    rng = np.random.default_rng(0)
    npz, npy = [], []
    for i in range(num):  # entries of the demo's size: 25 views' PNG bytes (~200 KB) and [25, 8, 16, 16] latents
        p = folder / f"o{i}.npz"
        arrays = {k: rng.integers(0, 255, 8192 if k.endswith("png") else 4, dtype=np.uint8) for k in _NPZ_MEMBERS}
        arrays["rgba_png"] = rng.integers(0, 255, 200_000, dtype=np.uint8)
        np.savez(p, **arrays)
        q = folder / f"o{i}.npy"
        np.save(q, rng.standard_normal((25, 8, 16, 16)).astype(np.float16))
        npz.append(str(p))
        npy.append(str(q))
    t_npz = _median_ms(lambda: [check_object_file(p) for p in npz], 5) / num * 1e3
    t_npy = _median_ms(lambda: [check_latent_file(p) for p in npy], 5) / num * 1e3
    print(f"\n2. cache checks over {num} entries (median µs per entry)")
    print(f"   .npz index {t_npz:8.1f} µs   .npy header {t_npy:8.1f} µs   "
          f"(10^5 objects: {(t_npz + t_npy) * 1e5 / 1e6:.1f} s)")


_CHILD = r"""
import sys, time
from gsv3d_pl.inference import preprocess_image
def hwm():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 2**20
base = hwm()
t0 = time.perf_counter()
try:
    preprocess_image(sys.argv[1], size=int(sys.argv[2]))
    outcome = 'ok'
except Exception as e:
    outcome = 'refused: ' + type(e).__name__
print(f'{base:.2f} {hwm():.2f} {time.perf_counter() - t0:.1f} {outcome}')
"""


def _images(folder: Path) -> dict[str, Path]:
    from PIL import Image

    out = {}
    big = np.zeros((8000, 8000, 4), np.uint8)  # mostly transparent: a few hundred KB on disk
    big[3000:5000, 2500:5500] = (200, 60, 30, 255)
    out["8000x8000 RGBA PNG"] = folder / "big.png"
    Image.fromarray(big).save(out["8000x8000 RGBA PNG"])
    del big
    strip = np.zeros((64, 20000, 4), np.uint8)
    strip[16:48, 100:19900] = (30, 60, 200, 255)
    out["20000x64 RGBA PNG"] = folder / "strip.png"
    Image.fromarray(strip).save(out["20000x64 RGBA PNG"])
    return out


def bench_preprocess(folder: Path, size: int, checkouts: dict[str, Path]) -> None:
    images = _images(folder)
    print(f"\n3. preprocess_image to {size}² in a fresh process: peak RSS GB (import alone), seconds")
    for label, img in images.items():
        for name, root in checkouts.items():
            env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
            r = subprocess.run([sys.executable, "-c", _CHILD, str(img), str(size)], capture_output=True, text=True,
                               env=env, cwd=root, timeout=900)
            line = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else f"- - - crashed (rc {r.returncode})"
            base, peak, secs, outcome = line.split(" ", 3)
            print(f"   {label:<20} {name:<10} peak {peak:>6} GB (import {base} GB)  {secs:>5} s  {outcome}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[8, 128], help="checkpoint sizes")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--entries", type=int, default=200, help="cache entries to check")
    ap.add_argument("--size", type=int, default=64, help="preprocess output size")
    ap.add_argument("--baseline", type=Path, default=None, help="another checkout: preprocessing measured there too")
    ap.add_argument("--no-preprocess", action="store_true", help="skip table 3 (it allocates GBs on old code)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:  # $TMPDIR: set it to a run folder's file system to measure that one
        folder = Path(tmp)
        bench_checkpoints(args.sizes_mb, args.repeats, folder)
        bench_cache_checks(args.entries, folder)
        if not args.no_preprocess:
            checkouts = {"this": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
            bench_preprocess(folder, args.size, checkouts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
