"""What a CUDA machine does: rasterizer parity, the paper-scale decoder step, SV3D at full size.

Sections of the one table it prints (and writes with ``--json PATH``):

1. **parity**: a fixed random scene (2k Gaussians in the unit box, 4 orbit cameras; 64² on CPU, 256² on
   CUDA), forward and backward of a fixed random weighting of rgb/alpha/depth, float32. CPU: ``torch`` vs
   ``numba``. CUDA: ``gsplat`` vs ``torch`` (both CUDA), CUDA ``torch`` and ``gsplat`` vs CPU ``numba``. Each
   row states the measured error and the tolerance (:data:`TOL`, chosen from the CPU pair with margin).
2. **decoder step** (CUDA): ``GSDecoder.from_preset("base")``, N = 12 / 21 latents of 72² (576² images),
   Q = 25 views rendered at 576² by ``render_loss`` (chunks of 5), bf16 autocast, gradient checkpointing
   on/off: median step time (forward + L_3D + backward + AdamW) and ``torch.cuda.max_memory_allocated()``.
3. **SV3D** (CUDA): the paper-scale UNet (``UNET_PRESETS["pretrained"]``) with random init, bf16 weights,
   LoRA rank 16 on to_q/to_k/to_v/to_out.0: one L_2D training step (EDM loss + backward + AdamW) at
   1 × 21 frames × 72², and 50-step Euler sampling with triangle CFG: time and peak memory.
4. **orbit** (``--weights``, CUDA, real SV3D-p/VAE/CLIP files): does SV3D's frame 4 look like the object
   seen from +85.7° or −85.7° azimuth? Skipped, with the reason, when the flag is absent or files are missing.

Any CUDA case that runs out of memory is reported as "OOM". Without CUDA only the CPU parity runs and the
CUDA rows are marked skipped; the exit code is 0 unless a CPU parity row fails its tolerance.

Usage:
    python benchmarks/gpu_check.py [--json gpu.json] [--steps 3] [--weights]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from gsv3d_pl.cameras import cameras_from_spherical, orbit_cameras  # noqa: E402
from gsv3d_pl.orbit import FOV_DEG, INPUT_FRAME, NUM_FRAMES, input_frames, orbit_angles  # noqa: E402
from gsv3d_pl.render import rasterize  # noqa: E402
from gsv3d_pl.render.gsplat_backend import gsplat_available  # noqa: E402
from gsv3d_pl.render.numba_backend import numba_available  # noqa: E402

# Tolerances of every parity row. Measured on the CPU pair (torch vs numba, 2-core machine, docs/gpu.md): rgb/alpha
# 3.6e-7, depth 7.2e-7, gradients 5.6e-7 relative; these leave >= 280x margin. gsplat is held to the same.
TOL = {
    "rgb_max_abs": 1e-4,
    "alpha_max_abs": 1e-4,
    "depth_max_abs": 1e-3,  # world units on pixels with alpha > 0.05 (ED = Σwz/A is ill-conditioned where A -> 0)
    "grad_rel": 1e-3,  # ‖g_a − g_b‖ / ‖g_b‖ per parameter tensor
}
PARAMS = ("means", "quats", "scales", "opacities", "colors")
SKIP_NO_CUDA = "skipped: CUDA not available"


# ----------------------------------------------------------------------------------------------- parity
def make_scene(n: int = 2048, seed: int = 0) -> list[torch.Tensor]:
    """Fixed scene: means uniform in the unit box [-0.5, 0.5]³, scales log-uniform in [0.004, 0.04]."""
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(n, 3, generator=g) - 0.5  # [n, 3]
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1)  # [n, 4] wxyz
    scales = torch.exp(math.log(0.004) + math.log(10.0) * torch.rand(n, 3, generator=g))  # [n, 3]
    opac = 0.05 + 0.9 * torch.rand(n, generator=g)  # [n]
    colors = torch.rand(n, 3, generator=g)  # [n, 3]
    return [means, quats, scales, opac, colors]


def fwd_bwd(backend: str, scene, res: int, device: str, views: int = 4, seed: int = 1) -> dict:
    """Forward + backward of sum(w·rgb) + sum(w·alpha) + sum(w·depth) with fixed random w; results on CPU."""
    cams = orbit_cameras(views, elevation_deg=15.0, width=res, height=res)
    vm, K = cams.viewmats.to(device), cams.K.to(device)  # [V, 4, 4], [V, 3, 3]
    ins = [x.to(device).clone().requires_grad_(True) for x in scene]
    rgb, alpha, depth = rasterize(*ins, vm, K, res, res, backend=backend)  # [V, H, W, 3|1|1]
    g = torch.Generator().manual_seed(seed)
    w = [torch.rand(t.shape, generator=g).to(device) for t in (rgb, alpha, depth)]
    sum((t * wt).sum() for t, wt in zip((rgb, alpha, depth), w)).backward()
    out = {k: t.detach().cpu() for k, t in zip(("rgb", "alpha", "depth"), (rgb, alpha, depth))}
    out.update({f"grad_{p}": x.grad.detach().cpu() for p, x in zip(PARAMS, ins)})
    return out


def compare(a: dict, b: dict) -> dict:
    """Errors of a against the reference b (see TOL for each metric's meaning)."""
    fg = (b["alpha"] > 0.05) & (a["alpha"] > 0.05)  # [V, H, W, 1]
    err = {
        "rgb_max_abs": float((a["rgb"] - b["rgb"]).abs().max()),
        "alpha_max_abs": float((a["alpha"] - b["alpha"]).abs().max()),
        "depth_max_abs": float((a["depth"] - b["depth"]).abs()[fg].max()) if fg.any() else 0.0,
    }
    rel = {p: float((a[f"grad_{p}"] - b[f"grad_{p}"]).norm() / b[f"grad_{p}"].norm().clamp_min(1e-12))
           for p in PARAMS}
    err["grad_rel"] = max(rel.values())
    err["grad_rel_per_param"] = rel
    err["rgb_mean_abs"] = float((a["rgb"] - b["rgb"]).abs().mean())  # context only: no tolerance
    err["coverage"] = float(b["alpha"].mean())  # mean alpha of the reference: the scene is not empty
    return err


def parity_rows(cuda: bool) -> list[dict]:
    scene = make_scene()
    rows = []

    def row(case: str, a: dict, b: dict) -> None:
        e = compare(a, b)
        ok = all(e[k] <= TOL[k] for k in TOL)
        summary = ", ".join(f"{k} {e[k]:.1e}" for k in TOL)
        rows.append({"section": "parity", "case": case, "status": "pass" if ok else "FAIL", "value": summary,
                     "limit": ", ".join(f"{k} <= {v:g}" for k, v in TOL.items()), "errors": e, "tolerances": TOL})

    if numba_available():
        row("cpu torch vs cpu numba, 64², 2048 G, 4 views", fwd_bwd("torch", scene, 64, "cpu"),
            fwd_bwd("numba", scene, 64, "cpu"))
    else:
        rows.append({"section": "parity", "case": "cpu torch vs cpu numba", "status": "skipped: numba not installed"})
    cuda_cases = ["cuda gsplat vs cuda torch, 256²", "cuda torch vs cpu numba, 256²", "cuda gsplat vs cpu numba, 256²"]
    if not cuda:
        rows += [{"section": "parity", "case": c, "status": SKIP_NO_CUDA} for c in cuda_cases]
        return rows
    ref_cpu = fwd_bwd("numba", scene, 256, "cpu") if numba_available() else fwd_bwd("torch", scene, 256, "cpu")
    t_cuda = fwd_bwd("torch", scene, 256, "cuda")
    g_cuda = fwd_bwd("gsplat", scene, 256, "cuda") if gsplat_available() else None
    for case, a, b in zip(cuda_cases, (g_cuda, t_cuda, g_cuda), (t_cuda, ref_cpu, ref_cpu)):
        if a is None:
            rows.append({"section": "parity", "case": case, "status": "skipped: gsplat CUDA kernels do not load"})
        else:
            row(case if numba_available() else case.replace("numba", "torch"), a, b)
    return rows


# ----------------------------------------------------------------------------------------------- CUDA helpers
# The CUDA sections at paper scale, and --smoke-cpu: the same code at tiny presets/sizes on the CPU, so the code
# paths of the CUDA sections are exercised where no GPU is (times are CPU times, peak memory is not measured).
FULL = dict(dev="cuda", dec_preset="base", lat=72, q=25, chunk=5, views=(12, 21), unet="pretrained", clip_dim=1024,
            dino_tokens=37 * 37, dino_dim=384)  # DINOv2-S/14 at 518²: 37² patch tokens of width 384
SMOKE = dict(dev="cpu", dec_preset="tiny", lat=8, q=6, chunk=4, views=(4,), unet="tiny", clip_dim=64,
             dino_tokens=16, dino_dim=64)


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def _peak(dev: str) -> int:
    return torch.cuda.max_memory_allocated() if dev == "cuda" else 0


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _gib(b: float) -> str:
    return f"{b / 2**30:.1f} GiB"


def timed_steps(step, steps: int, dev: str) -> tuple[float, int]:
    """One warm-up call, then ``steps`` timed ones: (median seconds, peak bytes over the timed ones)."""
    step()
    _sync(dev)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), _peak(dev)


