"""LoRA folded into the base weights for the sampler's steps without autograd: the same function, the base
weights restored bit for bit, and refused where a gradient is wanted."""

from __future__ import annotations

import pytest
import torch

from gsv3d_pl.models import SV3D
from gsv3d_pl.models.lora_fold import active_lora_layers, lora_folded, lora_off

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2")


@pytest.fixture(scope="module")
def sv3d():
    torch.manual_seed(0)
    s = SV3D("tiny")
    s.add_lora(rank=4, target_modules=TARGETS)  # linear and convolution adapters alike
    with torch.no_grad():
        for n, p in s.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return s


def inputs(s):
    g = torch.Generator().manual_seed(1)
    B, F = 1, 21
    return (torch.randn(B, 1, s.unet.config.cross_attention_dim, generator=g), torch.randn(B, 4, 8, 8, generator=g),
            torch.rand(B, F, generator=g), torch.rand(B, F, generator=g))


def test_folded_adapter_is_the_same_function_and_restores_the_weights(sv3d):
    x = torch.randn(1, 21, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([3.0])
    before = {n: p.detach().clone() for n, p in sv3d.unet.named_parameters()}
    n_layers = len(active_lora_layers(sv3d.unet))
    assert n_layers > 0
    with torch.no_grad():
        ref = sv3d.denoise(x, sigma, *inputs(sv3d), torch.tensor([1e-5]))
        with lora_off(sv3d.unet):
            base = sv3d.denoise(x, sigma, *inputs(sv3d), torch.tensor([1e-5]))
        with lora_folded(sv3d.unet):
            assert not active_lora_layers(sv3d.unet)  # the layers now run their (folded) base layer only
            folded = sv3d.denoise(x, sigma, *inputs(sv3d), torch.tensor([1e-5]))
    torch.testing.assert_close(folded, ref, rtol=1e-4, atol=1e-4)
    assert (ref - base).abs().max() > 1e-3  # the adapter does something, so the match above means something
    assert len(active_lora_layers(sv3d.unet)) == n_layers
    for n, p in sv3d.unet.named_parameters():
        assert torch.equal(p, before[n]), n  # swapped back, not subtracted: no rounding drift


def test_sampling_folds_only_the_steps_without_autograd(sv3d):
    clip, lat, pol, azi = inputs(sv3d)
    kw = dict(num_steps=4, generator=None, progress=False)
    noise = torch.randn(1, 21, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        fast = sv3d.sample(clip, lat, pol, azi, latents=noise, **kw)
    trace = []
    slow = sv3d.sample(clip, lat, pol, azi, latents=noise, grad_last=4, trace=trace, **kw)  # every step unfolded
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-4, atol=1e-4)
    part = sv3d.sample(clip, lat, pol, azi, latents=noise, grad_last=2, **kw)
    assert part.requires_grad
    part.float().pow(2).mean().backward()
    grads = [p.grad for n, p in sv3d.unet.named_parameters() if "lora_" in n]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    sv3d.unet.zero_grad(set_to_none=True)


def test_folding_is_refused_with_autograd_on(sv3d):
    with pytest.raises(RuntimeError, match="no_grad"):
        with lora_folded(sv3d.unet):
            pass
