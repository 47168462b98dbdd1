"""Stability's SGM SV3D checkpoints (``sv3d_p.safetensors`` / ``sv3d_u.safetensors``) → a diffusers UNet folder.

The official files hold the whole SGM ``DiffusionEngine``: the UNet under ``model.diffusion_model.`` (an SGM
``VideoUNet``), plus the VAE (``first_stage_model.``) and the conditioner (``conditioner.``), which are ignored
here. The UNet keys follow SGM's flat ``input_blocks`` / ``middle_block`` / ``output_blocks`` lists:

- ``input_blocks.0.0`` is the input conv; then per resolution level, ``layers_per_block`` entries
  ``[VideoResBlock, SpatialVideoTransformer?]`` and, except at the last level, one ``[Downsample]`` (``.0.op``);
- ``middle_block`` is ``[VideoResBlock, SpatialVideoTransformer, VideoResBlock]``;
- ``output_blocks``: per level (deepest first) ``layers_per_block + 1`` entries
  ``[VideoResBlock, SpatialVideoTransformer?, Upsample?]`` (the upsample on the last entry, not at level 0);
- a ``VideoResBlock`` is an SGM ``ResBlock`` (``in_layers.{0 norm, 2 conv}``, ``emb_layers.1``,
  ``out_layers.{0 norm, 3 conv}``, ``skip_connection``) with a temporal ``ResBlock`` in ``time_stack`` and an
  ``AlphaBlender`` ``time_mixer``; diffusers splits them into ``spatial_res_block`` / ``temporal_res_block``;
- a ``SpatialVideoTransformer`` keeps diffusers' names except ``time_stack.N`` (→ ``temporal_transformer_blocks.N``)
  and ``time_pos_embed.{0,2}`` (→ ``time_pos_embed.linear_{1,2}``).

:func:`convert_sgm_unet` maps the keys for a given diffusers config; :func:`convert_sv3d_checkpoint` reads the
file, checks the result against a freshly built :class:`~gsv3d_pl.models.sv3d.SV3DUNet` (on the meta device, so
nothing is allocated) and writes ``config.json`` + ``diffusion_pytorch_model.safetensors``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from gsv3d_pl.io import atomic_dir

__all__ = [
    "SGM_UNET_PREFIX",
    "SV3DCheckpointError",
    "ConvertResult",
    "sv3d_unet_config",
    "sgm_to_diffusers_prefixes",
    "convert_sgm_unet",
    "convert_sv3d_checkpoint",
]

SGM_UNET_PREFIX = "model.diffusion_model."
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# label_emb input width (= diffusers projection_class_embeddings_input_dim) of each official variant:
# SV3D-p embeds (cond_aug, polar, azimuth) as 256 + 512 + 512; SV3D-u only cond_aug (256).
VARIANT_ADM_CHANNELS: dict[str, int] = {"sv3d_p": 1280, "sv3d_u": 256}

_EXPECTED = (
    "an SGM SV3D checkpoint (Stability's sv3d_p.safetensors or sv3d_u.safetensors from HF stabilityai/sv3d: "
    f"a .safetensors file whose UNet keys start with {SGM_UNET_PREFIX!r})"
)

# Kinds of SGM module prefix, and how the rest of the key is renamed below it.
_DIRECT, _RESNET, _ATTN = "direct", "resnet", "attention"

# SGM ResBlock / VideoResBlock sub-module → diffusers SpatioTemporalResBlock sub-module.
_RESNET_RENAMES: tuple[tuple[str, str], ...] = (
    ("time_stack.in_layers.0.", "temporal_res_block.norm1."),
    ("time_stack.in_layers.2.", "temporal_res_block.conv1."),  # Conv3d, kernel (3, 1, 1) in both
    ("time_stack.emb_layers.1.", "temporal_res_block.time_emb_proj."),
    ("time_stack.out_layers.0.", "temporal_res_block.norm2."),
    ("time_stack.out_layers.3.", "temporal_res_block.conv2."),
    ("time_mixer.", "time_mixer."),
    ("in_layers.0.", "spatial_res_block.norm1."),
    ("in_layers.2.", "spatial_res_block.conv1."),
    ("emb_layers.1.", "spatial_res_block.time_emb_proj."),
    ("out_layers.0.", "spatial_res_block.norm2."),
    ("out_layers.3.", "spatial_res_block.conv2."),
    ("skip_connection.", "spatial_res_block.conv_shortcut."),  # 1x1 conv when channels change
)

# SGM SpatialVideoTransformer sub-module → diffusers TransformerSpatioTemporalModel sub-module; everything else
# (norm, proj_in, proj_out, transformer_blocks.N.{attn1,attn2,ff,norm1..3}) keeps its name.
_ATTN_RENAMES: tuple[tuple[str, str], ...] = (
    ("time_stack.", "temporal_transformer_blocks."),
    ("time_pos_embed.0.", "time_pos_embed.linear_1."),
    ("time_pos_embed.2.", "time_pos_embed.linear_2."),
)


class SV3DCheckpointError(ValueError):
    """The file is not an SGM SV3D checkpoint this converter can read (the message names the file)."""


@dataclass
class ConvertResult:
    out_dir: str
    variant: str | None
    num_params: int
    num_tensors: int
    dtypes: list[str]
    ignored: dict[str, int] = field(default_factory=dict)  # top-level prefix of non-UNet keys → count


def sv3d_unet_config(variant: str = "sv3d_p") -> dict[str, Any]:
    """The diffusers config of an official variant: the paper-scale preset with that variant's label_emb width."""
    from gsv3d_pl.models.sv3d import UNET_PRESETS

    if variant not in VARIANT_ADM_CHANNELS:
        raise ValueError(f"unknown SV3D variant {variant!r}; choose one of {sorted(VARIANT_ADM_CHANNELS)}")
    return dict(UNET_PRESETS["pretrained"], projection_class_embeddings_input_dim=VARIANT_ADM_CHANNELS[variant])


