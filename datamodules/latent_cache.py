"""The latent cache: frozen-VAE latents of every cached view, encoded once and read back per sample.

Layout: ``<render cache>/latents/<key>/<uid[:2]>/<uid>.npy``, one [Q, 4, h, w] float16 array per object, where
``key`` names the VAE weights and the background the views were composited on (both change the latents).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

from datamodules.render_cache import read_cached_object
from gsv3d_pl.io import atomic_path

__all__ = ["latent_key", "latent_file", "encode_missing_latents", "read_latents"]


def latent_key(vae_key: str, background: Sequence[float]) -> str:
    """Folder name of one latent cache: the VAE's weight hash and a tag of the background colour."""
    bg_tag = hashlib.sha1(json.dumps(list(background)).encode()).hexdigest()[:6]
    return f"{vae_key}_bg{bg_tag}"


def latent_file(latent_dir: str, uid: str) -> str:
    return os.path.join(latent_dir, uid[:2], f"{uid}.npy")


@torch.no_grad()
def encode_missing_latents(files: Sequence[tuple[str, str]], latent_dir: str,
                           encode_fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                           background: Sequence[float], batch_size: int = 16) -> int:
    """Encode the views of every cached object [(uid, npz path)] that has no latent file yet.

    Args:
        encode_fn: images [B, 3, H, W] in [0, 1] on ``device`` -> scaled latents [B, 4, H/8, W/8].
        batch_size: views per ``encode_fn`` call.

    Returns:
        the number of objects encoded.
    """
    from tqdm.auto import tqdm

    todo = [(u, p) for u, p in files if not os.path.exists(latent_file(latent_dir, u))]
    for uid, path in tqdm(todo, desc="encode latents", unit="obj", disable=not todo):
        imgs = torch.from_numpy(read_cached_object(path, background)["images"]).permute(0, 3, 1, 2)  # [Q, 3, H, W]
        lat = torch.cat([encode_fn(imgs[i:i + batch_size].to(device)).float().cpu()
                         for i in range(0, len(imgs), batch_size)])  # [Q, 4, h, w]
        with atomic_path(latent_file(latent_dir, uid)) as tmp, open(tmp, "wb") as f:
            np.save(f, lat.numpy().astype(np.float16))
    return len(todo)


def read_latents(latent_dir: str, uid: str) -> torch.Tensor:
    """[Q, 4, h, w] float32 latents of one object."""
    return torch.from_numpy(np.load(latent_file(latent_dir, uid)).astype(np.float32))
