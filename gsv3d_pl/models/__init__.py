"""Models: SV3D (UNet + EDM + sampler), frozen encoders (VAE, open_clip, DINOv2) and the GS decoder.

Every class is constructible from plain YAML ``init_args`` (LightningCLI ``class_path``/``init_args``).
Importing this package registers the pretrained presets' weight specs with :mod:`gsv3d_pl.weights`
(``gsv3d weights`` lists them).
"""

from gsv3d_pl.models.encoders import VAE, CLIPImageEmbedder, DINOEncoder, FrozenModule
from gsv3d_pl.models.gs_decoder import GS_DECODER_PRESETS, GSDecoder
from gsv3d_pl.models.sv3d import (
    LORA_TARGET_MODULES,
    SV3D,
    UNET_PRESETS,
    EDMPreconditioner,
    SV3DUNet,
    triangle_cfg_scales,
)

__all__ = [
    "VAE",
    "CLIPImageEmbedder",
    "DINOEncoder",
    "FrozenModule",
    "GSDecoder",
    "GS_DECODER_PRESETS",
    "SV3D",
    "SV3DUNet",
    "EDMPreconditioner",
    "UNET_PRESETS",
    "LORA_TARGET_MODULES",
    "triangle_cfg_scales",
]
