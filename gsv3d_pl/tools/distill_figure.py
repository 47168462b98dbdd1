"""The README picture of stage 2: one held-out object, SV3D's orbit and the decoder's renders with the LoRA off and on.

    python -m gsv3d_pl.tools.distill_figure runs/distill_mini [--object 0] [--out docs/images/distill_orbit.png]

For the K-th object of the run's test split (held out from training), a labelled grid whose columns are orbit
cameras the decoder did **not** read (novel views; the first column is the input image, marked in orange) and whose
rows are

1. the ground truth at those cameras,
2. SV3D's generated orbit, undistilled (LoRA off), VAE-decoded, at those frames,
3. the frozen decoder's Gaussians of that orbit, rendered at those cameras,
4. and 5. the same with the LoRA on (distilled),

each row labelled with its PSNR against row 1 (the mean over the shown views). Both variants share the conditioning
and the sampler's starting noise (the stage's per-object noise of ``--seed``, by default the run's ``e2e_seed``:
the orbits ``gsv3d test`` and ``heldout_e2e.json`` score), so the difference between rows 2/3 and 4/5 is the
LoRA's alone. Everything goes through the stage's own evaluation (:meth:`conditioning`, :meth:`lora_variant`,
:meth:`evaluate_novel_views`); rows 3 and 5 are renders of exactly the orbits shown in rows 2 and 4.

The stage and the datamodule are rebuilt from the run's saved config (``RUN_DIR/config.yaml``, else the newest
``RUN_DIR/csv/version_*/config.yaml``) as ``gsv3d predict`` builds them (seeded with its ``seed_everything``), and
the LoRA is read from ``RUN_DIR/checkpoints/last.ckpt`` with the safe reader (weights only). Relative paths in
the config (the VAE, SV3D, the stage-1 checkpoint, the data cache) resolve against the working directory: run it
from the repository root, as the run was.

:func:`distill_figure` (a built stage + a one-object batch -> :class:`DistillFigure`) and :func:`compose_figure` /
:func:`write_distill_figure` are the library part (no run folder needed).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["ROWS", "LABEL_WIDTH", "HEADER_HEIGHT", "CAPTION_LINE", "PADDING", "DistillFigure", "shown_frames",
           "distill_figure", "compose_figure", "write_distill_figure", "find_run_config", "load_run",
           "select_object", "main"]

#: The five rows, top to bottom: (key, label).
ROWS = (("gt", "ground truth"),
        ("orbit_undistilled", "SV3D orbit, LoRA off"),
        ("render_undistilled", "decoder renders, LoRA off"),
        ("orbit_distilled", "SV3D orbit, LoRA on"),
        ("render_distilled", "decoder renders, LoRA on"))
LABEL_WIDTH = 168  #: pixels of the label column left of the tiles
HEADER_HEIGHT = 16  #: pixels of the column headers above the tiles
CAPTION_LINE = 13  #: pixels per line of the caption below the tiles
PADDING = 2  #: pixels between tiles (viz.make_grid's padding)
MARK = (1.0, 0.5, 0.0)  #: the input image's frame colour (orange)


@dataclass
class DistillFigure:
    """What the picture shows. ``rows``: key (:data:`ROWS`) -> [n, 3, H, W] in [0, 1] at the shown ``frames``
    (orbit frames = target views 0..20); ``psnr``: key -> mean PSNR (dB) of that row against the ground truth."""

    uid: str
    frames: list[int]
    input_image: Tensor  # [3, H, W]
    rows: dict[str, Tensor]
    psnr: dict[str, float]
    decoder_frames: list[int] = field(default_factory=list)  # the orbit frames the decoder read
    seed: int = 0
    sample_steps: int = 0


def shown_frames(input_indices: list[int], num: int) -> list[int]:
    """``num`` orbit frames spread evenly over those the decoder did not read (the input frame left out: it is
    shown apart), so every column is a held-out novel view."""
    from gsv3d_pl.orbit import INPUT_FRAME

    free = [f for f in range(INPUT_FRAME) if f not in set(input_indices)]
    if num <= 0 or not free:
        raise ValueError(f"no orbit frame to show: {num} requested, the decoder reads {sorted(input_indices)}")
    if num >= len(free):
        return free
    return sorted({free[int(round(i))] for i in np.linspace(0, len(free) - 1, num)})


@contextlib.contextmanager
def _recorded_orbits(stage) -> Iterator[list[Tensor]]:
    """Within: every orbit ``stage.generate_orbit`` samples is also appended (a copy) to the yielded list, so the
    figure shows exactly the orbit that :meth:`evaluate_novel_views` decoded, without sampling it twice. A copy:
    evaluate_novel_views overwrites the input frame's latent in place (``replace_input_frame``)."""
    had_own = "generate_orbit" in vars(stage)
    original = stage.generate_orbit
    seen: list[Tensor] = []

    def record(*args, **kwargs):
        lat = original(*args, **kwargs)
        seen.append(lat.detach().clone())
        return lat

    stage.generate_orbit = record
    try:
        yield seen
    finally:
        if had_own:
            stage.generate_orbit = original
        else:
            del stage.generate_orbit  # the class's method again


