"""Test-only: synthetic multi-view batches (keys: ``gsv3d_pl.batch.BATCH_KEYS``) rendered from random Gaussian
blobs.

The views are consistent 3D renders (the project's rasterizer on the SV3D orbit + random extra cameras), so a
decoder can actually fit them; nothing is read from disk. Latents are not included (stages then encode with
their VAE); ``with_latents`` adds ``target_latents`` from a given encoder.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from gsv3d_pl.cameras import Cameras, orbit_cameras, random_cameras
from gsv3d_pl.orbit import DEFAULT_RADIUS, FOV_DEG, INPUT_FRAME, NUM_FRAMES, input_frames

__all__ = ["synthetic_sample", "SyntheticViews", "SyntheticDataModule", "collate"]


@torch.no_grad()
def synthetic_sample(index: int, num_input_views: int = 2, num_extra_views: int = 2, resolution: int = 32,
                     train: bool = True, num_blobs: int = 6, seed: int = 0) -> dict:
    """One multi-view item: a few coloured Gaussian blobs inside the unit box, rendered at Q views.

    Returns the per-object dict (no batch dim): input_indices [N], input_images [N, 3, H, W], input_c2w [N, 4, 4],
    input_K [N, 3, 3], cond_image [3, H, W], target_* [Q, ...], orbit_polars_rad / orbit_azimuths_rad [21], ...
    """
    from gsv3d_pl.gaussians import Gaussians
    from gsv3d_pl.render import render

    g = torch.Generator().manual_seed(seed * 100_003 + index)
    M = 64 * num_blobs  # Gaussians per object
    centers = (torch.rand(num_blobs, 3, generator=g) - 0.5) * 0.6  # [k, 3]
    means = (centers.repeat_interleave(64, 0) + 0.08 * torch.randn(M, 3, generator=g)).clamp(-0.5, 0.5)  # [M, 3]
    colors = torch.rand(num_blobs, 3, generator=g).repeat_interleave(64, 0)  # [M, 3]
    quats = torch.nn.functional.normalize(torch.randn(M, 4, generator=g), dim=-1)  # [M, 4]
    scales = torch.full((M, 3), 0.04)  # [M, 3]
    opac = torch.full((M,), 0.9)  # [M]
    orb = orbit_cameras(NUM_FRAMES, 10.0, DEFAULT_RADIUS, FOV_DEG, resolution, resolution)
    extra = random_cameras(num_extra_views, width=resolution, height=resolution, generator=g)
    cams = Cameras.cat([orb, extra]) if num_extra_views else orb
    rgb, alpha, depth = render(Gaussians(means, quats, scales, opac, colors), cams.c2w, cams.K, resolution, resolution,
                               backend="auto")  # [Q, 3|1, H, W]
    if train:
        idx = torch.randperm(NUM_FRAMES, generator=g)[:num_input_views].sort().values  # [N]
    else:
        idx = torch.tensor(input_frames(num_input_views))  # [N], the datamodule's evaluation frames
    images = rgb.clamp(0, 1).contiguous()  # [Q, 3, H, W]
    return {
        "uid": f"synthetic_{seed}_{index}",
        "mesh_path": "",
        "norm_center": torch.zeros(3),
        "norm_scale": torch.tensor(1.0),
        "input_indices": idx,
        "input_images": images[idx],
        "input_c2w": cams.c2w[idx],
        "input_K": cams.K[idx],
        "cond_image": images[INPUT_FRAME],
        "target_images": images,
        "target_alphas": alpha.contiguous(),
        "target_depths": (depth * (alpha > 1e-3)).contiguous(),
        "target_c2w": cams.c2w,
        "target_K": cams.K,
        "orbit_polars_rad": orb.polars_rad,
        "orbit_azimuths_rad": orb.azimuths_rad,
    }


class SyntheticViews(Dataset):
    """``num_objects`` synthetic objects, rendered once at construction (cheap at 32²)."""

    def __init__(self, num_objects: int, train: bool, offset: int = 0, **kw):
        self.items = [synthetic_sample(offset + i, train=train, **kw) for i in range(num_objects)]
        self.train = train

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class SyntheticDataModule(pl.LightningDataModule):
    """Train / val / test splits of synthetic objects (disjoint indices), multi-view batches.

    With ``nan_at`` (a training-sample index), that sample's target images are NaN: tests the NaN guard.
    Implements ``set_latent_encoder`` , adding ``target_latents`` [Q, 4, h, w] to every sample.
    """

    def __init__(self, num_train: int = 4, num_val: int = 2, num_test: int = 2, num_input_views: int = 2,
                 num_extra_views: int = 2, resolution: int = 32, batch_size: int = 2, nan_at: int | None = None):
        super().__init__()
        self.kw = dict(num_input_views=num_input_views, num_extra_views=num_extra_views, resolution=resolution)
        self.sizes = (num_train, num_val, num_test)
        self.batch_size = batch_size
        self.nan_at = nan_at
        self.encoder_key: str | None = None
        self._encode = None
        self.ds: dict[str, SyntheticViews] = {}

    def set_latent_encoder(self, encode_fn, key: str) -> None:
        self._encode, self.encoder_key = encode_fn, key
        for ds in self.ds.values():
            self._add_latents(ds)

    def _add_latents(self, ds: SyntheticViews) -> None:
        if self._encode is None:
            return
        for item in ds.items:
            item["target_latents"] = self._encode(item["target_images"]).float()  # [Q, 4, h, w]

    def setup(self, stage: str | None = None) -> None:
        if self.ds:
            return
        n_tr, n_va, n_te = self.sizes
        self.ds = {
            "train": SyntheticViews(n_tr, True, 0, **self.kw),
            "val": SyntheticViews(n_va, False, 1000, **self.kw),
            "test": SyntheticViews(n_te, False, 2000, **self.kw),
        }
        if self.nan_at is not None:
            self.ds["train"].items[self.nan_at]["target_images"] = torch.full_like(
                self.ds["train"].items[self.nan_at]["target_images"], float("nan"))
        for ds in self.ds.values():
            self._add_latents(ds)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        return DataLoader(self.ds[split], batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", False)  # fixed order: tests address a sample by step

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)


def collate(samples: list[dict]) -> dict[str, Tensor]:
    """Default-collate a list of samples into a batch (convenience for tests)."""
    return torch.utils.data.default_collate(samples)