def guarded(section: str, case: str, fn) -> dict:
    """Run fn() -> {"time_s", "peak_bytes", ...}; an out-of-memory error becomes an "OOM" row."""
    row = {"section": section, "case": case}
    try:
        row.update(fn())
        row["status"] = "ok"
        peak = _gib(row["peak_bytes"]) if row["peak_bytes"] else "n/a (CPU)"
        row["value"] = f"{row['time_s']:.3f} s, peak {peak}"
    except torch.cuda.OutOfMemoryError as e:
        row.update(status="OOM", value="OOM", error=str(e).splitlines()[0])
    except Exception as e:  # noqa: BLE001 - one broken case must not hide the others' numbers
        row.update(status="ERROR", value=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    _free()
    return row


# ----------------------------------------------------------------------------------------------- decoder step
def decoder_case(cfg: dict, n_views: int, ckpt: bool, steps: int) -> dict:
    from gsv3d_pl.cameras import random_cameras
    from gsv3d_pl.models.gs_decoder import GSDecoder
    from gsv3d_pl.render import resolve_backend
    from gsv3d_pl.stages.losses import L3DWeights, render_loss

    dev, h, Q = cfg["dev"], cfg["lat"], cfg["q"]
    dec = GSDecoder.from_preset(cfg["dec_preset"], gradient_checkpointing=ckpt).to(dev).train()
    res = h * dec.vae_factor  # 576 at paper scale: the supervised views are rendered at the image size
    opt = torch.optim.AdamW(dec.parameters(), lr=1e-4)
    orbit = orbit_cameras(NUM_FRAMES, elevation_deg=10.0, width=res, height=res)
    extra = random_cameras(max(Q - NUM_FRAMES, 0), width=res, height=res, generator=torch.Generator().manual_seed(0))
    c2w_q = torch.cat([orbit.c2w, extra.c2w])[None, :Q].to(dev)  # [1, Q, 4, 4]: 21 orbit + Q-21 random views
    K_q = torch.cat([orbit.K, extra.K])[None, :Q].to(dev)  # [1, Q, 3, 3]
    idx = torch.tensor(input_frames(n_views))
    c2w_in, K_in = orbit.c2w[idx][None].to(dev), orbit.K[idx][None].to(dev)  # [1, N, 4, 4], [1, N, 3, 3]
    g = torch.Generator(device=dev).manual_seed(0)
    lat = torch.randn(1, n_views, 4, h, h, device=dev, generator=g)  # [1, N, 4, h, h]
    dino = torch.randn(1, cfg["dino_tokens"], cfg["dino_dim"], device=dev, generator=g)  # [1, T, C]
    gt_rgb = torch.rand(1, Q, 3, res, res, device=dev, generator=g)  # [1, Q, 3, H, W]
    gt_alpha = (torch.rand(1, Q, 1, res, res, device=dev, generator=g) > 0.5).float()  # [1, Q, 1, H, W]
    gt_depth = gt_alpha * (1.5 + torch.rand(1, Q, 1, res, res, device=dev, generator=g))
    weights = L3DWeights()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16):  # as DecoderStage.autocast(); render() runs in fp32
            gs = dec(lat, c2w_in, K_in, dino)  # G = N · (h·upsample)² Gaussians
            loss, _ = render_loss(gs, c2w_q, K_q, gt_rgb, gt_alpha, gt_depth, weights, chunk=cfg["chunk"])
        loss.backward()
        opt.step()

    t, peak = timed_steps(step, steps, dev)
    return {"time_s": t, "peak_bytes": peak, "gaussians": dec.num_gaussians(n_views, h, h),
            "backend": resolve_backend("auto", torch.device(dev)), "steps": steps}


