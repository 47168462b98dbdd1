"""Frozen encoders: the SD image VAE, the open_clip image embedder and DINOv2.

Every encoder is a :class:`FrozenModule`: ``eval()`` forever and ``requires_grad_(False)``. The stages
save only what trains, so encoders never enter a checkpoint, and their weights always come from the preset:
the pretrained files, or for ``tiny`` a random init from the preset's own fixed seed (identical in every
process: stage 1, stage 2, predict, every DDP rank; :meth:`FrozenModule.weights_key` tells weights apart).

Presets:

- ``tiny``: random initialisation, CPU-fast, no files.
- ``pretrained``: local files only (``path`` or the standard caches), resolved through
  :mod:`gsv3d_pl.weights`; a missing file raises :class:`~gsv3d_pl.weights.MissingWeightsError` at
  construction, naming the config key, the expected file and where to get it.

Images enter every encoder as float RGB in [0, 1], channels-first [B, 3, H, W].
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsv3d_pl.hub import hub_path
from gsv3d_pl.models.frozen import fingerprint, freeze
from gsv3d_pl.weights import HubFile, WeightSpec, require_files, resolve

__all__ = [
    "FrozenModule",
    "VAE",
    "CLIPImageEmbedder",
    "DINOEncoder",
    "TINY_CLIP_MODEL",
    "TINY_VAE_CONFIG",
    "autoencoder_downsample",
]

_PRESETS = ("tiny", "pretrained")


@contextlib.contextmanager
def tiny_init_seed(seed: int):
    """Draw a tiny preset's random init from its own fixed seed, independent of the global RNG state.

    Frozen tiny components (VAE, CLIP, DINO, the SV3D UNet under LoRA) are not stored in checkpoints,
    so every process that builds them — stage 1, stage 2, predict, every DDP rank — must get the same
    weights regardless of construction order or ``seed_everything``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _check_preset(cls: str, preset: str, path) -> None:
    if preset not in _PRESETS:
        raise ValueError(f"{cls}: unknown preset {preset!r}; choose one of {_PRESETS}")
    if preset == "tiny" and path is not None:
        raise ValueError(f"{cls}: `path` is only read with preset='pretrained' (got path={path!r} with preset='tiny')")


class FrozenModule(nn.Module):
    """Base of the frozen encoders: always in eval mode and without gradients.

    Their weights never enter a checkpoint: a stage saves only what trains (see
    :meth:`gsv3d_pl.stages.common.StageBase.state_dict`), and the encoders are rebuilt from the config.
    :meth:`weights_key` identifies the weights, e.g. for the latent cache and stage 2's check that it uses
    stage 1's encoders.
    """

    def train(self, mode: bool = True) -> FrozenModule:  # noqa: ARG002 - frozen: always eval
        return super().train(False)

    def weights_key(self) -> str:
        """:func:`~gsv3d_pl.models.frozen.fingerprint` of the weights and of what else changes the outputs
        (e.g. the VAE's scaling factor): a cache key that changes whenever they do."""
        return fingerprint(self, self._key_extra())

    def _key_extra(self) -> object:
        return None


# ============================================================================= VAE

# ×8 downsampling (3 of the 4 encoder blocks downsample) with 4 GroupNorm groups: ~100k parameters.
TINY_VAE_CONFIG: dict = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 16, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=64,
)

_VAE_SOURCE = (
    "the SD image VAE in diffusers format (config.json + diffusion_pytorch_model.safetensors): "
    "`huggingface-cli download stabilityai/sd-vae-ft-mse` (SV3D uses this VAE, scaling 0.18215), "
    "or the vae/ folder of chenguolin/sv3d-diffusers; for the CPU miniature, train one: "
    "`gsv3d fit --config configs/vae/mini.yaml` writes runs/vae_mini/vae"
)


def _vae_spec(path, key_prefix: str = "model.init_args.vae") -> WeightSpec:
    return WeightSpec(
        name="SD image VAE (AutoencoderKL, diffusers format)",
        config_key=f"{key_prefix}.init_args.path",
        candidates=[hub_path("stabilityai/sd-vae-ft-mse"), hub_path("chenguolin/sv3d-diffusers", "vae")],
        source=_VAE_SOURCE,
        explicit=path,
        fetch=HubFile("stabilityai/sd-vae-ft-mse", ("config.json", "diffusion_pytorch_model.safetensors")),
    )


@torch.no_grad()
def _zero_residual_branches(vae: nn.Module) -> None:
    """Zero the last layer of every residual branch (ResNet conv2, attention output) of an AutoencoderKL."""
    from diffusers.models.resnet import ResnetBlock2D

    for name, mod in vae.named_modules():
        if isinstance(mod, ResnetBlock2D):
            nn.init.zeros_(mod.conv2.weight)
            nn.init.zeros_(mod.conv2.bias)
        elif name.endswith("to_out.0") and isinstance(mod, nn.Linear):
            nn.init.zeros_(mod.weight)
            nn.init.zeros_(mod.bias)


