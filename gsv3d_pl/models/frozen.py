"""Frozen weights: the one ``freeze`` and the one weight fingerprint.

Frozen modules (the encoders, stage 2's decoder and base UNet) are never written into checkpoints: their
weights always come from the config (a pretrained file, or a ``tiny`` preset's fixed-seed init) or from the
stage-1 checkpoint. :func:`fingerprint` identifies those weights, so that a checkpoint can record which
encoders it was trained with, and the latent cache can tell two VAEs apart.
"""

from __future__ import annotations

import hashlib
from typing import TypeVar

import torch
from torch import nn

__all__ = ["freeze", "fingerprint", "is_frozen"]

M = TypeVar("M", bound=nn.Module)


def freeze(module: M | None) -> M | None:
    """``eval()`` + ``requires_grad_(False)``; returns the module (None passes through)."""
    if module is not None:
        module.eval()
        module.requires_grad_(False)
    return module


def is_frozen(module: nn.Module) -> bool:
    """True when no parameter of ``module`` trains (a module without parameters counts as frozen)."""
    return not any(p.requires_grad for p in module.parameters())


def fingerprint(module: nn.Module | None, extra: object = None) -> str | None:
    """16-hex identity of a module's weights: class, every parameter and buffer (name, shape, dtype, fp64 sum,
    sum of squares and the first values), and ``extra`` (e.g. a VAE's scaling factor). None for None.

    Statistics instead of raw bytes keep it cheap for a 1.5B-parameter UNet; two random or pretrained
    initialisations never share them.
    """
    if module is None:
        return None
    h = hashlib.sha1(f"{type(module).__qualname__}|{extra!r}".encode())
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    with torch.no_grad():
        for name, t in sorted(tensors.items()):
            if not torch.is_tensor(t) or t.is_meta:
                continue
            t = t.detach()
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            if t.numel():
                d = t.cpu().double()  # on the CPU: CUDA and CPU reductions differ in the last bits
                stats = torch.stack([d.sum(), d.square().sum(), *d.flatten()[:4]]).cpu()  # [<= 6]
                h.update(stats.numpy().round(6).tobytes())
    return h.hexdigest()[:16]
