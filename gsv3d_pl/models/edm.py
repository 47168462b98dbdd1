"""EDM preconditioning and SV3D's triangle classifier-free guidance: the diffusion maths of :mod:`gsv3d_pl.models.sv3d`,
kept apart from the UNet and its weights."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["EDMPreconditioner", "triangle_cfg_scales"]


class EDMPreconditioner(nn.Module):
    """EDM preconditioning with sigma_data = 1 and SVD's v-parameterisation sign.

    c_in = 1/√(σ²+1), c_skip = 1/(σ²+1), c_out = −σ/√(σ²+1), c_noise = ¼·ln σ, and
    D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise). Training σ ~ exp(N(p_mean, p_std)), loss weight
    (σ²+1)/σ² (which makes the effective target the unit-variance v of the network output).
    """

    def __init__(self, p_mean: float = 0.7, p_std: float = 1.6):
        super().__init__()
        self.p_mean = float(p_mean)
        self.p_std = float(p_std)

    @staticmethod
    def scalings(sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise), each shaped like ``sigma``."""
        sigma = sigma.float()
        s2 = sigma**2 + 1.0
        return 1.0 / s2, -sigma / s2.sqrt(), 1.0 / s2.sqrt(), 0.25 * sigma.log()

    def sample_sigma(self, n: int, device=None, generator: torch.Generator | None = None) -> Tensor:
        """[n] training noise levels, log-normal(p_mean, p_std)."""
        dev = generator.device if generator is not None else device
        z = torch.randn(n, generator=generator, device=dev)
        return (self.p_mean + self.p_std * z).exp().to(device)

    @staticmethod
    def loss_weight(sigma: Tensor) -> Tensor:
        """EDM weight λ(σ) = (σ²+1)/σ² for sigma_data = 1."""
        sigma = sigma.float()
        return (sigma**2 + 1.0) / sigma**2


def triangle_cfg_scales(num_frames: int, min_scale: float = 1.0, max_scale: float = 2.5) -> Tensor:
    """SV3D's triangle CFG: [F] scales rising linearly from ``min_scale`` (frame 0) to ``max_scale``
    (middle frame) and back to ``min_scale`` (last frame, the input view)."""
    x = torch.linspace(0.0, 1.0, num_frames, dtype=torch.float64)
    tri = 1.0 - (2.0 * x - 1.0).abs()  # 0 -> 1 -> 0
    return (min_scale + (max_scale - min_scale) * tri).float()  # [F]