def autoencoder_downsample(model: nn.Module) -> int:
    """Image pixels per latent pixel of an AutoencoderKL (2^(blocks − 1)) or a PatchAutoencoder (patch_size)."""
    cfg = model.config
    if "patch_size" in cfg:
        return int(cfg["patch_size"])
    return 2 ** (len(cfg["block_out_channels"]) - 1)


def _autoencoder_class(folder) -> type:
    """The class a diffusers VAE folder was saved from (``_class_name`` in its config.json)."""
    import json
    from pathlib import Path

    from diffusers import AutoencoderKL

    from gsv3d_pl.models.patch_vae import PatchAutoencoder

    name = json.loads((Path(folder) / "config.json").read_text()).get("_class_name", "AutoencoderKL")
    classes = {"AutoencoderKL": AutoencoderKL, "PatchAutoencoder": PatchAutoencoder}
    if name not in classes:
        raise ValueError(f"VAE: {Path(folder) / 'config.json'} is a {name!r}; supported: {sorted(classes)}")
    return classes[name]


class VAE(FrozenModule):
    """Frozen SD image VAE (diffusers ``AutoencoderKL``), SV3D's latent space.

    The tiny preset is :data:`TINY_VAE_CONFIG` with random weights, except that the last conv of every
    residual branch (ResNet ``conv2``, attention ``to_out``) starts at zero, so each block starts as its
    shortcut. Why: with a plain random init the latents carry almost no image content (linear R² of
    8×8-block colours from the 4 latent channels ≈ 0.03 over 3 seeds, measured), with identity residuals
    0.2–0.4, which is what lets the tiny GS decoder learn anything from tiny latents.

    Args:
        preset: "tiny" (random init, :data:`TINY_VAE_CONFIG`) or "pretrained" (a diffusers folder).
        path: the folder for "pretrained"; default: the HF cache of stabilityai/sd-vae-ft-mse.
        scaling_factor: latent scale; None = the preset's: for "pretrained" the folder's
            ``config.json`` ``scaling_factor`` (SD's VAE: 0.18215; a VAE trained by
            :class:`~gsv3d_pl.stages.vae_stage.VAEStage`: 1 / its latent std), 4.0 for "tiny" (its unscaled
            latents have std ≈ 0.25), so that scaled latents have roughly unit std as EDM's sigma_data = 1
            assumes.
        chunk_size: images per VAE call in encode/decode (bounds memory at 576²).
    """

    @staticmethod
    def weight_specs(init_args: dict, key_prefix: str = "model.init_args.vae") -> list[WeightSpec]:
        """The files a ``VAE(**init_args)`` at config key ``key_prefix`` needs (none for tiny)."""
        if init_args.get("preset", "tiny") == "tiny":
            return []
        return [_vae_spec(init_args.get("path"), key_prefix)]

    def __init__(self, preset: str = "tiny", path: str | None = None, scaling_factor: float | None = None,
                 chunk_size: int = 16):
        super().__init__()
        from diffusers import AutoencoderKL

        _check_preset("VAE", preset, path)
        if preset == "tiny":
            with tiny_init_seed(1):
                self.vae = AutoencoderKL(**TINY_VAE_CONFIG)
            _zero_residual_branches(self.vae)
        else:
            spec = _vae_spec(path)
            folder = resolve(spec)
            require_files(folder, spec, ["config.json"],
                          ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"])
            self.vae = _autoencoder_class(folder).from_pretrained(str(folder))
        if scaling_factor is None:  # a diffusers folder records its own (SD's config.json: 0.18215)
            scaling_factor = 4.0 if preset == "tiny" else getattr(self.vae.config, "scaling_factor", 0.18215)
        self.scaling_factor = float(scaling_factor)
        self.chunk_size = int(chunk_size)
        self.downsample = autoencoder_downsample(self.vae)
        freeze(self)

    def _key_extra(self) -> object:
        return self.scaling_factor

    def _chunks(self, x: Tensor):
        return x.split(self.chunk_size) if x.shape[0] > self.chunk_size else (x,)

    def _check_images(self, images: Tensor, what: str) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"VAE.{what}: images must be [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
        if images.shape[-1] % self.downsample or images.shape[-2] % self.downsample:
            raise ValueError(f"VAE.{what}: H and W must be multiples of {self.downsample}, got {tuple(images.shape[-2:])}")

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [0, 1] -> scaled latents [B, C, H/f, W/f] (posterior mode × scaling_factor; SD: C = 4,
        f = 8 = ``self.downsample``)."""
        self._check_images(images, "encode")
        dt = self.vae.dtype
        out = [self.vae.encode((2 * x - 1).to(dt)).latent_dist.mode() for x in self._chunks(images)]
        return (torch.cat(out) * self.scaling_factor).float()  # [B, C, h, w]

    @torch.no_grad()
    def encode_cond(self, images: Tensor, cond_aug: float | Tensor, generator: torch.Generator | None = None) -> Tensor:
        """SV3D's conditioning latent: ``vae.encode(2·img − 1 + cond_aug·noise).mode()``, **unscaled**.

        Args:
            images: [B, 3, H, W] in [0, 1].
            cond_aug: scalar or [B] noise-augmentation std (SV3D inference: 1e-5).
        Returns:
            [B, C, H/f, W/f] unscaled latents.
        """
        self._check_images(images, "encode_cond")
        B = images.shape[0]
        aug = torch.as_tensor(cond_aug, dtype=torch.float32, device=images.device).reshape(-1).expand(B)
        gdev = generator.device if generator is not None else images.device
        noise = torch.randn(images.shape, generator=generator, device=gdev).to(images.device)  # [B, 3, H, W]
        x = 2 * images.float() - 1 + aug.view(B, 1, 1, 1) * noise
        dt = self.vae.dtype
        out = [self.vae.encode(c.to(dt)).latent_dist.mode() for c in self._chunks(x)]
        return torch.cat(out).float()  # [B, C, h, w]

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents [B, C, h, w] -> images [B, 3, f·h, f·w] in [0, 1]."""
        if latents.ndim != 4:
            raise ValueError(f"VAE.decode: latents must be [B, C, h, w], got {tuple(latents.shape)}")
        dt = self.vae.dtype
        out = [self.vae.decode((z / self.scaling_factor).to(dt)).sample for z in self._chunks(latents)]
        return ((torch.cat(out).float() + 1) / 2).clamp(0, 1)  # [B, 3, H, W]

    def forward(self, images: Tensor) -> Tensor:
        return self.encode(images)


# ============================================================================= CLIP (open_clip)

# A small ViT registered with open_clip so that the tiny preset goes through the same factory as
# ViT-H-14. embed_dim 64 = the tiny SV3D UNet's cross_attention_dim.
TINY_CLIP_MODEL = "gsv3d-tiny-ViT"
_TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 1000, "width": 64, "heads": 2, "layers": 1},
}
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip OPENAI_DATASET_MEAN
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_CLIP_SOURCE = (
    "open_clip ViT-H-14 laion2b_s32b_b79k: `huggingface-cli download laion/CLIP-ViT-H-14-laion2B-s32B-b79K "
    "open_clip_pytorch_model.bin` (or open_clip_model.safetensors)"
)