def sgm_to_diffusers_prefixes(config: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``[(SGM module prefix, diffusers module prefix, kind)]`` for a diffusers UNet config.

    The SGM indices follow VideoUNet's construction order; a level has attention iff its diffusers block type
    is a ``CrossAttn*`` one (SGM: ``ds in attention_resolutions``).
    """
    n = len(config["block_out_channels"])
    per_block = config.get("layers_per_block", 2)
    if not isinstance(per_block, int):  # diffusers allows a per-level list; SV3D/SVD use one int
        raise ValueError(f"layers_per_block must be an int, got {per_block!r}")
    down_attn = [t.startswith("CrossAttn") for t in config["down_block_types"]]
    up_attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    out: list[tuple[str, str, str]] = [
        ("time_embed.0.", "time_embedding.linear_1.", _DIRECT),
        ("time_embed.2.", "time_embedding.linear_2.", _DIRECT),
        ("label_emb.0.0.", "add_embedding.linear_1.", _DIRECT),  # num_classes="sequential": Sequential(Sequential(...))
        ("label_emb.0.2.", "add_embedding.linear_2.", _DIRECT),
        ("input_blocks.0.0.", "conv_in.", _DIRECT),
        ("out.0.", "conv_norm_out.", _DIRECT),
        ("out.2.", "conv_out.", _DIRECT),
        ("middle_block.0.", "mid_block.resnets.0.", _RESNET),
        ("middle_block.1.", "mid_block.attentions.0.", _ATTN),
        ("middle_block.2.", "mid_block.resnets.1.", _RESNET),
    ]
    idx = 1  # input_blocks.0 is conv_in
    for i in range(n):
        for j in range(per_block):
            out.append((f"input_blocks.{idx}.0.", f"down_blocks.{i}.resnets.{j}.", _RESNET))
            if down_attn[i]:
                out.append((f"input_blocks.{idx}.1.", f"down_blocks.{i}.attentions.{j}.", _ATTN))
            idx += 1
        if i < n - 1:  # Downsample(conv) sits alone in its own input block
            out.append((f"input_blocks.{idx}.0.op.", f"down_blocks.{i}.downsamplers.0.conv.", _DIRECT))
            idx += 1
    idx = 0
    for i in range(n):  # diffusers up_blocks[i] is SGM level n-1-i
        for j in range(per_block + 1):
            out.append((f"output_blocks.{idx}.0.", f"up_blocks.{i}.resnets.{j}.", _RESNET))
            k = 1
            if up_attn[i]:
                out.append((f"output_blocks.{idx}.1.", f"up_blocks.{i}.attentions.{j}.", _ATTN))
                k = 2
            if j == per_block and i < n - 1:  # Upsample after the last entry of every level but the top one
                out.append((f"output_blocks.{idx}.{k}.conv.", f"up_blocks.{i}.upsamplers.0.conv.", _DIRECT))
            idx += 1
    return out


def _rename_rest(rest: str, kind: str) -> str | None:
    if kind == _DIRECT:
        return rest
    table = _RESNET_RENAMES if kind == _RESNET else _ATTN_RENAMES
    for old, new in table:
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest if kind == _ATTN else None  # every ResBlock parameter is in the table


def convert_sgm_unet(state_dict: Mapping[str, Tensor], config: Mapping[str, Any]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename an SGM VideoUNet state dict (keys with or without ``model.diffusion_model.``) to diffusers names.

    Returns ``(converted, unmapped)``: the diffusers state dict and the SGM keys no rule covers. The only
    reshape: a 1x1-conv ``proj_in``/``proj_out`` ([C, C, 1, 1], SGM's ``use_linear_in_transformer=False``)
    becomes diffusers' Linear weight [C, C].
    """
    # Longest prefix first, so "input_blocks.1.0." never shadows "input_blocks.11.0." (a trailing dot
    # already separates them, but this also keeps the order-independent).
    prefixes = sorted(sgm_to_diffusers_prefixes(config), key=lambda p: -len(p[0]))
    converted: dict[str, Tensor] = {}
    unmapped: list[str] = []
    for key, value in state_dict.items():
        k = key[len(SGM_UNET_PREFIX):] if key.startswith(SGM_UNET_PREFIX) else key
        new = None
        for src, dst, kind in prefixes:
            if k.startswith(src):
                rest = _rename_rest(k[len(src):], kind)
                new = None if rest is None else dst + rest
                break
        if new is None:
            unmapped.append(key)
            continue
        if kind == _ATTN and new.endswith(("proj_in.weight", "proj_out.weight")) and value.ndim == 4:
            value = value[:, :, 0, 0]  # [C_out, C_in, 1, 1] conv → [C_out, C_in] linear
        if new in converted:
            raise ValueError(f"two SGM keys map to {new!r} (the second is {key!r})")
        converted[new] = value.contiguous()
    return converted, unmapped


def _head(names: list[str], n: int = 10) -> str:
    more = f", ... ({len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _read_unet(src: str) -> tuple[dict[str, Tensor], dict[str, int]]:
    """The ``model.diffusion_model.`` tensors of ``src`` and a count of the other keys by top-level prefix.

    ``safe_open`` (safetensors' lazy reader) loads only the UNet's tensors, not the VAE/CLIP ones.
    """
    from safetensors import safe_open

    if not os.path.isfile(src):
        raise SV3DCheckpointError(f"{src}: no such file; expected {_EXPECTED}")
    try:
        with safe_open(src, framework="pt") as f:
            keys = list(f.keys())
            unet = {k: f.get_tensor(k) for k in keys if k.startswith(SGM_UNET_PREFIX)}
    except Exception as e:  # safetensors raises its own error types for a non-safetensors file
        raise SV3DCheckpointError(f"{src}: cannot be read as a .safetensors file ({type(e).__name__}: {e}); "
                                  f"expected {_EXPECTED}") from e
    if not unet:
        shown = _head(sorted(keys), 5) if keys else "none"
        raise SV3DCheckpointError(f"{src}: has no {SGM_UNET_PREFIX!r} keys ({len(keys)} keys: {shown}); "
                                  f"expected {_EXPECTED}")
    ignored = Counter(k.split(".", 1)[0] for k in keys if not k.startswith(SGM_UNET_PREFIX))
    return unet, dict(ignored)


def _shape(sd: Mapping[str, Tensor], key: str, src: str) -> tuple[int, ...]:
    t = sd.get(SGM_UNET_PREFIX + key)
    if t is None:
        raise SV3DCheckpointError(f"{src}: has no {SGM_UNET_PREFIX + key!r}; expected {_EXPECTED}")
    return tuple(t.shape)


def _check_dims(sd: Mapping[str, Tensor], config: Mapping[str, Any], src: str) -> None:
    """The config's headline dims against the tensors, so a mismatch names the dim, not 300 keys."""
    conv_in = _shape(sd, "input_blocks.0.0.weight", src)  # [c0, C_in, 3, 3]
    conv_out = _shape(sd, "out.2.weight", src)  # [C_out, c0, 3, 3]
    label = _shape(sd, "label_emb.0.0.weight", src)  # [4 c0, adm_in_channels]
    ctx = next((tuple(v.shape) for k, v in sd.items() if k.endswith("attn2.to_k.weight")), None)  # [C, ctx]
    found = {
        "in_channels": conv_in[1],
        "block_out_channels[0]": conv_in[0],
        "out_channels": conv_out[0],
        "projection_class_embeddings_input_dim": label[1],
        "cross_attention_dim": ctx[1] if ctx else None,
    }
    want = dict(config, **{"block_out_channels[0]": config["block_out_channels"][0]})
    bad = [f"{k} is {v} in the file, {want.get(k)} expected" for k, v in found.items()
           if v is not None and v != want.get(k)]
    if bad:
        raise SV3DCheckpointError(f"{src}: UNet dims do not match the SV3D config: {'; '.join(bad)}; "
                                  f"expected {_EXPECTED}")


def _detect_variant(sd: Mapping[str, Tensor], src: str) -> str:
    adm = _shape(sd, "label_emb.0.0.weight", src)[1]
    for name, width in VARIANT_ADM_CHANNELS.items():
        if adm == width:
            return name
    raise SV3DCheckpointError(f"{src}: label_emb input width is {adm}, neither SV3D-p's 1280 nor SV3D-u's 256 "
                              f"(pass a config for another UNet size); expected {_EXPECTED}")


def convert_sv3d_checkpoint(src: str | os.PathLike, out_dir: str | os.PathLike, variant: str | None = None,
                            config: Mapping[str, Any] | None = None) -> ConvertResult:
    """Convert an SGM SV3D ``.safetensors`` into a diffusers UNet folder ``out_dir`` (replaced atomically).

    Args:
        src: ``sv3d_p.safetensors`` / ``sv3d_u.safetensors`` (the whole SGM checkpoint; only the UNet is kept).
        out_dir: written as ``config.json`` + ``diffusion_pytorch_model.safetensors``; tensors keep their dtype.
        variant: ``"sv3d_p"``, ``"sv3d_u"`` or None (from the label_emb input width, 1280 vs 256).
        config: a diffusers UNet config to use instead of the variant's paper-scale one (tests: the tiny preset).
    Raises:
        SV3DCheckpointError: unreadable file, no UNet keys, dims or keys that do not match the config.
    """
    from gsv3d_pl.models.sv3d import SV3DUNet

    src = os.fspath(src)
    sd, ignored = _read_unet(src)
    if config is None:
        variant = variant or _detect_variant(sd, src)
        config = sv3d_unet_config(variant)
    _check_dims(sd, config, src)
    converted, unmapped = convert_sgm_unet(sd, config)

    with torch.device("meta"):  # the module tree and shapes only; no 1.5B-parameter allocation
        model = SV3DUNet(**config)
    target = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(target) - set(converted))
    extra = sorted(set(converted) - set(target))
    wrong = [f"{k} {tuple(converted[k].shape)} vs {target[k]}" for k in sorted(set(target) & set(converted))
             if tuple(converted[k].shape) != target[k]]
    problems = [f"{len(v)} {what}: {_head(v)}" for what, v in (
        ("SGM UNet keys with no diffusers name", unmapped),
        ("converted keys the diffusers UNet does not have", extra),
        ("diffusers UNet keys not filled", missing),
        ("tensors of the wrong shape (file vs diffusers)", wrong)) if v]
    if problems:
        raise SV3DCheckpointError(f"{src}: does not convert to the SV3D UNet ({'; '.join(problems)}); "
                                  f"expected {_EXPECTED}")

    from safetensors.torch import save_file

    out_dir = os.fspath(out_dir)
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    with atomic_dir(out_dir) as tmp:
        model.save_config(tmp)  # config.json with _class_name / _diffusers_version, as save_pretrained writes
        save_file({k: converted[k] for k in target}, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(tmp, "conversion.json"), "w") as f:  # provenance, read by nobody but people
            json.dump({"source": os.path.abspath(src), "variant": variant, "ignored_prefixes": ignored}, f, indent=2)
    return ConvertResult(
        out_dir=out_dir, variant=variant, num_params=sum(v.numel() for v in converted.values()),
        num_tensors=len(converted), dtypes=sorted({str(v.dtype).removeprefix("torch.") for v in converted.values()}),
        ignored=ignored)