def decoder_rows(cfg: dict, run: bool, steps: int) -> list[dict]:
    rows = []
    res = cfg["lat"] * 8
    for n in cfg["views"]:
        for ckpt in (True, False):
            case = (f"{cfg['dec_preset']}, N={n} x {cfg['lat']}², Q={cfg['q']} x {res}², chunk {cfg['chunk']}, bf16, "
                    f"checkpointing {'on' if ckpt else 'off'}")
            rows.append(guarded("decoder step", case, lambda n=n, c=ckpt: decoder_case(cfg, n, c, steps)) if run
                        else {"section": "decoder step", "case": case, "status": SKIP_NO_CUDA})
    return rows


# ----------------------------------------------------------------------------------------------- SV3D
def build_sv3d_random(cfg: dict, ckpt: bool):
    """SV3D with the preset's UNet and random weights: SV3D(unet_preset="pretrained") insists on files, so
    build the wrapper with the tiny UNet and swap in SV3DUNet(**UNET_PRESETS[...]) (random init)."""
    from gsv3d_pl.models.sv3d import SV3D, UNET_PRESETS, SV3DUNet

    sv3d = SV3D(unet_preset="tiny")
    with torch.device(cfg["dev"]):  # initialise the ~1.5B parameters on the GPU, not on the host
        sv3d.unet = SV3DUNet(**UNET_PRESETS[cfg["unet"]])
    sv3d.unet.to(torch.bfloat16)  # frozen base in bf16, as LoRA fine-tuning keeps it
    if ckpt:
        sv3d.unet.enable_gradient_checkpointing()
    return sv3d.to(cfg["dev"])


