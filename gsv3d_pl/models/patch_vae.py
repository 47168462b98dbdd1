"""PatchAutoencoder: a linear patch codec with AutoencoderKL's interface, the CPU miniature's image VAE.

Each non-overlapping p×p patch of the image (3·p² numbers in [-1, 1]) is encoded as C numbers by a learned
linear map and decoded by another; trained with MSE this converges to the patch PCA. Why not a small
``AutoencoderKL``: on the toy renders at 64², a 0.24M-parameter ×4 AutoencoderKL with 8 latent channels
reached 21.3 dB held-out after 200 CPU steps (minutes), while the ×4 patch PCA with 8 components
reconstructs 27.2 dB and trains in seconds (``docs/miniature.md``). The latents stay spatial
[C, H/p, W/p], as SD's, so SV3D's UNet and the GS decoder read them unchanged.

A diffusers ``ModelMixin`` + ``ConfigMixin``: ``save_pretrained`` writes ``config.json`` +
``diffusion_pytorch_model.safetensors`` and :class:`gsv3d_pl.models.VAE` loads the folder with
``from_pretrained``, as it loads SD's VAE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

__all__ = ["PatchAutoencoder", "DeterministicLatent"]


@dataclass
class DeterministicLatent:
    """AutoencoderKL's ``latent_dist`` for a deterministic code: ``mode() == sample() == mean``, ``kl() == 0``."""

    mean: Tensor  # [B, C, h, w]

    def mode(self) -> Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> Tensor:  # noqa: ARG002 - deterministic
        return self.mean

    def kl(self) -> Tensor:
        return self.mean.new_zeros(self.mean.shape[0])


@dataclass
class _EncoderOutput:
    latent_dist: DeterministicLatent


@dataclass
class _DecoderOutput:
    sample: Tensor


class PatchAutoencoder(ModelMixin, ConfigMixin):
    """Linear p×p patch encoder/decoder with ``encode(x).latent_dist`` / ``decode(z).sample`` like AutoencoderKL.

    Args:
        in_channels: image channels (3).
        patch_size: p, the downsampling factor (latents are [C, H/p, W/p]).
        latent_channels: C, numbers per patch.
        scaling_factor: the factor latents are multiplied by for diffusion (set at export to 1 / latent std).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, in_channels: int = 3, patch_size: int = 4, latent_channels: int = 8,
                 scaling_factor: float = 1.0):
        super().__init__()
        d = in_channels * patch_size**2
        if not 0 < latent_channels <= d:
            raise ValueError(f"PatchAutoencoder: latent_channels must be in [1, {d}] (= 3·patch_size²), "
                             f"got {latent_channels}")
        self.patch_size = patch_size
        # Orthonormal random init: a random projection already keeps what the patches' main directions carry.
        w = torch.linalg.qr(torch.randn(d, latent_channels))[0].T.contiguous()  # [C, d]
        self.encoder = nn.Conv2d(d, latent_channels, 1)
        self.decoder = nn.Conv2d(latent_channels, d, 1)
        with torch.no_grad():
            self.encoder.weight.copy_(w[:, :, None, None])
            self.decoder.weight.copy_(w.T[:, :, None, None])
            self.encoder.bias.zero_()
            self.decoder.bias.zero_()

    def encode(self, x: Tensor, return_dict: bool = True) -> _EncoderOutput:
        """x [B, 3, H, W] in [-1, 1] (H, W multiples of p) -> ``latent_dist`` with mean [B, C, H/p, W/p]."""
        z = self.encoder(F.pixel_unshuffle(x, self.patch_size))  # [B, C, H/p, W/p]
        return _EncoderOutput(DeterministicLatent(z))

    def decode(self, z: Tensor, return_dict: bool = True) -> _DecoderOutput:
        """z [B, C, h, w] (unscaled) -> ``sample`` [B, 3, p·h, p·w] in ~[-1, 1]."""
        return _DecoderOutput(F.pixel_shuffle(self.decoder(z), self.patch_size))

    @torch.no_grad()
    def init_pca(self, images: Tensor) -> None:
        """Set encoder/decoder to the patch PCA of ``images`` [M, 3, H, W] in [-1, 1]: the MSE optimum, reached in
        closed form (gradient descent alone is slow on the low-variance directions: 22.1 dB after 200 steps)."""
        x = F.pixel_unshuffle(images.float(), self.patch_size)  # [M, d, h, w]
        X = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).double()  # [M·h·w, d] patches
        mu = X.mean(0)  # [d]
        cov = (X - mu).T @ (X - mu) / max(1, X.shape[0] - 1)  # [d, d]
        _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
        V = vecs.flip(1)[:, : self.config.latent_channels].float()  # [d, C] principal directions
        mu = mu.float()
        self.encoder.weight.copy_(V.T[:, :, None, None])
        self.encoder.bias.copy_(-(V.T @ mu))  # z = Vᵀ(x − μ)
        self.decoder.weight.copy_(V[:, :, None, None])
        self.decoder.bias.copy_(mu)  # x̂ = V z + μ

    @property
    def downsample(self) -> int:
        return self.patch_size
