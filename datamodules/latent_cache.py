"""The latent cache: frozen-VAE latents of every cached view, encoded once and read back per sample.

Layout: ``<render cache>/latents/<key>/<name[:2]>/<name>.npy``, one [Q, 4, h, w] float16 array per object, where
``key`` names the VAE weights and the background the views were composited on (both change the latents), and
``name`` is the uid or its escaped form (:func:`datamodules.sources.uid_filename`).

A latent file that does not read back (:func:`check_latent_file`: its header, and a size that matches it) counts as
missing: :func:`encode_missing_latents` encodes it again, and ``gsv3d data prepare`` (which builds no VAE) removes
it (:func:`remove_corrupt_latents`) so that the next training run does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

from datamodules.render_cache import REPAIR_HINT, cache_read_error, read_cached_object
from datamodules.sources import uid_filename
from gsv3d_pl.io import atomic_path

log = logging.getLogger(__name__)

__all__ = ["latent_key", "latent_file", "check_latent_file", "remove_corrupt_latents", "encode_missing_latents",
           "read_latents"]


def latent_key(vae_key: str, background: Sequence[float]) -> str:
    """Folder name of one latent cache: the VAE's weight hash and a tag of the background colour."""
    bg_tag = hashlib.sha1(json.dumps(list(background)).encode()).hexdigest()[:6]
    return f"{vae_key}_bg{bg_tag}"


def latent_file(latent_dir: str, uid: str) -> str:
    name = uid_filename(uid)
    return os.path.join(latent_dir, name[:2], f"{name}.npy")


def check_latent_file(path: str) -> str | None:
    """Why one latent file does not read back, or None when it does: reads its header only and compares the file's
    size with the header's shape and dtype (a truncated copy, a half-written file of an older version)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            expected = f.tell() + math.prod(shape) * dtype.itemsize
            size = os.fstat(f.fileno()).st_size
    except Exception as e:  # ValueError (bad magic or header), OSError, EOFError
        return f"{type(e).__name__}: {e}"
    if dtype.hasobject or len(shape) != 4:
        return f"not a [Q, 4, h, w] array (shape {shape}, dtype {dtype})"
    if size != expected:
        return f"{size} bytes where its header needs {expected}"
    return None


def remove_corrupt_latents(cache_path: str) -> list[str]:
    """Delete every latent file under ``<cache_path>/latents/`` that does not read back; returns their paths.

    ``data prepare`` builds no VAE, so it cannot encode them; the next run that caches latents encodes them again.
    """
    removed = []
    root = os.path.join(cache_path, "latents")
    for dirpath, _, names in os.walk(root):
        for n in names:
            path = os.path.join(dirpath, n)
            if n.endswith(".npy") and not n.startswith(".tmp_"):  # .tmp_*: another process is writing it
                why = check_latent_file(path)
                if why is not None:
                    log.warning("cached latents %s do not read back (%s): removed, the next run encodes them", path,
                                why)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                    removed.append(path)
    return removed


@torch.no_grad()
def encode_missing_latents(files: Sequence[tuple[str, str]], latent_dir: str,
                           encode_fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                           background: Sequence[float], batch_size: int = 16) -> int:
    """Encode the views of every cached object [(uid, npz path)] whose latent file is missing or does not read back.

    Args:
        encode_fn: images [B, 3, H, W] in [0, 1] on ``device`` -> scaled latents [B, 4, H/8, W/8].
        batch_size: views per ``encode_fn`` call.

    Returns:
        the number of objects encoded.

    Raises:
        RuntimeError: a cached object does not read (names the file and the command that repairs it).
    """
    from tqdm.auto import tqdm

    todo = []
    for u, p in files:
        out = latent_file(latent_dir, u)
        if os.path.exists(out):
            why = check_latent_file(out)
            if why is None:
                continue
            log.warning("cached latents %s do not read back (%s): encoding them again", out, why)
        todo.append((u, p))
    for uid, path in tqdm(todo, desc="encode latents", unit="obj", disable=not todo):
        try:
            views = read_cached_object(path, background)["images"]
        except Exception as e:
            raise cache_read_error(path, uid, e) from e
        imgs = torch.from_numpy(views).permute(0, 3, 1, 2)  # [Q, 3, H, W]
        lat = torch.cat([encode_fn(imgs[i:i + batch_size].to(device)).float().cpu()
                         for i in range(0, len(imgs), batch_size)])  # [Q, 4, h, w]
        with atomic_path(latent_file(latent_dir, uid)) as tmp, open(tmp, "wb") as f:
            np.save(f, lat.numpy().astype(np.float16))
    return len(todo)


def read_latents(latent_dir: str, uid: str) -> torch.Tensor:
    """[Q, 4, h, w] float32 latents of one object.

    Raises:
        RuntimeError: the file does not read (names it and the command that repairs it).
    """
    path = latent_file(latent_dir, uid)
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # ValueError "Failed to read all data for array", OSError, EOFError
        raise RuntimeError(f"cannot read the cached latents of {uid} in {path} ({type(e).__name__}: {e}). Repair the "
                           f"cache with `{REPAIR_HINT}`: it removes latents that do not read back, and the next "
                           "run encodes them again.") from e
    return torch.from_numpy(arr.astype(np.float32))