def sv3d_inputs(cfg: dict) -> dict:
    dev, h = cfg["dev"], cfg["lat"]
    g = torch.Generator(device=dev).manual_seed(0)
    pol, azi = orbit_angles(1, NUM_FRAMES, elevation_deg=10.0, device=dev)  # [1, 21] each
    return {"clip_emb": torch.randn(1, 1, cfg["clip_dim"], device=dev, generator=g),  # [1, 1, D] (ViT-H-14: 1024)
            "cond_latent": torch.randn(1, 4, h, h, device=dev, generator=g),  # [1, 4, h, h] unscaled
            "polars": pol, "azimuths": azi, "cond_aug": torch.full((1,), 1e-5, device=dev),
            "z0": torch.randn(1, NUM_FRAMES, 4, h, h, device=dev, generator=g)}  # [1, 21, 4, h, h] scaled


def sv3d_train_case(cfg: dict, ckpt: bool, steps: int) -> dict:
    sv3d = build_sv3d_random(cfg, ckpt).train()
    n_lora = sv3d.add_lora(rank=16)  # LORA_TARGET_MODULES: to_q, to_k, to_v, to_out.0
    opt = torch.optim.AdamW([p for p in sv3d.parameters() if p.requires_grad], lr=1e-4)
    c = sv3d_inputs(cfg)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(cfg["dev"], dtype=torch.bfloat16):
            loss, _, _ = sv3d.training_loss(c["z0"], c["clip_emb"], c["cond_latent"], c["polars"], c["azimuths"],
                                            c["cond_aug"])
        loss.backward()
        opt.step()

    t, peak = timed_steps(step, steps, cfg["dev"])
    return {"time_s": t, "peak_bytes": peak, "lora_params": n_lora, "steps": steps}


def sv3d_sample_case(cfg: dict, num_steps: int) -> dict:
    sv3d = build_sv3d_random(cfg, False).eval()
    sv3d.add_lora(rank=16)
    c = sv3d_inputs(cfg)

    def run():
        with torch.autocast(cfg["dev"], dtype=torch.bfloat16):
            sv3d.sample(c["clip_emb"], c["cond_latent"], c["polars"], c["azimuths"], c["cond_aug"],
                        num_steps=num_steps, progress=False)

    t, peak = timed_steps(run, 1, cfg["dev"])  # the warm-up is a whole sampling run too
    return {"time_s": t, "peak_bytes": peak, "num_steps": num_steps}


