"""Image -> 3D on held-out toy objects, as `gsv3d predict` runs it, scored against their ground-truth orbit.

For each of the first K test-split objects of the config's toy set: its input view (orbit frame 20, a clean
render) goes through :class:`gsv3d_pl.inference.ImageTo3D` (SV3D + LoRA -> GS decoder), the Gaussians are rendered
at the object's 20 other orbit cameras, and PSNR is printed next to the mean training image and to copying the
input image. Writes a picture: per object, the input | GT orbit frames | SV3D's frames | Gaussian renders.

    python benchmarks/heldout_predict.py --config configs/distill/mini.yaml \\
        --ckpt_path runs/distill_mini/checkpoints/last.ckpt --objects 4 --out docs/images/predict_heldout.png
"""

from __future__ import annotations

import argparse

import torch

from gsv3d_pl.config import config_args, instantiate_section, parse_config
from gsv3d_pl.inference import ImageTo3D
from gsv3d_pl.inference.heldout import NOVEL_FRAMES, score_orbit_prediction
from gsv3d_pl.stages.heldout import mean_training_image
from gsv3d_pl.tools.predict import load_checkpoint, load_stage


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--ckpt_path", required=True)
    ap.add_argument("--objects", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default="predict_heldout.png")
    a = ap.parse_args()
    stage, settings = load_stage([a.config])
    load_checkpoint(stage, a.ckpt_path)
    stage.eval()
    pipe = ImageTo3D.from_stage(stage, input_indices=list(settings["eval_input_indices"]))
    dm = instantiate_section(parse_config(config_args([a.config]) + ["--data.init_args.num_workers=0"]), "data")
    dm.prepare_data()
    dm.setup("test")
    mean_img, _ = mean_training_image(dm.train_dataloader(), None)  # [3, H, W]
    rows, scores = [], {"prediction": [], "copy the input image": [], "mean training image": [], "empty background": []}
    done = 0
    for batch in dm.test_dataloader():
        for b in range(batch["target_images"].shape[0]):
            if done >= a.objects:
                break
            sc = score_orbit_prediction(pipe, batch, b, mean_img, num_steps=a.steps, seed=0)
            for k, v in zip(scores, (sc.prediction, sc.copy_input, sc.mean_image, sc.background)):
                scores[k].append(v)
            show = [0, 3, 6, 9, 12, 15, 18]
            rows.append(torch.cat([sc.input_image[None], sc.gt[show], sc.frames[show], sc.renders[show]]))  # [22, 3, H, W]
            print(f"object {batch['uid'][b]}: prediction {sc.prediction.mean():.2f} dB, copy input "
                  f"{sc.copy_input.mean():.2f} dB, mean image {sc.mean_image.mean():.2f} dB, empty background "
                  f"{sc.background.mean():.2f} dB", flush=True)
            done += 1
        if done >= a.objects:
            break
    print(f"\n{done} held-out objects, {len(NOVEL_FRAMES)} orbit views each, PSNR (dB):")
    for k, v in scores.items():
        print(f"  {k:<22} {torch.cat(v).mean():6.2f}")
    from torchvision.utils import save_image

    tiles = []
    for r in rows:  # per object 3 rows of 8: input + 7 GT frames | blank + SV3D's frames | blank + renders
        n = len(show)
        tiles += [r[0]] + list(r[1:1 + n]) + [torch.ones_like(r[0])] + list(r[1 + n:1 + 2 * n]) + \
                 [torch.ones_like(r[0])] + list(r[1 + 2 * n:1 + 3 * n])
    save_image(torch.stack(tiles), a.out, nrow=len(show) + 1, padding=2, pad_value=1.0)
    print(f"written {a.out}: per object, rows = input + GT orbit | SV3D frames | Gaussian renders")


if __name__ == "__main__":
    main()
