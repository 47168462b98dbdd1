"""A plane-sweep matching volume over the input views: where along each Gaussian's ray the other views agree.

A pixel-aligned decoder must place every Gaussian at a depth along its pixel's ray. Learning that from rendering
losses alone is slow for a small network: it has to discover multi-view correspondence by itself. MVSplat
(Chen et al., ECCV 2024) builds it in: sample D candidate depths along each ray, project each candidate into the
other views, and compare what those views see there with what this view sees. The true depth is where the
views agree (and, on a white-background object, where no other view sees background: a soft visual hull).

Here the comparison is done on the VAE latents (the decoder's only image input), unrectified, for any cameras:

- For view n, pixel (u, v) of the Gaussian grid and candidate k, the point P = o + t_k·d is projected into
  every view m; the latents of m are sampled there (bilinear). s_n is view n's own latent at (u, v).
- Per candidate, the features are s_n, the mean of the other views' samples, and the min / mean over the other
  views of the squared latent difference mean_c (s_m − s_n)², plus the fraction of views that see P at all.
- A 1×1 MLP maps them to one logit per candidate: [B, N, D, H', W'].

The features depend only on the inputs (latents, cameras), so they are built without gradient; only the MLP
trains. Off by default (``GSDecoder(cost_volume_depths=None)``): the paper's decoder has no such volume.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["MatchingVolume"]

_FAR = 4.0  # squared-difference stand-in for "no other view sees this point" (latents are ~unit variance)


class MatchingVolume(nn.Module):
    """Matching logits of ``num_depths`` candidate depths per output pixel of every view.

    Args:
        latent_channels: C of the latents.
        num_depths: D candidates, spread uniformly (bin centres) over each ray's depth window.
        hidden: width of the per-candidate MLP.
    """

    def __init__(self, latent_channels: int, num_depths: int, hidden: int = 32):
        super().__init__()
        if num_depths < 2:
            raise ValueError(f"MatchingVolume: num_depths must be >= 2, got {num_depths}")
        self.num_depths = num_depths
        self.mlp = nn.Sequential(nn.Conv2d(2 * latent_channels + 3, hidden, 1), nn.SiLU(), nn.Conv2d(hidden, 1, 1))

    @torch.no_grad()
    def features(self, latents: Tensor, c2w: Tensor, K: Tensor, points: Tensor, image_size: tuple[int, int]) -> Tensor:
        """Per-candidate matching features [B, N, 2C + 3, D, H', W'].

        Args:
            latents: [B, N, C, h, w] latents of the N views (they span the H×W image of ``K``).
            c2w: [B, N, 4, 4] OpenCV camera-to-world; K: [B, N, 3, 3] intrinsics at the image size H×W.
            points: [B, N, D, H', W', 3] the candidate points of every view's Gaussian grid.
            image_size: (H, W) of the images ``K`` refers to.
        """
        B, N, C, h, w = latents.shape
        D, Ho, Wo = points.shape[2:5]
        H, W = image_size
        z = latents.float()
        own = F.interpolate(z.flatten(0, 1), size=(Ho, Wo), mode="bilinear", align_corners=False)  # [BN, C, Ho, Wo]
        own = own.reshape(B, N, C, 1, Ho, Wo)
        w2c = torch.linalg.inv(c2w.float())  # [B, N, 4, 4]
        pts = points.float().reshape(B, N * D * Ho * Wo, 3)  # [B, P, 3]
        d_min = torch.full((B, N, D, Ho, Wo), _FAR, device=z.device)
        d_sum = torch.zeros(B, N, D, Ho, Wo, device=z.device)
        s_sum = torch.zeros(B, N, C, D, Ho, Wo, device=z.device)
        seen = torch.zeros(B, N, D, Ho, Wo, device=z.device)
        for m in range(N):
            cam = pts @ w2c[:, m, :3, :3].transpose(1, 2) + w2c[:, m, None, :3, 3]  # [B, P, 3] in camera m
            zc = cam[..., 2]
            uv = cam[..., :2] / zc.clamp_min(1e-6)[..., None] @ K[:, m, :2, :2].transpose(1, 2).float() \
                + K[:, m, None, :2, 2].float()  # [B, P, 2] pixels
            grid = torch.stack([uv[..., 0] / W, uv[..., 1] / H], -1) * 2 - 1  # [B, P, 2] in [-1, 1]
            ok = (zc > 0.05) & (grid.abs() <= 1).all(-1)  # [B, P]
            s = F.grid_sample(z[:, m], grid[:, None], mode="bilinear", padding_mode="border",
                              align_corners=False)  # [B, C, 1, P]
            s = s.reshape(B, C, N, D, Ho, Wo).transpose(1, 2)  # [B, N, C, D, Ho, Wo]
            ok = ok.reshape(B, N, D, Ho, Wo).float()
            ok[:, m] = 0.0  # view m is one of the "other views" of every n != m only
            diff = (s - own).square().mean(2)  # [B, N, D, Ho, Wo]
            d_min = torch.where(ok > 0, torch.minimum(d_min, diff), d_min)
            d_sum += ok * diff
            s_sum += ok[:, :, None] * s
            seen += ok
        cnt = seen.clamp_min(1.0)
        d_mean = torch.where(seen > 0, d_sum / cnt, torch.full_like(d_sum, _FAR))
        s_mean = s_sum / cnt[:, :, None]
        frac = seen / max(N - 1, 1)
        own = own.expand(B, N, C, D, Ho, Wo)
        return torch.cat([own, s_mean, d_min[:, :, None], d_mean[:, :, None], frac[:, :, None]], dim=2)

    def forward(self, latents: Tensor, c2w: Tensor, K: Tensor, points: Tensor, image_size: tuple[int, int]) -> Tensor:
        """Matching logits [B, N, D, H', W'] (arguments as :meth:`features`)."""
        f = self.features(latents, c2w, K, points, image_size)  # [B, N, F, D, Ho, Wo]
        B, N, Fc, D, Ho, Wo = f.shape
        x = f.to(self.mlp[0].weight.dtype).permute(0, 1, 3, 2, 4, 5).reshape(B * N * D, Fc, Ho, Wo)
        return self.mlp(x).reshape(B, N, D, Ho, Wo)