def sv3d_rows(cfg: dict, run: bool, steps: int, sample_steps: int) -> list[dict]:
    shape = f"1 x 21 x {cfg['lat']}²"
    cases = [(f"{cfg['unet']} UNet, random init: train step (L_2D + LoRA r16), {shape}, bf16, checkpointing "
              f"{'on' if ck else 'off'}", lambda ck=ck: sv3d_train_case(cfg, ck, steps)) for ck in (True, False)]
    cases.append((f"{cfg['unet']} UNet, random init: sampling, {sample_steps} Euler steps, triangle CFG "
                  f"(2 x 21 frames per call), {shape}, bf16", lambda: sv3d_sample_case(cfg, sample_steps)))
    if not run:
        return [{"section": "SV3D", "case": name, "status": SKIP_NO_CUDA} for name, _ in cases]
    return [guarded("SV3D", name, fn) for name, fn in cases]


# ----------------------------------------------------------------------------------------------- orbit direction
ORBIT_CASE = "frame 4 of SV3D-p vs renders at +/-85.7° azimuth"


def asymmetric_object(dev: str):
    """A grey Gaussian ball with a red lump on +X and a blue lump on +Z: seen from ±86° it differs."""
    from gsv3d_pl.gaussians import Gaussians

    g = torch.Generator().manual_seed(0)
    parts = [(torch.zeros(3), 0.3, (0.6, 0.6, 0.6), 3000), (torch.tensor([0.35, 0.0, 0.0]), 0.12, (0.9, 0.1, 0.1), 800),
             (torch.tensor([0.0, 0.15, 0.35]), 0.12, (0.1, 0.2, 0.9), 800)]
    means, colors = [], []
    for centre, r, rgb, n in parts:
        means.append(centre + r * torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
                     * torch.rand(n, 1, generator=g) ** (1 / 3))  # uniform in the ball
        colors.append(torch.tensor(rgb).expand(n, 3))
    m = torch.cat(means)  # [G, 3]
    G = len(m)
    return Gaussians(m, torch.tensor([1.0, 0, 0, 0]).expand(G, 4).clone(), torch.full((G, 3), 0.02),
                     torch.full((G,), 0.8), torch.cat(colors)).to(dev)


def orbit_rows(args, cuda: bool) -> list[dict]:
    base = {"section": "orbit", "case": ORBIT_CASE}
    if not args.weights:
        return [{**base, "status": "skipped: needs --weights (real SV3D-p, VAE and CLIP files)"}]
    from gsv3d_pl.models import SV3D, VAE, CLIPImageEmbedder

    missing = [s for spec_fn, ia in ((SV3D.weight_specs, {"unet_preset": "pretrained"}),
                                     (VAE.weight_specs, {"preset": "pretrained"}),
                                     (CLIPImageEmbedder.weight_specs, {"preset": "pretrained"}))
               for s in spec_fn(ia) if s.find() is None]
    if missing:
        names = "; ".join(f"{s.name} (looked in {', '.join(str(p) for p in s.paths())})" for s in missing)
        return [{**base, "status": f"skipped: --weights given but files are missing: {names}"}]
    if not cuda:
        return [{**base, "status": SKIP_NO_CUDA}]
    return [guarded("orbit", ORBIT_CASE, orbit_direction_check)]


