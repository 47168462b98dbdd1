"""GS decoder: N multi-view SV3D latents (+ cameras, + DINO tokens of the input view) -> pixel-aligned 3D Gaussians.

Architecture (Lyra / LGM / DiffSplat family; see ``docs/conventions.md`` for cameras and Gaussians):

1. **Tokens.** Each view's latent [4, h, w] is patchified (conv, stride ``patch_size``); its Plücker
   rays, computed at the *image* resolution (H = 8h), are embedded to the same token grid by a strided
   conv (stride 8·``patch_size``), and the two are summed. The rays carry pixel position and camera,
   so no extra positional embedding is needed.
2. **Body.** ``depth`` pre-LN transformer blocks: self-attention over the tokens of *all* N views
   (``F.scaled_dot_product_attention``), then cross-attention to the projected DINO tokens of the input
   view when ``dino_dim`` is set (``dino_dim=None`` builds no cross-attention parameters at all, the
   paper's "w/o DINO" ablation), then an MLP. Optional gradient checkpointing per block.
3. **Head.** Tokens go back to a per-view grid and are upsampled by ``patch_size · upsample`` with
   conv + PixelShuffle(2) stages to the output grid H' = h·upsample. A skip path at the output
   resolution (Plücker rays, and the latents bilinearly upsampled or read out per sub-pixel: ``latent_skip``)
   is fused in, which gives the head exact per-pixel ray information. A 1×1 conv emits 12 channels per pixel:
   depth 1, scale 3, opacity 1, rotation 4, colour 3. With ``cost_volume_depths = D`` (off by default), the skip
   path also reads a plane-sweep matching volume over the input views (:mod:`gsv3d_pl.models.cost_volume`) and
   the head emits D depth logits instead of 1 (D + 11 channels).
4. **Gaussians.** Pixel-aligned on each view's rays through pixel centres (u+0.5, v+0.5) at H'×W':
   mean = o + t·d with t = near + (far − near)·sigmoid(x) (distance along the ray; with the volume, t is the
   soft-argmax of the head's + the volume's logits over the D bin centres of [near, far]); by default
   [near, far] = [‖o‖ − r, ‖o‖ + r] with r = ``object_radius`` = 0.9 (objects are normalised to a unit
   box, whose bounding sphere has radius √3/2 ≈ 0.866), so any radius works; ``depth_range`` fixes it.
   Scales are exp(x + ln s₀) *pixels* (clamped) converted to world units at the Gaussian's distance
   (× t / f'), so the initial footprint is resolution-independent; opacity = sigmoid(x − 2);
   quaternions = normalise(x + (1, 0, 0, 0)) along the last dim; colour = sigmoid(x). The depth, scale
   and opacity rows of the last conv start small (×0.01) so training starts from a sphere of
   near-pixel-sized, low-opacity splats.

Output: :class:`~gsv3d_pl.gaussians.Gaussians` with batch [B] and G = N·H'·W' (view-major, then row-major).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gsv3d_pl.cameras import pixel_rays, plucker_rays
from gsv3d_pl.gaussians import Gaussians
from gsv3d_pl.models.cost_volume import MatchingVolume

__all__ = ["GSDecoder", "GS_DECODER_PRESETS"]

GS_DECODER_PRESETS: dict[str, dict] = {
    # CPU: 8² latents (64² images), 64 tokens per view; N=4 views -> 4 × 32² = 4096 Gaussians.
    "tiny": dict(dim=64, depth=2, num_heads=4, patch_size=1, dino_dim=64, upsample=4, head_channels=32),
    # Paper scale: 21 × 72² latents, patch 2 -> 21 × 36² = 27216 tokens; 21 × 144² ≈ 435k Gaussians.
    # dino_dim 384 = vit_small_patch14_dinov2 (DINOEncoder's default pretrained model).
    "base": dict(dim=768, depth=12, num_heads=12, patch_size=2, dino_dim=384, upsample=2, head_channels=64),
}

# Channel layout of the per-pixel head output.
_SPLIT = {"depth": 1, "scale": 3, "opacity": 1, "rotation": 4, "color": 3}


class _Attention(nn.Module):
    """Multi-head attention on [B, L, dim] queries and [B, S, dim] keys/values, via SDPA."""

    def __init__(self, dim: int, num_heads: int, cross: bool):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"GSDecoder: dim {dim} must be divisible by num_heads {num_heads}")
        self.h = num_heads
        self.cross = cross
        if cross:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, ctx: Tensor | None = None) -> Tensor:
        B, L, C = x.shape
        if self.cross:
            q = self.q(x)  # [B, L, C]
            k, v = self.kv(ctx).chunk(2, dim=-1)  # [B, S, C] each
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)  # [B, L, C] each
        q, k, v = (t.unflatten(-1, (self.h, C // self.h)).transpose(1, 2) for t in (q, k, v))  # [B, h, *, C/h]
        o = F.scaled_dot_product_attention(q, k, v)  # [B, h, L, C/h]
        return self.proj(o.transpose(1, 2).reshape(B, L, C))


class _Block(nn.Module):
    """Pre-LN block: self-attention over all views' tokens, optional cross-attention to DINO, MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, cross: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, num_heads, cross=False)
        if cross:
            self.norm_x = nn.LayerNorm(dim)
            self.cross_attn = _Attention(dim, num_heads, cross=True)
        else:
            self.cross_attn = None
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, ctx: Tensor | None) -> Tensor:
        x = x + self.attn(self.norm1(x))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_x(x), ctx)  # F_ViT <- CrossAttn(F_ViT, F_DINO)
        return x + self.mlp(self.norm2(x))