def _position(novel: Tensor, frame: int) -> int:
    hit = (novel == frame).nonzero()
    if hit.numel() != 1:
        raise RuntimeError(f"orbit frame {frame} is not one of the novel views {novel.tolist()}")
    return int(hit[0, 0])


@torch.no_grad()
def distill_figure(stage, batch: dict, num_frames: int = 8, seed: int | None = None) -> DistillFigure:
    """The five rows of the figure for the one object of ``batch`` (a collated batch of 1, on the stage's device).

    Args:
        stage: a :class:`~gsv3d_pl.stages.distill_stage.DistillStage` (its LoRA loaded), in eval mode.
        batch: a val/test batch of one object (``input_indices`` = the decoder's fixed orbit frames).
        num_frames: columns besides the input image (at most the orbit frames the decoder does not read).
        seed: the sampler's seed (per-object noise); None = the stage's ``e2e_seed``.
    """
    from gsv3d_pl.stages.heldout import per_image_psnr

    if batch["target_images"].shape[0] != 1:
        raise ValueError(f"distill_figure takes a batch of one object, got {batch['target_images'].shape[0]}")
    seed = int(stage.e2e_seed if seed is None else seed)
    decoder_frames = [int(i) for i in batch["input_indices"][0].tolist()]
    frames = shown_frames(decoder_frames, num_frames)
    gt_all = batch["target_images"][0].float()  # [Q, 3, H, W]; views 0..20 are the orbit frames
    rows = {"gt": gt_all[frames].clamp(0, 1).cpu()}
    c = stage.conditioning(batch)  # shared by both variants, as test_step shares it
    for variant in ("undistilled", "distilled"):
        with stage.lora_variant(variant), _recorded_orbits(stage) as seen:
            out = stage.evaluate_novel_views(batch, seed=seed, c=c)
        lat = seen[-1] if seen else stage.generate_orbit(batch, c, seed)  # [1, 21, C, h, w]
        rows[f"orbit_{variant}"] = stage.vae.decode(lat[0, frames].float()).float().clamp(0, 1).cpu()
        novel = out["novel_indices"][0].cpu()  # [V]
        pos = [_position(novel, f) for f in frames]
        rows[f"render_{variant}"] = out["pred_images"][0, pos].float().clamp(0, 1).cpu()
    gt = rows["gt"]
    psnr = {k: float(per_image_psnr(v, gt).mean()) for k, v in rows.items() if k != "gt"}
    uid = batch.get("uid")
    return DistillFigure(uid=str(uid[0]) if uid is not None else "", frames=frames,
                         input_image=batch["cond_image"][0].float().clamp(0, 1).cpu(), rows=rows, psnr=psnr,
                         decoder_frames=decoder_frames, seed=seed, sample_steps=int(stage.val_sample_steps))


def _font(size: int = 11):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _wrap(lines: list[str], font, width: float) -> list[str]:
    """``lines`` broken at spaces so that each fits ``width`` pixels in ``font``."""
    from PIL import Image, ImageDraw

    d = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    out = []
    for line in lines:
        cur = ""
        for word in line.split(" "):
            cand = f"{cur} {word}" if cur else word
            if cur and d.textlength(cand, font=font) > width:
                out.append(cur)
                cur = word
            else:
                cur = cand
        out.append(cur)
    return out


def _resize(x: Tensor, tile: int | None) -> Tensor:
    if tile is None or tuple(x.shape[-2:]) == (tile, tile):
        return x
    return torch.nn.functional.interpolate(x, size=(tile, tile), mode="bilinear", antialias=True,
                                           align_corners=False).clamp(0, 1)


