"""LoRA adapters folded into their base weights for forward passes without autograd.

A PEFT LoRA layer computes ``W x + B(A x)·s``: three matmuls where the base layer needs one. In SV3D's sampler
most steps run without a graph (the whole evaluation; DRaFT-K's first S − K steps), so there the adapter's ΔW =
s·B·A is added to W once and the layer runs as a plain one. On this project's CPU miniature that is about a
third of the adapted UNet's forward time.

Unlike PEFT's ``merge()`` / ``unmerge()``, which subtract ΔW again (and so let the frozen base weights drift by
rounding each time), the base weight tensors are swapped back unchanged on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["active_lora_layers", "lora_folded", "lora_off"]


def active_lora_layers(module: nn.Module) -> list[nn.Module]:
    """The PEFT LoRA layers of ``module`` whose adapters are on (not disabled, not already merged)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no PEFT: no adapters
        return []
    return [m for m in module.modules() if isinstance(m, LoraLayer) and not m.disable_adapters and not m.merged
            and any(a in m.lora_A for a in m.active_adapters)]


@contextlib.contextmanager
def lora_folded(module: nn.Module) -> Iterator[None]:
    """Within: every active LoRA adapter of ``module`` is folded into its base layer (same function, one matmul).

    Only for passes without autograd: the adapters' own parameters are not used inside, so no gradient reaches
    them (entering with grad mode on is refused)."""
    if torch.is_grad_enabled():
        raise RuntimeError("lora_folded: the adapters receive no gradient while folded; use it under torch.no_grad()")
    layers = active_lora_layers(module)
    saved: list[tuple[nn.Module, torch.Tensor]] = []
    try:
        for m in layers:
            base = m.get_base_layer()
            delta = sum(m.get_delta_weight(a) for a in m.active_adapters if a in m.lora_A)
            saved.append((m, base.weight.data))
            base.weight.data = base.weight.data + delta.to(base.weight.dtype)  # a new tensor: the original is kept
            m._disable_adapters = True  # the layer now runs its (folded) base layer only
        yield
    finally:
        for m, w in saved:
            m.get_base_layer().weight.data = w
            m._disable_adapters = False


@contextlib.contextmanager
def lora_off(module: nn.Module) -> Iterator[None]:
    """Within: every active LoRA adapter of ``module`` is skipped (the base model); on again on exit.

    Unlike diffusers' ``disable_adapters()`` / ``enable_adapters()`` this touches only the adapters that were on,
    and never their ``requires_grad``."""
    layers = active_lora_layers(module)
    try:
        for m in layers:
            m._disable_adapters = True
        yield
    finally:
        for m in layers:
            m._disable_adapters = False
