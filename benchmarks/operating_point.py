"""The tiny operating point: what each image resolution and latent grid can carry, before any training.

For the held-out (test split) toy objects at each resolution R, on the same novel views the decoder is scored on
(every target view but the N evaluation inputs), it prints PSNR of:

- **nearest input view**: the input view whose camera axis is nearest (the strongest trivial baseline, as in
  ``heldout_eval.json``);
- **h×h ceiling**: each ground-truth view area-averaged to h×h and bilinearly upsampled back (what h×h numbers
  per channel can carry at best, with a linear decoder); h = R/8 is the tiny VAE's grid;
- **tiny VAE**: the random tiny VAE's own encode → decode of each view (its reconstruction ceiling).

    python benchmarks/operating_point.py                        # R = 64 and 128, 25 held-out objects
    python benchmarks/operating_point.py --resolutions 64 --objects 64
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F

from gsv3d_pl.config import instantiate_section, parse_config
from gsv3d_pl.models import VAE
from gsv3d_pl.stages.common import gather_views, novel_view_indices
from gsv3d_pl.stages.heldout import nearest_input_views, per_image_psnr


def block_ceiling(images: torch.Tensor, h: int) -> torch.Tensor:
    """images [M, 3, R, R] -> area-averaged to h×h and bilinearly upsampled back, [M, 3, R, R]."""
    small = F.interpolate(images, size=(h, h), mode="area")  # [M, 3, h, h]
    return F.interpolate(small, size=images.shape[-2:], mode="bilinear", align_corners=False)


@torch.no_grad()
def measure(resolution: int, num_objects: int, cache_dir: str, grids: list[int]) -> dict:
    cfg = parse_config(["--config", "configs/decoder/tiny.yaml", f"--data.init_args.resolution={resolution}",
                        f"--data.init_args.toy_objects={num_objects}", f"--data.init_args.cache_dir={cache_dir}",
                        "--data.init_args.test_fraction=0.5", "--data.init_args.val_fraction=0.1",
                        "--data.init_args.num_workers=0"])
    dm = instantiate_section(cfg, "data")
    dm.prepare_data()
    dm.setup("test")
    vae = VAE("tiny", scaling_factor=4.0)
    scores: dict[str, list[torch.Tensor]] = {"nearest input view": [], "tiny VAE": []}
    scores.update({f"{h}x{h} ceiling": [] for h in grids})
    n_obj = 0
    for batch in dm.test_dataloader():
        Q = batch["target_images"].shape[1]
        novel = novel_view_indices(batch["input_indices"], Q)  # [B, V]
        gt = gather_views(batch["target_images"], novel)  # [B, V, 3, R, R]
        c2w = gather_views(batch["target_c2w"], novel)  # [B, V, 4, 4]
        near, _ = nearest_input_views(batch["input_images"], batch["input_c2w"], c2w)
        flat = gt.flatten(0, 1)  # [M, 3, R, R]
        scores["nearest input view"].append(per_image_psnr(near.flatten(0, 1), flat))
        scores["tiny VAE"].append(per_image_psnr(vae.decode(vae.encode(flat)).clamp(0, 1), flat))
        for h in grids:
            scores[f"{h}x{h} ceiling"].append(per_image_psnr(block_ceiling(flat, h), flat))
        n_obj += gt.shape[0]
    return {"objects": n_obj, "views": int(torch.cat(scores["tiny VAE"]).numel()),
            **{k: float(torch.cat(v).mean()) for k, v in scores.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--resolutions", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--objects", type=int, default=50, help="toy objects generated (half are held out)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gsv3d_op_") as tmp:
        for r in args.resolutions:
            t0 = time.perf_counter()
            grids = [g for g in (r // 8, r // 4, r // 2) if g >= 4]
            res = measure(r, args.objects, f"{tmp}/cache", grids)
            rows.append((r, res, time.perf_counter() - t0))
    print("\nheld-out novel views, PSNR (dB); each row on its own toy renders at that resolution")
    for r, res, dt in rows:
        cells = ", ".join(f"{k} {v:.2f}" for k, v in res.items() if k not in ("objects", "views"))
        print(f"  {r}x{r} ({res['objects']} objects, {res['views']} views, {dt:.0f} s): {cells}")


if __name__ == "__main__":
    main()