def _register_tiny_clip() -> None:
    import open_clip.factory as factory

    if TINY_CLIP_MODEL not in factory._MODEL_CONFIGS:
        factory._MODEL_CONFIGS[TINY_CLIP_MODEL] = copy.deepcopy(_TINY_CLIP_CONFIG)


def _clip_spec(path, model_name: str, key_prefix: str = "model.init_args.clip") -> WeightSpec:
    repo = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    return WeightSpec(
        name=f"open_clip {model_name} image tower weights",
        config_key=f"{key_prefix}.init_args.path",
        candidates=[hub_path(repo, "open_clip_model.safetensors"), hub_path(repo, "open_clip_pytorch_model.bin")],
        source=_CLIP_SOURCE,
        explicit=path,
        fetch=HubFile(repo, "open_clip_pytorch_model.bin"),  # the file _CLIP_SOURCE names
    )


class CLIPImageEmbedder(FrozenModule):
    """Frozen open_clip image embedder: SV3D's ``encoder_hidden_states``.

    Images are resized to the model's input size (224) bicubic with antialiasing, normalised with the
    CLIP mean/std, and embedded by the image tower (projected, not L2-normalised, as Stability's
    ``FrozenOpenCLIPImageEmbedder``). Only the image tower is kept.

    Args:
        preset: "tiny" (registered small ViT, embed_dim 64) or "pretrained" (ViT-H-14, embed_dim 1024).
        path: the open_clip checkpoint file for "pretrained"; default: the HF cache of
            laion/CLIP-ViT-H-14-laion2B-s32B-b79K.
        model_name: open_clip architecture for "pretrained".
    """

    @staticmethod
    def weight_specs(init_args: dict, key_prefix: str = "model.init_args.clip") -> list[WeightSpec]:
        """The files a ``CLIPImageEmbedder(**init_args)`` at config key ``key_prefix`` needs (none for tiny)."""
        if init_args.get("preset", "tiny") == "tiny":
            return []
        return [_clip_spec(init_args.get("path"), init_args.get("model_name", "ViT-H-14"), key_prefix)]

    def __init__(self, preset: str = "tiny", path: str | None = None, model_name: str = "ViT-H-14"):
        super().__init__()
        import open_clip

        _check_preset("CLIPImageEmbedder", preset, path)
        if preset == "tiny":
            _register_tiny_clip()
            with tiny_init_seed(2):
                model = open_clip.create_model(TINY_CLIP_MODEL, pretrained=None)
        else:
            ckpt = resolve(_clip_spec(path, model_name))
            model = open_clip.create_model(model_name, pretrained=str(ckpt))
        self.visual = model.visual  # the text tower is dropped (≈350M parameters for ViT-H-14)
        self.image_size = int(_as_pair(self.visual.image_size)[0])
        self.embed_dim = int(self.visual.output_dim)
        self.register_buffer("mean", torch.tensor(_CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_CLIP_STD).view(1, 3, 1, 1), persistent=False)
        freeze(self)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [0, 1] -> embeddings [B, 1, D] (D = 1024 for ViT-H-14)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"CLIPImageEmbedder: images must be [B, 3, H, W], got {tuple(images.shape)}")
        x = F.interpolate(images.float(), size=(self.image_size, self.image_size), mode="bicubic",
                          align_corners=True, antialias=True)  # [B, 3, 224, 224]
        x = (x - self.mean) / self.std
        dt = next(self.visual.parameters()).dtype
        return self.visual(x.to(dt)).float()[:, None]  # [B, 1, D]


