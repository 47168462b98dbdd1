"""Time of one tiny decoder training step on CPU, with the torch and the compiled (numba) projection of the renderer.

What it measures: a ``GSDecoder(latent_channels=8, dim=64, depth=2, num_heads=4, patch_size=1, dino_dim=64,
upsample=2, head_channels=32, vae_factor=4, latent_skip="shuffle")`` decodes B objects from N=4 input views of
16x16x8 random latents (+ random DINO tokens [B, 64, 64]) into 4·32·32 = 4096 Gaussians each; they are rendered
(:func:`gsv3d_pl.render.render`, the losses' path; the numba backend on CPU) at 8 target views of 64x64 on the
SV3D orbit (:func:`gsv3d_pl.cameras.orbit_cameras`, 12 frames: every 3rd is an input view, the others targets)
and the loss is the MSE of the rendered RGB against random targets. The graph is cut at the Gaussians (as
``render_loss`` does for chunked views), so the step splits into

- decoder forward,
- render forward + backward (projection, binning, compositing, the MSE; down to the Gaussians),
- decoder backward (from the Gaussians' gradients to the weights),

and their total. Each variant, ``projection="torch"`` (before: the projection in PyTorch autograd) and
``projection="numba"`` (after: :mod:`gsv3d_pl.render.numba_projection`), runs 2 warm-up steps (numba kernels
load from the on-disk cache or compile), then ``--repeats`` steps interleaved with the other variant (alternating
which goes first), so load from other processes hits both alike; the table shows medians. The first step checks
that both give the same loss and Gaussian gradients.

Usage:
    python benchmarks/bench_decoder_step.py                 # B=4, 10 repeats (~1.5 min on 2 loaded cores)
    python benchmarks/bench_decoder_step.py --repeats 3 --batch 2
    python benchmarks/bench_decoder_step.py --threads 1   # on a loaded machine: no OpenMP spin-waiting
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from gsv3d_pl.cameras import orbit_cameras  # noqa: E402
from gsv3d_pl.models import GSDecoder  # noqa: E402
from gsv3d_pl.render import render  # noqa: E402
from gsv3d_pl.render.numba_jit import numba_available  # noqa: E402
from gsv3d_pl.render.param_table import projection_mode  # noqa: E402

RES, N_IN, N_TGT, LAT, LAT_C = 64, 4, 8, 16, 8
PARTS = ("decoder forward", "render fwd+bwd", "decoder backward", "total")


def make_setup(batch: int, seed: int = 0):
    """The decoder and one batch: latents [B, 4, 8, 16, 16], input / target cameras, DINO tokens, targets."""
    torch.manual_seed(seed)
    dec = GSDecoder(latent_channels=LAT_C, dim=64, depth=2, num_heads=4, patch_size=1, dino_dim=64, upsample=2,
                    head_channels=32, vae_factor=4, latent_skip="shuffle")
    cams = orbit_cameras(N_IN + N_TGT, width=RES, height=RES)  # frame 11 is the input view
    idx_in = torch.arange(N_IN + N_TGT)[2::3]  # frames 2, 5, 8, 11
    idx_tgt = torch.tensor([i for i in range(N_IN + N_TGT) if i not in set(idx_in.tolist())])
    per_obj = lambda x: x[None].expand(batch, *x.shape).contiguous()  # noqa: E731
    batch_data = {
        "latents": torch.randn(batch, N_IN, LAT_C, LAT, LAT),
        "c2w_in": per_obj(cams.c2w[idx_in]), "K_in": per_obj(cams.K[idx_in]),
        "c2w_tgt": per_obj(cams.c2w[idx_tgt]), "K_tgt": per_obj(cams.K[idx_tgt]),
        "dino": torch.randn(batch, 64, 64),
        "target": torch.rand(batch, N_TGT, 3, RES, RES),
    }
    return dec, batch_data


def step(dec: GSDecoder, d: dict, projection: str) -> tuple[dict[str, float], float, list[torch.Tensor]]:
    """One training step; returns the seconds per part, the loss and the Gaussians' gradients."""
    dec.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    g = dec(d["latents"], d["c2w_in"], d["K_in"], d["dino"])  # Gaussians [B], G = 4096
    t1 = time.perf_counter()
    params = [g.means, g.quats, g.scales, g.opacities, g.colors]
    leaves = [p.detach().requires_grad_(True) for p in params]  # cut: render backward stops here
    with projection_mode(projection):
        rgb = render(type(g)(*leaves), d["c2w_tgt"], d["K_tgt"], RES, RES).rgb  # [B, 8, 3, H, W]
    loss = (rgb - d["target"]).square().mean()
    loss.backward()
    t2 = time.perf_counter()
    torch.autograd.backward(params, [x.grad for x in leaves])
    t3 = time.perf_counter()
    times = {"decoder forward": t1 - t0, "render fwd+bwd": t2 - t1, "decoder backward": t3 - t2, "total": t3 - t0}
    return times, float(loss.detach()), [x.grad for x in leaves]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=10, help="timed steps per variant (median reported)")
    p.add_argument("--batch", type=int, default=4, help="objects per step (B)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave torch's default); the "
                   "renderer's kernels use as many pool threads")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if not numba_available():
        print("numba is not installed: the numba backend and projection cannot run")
        return 1
    variants = ("torch", "numba")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, B={args.batch}, {N_IN} input views of "
          f"{LAT}x{LAT}x{LAT_C} latents, {N_TGT} target views of {RES}x{RES}, load average {os.getloadavg()}",
          flush=True)
    dec, d = make_setup(args.batch)
    for k in range(args.warmup):
        outs = {v: step(dec, d, v) for v in variants}
        if k == 0:
            (_, loss_t, grads_t), (_, loss_n, grads_n) = outs["torch"], outs["numba"]
            rel = max(float((a - b).norm() / b.norm().clamp(min=1e-30)) for a, b in zip(grads_n, grads_t))
            print(f"check: loss torch {loss_t:.6f} numba {loss_n:.6f}; Gaussian gradients max relative "
                  f"difference {rel:.1e} (float32 rounding of the two projections)", flush=True)
    times: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for r in range(args.repeats):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            times[v].append(step(dec, d, v)[0])
    med = {v: {k: statistics.median(t[k] for t in times[v]) for k in PARTS} for v in variants}
    print(f"\nmedian of {args.repeats} steps per variant (interleaved), milliseconds:\n")
    print("| part | projection=torch (before) | projection=numba (after) | before / after |")
    print("|---|---|---|---|")
    for k in PARTS:
        a, b = med["torch"][k] * 1e3, med["numba"][k] * 1e3
        print(f"| {k} | {a:.0f} | {b:.0f} | {a / b:.2f}x |")
    print(f"\nload average at the end {os.getloadavg()} (shared machine: timings are upper bounds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
