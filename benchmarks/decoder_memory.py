"""Memory of the GS decoder's ``base`` preset at paper scale (21 views × 72² latents), with and without
gradient checkpointing.

Three estimates, printed as one Markdown table (``docs/decoder_memory.md`` records the output):

1. **Counted**: the bytes autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``,
   unique storages) in one forward at a reduced scale on CPU, split into transformer and head, then
   scaled linearly to the target scale. Linear is exact here because attention goes through
   ``scaled_dot_product_attention`` (flash / memory-efficient kernels save O(L), not O(L²)), and every
   other activation is per token or per output pixel.
2. **Analytic**: parameters + AdamW state, and the token/pixel counts.
3. **Measured** on a CUDA device when one is present (``--gpu``): ``max_memory_allocated`` of one
   bf16-autocast forward+backward at the full scale.

Usage: ``python benchmarks/decoder_memory.py [--views 21 --latent 72 --gpu]``.
"""

from __future__ import annotations

import argparse
import sys

import torch

from gsv3d_pl.cameras import orbit_cameras
from gsv3d_pl.models.gs_decoder import GS_DECODER_PRESETS, GSDecoder
from gsv3d_pl.orbit import NUM_FRAMES

GiB = 1024**3


def _inputs(views: int, latent: int, dino_dim: int, device="cpu"):
    cams = orbit_cameras(NUM_FRAMES, width=8 * latent, height=8 * latent)
    idx = torch.arange(views) % NUM_FRAMES  # more views than the orbit has wrap around it
    z = torch.randn(1, views, 4, latent, latent, device=device)
    dino = torch.randn(1, 256, dino_dim, device=device)
    return z, cams.c2w[idx][None].to(device), cams.K[idx][None].to(device), dino


def saved_bytes(dec: GSDecoder, views: int, latent: int, ckpt: bool) -> tuple[int, int]:
    """(transformer bytes, head bytes) saved for backward in one fp32 forward, unique storages."""
    dec.gradient_checkpointing = ckpt
    dec.train()
    seen: dict[int, int] = {}
    phase = {"name": "tokens"}
    per_phase = {"tokens": 0, "head": 0}

    def pack(t):
        if t.device.type != "meta":
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen[key] = t.untyped_storage().nbytes()
                per_phase[phase["name"]] += seen[key]
        return t

    def to_head(*_):
        phase["name"] = "head"

    h = dec.norm_out.register_forward_hook(to_head)
    z, c2w, K, dino = _inputs(views, latent, dec.dino_dim)
    params = {p.untyped_storage().data_ptr() for p in dec.parameters()}
    seen.update({k: 0 for k in params})  # weights are not activations
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        g = dec(z, c2w, K, dino)
    h.remove()
    (g.means.sum() + g.colors.sum()).backward()
    return per_phase["tokens"], per_phase["head"]


def gpu_peak(dec: GSDecoder, views: int, latent: int, ckpt: bool) -> float:
    dec = dec.cuda().train()
    dec.gradient_checkpointing = ckpt
    z, c2w, K, dino = _inputs(views, latent, dec.dino_dim, "cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        g = dec(z, c2w, K, dino)
    (g.means.float().mean() + g.colors.float().mean()).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    dec.zero_grad(set_to_none=True)
    return peak / GiB


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--views", type=int, default=NUM_FRAMES)
    ap.add_argument("--latent", type=int, default=72, help="latent side h = w (72 for 576² images)")
    ap.add_argument("--measure-views", type=int, default=1)
    ap.add_argument("--measure-latent", type=int, default=16)
    ap.add_argument("--gpu", action="store_true", help="also measure at full scale on CUDA")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)

    cfg = GS_DECODER_PRESETS["base"]
    dec = GSDecoder.from_preset("base")
    n_params = sum(p.numel() for p in dec.parameters())
    p = cfg["patch_size"]
    tokens = a.views * (a.latent // p) ** 2
    gauss = dec.num_gaussians(a.views, a.latent, a.latent)
    scale = (a.views * a.latent**2) / (a.measure_views * a.measure_latent**2)

    rows = []
    for ckpt in (False, True):
        tok_b, head_b = saved_bytes(dec, a.measure_views, a.measure_latent, ckpt)
        rows.append((ckpt, tok_b * scale, head_b * scale))

    lines = [
        f"GSDecoder `base` ({cfg['dim']}×{cfg['depth']}, {cfg['num_heads']} heads, patch {p}, "
        f"upsample {cfg['upsample']}, dino_dim {cfg['dino_dim']}) at {a.views} × {a.latent}² latents, batch 1",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| parameters | {n_params / 1e6:.1f} M |",
        f"| weights + grads + AdamW states (fp32) | {16 * n_params / GiB:.2f} GiB |",
        f"| tokens (self-attention sequence length) | {tokens:,} |",
        f"| Gaussians ({a.views} × {a.latent * cfg['upsample']}²) | {gauss:,} |",
    ]
    for ckpt, tb, hb in rows:
        tag = "with" if ckpt else "without"
        lines.append(f"| activations {tag} checkpointing, fp32 (transformer + head) | "
                     f"{(tb + hb) / GiB:.2f} GiB ({tb / GiB:.2f} + {hb / GiB:.2f}) |")
        lines.append(f"| activations {tag} checkpointing, bf16 autocast (≈ half) | {(tb + hb) / 2 / GiB:.2f} GiB |")
    per_block = (rows[0][1] - rows[1][1]) / cfg["depth"]
    lines.append(f"| + transient recompute of one block in backward (with checkpointing), fp32 | {per_block / GiB:.2f} GiB |")
    lines.append(f"| counted at | {a.measure_views} view × {a.measure_latent}² latents on CPU, scaled ×{scale:.1f} |")
    if a.gpu:
        if not torch.cuda.is_available():
            print("--gpu: no CUDA device", file=sys.stderr)
            return 2
        name = torch.cuda.get_device_name()
        for ckpt in (False, True):
            try:
                peak = f"{gpu_peak(dec, a.views, a.latent, ckpt):.2f} GiB"
            except torch.OutOfMemoryError:
                peak = "out of memory"
                torch.cuda.empty_cache()
            tag = "with" if ckpt else "without"
            lines.append(f"| measured peak, bf16 fwd+bwd {tag} checkpointing ({name}) | {peak} (beyond weights) |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