def compose_figure(fig: DistillFigure, tile: int | None = None) -> np.ndarray:
    """The labelled picture, [H, W, 3] uint8: a label column (row name, its PSNR), column headers (the orbit frame
    and its azimuth), the tiles (:func:`gsv3d_pl.viz.labeled_rows`) and a caption.

    ``tile``: square tile size in pixels (None = the images' own). Size: width ``LABEL_WIDTH + (n + 1)·(tile +
    PADDING) + PADDING``, height ``HEADER_HEIGHT + 5·(tile + PADDING) + PADDING + 4 + CAPTION_LINE·L`` (n = shown
    frames; L = caption lines, 3 when the picture is wide enough, more when they wrap).
    """
    from PIL import Image, ImageDraw

    from gsv3d_pl.orbit import INPUT_FRAME, NUM_FRAMES
    from gsv3d_pl.viz import labeled_rows, to_uint8

    inp = _resize(fig.input_image[None], tile)[0].clone()  # [3, t, t]
    t = inp.shape[-1]
    b = max(1, t // 32)  # the mark's width
    mark = torch.tensor(MARK).view(3, 1, 1)
    inp[:, :b], inp[:, -b:], inp[:, :, :b], inp[:, :, -b:] = mark, mark, mark, mark
    blank = torch.ones_like(inp)
    tiles = [torch.cat([(inp if key == "gt" else blank)[None], _resize(fig.rows[key], tile)]) for key, _ in ROWS]
    grid = to_uint8(labeled_rows(tiles, padding=PADDING))  # [Hg, Wg, 3]
    Hg, Wg = grid.shape[:2]
    font, small = _font(11), _font(10)
    caption = _wrap([f"held-out object {fig.uid}; the decoder reads orbit frames "
                     f"{', '.join(map(str, fig.decoder_frames))}.",
                     f"Columns: orbit frames it did not read (azimuth). LoRA off / on: the same conditioning and "
                     f"sampler noise (seed {fig.seed}, {fig.sample_steps} steps).",
                     f"PSNR: mean over the {len(fig.frames)} shown views against the ground truth."],
                    small, LABEL_WIDTH + Wg - 12)
    img = Image.new("RGB", (LABEL_WIDTH + Wg, HEADER_HEIGHT + Hg + 4 + CAPTION_LINE * len(caption)), "white")
    img.paste(Image.fromarray(grid), (LABEL_WIDTH, HEADER_HEIGHT))
    d = ImageDraw.Draw(img)
    step = t + PADDING

    def col_x(j: int) -> int:
        return LABEL_WIDTH + PADDING + j * step

    heads = [f"input (f{INPUT_FRAME})"] + [f"f{f}, {round((f + 1) * 360 / NUM_FRAMES)}°" for f in fig.frames]
    for j, text in enumerate(heads):
        d.text((col_x(j) + t / 2, HEADER_HEIGHT - 2), text, fill=(224, 112, 0) if j == 0 else (0, 0, 0),
               font=small, anchor="ms")
    for r, (key, label) in enumerate(ROWS):
        y = HEADER_HEIGHT + PADDING + r * step + t / 2
        sub = "(the reference)" if key == "gt" else f"PSNR {fig.psnr[key]:.2f} dB"
        d.text((6, y - 1), label, fill=(0, 0, 0), font=font, anchor="ls")
        d.text((6, y + 2), sub, fill=(80, 80, 80), font=small, anchor="lt")
    y0 = HEADER_HEIGHT + Hg + 3
    for i, line in enumerate(caption):
        d.text((6, y0 + i * CAPTION_LINE), line, fill=(60, 60, 60), font=small)
    return np.asarray(img)


def write_distill_figure(stage, batch: dict, out: str | Path, num_frames: int = 8, seed: int | None = None,
                         tile: int | None = None) -> DistillFigure:
    """:func:`distill_figure` + :func:`compose_figure`, written atomically to ``out`` (PNG)."""
    from gsv3d_pl.viz import save_image

    fig = distill_figure(stage, batch, num_frames, seed)
    save_image(compose_figure(fig, tile), out)
    return fig


# ---- a finished run ----------------------------------------------------------------------------------------------
def find_run_config(run_dir: str | Path) -> Path:
    """The run's saved config: ``RUN_DIR/config.yaml``, else the newest ``RUN_DIR/csv/version_*/config.yaml``."""
    run_dir = Path(run_dir)
    if (run_dir / "config.yaml").is_file():
        return run_dir / "config.yaml"

    def version(p: Path) -> int:
        m = re.fullmatch(r"version_(\d+)", p.parent.name)
        return int(m.group(1)) if m else -1

    found = sorted(run_dir.glob("csv/version_*/config.yaml"), key=version)
    if not found:
        raise FileNotFoundError(f"{run_dir}: no config.yaml (looked for {run_dir}/config.yaml and "
                                f"{run_dir}/csv/version_*/config.yaml); is it a `gsv3d fit` run folder?")
    return found[-1]


def load_run(run_dir: str | Path, ckpt: str | Path | None = None, device: str | torch.device = "cpu"):
    """(stage with its LoRA loaded, in eval mode on ``device``; the datamodule set up for ``test``) of a stage-2 run."""
    from gsv3d_pl.config import config_args, instantiate_section, parse_config
    from gsv3d_pl.stages.distill_stage import DistillStage
    from gsv3d_pl.tools.predict import load_checkpoint, load_stage

    cfg = find_run_config(run_dir)
    stage, _ = load_stage([str(cfg)])  # seeded with the run's seed_everything (random 'tiny' encoders match)
    if not isinstance(stage, DistillStage):
        raise ValueError(f"{cfg}: builds a {type(stage).__name__}; the figure needs a stage-2 (DistillStage) run")
    ckpt = Path(run_dir) / "checkpoints" / "last.ckpt" if ckpt is None else Path(ckpt)
    load_checkpoint(stage, str(ckpt))  # gsv3d_pl.checkpoints.read_checkpoint: weights only; strict
    stage.eval().to(device)
    dm = instantiate_section(parse_config(config_args([str(cfg)], ["--data.init_args.num_workers=0"]),
                                          subcommand="test"), "data")
    dm.prepare_data()
    dm.setup("test")
    return stage, dm


def select_object(loader, k: int) -> dict:
    """The ``k``-th object of ``loader`` as a batch of one (tensors sliced, lists of strings kept as lists)."""
    seen = 0
    for batch in loader:
        B = batch["target_images"].shape[0]
        if k < seen + B:
            i = k - seen
            return {key: (v[i:i + 1] if isinstance(v, (Tensor, list, tuple)) else v) for key, v in batch.items()}
        seen += B
    raise IndexError(f"--object {k}: the test split has {seen} objects (0..{seen - 1})")


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gsv3d_pl.tools.distill_figure",
                                description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", help="a finished stage-2 run folder (e.g. runs/distill_mini)")
    p.add_argument("--object", type=int, default=0, help="which test-split object (0-based)")
    p.add_argument("--out", default="docs/images/distill_orbit.png")
    p.add_argument("--frames", type=int, default=8, help="orbit frames shown (novel views), besides the input")
    p.add_argument("--seed", type=int, default=None, help="sampler seed (default: the run's model e2e_seed)")
    p.add_argument("--tile", type=int, default=None,
                   help="tile size in pixels (default: the data resolution, within [64, 128]: legible headers, small file)")
    p.add_argument("--ckpt_path", default=None, help="default: RUN_DIR/checkpoints/last.ckpt")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    a = p.parse_args(argv)
    if a.object < 0 or a.frames < 1 or (a.tile is not None and a.tile < 8):
        p.error("--object must be >= 0, --frames >= 1 and --tile >= 8")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    try:
        stage, dm = load_run(a.run_dir, a.ckpt_path, device)
        batch = _to(select_object(dm.test_dataloader(), a.object), device)
    except (FileNotFoundError, ValueError, IndexError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    tile = a.tile if a.tile is not None else min(max(int(batch["target_images"].shape[-1]), 64), 128)
    fig = write_distill_figure(stage, batch, a.out, a.frames, a.seed, tile)
    print(f"held-out object {a.object} ({fig.uid}), frames {fig.frames}, seed {fig.seed}:")
    for key, label in ROWS[1:]:
        print(f"  {label:<28} PSNR {fig.psnr[key]:6.2f} dB")
    print(f"written {a.out} ({Path(a.out).stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