def orbit_direction_check() -> dict:
    """Render the object from the input view, sample SV3D-p, compare frame 4 (+85.7° by the project's
    convention) with renders at +85.7° and −85.7°. Needs the real weights; not exercised without them."""
    from gsv3d_pl.models import SV3D, VAE, CLIPImageEmbedder
    from gsv3d_pl.render import render

    dev, res, elev = "cuda", 576, 10.0
    obj = asymmetric_object(dev)
    cam_in = orbit_cameras(NUM_FRAMES, elevation_deg=elev, width=res, height=res)[INPUT_FRAME]
    az4 = 5 * 360.0 / NUM_FRAMES  # frame i at (i+1)·360/21: frame 4 at 85.7°
    side = cameras_from_spherical([elev, elev], [az4, -az4], fov_deg=FOV_DEG, width=res, height=res)
    c2w_in, K_in = cam_in.c2w.reshape(1, 4, 4).to(dev), cam_in.K.reshape(1, 3, 3).to(dev)  # [V=1, ...]
    img = render(obj, c2w_in, K_in, res, res).rgb  # [1, 3, H, W]
    refs = render(obj, side.c2w.to(dev), side.K.to(dev), res, res).rgb  # [2, 3, H, W]: +az4, -az4
    t0 = time.perf_counter()
    vae, clip = VAE(preset="pretrained").to(dev), CLIPImageEmbedder(preset="pretrained").to(dev)
    sv3d = SV3D(unet_preset="pretrained").to(dev).eval()
    sv3d.unet.to(torch.bfloat16)
    pol, azi = orbit_angles(1, NUM_FRAMES, elevation_deg=elev, device=dev)
    aug = torch.full((1,), 1e-5, device=dev)
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        lat = sv3d.sample(clip(img), vae.encode_cond(img, aug), pol, azi, aug,
                          generator=torch.Generator(device=dev).manual_seed(0), progress=False)  # [1, 21, 4, 72, 72]
    frame4 = vae.decode(lat[:, 4].float())  # [1, 3, H, W]
    mse = ((frame4 - refs) ** 2).mean(dim=(1, 2, 3)).tolist()  # [+az4, -az4]
    match = "+85.7° (the project's convention)" if mse[0] < mse[1] else "-85.7° (convention is mirrored!)"
    return {"time_s": time.perf_counter() - t0, "peak_bytes": torch.cuda.max_memory_allocated(),
            "mse_plus": mse[0], "mse_minus": mse[1], "matches": match}


# ----------------------------------------------------------------------------------------------- table
def print_table(header: str, rows: list[dict]) -> None:
    print(f"\n{header}\n")
    print("| section | case | status | measured | limit |")
    print("|---|---|---|---|---|")
    for r in rows:
        val = r.get("value", "")
        if r.get("matches"):
            val += f"; matches {r['matches']} (mse +{r['mse_plus']:.4f} / -{r['mse_minus']:.4f})"
        print(f"| {r['section']} | {r['case']} | {r['status']} | {val} | {r.get('limit', '')} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="also write the table as JSON to this path")
    p.add_argument("--steps", type=int, default=3, help="timed steps per training case (after one warm-up)")
    p.add_argument("--sample-steps", type=int, default=50, help="SV3D sampling steps")
    p.add_argument("--weights", action="store_true", help="run the orbit-direction check with real SV3D-p weights")
    p.add_argument("--smoke-cpu", action="store_true",
                   help="without CUDA, run the decoder/SV3D code paths at tiny presets on the CPU (code check only)")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else f"CPU only ({platform.processor() or platform.machine()}, " \
                                                         f"{os.cpu_count()} cores)"
    if not cuda:
        print("CUDA not available: running the CPU parts only", flush=True)
    t0 = time.perf_counter()
    rows = parity_rows(cuda)
    smoke = args.smoke_cpu and not cuda
    cfg = FULL if not smoke else SMOKE
    if smoke:
        print("--smoke-cpu: decoder and SV3D sections at tiny presets on the CPU (not paper-scale numbers)", flush=True)
    rows += decoder_rows(cfg, cuda or smoke, args.steps)
    rows += sv3d_rows(cfg, cuda or smoke, args.steps, args.sample_steps)
    rows += orbit_rows(args, cuda)
    header = (f"gpu_check on {device}: torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"gsplat kernels {'yes' if cuda and gsplat_available() else 'no'}, numba {numba_available()}, "
              f"{time.perf_counter() - t0:.1f} s")
    print_table(header, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "cuda": cuda, "smoke_cpu": smoke, "torch": torch.__version__, "tolerances": TOL, "rows": rows},
                      f, indent=2)
        print(f"\nwrote {args.json}")
    cpu_fail = [r for r in rows if r["section"] == "parity" and r["case"].startswith("cpu") and r["status"] == "FAIL"]
    return 1 if cpu_fail else 0


if __name__ == "__main__":
    raise SystemExit(main())