class _UpStage(nn.Module):
    """×2 upsampling: conv to 4·c_out, PixelShuffle(2), GroupNorm, SiLU, conv."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, 4 * c_out, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.norm = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.silu(self.norm(self.shuffle(self.conv(x))))
        return x + self.conv2(F.silu(x))


def _groups(c: int) -> int:
    for g in (8, 4, 2, 1):
        if c % g == 0:
            return g
    return 1


class GSDecoder(ModelMixin, ConfigMixin):
    """Latents of N views -> pixel-aligned Gaussians. See the module docstring for the design.

    A diffusers ``ConfigMixin``: the constructor arguments are recorded in ``self.config``, so a DecoderStage
    checkpoint can rebuild the decoder on its own (stage 2, ``gsv3d predict``), and ``save_pretrained`` /
    ``from_pretrained`` work as for any diffusers model.

    Args:
        latent_channels: VAE latent channels (4).
        dim, depth, num_heads, mlp_ratio: transformer width, blocks, heads, MLP expansion.
        patch_size: latent pixels per token side.
        dino_dim: channel width of the DINO tokens; None = no cross-attention (no parameters for it).
        upsample: output Gaussians per latent pixel side: H' = h·upsample (``patch_size·upsample`` must be
            a power of two).
        head_channels: channels of the last upsampling stage and of the output-resolution skip path.
        vae_factor: image pixels per latent pixel (8); K refers to the H = vae_factor·h image.
        object_radius: half-width of the default depth window around the camera distance ‖o‖.
        depth_range: fixed (near, far) distances along the ray instead of ‖o‖ ± object_radius.
        scale_init_px: initial Gaussian scale in output pixels; scale_range_px: its clamp.
        gradient_checkpointing: recompute each transformer block in backward (saves activation memory).
        latent_skip: how the output-resolution skip path sees the latents: "bilinear" (interpolated) or "shuffle"
            (a learned 1×1 conv + PixelShuffle(upsample): each output pixel gets its own linear read-out of its
            latent pixel, which is what a patch VAE's decoder does).
        cost_volume_depths: D candidate depths of a plane-sweep matching volume over the input views
            (:class:`~gsv3d_pl.models.cost_volume.MatchingVolume`, MVSplat's idea): the head then emits D depth
            logits, added to the volume's, and a Gaussian's distance is their soft-argmax over the D bin centres of
            its depth window; the volume's logits also enter the skip path. None = off (the paper's decoder).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 4,
        dim: int = 64,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        patch_size: int = 1,
        dino_dim: int | None = 64,
        upsample: int = 4,
        head_channels: int = 32,
        vae_factor: int = 8,
        object_radius: float = 0.9,
        depth_range: tuple[float, float] | None = None,
        scale_init_px: float = 0.7,
        scale_range_px: tuple[float, float] = (0.02, 32.0),
        gradient_checkpointing: bool = False,
        latent_skip: str = "bilinear",
        cost_volume_depths: int | None = None,
    ):
        super().__init__()
        total_up = patch_size * upsample
        if total_up < 1 or total_up & (total_up - 1):
            raise ValueError(f"GSDecoder: patch_size * upsample must be a power of two, got {patch_size} * {upsample}")
        if depth_range is not None and not (0 < depth_range[0] < depth_range[1]):
            raise ValueError(f"GSDecoder: depth_range must be 0 < near < far, got {depth_range}")
        self.latent_channels, self.dim, self.patch_size = latent_channels, dim, patch_size
        self.dino_dim = dino_dim
        self.upsample, self.vae_factor = upsample, vae_factor
        self.object_radius = float(object_radius)
        self.depth_range = tuple(depth_range) if depth_range is not None else None
        self.log_scale_init = math.log(scale_init_px)
        self.log_scale_range = (math.log(scale_range_px[0]), math.log(scale_range_px[1]))
        self.gradient_checkpointing = gradient_checkpointing

        self.patch_embed = nn.Conv2d(latent_channels, dim, patch_size, stride=patch_size)
        self.ray_embed = nn.Conv2d(6, dim, vae_factor * patch_size, stride=vae_factor * patch_size)
        if dino_dim is not None:
            self.dino_proj = nn.Sequential(nn.LayerNorm(dino_dim), nn.Linear(dino_dim, dim))
        else:
            self.dino_proj = None
        self.blocks = nn.ModuleList(_Block(dim, num_heads, mlp_ratio, cross=dino_dim is not None) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim)

        # Upsampler: log2(total_up) ×2 stages, halving channels down to head_channels.
        n_up = int(math.log2(total_up))
        chans = [dim] + [max(head_channels, dim // 2 ** (i + 1)) for i in range(n_up)]
        self.up = nn.Sequential(*(_UpStage(chans[i], chans[i + 1]) for i in range(n_up)))
        self.up_proj = nn.Conv2d(chans[-1], head_channels, 1)
        # Output-resolution skip path: Plücker rays (6) + the latents brought to the output grid.
        if latent_skip not in ("bilinear", "shuffle"):
            raise ValueError(f"GSDecoder: latent_skip must be 'bilinear' or 'shuffle', got {latent_skip!r}")
        self.latent_skip = latent_skip
        if latent_skip == "shuffle":
            if upsample < 2 or upsample & (upsample - 1):
                raise ValueError(f"GSDecoder: latent_skip='shuffle' needs upsample a power of two >= 2, got {upsample}")
            # A learned sub-pixel read-out: each latent pixel -> its upsample² output pixels (the inverse of a
            # patch encoder's pixel-unshuffle), instead of interpolating between neighbouring latents.
            self.latent_up = nn.Sequential(nn.Conv2d(latent_channels, latent_channels * upsample**2, 1),
                                           nn.PixelShuffle(upsample))
        else:
            self.latent_up = None
        if cost_volume_depths is not None:
            if int(cost_volume_depths) < 2:
                raise ValueError(f"GSDecoder: cost_volume_depths (the matching volume's num_depths) must be >= 2 or "
                                 f"null (no volume), got {cost_volume_depths}")
            self.matching = MatchingVolume(latent_channels, int(cost_volume_depths))
            n_depth = int(cost_volume_depths)
        else:
            self.matching = None
            n_depth = 1
        self._split = {**_SPLIT, "depth": n_depth}
        self.skip = nn.Sequential(nn.Conv2d(6 + latent_channels + (n_depth if self.matching else 0), head_channels, 3,
                                            padding=1), nn.SiLU(),
                                  nn.Conv2d(head_channels, head_channels, 3, padding=1))
        self.fuse = nn.Sequential(nn.SiLU(), nn.Conv2d(2 * head_channels, head_channels, 3, padding=1), nn.SiLU())
        self.head = nn.Conv2d(head_channels, sum(self._split.values()), 1)
        self._init_weights()

    @classmethod
    def from_preset(cls, preset: str = "tiny", **overrides) -> GSDecoder:
        """Build a preset ("tiny" or "base"), any constructor argument overridden."""
        if preset not in GS_DECODER_PRESETS:
            raise ValueError(f"GSDecoder: unknown preset {preset!r}; choose one of {sorted(GS_DECODER_PRESETS)}")
        return cls(**{**GS_DECODER_PRESETS[preset], **overrides})

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            w, b = self.head.weight, self.head.bias  # [D + 11, c, 1, 1], [D + 11] (D = 1 without a volume)
            b.zero_()
            w[: self._split["depth"] + 4] *= 0.01  # depth (D rows), scale ×3, opacity

    # ------------------------------------------------------------------ forward

    def forward(self, latents: Tensor, c2w: Tensor, K: Tensor, dino_tokens: Tensor | None = None) -> Gaussians:
        """Decode Gaussians.

        Args:
            latents: [B, N, C, h, w] scaled VAE latents of N views.
            c2w: [B, N, 4, 4] OpenCV camera-to-world of those views.
            K: [B, N, 3, 3] intrinsics of the full-resolution images (H = vae_factor·h).
            dino_tokens: [B, T, dino_dim] DINO patch tokens of the input view; required iff dino_dim is set.
        Returns:
            Gaussians with batch [B], G = N·H'·W' (H' = h·upsample): means [B, G, 3], quats [B, G, 4],
            scales [B, G, 3], opacities [B, G], colors [B, G, 3], all float32.
        """
        B, N, C, h, w = latents.shape
        p = self.patch_size
        if C != self.latent_channels or h % p or w % p:
            raise ValueError(f"GSDecoder: latents must be [B, N, {self.latent_channels}, h, w] with h, w multiples of "
                             f"patch_size {p}, got {tuple(latents.shape)}")
        if c2w.shape != (B, N, 4, 4) or K.shape != (B, N, 3, 3):
            raise ValueError(f"GSDecoder: c2w must be [B, N, 4, 4] and K [B, N, 3, 3] with (B, N) = {(B, N)}, got "
                             f"{tuple(c2w.shape)} and {tuple(K.shape)}")
        if (self.dino_dim is None) != (dino_tokens is None):
            raise ValueError("GSDecoder: dino_tokens must be given iff dino_dim is set "
                             f"(dino_dim={self.dino_dim}, dino_tokens={'None' if dino_tokens is None else 'given'})")
        H, W = h * self.vae_factor, w * self.vae_factor  # image resolution K refers to
        Ho, Wo = h * self.upsample, w * self.upsample  # output (Gaussian) grid
        dt = self.patch_embed.weight.dtype
        c2w, K = c2w.float(), K.float()

        # 1. tokens
        z = latents.flatten(0, 1).to(dt)  # [BN, C, h, w]
        rays = plucker_rays(c2w, K, W, H).flatten(0, 1).to(dt)  # [BN, 6, H, W]
        tok = self.patch_embed(z) + self.ray_embed(rays)  # [BN, dim, h/p, w/p]
        gh, gw = tok.shape[-2:]
        x = tok.flatten(2).transpose(1, 2).reshape(B, N * gh * gw, self.dim)  # [B, L, dim], L = N·gh·gw
        ctx = None
        if self.dino_proj is not None:
            if dino_tokens.ndim != 3 or dino_tokens.shape[0] != B or dino_tokens.shape[-1] != self.dino_dim:
                raise ValueError(f"GSDecoder: dino_tokens must be [B, T, {self.dino_dim}], got {tuple(dino_tokens.shape)}")
            ctx = self.dino_proj(dino_tokens.to(dt))  # [B, T, dim]

        # 2. transformer over all views' tokens
        for blk in self.blocks:
            # Whenever gradients flow through the block, not only in training mode: stage 2 backpropagates
            # through the frozen decoder (eval mode, no trainable weights) into the LoRA via the latents.
            if self.gradient_checkpointing and torch.is_grad_enabled() and x.requires_grad:
                x = checkpoint(blk, x, ctx, use_reentrant=False)
            else:
                x = blk(x, ctx)
        x = self.norm_out(x)  # [B, L, dim]

        # 3. head at the output resolution
        f = x.reshape(B * N, gh * gw, self.dim).transpose(1, 2).reshape(B * N, self.dim, gh, gw)  # [BN, dim, gh, gw]
        f = self.up_proj(self.up(f))  # [BN, hc, Ho, Wo]
        s = Wo / W  # image pixels -> output pixels
        K_out = K.clone()
        K_out[..., :2, :] *= s  # fx, fy, cx, cy scaled: pixel centres stay at u + 0.5 in the output grid
        rays_o = plucker_rays(c2w, K_out, Wo, Ho).flatten(0, 1).to(dt)  # [BN, 6, Ho, Wo]
        if self.latent_up is not None:
            z_up = self.latent_up(z)  # [BN, C, Ho, Wo]
        else:
            z_up = F.interpolate(z, size=(Ho, Wo), mode="bilinear", align_corners=False)  # [BN, C, Ho, Wo]
        origins, dirs, _ = pixel_rays(c2w, K_out, Wo, Ho)  # [B, N, Ho, Wo, 3] each
        origins, dirs = origins.reshape(B, -1, 3), dirs.reshape(B, -1, 3)  # [B, G, 3]
        near, far = self._depth_window(origins)  # [B, G, 1] each
        skip_in = [rays_o, z_up]
        if self.matching is not None:
            D = self.matching.num_depths
            bins = (torch.arange(D, device=near.device, dtype=near.dtype) + 0.5) / D  # [D] bin centres in (0, 1)
            t_k = near + (far - near) * bins  # [B, G, D] candidate distances
            pts = origins[:, :, None] + t_k[..., None] * dirs[:, :, None]  # [B, G, D, 3]
            pts = pts.reshape(B, N, Ho, Wo, D, 3).permute(0, 1, 4, 2, 3, 5)  # [B, N, D, Ho, Wo, 3]
            cost = self.matching(latents, c2w, K, pts, (H, W))  # [B, N, D, Ho, Wo]
            skip_in.append(cost.flatten(0, 1).to(dt))
        f = self.fuse(torch.cat([f, self.skip(torch.cat(skip_in, dim=1))], dim=1))  # [BN, hc, Ho, Wo]
        out = self.head(f).float()  # [BN, D + 11, Ho, Wo]
        out = out.reshape(B, N, -1, Ho, Wo).permute(0, 1, 3, 4, 2).reshape(B, N * Ho * Wo, -1)  # [B, G, D + 11]
        x_d, x_s, x_o, x_r, x_c = out.split(list(self._split.values()), dim=-1)

        # 4. pixel-aligned Gaussians
        if self.matching is not None:
            logits = x_d + cost.float().permute(0, 1, 3, 4, 2).reshape(B, N * Ho * Wo, D)  # [B, G, D]
            t = (torch.softmax(logits, dim=-1) * t_k).sum(-1, keepdim=True)  # [B, G, 1] soft-argmax distance
        else:
            t = near + (far - near) * torch.sigmoid(x_d)  # [B, G, 1] distance along the ray
        means = origins + t * dirs  # [B, G, 3]
        focal = K_out[..., 0, 0].reshape(B, N, 1).expand(B, N, Ho * Wo).reshape(B, -1, 1)  # [B, G, 1]
        log_px = (x_s + self.log_scale_init).clamp(*self.log_scale_range)  # [B, G, 3]
        scales = log_px.exp() * t / focal  # [B, G, 3] world units
        opacities = torch.sigmoid(x_o[..., 0] - 2.0)  # [B, G]
        quats = F.normalize(x_r + x_r.new_tensor([1.0, 0.0, 0.0, 0.0]), dim=-1)  # [B, G, 4] wxyz
        colors = torch.sigmoid(x_c)  # [B, G, 3]
        return Gaussians(means, quats, scales, opacities, colors)

    def _depth_window(self, origins: Tensor) -> tuple[Tensor, Tensor]:
        """[near, far] distances along each ray, [B, G, 1] each, for ray origins [B, G, 3]."""
        if self.depth_range is not None:
            near = torch.full_like(origins[..., :1], self.depth_range[0])
            return near, torch.full_like(near, self.depth_range[1])
        dist = origins.norm(dim=-1, keepdim=True)  # camera distance to the origin
        return (dist - self.object_radius).clamp_min(0.05), dist + self.object_radius

    def num_gaussians(self, num_views: int, h: int, w: int) -> int:
        """G for N views of h×w latents."""
        return num_views * h * self.upsample * w * self.upsample
