"""Forward+backward time and peak memory of the rasterizer backends.

Compares the project's two CPU backends (``numba``: compiled kernels, what ``backend="auto"`` picks on CPU;
``torch``: pure-PyTorch tiled pair compositing), a straightforward dense torch implementation written here as the
baseline ([C, N, H·W] alpha matrix + cumprod), and gsplat when CUDA is present.

Scenes: N Gaussians on the surface of a sphere of radius 0.4 (so pixels see several overlapping layers, as with a
decoded object), scales log-uniform so that footprints have a radius of a few pixels at the given resolution,
opacities uniform in (0.1, 1), cameras on the SV3D orbit (``gsv3d_pl.orbit``: radius 2, FoV 33.8°).

Memory method (CPU): every measurement runs in a fresh subprocess; peak = getrusage(RUSAGE_SELF).ru_maxrss after
one fwd+bwd minus ru_maxrss just before it (scene and warm-up excluded: the warm-up runs on a 4x smaller scene).
This is the resident high-water mark of everything the process touched, allocator slack included. On CUDA the
peak is torch.cuda.max_memory_allocated() over the fwd+bwd.

Usage:
    python benchmarks/bench_rasterizer.py            # small, large, linearity, training-step sizes
    python benchmarks/bench_rasterizer.py --quick    # small only, 3 repeats
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from gsv3d_pl.cameras import orbit_cameras  # noqa: E402
from gsv3d_pl.orbit import DEFAULT_RADIUS, FOV_DEG  # noqa: E402
from gsv3d_pl.render import project_gaussians, rasterize  # noqa: E402
from gsv3d_pl.render.inputs import RasterInputs  # noqa: E402
from gsv3d_pl.render.numba_backend import numba_available, rasterize_numba  # noqa: E402
from gsv3d_pl.render.torch_backend import rasterize_torch  # noqa: E402


def make_scene(n: int, views: int, res: int, radius_px: float = 3.0, seed: int = 0, device: str = "cpu"):
    """N Gaussians near a sphere surface with ~radius_px-pixel 3σ footprints at resolution res."""
    g = torch.Generator().manual_seed(seed)
    d = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    means = d * (0.4 + 0.02 * torch.randn(n, 1, generator=g))  # [n, 3]
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1)
    # 1 px at the orbit radius: 2 * tan(FoV / 2) * radius / res world units. 3σ ≈ radius_px -> σ = radius_px / 3.
    px = 2 * math.tan(math.radians(FOV_DEG / 2)) * DEFAULT_RADIUS / res
    sigma = radius_px / 3 * px
    scales = sigma * torch.exp(0.5 * torch.randn(n, 3, generator=g)).clamp(0.3, 3.0)  # [n, 3]
    opac = 0.1 + 0.9 * torch.rand(n, generator=g)
    colors = torch.rand(n, 3, generator=g)
    cams = orbit_cameras(views, elevation_deg=10.0, width=res, height=res)
    scene = [x.to(device) for x in (means, quats, scales, opac, colors)]
    return scene, cams.viewmats.to(device), cams.K.to(device)


def dense_rasterize(means, quats, scales, opacities, colors, viewmats, Ks, width, height):
    """Baseline: every pixel x every Gaussian, sorted by depth, cumprod transmittance (no T stop, no culling
    beyond the near plane and the 1/255 threshold). Uses the shared EWA projection. [C, H, W, 3/1/1] outputs."""
    m2d, con, z, _, vis = project_gaussians(means[None], quats[None], scales[None], opacities[None], viewmats[None],
                                            Ks[None], width, height)
    m2d, con, z, vis = m2d[0], con[0], z[0], vis[0]  # [C, N, ...]
    C = viewmats.shape[0]
    v, u = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    pix = torch.stack([u, v], -1).reshape(-1, 2).to(means)  # [HW, 2]
    order = torch.argsort(z.detach(), dim=1)  # [C, N]
    take = lambda x: torch.gather(x, 1, order.reshape(C, -1, *([1] * (x.dim() - 2))).expand_as(x))
    m2d, con, z, vis = take(m2d), take(con), take(z), take(vis)
    op = opacities[order] * vis  # [C, N]
    dx = m2d[:, :, None, 0] - pix[None, None, :, 0]  # [C, N, HW]
    dy = m2d[:, :, None, 1] - pix[None, None, :, 1]
    sig = 0.5 * (con[..., 0, None] * dx * dx + con[..., 2, None] * dy * dy) + con[..., 1, None] * dx * dy
    a = (op[..., None] * torch.exp(-sig)).clamp(max=0.999)
    a = torch.where(a >= 1 / 255, a, torch.zeros_like(a))  # [C, N, HW]
    T = torch.cumprod(torch.cat([torch.ones_like(a[:, :1]), 1 - a[:, :-1]], 1), 1)
    w = a * T  # [C, N, HW]
    rgb = torch.einsum("cnp,cnk->cpk", w, colors[order])
    acc = w.sum(1)[..., None]
    dep = torch.einsum("cnp,cn->cp", w, z)[..., None] / acc.clamp(min=1e-10)
    rgb = rgb + (1 - acc)
    shp = (C, height, width)
    return rgb.reshape(*shp, 3), acc.reshape(*shp, 1), dep.reshape(*shp, 1)


def dense_bytes(n: int, views: int, res: int) -> int:
    """Memory of the dense baseline: ~8 float32 [C, N, HW] tensors are alive/saved for backward."""
    return 8 * 4 * n * views * res * res


def _step(backend: str, scene, viewmats, Ks, res: int, stats: dict | None = None):
    ins = [x.clone().requires_grad_(True) for x in scene]
    if backend == "dense":
        rgb, a, d = dense_rasterize(*ins, viewmats, Ks, res, res)
    elif backend in ("torch", "numba"):
        fn = rasterize_numba if backend == "numba" else rasterize_torch
        inputs = RasterInputs(*(x[None] for x in ins), viewmats[None], Ks[None], res, res,
                              backgrounds=torch.ones(1, len(viewmats), 3, device=viewmats.device))
        rgb, a, d = fn(inputs, stats=stats)
    else:
        rgb, a, d = rasterize(*ins, viewmats, Ks, res, res, backend="gsplat")
    (rgb.mean() + a.mean() + d.mean()).backward()
    return ins


def measure(backend: str, n: int, views: int, res: int, repeats: int, radius_px: float, device: str) -> dict:
    """Runs in the current process: median fwd+bwd seconds over `repeats` and the peak memory of one step."""
    import resource

    torch.manual_seed(0)
    scene, vm, K = make_scene(n, views, res, radius_px, device=device)
    small = make_scene(max(n // 4, 1), views, max(res // 2, 8), radius_px, device=device)
    _step(backend, *small, max(res // 2, 8))  # warm-up (lazy init, thread pools, numba cache load) on a smaller scene
    stats: dict = {}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    _step(backend, scene, vm, K, res, stats)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = [time.perf_counter() - t0]
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        _step(backend, scene, vm, K, res)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"backend": backend, "n": n, "views": views, "res": res, "device": device, "time_s": statistics.median(times),
            "peak_bytes": peak, "pairs": stats.get("pairs"), "tile": stats.get("tile"), "repeats": repeats}


def run_sub(backend: str, n: int, views: int, res: int, repeats: int, radius_px: float = 3.0,
            device: str = "cpu") -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", json.dumps([backend, n, views, res, repeats, radius_px,
                                                                          device])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt_bytes(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(*json.loads(args.one))))
        return 0
    reps = 3 if args.quick else args.repeats
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, devices {devices}, "
          f"load average {os.getloadavg()}", flush=True)
    cpu_backends = ["numba"] * numba_available() + ["torch"]
    if numba_available():  # compile / load the kernels from the on-disk cache before any timing
        run_sub("numba", 64, 2, 16, 1)
    sizes = [("small", 4096, 8, 64)] + ([] if args.quick else [("large", 32768, 8, 256),
                                                               ("train step", 8192, 25, 64)])
    for name, n, views, res in sizes:
        for device in devices:
            backends = list(cpu_backends) if device == "cpu" else ["torch", "gsplat"]
            if device == "cpu" and name == "small":
                backends.append("dense")
            for b in backends:
                r = run_sub(b, n, views, res, reps if name != "large" or b != "torch" else max(2, reps // 2),
                            device=device)
                if device == "cuda" and b == "torch":
                    r["backend"] = "torch (pytorch compositor)"
                r["size"] = name
                rows.append(r)
                print(json.dumps(r), flush=True)
            if name == "large":
                rows.append({"size": name, "backend": "dense", "device": "cpu", "n": n, "views": views, "res": res,
                             "time_s": None, "peak_bytes": dense_bytes(n, views, res), "pairs": None,
                             "estimated": True})
    lin = []
    if not args.quick:
        for b in cpu_backends:
            for n in (4096, 8192, 16384):
                r = run_sub(b, n, 8, 128, reps)
                r["size"] = "linearity"
                lin.append(r)
                print(json.dumps(r), flush=True)

    print("\n| size | backend | device | views x res² x N | fwd+bwd (median) | peak memory | pairs evaluated |")
    print("|---|---|---|---|---|---|---|")
    for r in rows + lin:
        t = "n/a (estimated only)" if r.get("time_s") is None else f"{r['time_s'] * 1000:.0f} ms"
        mem = fmt_bytes(r["peak_bytes"]) + (" (estimate)" if r.get("estimated") else "")
        pairs = f"{r['pairs'] / 1e6:.2f} M (t={r['tile']})" if r.get("pairs") else ""
        print(f"| {r['size']} | {r['backend']} | {r['device']} | {r['views']} x {r['res']}² x {r['n']} | {t} | "
              f"{mem} | {pairs} |")
    for size in ("small", "large", "train step"):
        by = {r["backend"]: r for r in rows if r["size"] == size and r["device"] == "cpu" and r.get("time_s")}
        for fast in ("numba", "torch"):
            for slow in ("torch", "dense"):
                if fast != slow and fast in by and slow in by:
                    print(f"{size}: {fast} is {by[slow]['time_s'] / by[fast]['time_s']:.1f}x faster than {slow}")
    for b in cpu_backends:
        per = [r["time_s"] / r["pairs"] * 1e9 for r in lin if r["backend"] == b and r.get("pairs")]
        if per:
            print(f"linearity ({b}): ns per evaluated pair = " + ", ".join(f"{x:.1f}" for x in per))
    print(f"load average at the end {os.getloadavg()} (shared machine: timings are upper bounds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
