"""Validation/test image grids: for each object a row of its input views, a row of ground-truth views, a row of
predictions and a row of Turbo-coloured predicted depth, saved to ``<run>/images/`` and to the TensorBoard logger;
at the end of fit, a turntable and the ``.ply`` of the first validation object.

Consumes the stages' ``validation_step``/``test_step`` novel-view result (:data:`gsv3d_pl.batch.NOVEL_VIEW_KEYS`): ``gt_images``,
``pred_images`` [B, V, 3, H, W], ``pred_depths``, ``pred_alphas`` [B, V, 1, H, W].
"""

from __future__ import annotations

import os

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only

from gsv3d_pl.viz import colorize_depth, render_turntable, save_image, save_video

__all__ = ["ValidationImages", "make_grid"]


def make_grid(outputs: dict, num_objects: int, max_views: int, pad: int = 2) -> np.ndarray:
    """The grid (uint8 [rows*H, cols*W, 3]) of up to ``num_objects`` objects: per object GT | pred | depth rows."""
    gt, pred = outputs["gt_images"].float().cpu(), outputs["pred_images"].float().cpu()  # [B, V, 3, H, W]
    depth, alpha = outputs["pred_depths"].float().cpu(), outputs["pred_alphas"].float().cpu()  # [B, V, 1, H, W]
    B, V, _, H, W = gt.shape
    nb, nv = min(B, num_objects), min(V, max_views)
    views = torch.linspace(0, V - 1, nv).round().long()  # spread over the orbit
    inputs = outputs.get("input_images")  # [B, N, 3, H, W] or None
    rows = []
    for b in range(nb):
        if inputs is not None:  # the N input views first, padded with white to the row length
            inp = inputs[b].float().cpu()[:nv]
            rows.append(torch.cat([inp, torch.ones(nv - inp.shape[0], 3, H, W)]) if inp.shape[0] < nv else inp)
        rows += [gt[b, views], pred[b, views].clamp(0, 1), colorize_depth(depth[b, views], alpha[b, views])]
    canvas = torch.ones(3, len(rows) * (H + pad) - pad, nv * (W + pad) - pad) * 0.5  # grey separators
    for r, row in enumerate(rows):
        for c in range(nv):
            canvas[:, r * (H + pad): r * (H + pad) + H, c * (W + pad): c * (W + pad) + W] = row[c]
    return (canvas.permute(1, 2, 0).numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)


class ValidationImages(pl.Callback):
    """Save an input | GT | prediction | depth grid of the first objects of every validation (and test) run,
    and at the end of fit a turntable video and the `.ply` of the first validation object.

    Args:
        num_objects: objects in the grid (taken from the first batches on rank 0).
        max_views: views per row (evenly spread over the evaluated novel views).
        dirname: folder under ``trainer.default_root_dir``.
        on_test: also save a grid for ``gsv3d test``.
        turntable_frames, turntable_size: the end-of-fit turntable (0 frames: none).
    Files: ``<run>/<dirname>/val_step{global_step:07d}.png`` and ``test_step....png``; TensorBoard tag
    ``val/grid`` / ``test/grid``.
    """

    def __init__(self, num_objects: int = 4, max_views: int = 8, dirname: str = "images", on_test: bool = True,
                 turntable_frames: int = 48, turntable_size: int = 128):
        super().__init__()
        self.num_objects, self.max_views, self.dirname, self.on_test = num_objects, max_views, dirname, on_test
        self.turntable_frames, self.turntable_size = turntable_frames, turntable_size
        self._buf: list[dict] = []
        self._gaussians = None  # the first validation object's Gaussians, for the end-of-fit turntable
        self.last_path: str | None = None

    def _collect(self, outputs) -> None:
        if not isinstance(outputs, dict) or "pred_images" not in outputs:
            return
        have = sum(o["gt_images"].shape[0] for o in self._buf)
        if have >= self.num_objects:
            return
        keys = ("gt_images", "pred_images", "pred_depths", "pred_alphas", "input_images")
        self._buf.append({k: outputs[k].detach().float().cpu() for k in keys if k in outputs})
        if self._gaussians is None and outputs.get("gaussians") is not None:
            self._gaussians = outputs["gaussians"][0].detach().to("cpu", torch.float32)  # first object, unbatched

    def _flush(self, trainer: pl.Trainer, tag: str) -> None:
        if not self._buf:
            return
        cat = {k: torch.cat([o[k] for o in self._buf]) for k in self._buf[0]}
        self._buf = []
        img = make_grid(cat, self.num_objects, self.max_views)
        path = os.path.join(trainer.default_root_dir, self.dirname, f"{tag}_step{trainer.global_step:07d}.png")
        save_image(img, path)  # uint8 [H, W, 3], written atomically
        self.last_path = path
        for lg in trainer.loggers:
            exp = getattr(lg, "experiment", None)
            if hasattr(exp, "add_image"):  # TensorBoard
                exp.add_image(f"{tag}/grid", img, global_step=trainer.global_step, dataformats="HWC")
            elif hasattr(lg, "log_image"):  # W&B and friends
                lg.log_image(key=f"{tag}/grid", images=[img], step=trainer.global_step)

    @rank_zero_only
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self._collect(outputs)

    @rank_zero_only
    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._flush(trainer, "val")
        self._buf = []

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module):
        """A turntable and the `.ply` of the first validation object, from the last validation run."""
        if self._gaussians is None or self.turntable_frames < 1:
            return
        out = os.path.join(trainer.default_root_dir, self.dirname)
        frames = render_turntable(self._gaussians, num_frames=self.turntable_frames, size=self.turntable_size)
        video = save_video(frames, os.path.join(out, "turntable_val0.mp4"))  # .gif without ffmpeg
        self._gaussians.save_ply(os.path.join(out, "val0.ply"))
        print(f"[visuals] turntable {video} and Gaussians {os.path.join(out, 'val0.ply')}")

    @rank_zero_only
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.on_test:
            self._collect(outputs)

    @rank_zero_only
    def on_test_epoch_end(self, trainer, pl_module):
        if self.on_test:
            self._flush(trainer, "test")
        self._buf = []