def _as_pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


# ============================================================================= DINOv2 (timm)

_DINO_SOURCE = (
    "timm DINOv2 weights: `huggingface-cli download timm/{name}.lvd142m model.safetensors` "
    "(pass the file as path)"
)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _dino_spec(path, model_name: str, key_prefix: str = "model.init_args.dino") -> WeightSpec:
    return WeightSpec(
        name=f"timm {model_name} weights",
        config_key=f"{key_prefix}.init_args.path",
        candidates=[hub_path(f"timm/{model_name}.lvd142m", "model.safetensors")],
        source=_DINO_SOURCE.format(name=model_name),
        explicit=path,
        fetch=HubFile(f"timm/{model_name}.lvd142m", "model.safetensors"),
    )


class DINOEncoder(FrozenModule):
    """Frozen DINOv2 (timm) returning the final-normed patch tokens of the input view.

    Args:
        preset: "tiny" (random ViT, patch 14, depth 2, width 64, 2 heads) or "pretrained".
        model_name: timm name for "pretrained" (``vit_small_patch14_dinov2`` / ``vit_base_patch14_dinov2``).
        path: the weights file for "pretrained"; default: the HF cache of ``timm/<model_name>.lvd142m``.
        image_size: input side (a multiple of 14); T = (image_size / 14)² tokens. timm resamples the
            pretrained position embedding (trained at 518) to it.
    """

    @staticmethod
    def weight_specs(init_args: dict, key_prefix: str = "model.init_args.dino") -> list[WeightSpec]:
        """The files a ``DINOEncoder(**init_args)`` at config key ``key_prefix`` needs (none for tiny)."""
        if init_args.get("preset", "tiny") == "tiny":
            return []
        model_name = init_args.get("model_name", "vit_small_patch14_dinov2")
        return [_dino_spec(init_args.get("path"), model_name, key_prefix)]

    def __init__(self, preset: str = "tiny", model_name: str = "vit_small_patch14_dinov2", path: str | None = None,
                 image_size: int = 224):
        super().__init__()
        import timm
        from timm.models.vision_transformer import VisionTransformer

        _check_preset("DINOEncoder", preset, path)
        if image_size % 14:
            raise ValueError(f"DINOEncoder: image_size must be a multiple of the patch size 14, got {image_size}")
        if preset == "tiny":
            with tiny_init_seed(3):
                self.vit = VisionTransformer(img_size=image_size, patch_size=14, embed_dim=64, depth=2, num_heads=2,
                                             init_values=1e-5, num_classes=0)
        else:
            f = resolve(_dino_spec(path, model_name))
            self.vit = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(f)),
                                         img_size=image_size, num_classes=0)
        self.image_size = int(image_size)
        self.embed_dim = int(self.vit.embed_dim)
        self.num_tokens = (image_size // 14) ** 2
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        freeze(self)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [0, 1] -> patch tokens [B, T, C] (T = (image_size/14)², C = embed_dim)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"DINOEncoder: images must be [B, 3, H, W], got {tuple(images.shape)}")
        x = images.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                              antialias=True)  # [B, 3, S, S]
        x = (x - self.mean) / self.std
        dt = next(self.vit.parameters()).dtype
        tokens = self.vit.forward_features(x.to(dt))  # [B, prefix + T, C], final LayerNorm applied
        return tokens[:, self.vit.num_prefix_tokens:].float()  # [B, T, C]

