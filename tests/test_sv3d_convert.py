"""`gsv3d weights convert-sv3d`: an SGM-layout SV3D checkpoint → a diffusers SV3DUNet folder.

Three independent sources of truth, none derived from the converter's own mapping:

1. :func:`sgm_tiny_state_shapes` spells out the SGM VideoUNet key names and shapes by hand, from the module
   structure of ``sgm/modules/diffusionmodules/{video_model,openaimodel}.py`` and ``sgm/modules/video_attention.py``;
2. ``tests/data/sv3d_sgm_tiny/sgm_keys.json`` is the key→shape list of Stability's own ``VideoUNet`` built at the
   tiny size (generated once outside the repository; SGM's code is not committed), and ``io.safetensors`` holds
   fixed inputs and SGM's forward output for weights drawn by :func:`seeded_tensor`;
3. a handful of SGM→diffusers key pairs written out explicitly below.

The fixture came from ``VideoUNet(in_channels=8, model_channels=32, out_channels=4, num_res_blocks=1,
attention_resolutions=[1], channel_mult=[1, 2], num_head_channels=16, use_linear_in_transformer=True,
transformer_depth=1, context_dim=64, spatial_transformer_attn_type="softmax", extra_ff_mix_layer=True,
use_spatial_context=True, merge_strategy="learned_with_images", video_kernel_size=[3, 1, 1],
num_classes="sequential", adm_in_channels=160)`` (Stability-AI/generative-models @ 0ad7de9, sv3d_p.yaml's
settings at the tiny preset's size) with ``seeded_tensor`` weights, called on ``io.safetensors``'s inputs with
``y = cat(timestep_embedding(cond_aug, 32), timestep_embedding(polar, 64), timestep_embedding(azimuth, 64))``
(SGM's own sinusoids, as its SV3D-p conditioner builds ``vector``), ``num_video_frames=5`` and
``image_only_indicator`` zeros. Its output ``sgm_output`` is [B*F, 4, 8, 8].
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gsv3d_pl.models.sv3d import UNET_PRESETS, SV3DUNet
from gsv3d_pl.models.sv3d_convert import SV3DCheckpointError, convert_sv3d_checkpoint
from gsv3d_pl.tools import weights as tool

DATA = Path(__file__).resolve().parent / "data" / "sv3d_sgm_tiny"
TINY = UNET_PRESETS["tiny"]
P = "model.diffusion_model."


# ----------------------------------------------------------------------------- the SGM layout, by hand

def sgm_tiny_state_shapes(c0: int = 32, mult: tuple[int, ...] = (1, 2), n_res: int = 1, attn_levels: tuple[int, ...] = (0,),
                          c_in: int = 8, c_out: int = 4, adm: int = 160, ctx: int = 64) -> dict[str, tuple[int, ...]]:
    """SGM VideoUNet key → shape, written from SGM's constructors (not from the converter).

    VideoUNet: ``time_embed = Sequential(linear, SiLU, linear)``; ``label_emb = Sequential(Sequential(linear, SiLU,
    linear))`` (num_classes="sequential"); ``input_blocks[0] = conv``; ResBlock: ``in_layers = (GroupNorm, SiLU,
    conv)``, ``emb_layers = (SiLU, linear)``, ``out_layers = (GroupNorm, SiLU, Dropout, conv)``, ``skip_connection``
    1x1 conv iff channels change; VideoResBlock adds ``time_stack`` (a ResBlock with Conv3d kernel (3, 1, 1)) and
    ``time_mixer.mix_factor``; SpatialVideoTransformer (linear proj): ``norm, proj_in, transformer_blocks.0, proj_out``
    plus ``time_stack.0`` (VideoTransformerBlock with ff_in), ``time_pos_embed = (linear, SiLU, linear)`` and
    ``time_mixer``; ``out = (GroupNorm, SiLU, conv)``.
    """
    ted = 4 * c0  # time_embed_dim
    s: dict[str, tuple[int, ...]] = {}

    def lin(name: str, i: int, o: int, bias: bool = True) -> None:
        s[f"{name}.weight"] = (o, i)
        if bias:
            s[f"{name}.bias"] = (o,)

    def conv(name: str, i: int, o: int, k: tuple[int, ...] = (3, 3)) -> None:
        s[f"{name}.weight"] = (o, i, *k)
        s[f"{name}.bias"] = (o,)

    def norm(name: str, c: int) -> None:
        s[f"{name}.weight"] = (c,)
        s[f"{name}.bias"] = (c,)

    def resblock(p: str, ci: int, co: int) -> None:
        norm(f"{p}.in_layers.0", ci)
        conv(f"{p}.in_layers.2", ci, co)
        lin(f"{p}.emb_layers.1", ted, co)
        norm(f"{p}.out_layers.0", co)
        conv(f"{p}.out_layers.3", co, co)
        if ci != co:
            conv(f"{p}.skip_connection", ci, co, (1, 1))
        t = f"{p}.time_stack"  # temporal ResBlock on co channels, video_kernel_size [3, 1, 1]
        norm(f"{t}.in_layers.0", co)
        conv(f"{t}.in_layers.2", co, co, (3, 1, 1))
        lin(f"{t}.emb_layers.1", ted, co)
        norm(f"{t}.out_layers.0", co)
        conv(f"{t}.out_layers.3", co, co, (3, 1, 1))
        s[f"{p}.time_mixer.mix_factor"] = (1,)

    def attn(p: str, q: int, kv: int) -> None:
        lin(f"{p}.to_q", q, q, bias=False)
        lin(f"{p}.to_k", kv, q, bias=False)
        lin(f"{p}.to_v", kv, q, bias=False)
        lin(f"{p}.to_out.0", q, q)

    def geglu_ff(p: str, ci: int, co: int) -> None:
        lin(f"{p}.net.0.proj", ci, 2 * 4 * ci)  # GEGLU: value and gate halves
        lin(f"{p}.net.2", 4 * ci, co)

    def transformer(p: str, c: int) -> None:
        norm(f"{p}.norm", c)
        lin(f"{p}.proj_in", c, c)
        b = f"{p}.transformer_blocks.0"
        attn(f"{b}.attn1", c, c)
        geglu_ff(f"{b}.ff", c, c)
        attn(f"{b}.attn2", c, ctx)
        for n in ("norm1", "norm2", "norm3"):
            norm(f"{b}.{n}", c)
        lin(f"{p}.proj_out", c, c)
        t = f"{p}.time_stack.0"
        norm(f"{t}.norm_in", c)
        geglu_ff(f"{t}.ff_in", c, c)
        attn(f"{t}.attn1", c, c)
        geglu_ff(f"{t}.ff", c, c)
        attn(f"{t}.attn2", c, ctx)
        for n in ("norm1", "norm2", "norm3"):
            norm(f"{t}.{n}", c)
        lin(f"{p}.time_pos_embed.0", c, 4 * c)
        lin(f"{p}.time_pos_embed.2", 4 * c, c)
        s[f"{p}.time_mixer.mix_factor"] = (1,)

    lin("time_embed.0", c0, ted)
    lin("time_embed.2", ted, ted)
    lin("label_emb.0.0", adm, ted)
    lin("label_emb.0.2", ted, ted)
    conv("input_blocks.0.0", c_in, c0)
    chans, ch, idx = [c0], c0, 1
    for level, m in enumerate(mult):
        for _ in range(n_res):
            resblock(f"input_blocks.{idx}.0", ch, m * c0)
            ch = m * c0
            if level in attn_levels:
                transformer(f"input_blocks.{idx}.1", ch)
            chans.append(ch)
            idx += 1
        if level != len(mult) - 1:
            conv(f"input_blocks.{idx}.0.op", ch, ch)  # Downsample, stride-2 conv
            chans.append(ch)
            idx += 1
    resblock("middle_block.0", ch, ch)
    transformer("middle_block.1", ch)
    resblock("middle_block.2", ch, ch)
    idx = 0
    for level in reversed(range(len(mult))):
        for i in range(n_res + 1):
            co = mult[level] * c0
            resblock(f"output_blocks.{idx}.0", ch + chans.pop(), co)
            ch, k = co, 1
            if level in attn_levels:
                transformer(f"output_blocks.{idx}.1", ch)
                k = 2
            if level and i == n_res:
                conv(f"output_blocks.{idx}.{k}.conv", ch, ch)  # Upsample: nearest ×2 then conv
            idx += 1
    norm("out.0", c0)
    conv("out.2", c0, c_out)
    return s


def seeded_tensor(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A fixed random tensor for ``key`` (seeded by its name, so order does not matter): fan-in-scaled normals
    for matrices/convs, 1 ± 0.2 for 1-D weights (norm gains), ± 0.2 for biases, N(0, 1) for mix factors."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    if len(shape) >= 2:
        return x / math.sqrt(math.prod(shape[1:]))
    if key.endswith("mix_factor"):
        return x
    return 1.0 + 0.2 * x if key.endswith(".weight") else 0.2 * x


def sgm_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]], extra: bool = True) -> dict[str, torch.Tensor]:
    """Write an SGM-style full checkpoint (UNet + a stand-in VAE/conditioner key) and return its UNet part."""
    sd = {P + k: seeded_tensor(k, v) for k, v in shapes.items()}
    other = {"first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4),
             "conditioner.embedders.0.open_clip.model.positional_embedding": torch.zeros(2, 3)} if extra else {}
    save_file({**sd, **other}, str(path))
    return sd


# ----------------------------------------------------------------------------- tests

def test_hand_written_layout_matches_stability_videounet():
    """The hand-written key list equals the one Stability's VideoUNet produced (fixture), key for key."""
    sgm = {k: tuple(v) for k, v in json.loads((DATA / "sgm_keys.json").read_text()).items()}
    ours = sgm_tiny_state_shapes()
    assert sorted(set(sgm) - set(ours)) == [] and sorted(set(ours) - set(sgm)) == []
    assert {k: v for k, v in ours.items() if sgm[k] != v} == {}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    d = tmp_path_factory.mktemp("sv3d")
    src = d / "sv3d_tiny.safetensors"
    sd = sgm_checkpoint(src, sgm_tiny_state_shapes())
    res = convert_sv3d_checkpoint(src, d / "unet", config=TINY)
    return sd, res, d / "unet"


def test_every_key_converted_and_values_identical(converted):
    sd, res, out = converted
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "conversion.json", "diffusion_pytorch_model.safetensors"]
    assert res.ignored == {"first_stage_model": 1, "conditioner": 1}
    conv = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    assert res.num_tensors == len(conv) == len(sd) and res.num_params == sum(v.numel() for v in sd.values())
    pairs = {  # SGM → diffusers, spelled out (the strongest independent expectation)
        "input_blocks.0.0.weight": "conv_in.weight",
        "out.0.weight": "conv_norm_out.weight",
        "out.2.weight": "conv_out.weight",
        "time_embed.0.weight": "time_embedding.linear_1.weight",
        "time_embed.2.bias": "time_embedding.linear_2.bias",
        "label_emb.0.0.weight": "add_embedding.linear_1.weight",
        "label_emb.0.2.weight": "add_embedding.linear_2.weight",
        "input_blocks.1.0.in_layers.2.weight": "down_blocks.0.resnets.0.spatial_res_block.conv1.weight",
        "input_blocks.1.0.time_stack.out_layers.3.weight": "down_blocks.0.resnets.0.temporal_res_block.conv2.weight",
        "input_blocks.1.0.time_mixer.mix_factor": "down_blocks.0.resnets.0.time_mixer.mix_factor",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight":
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        "input_blocks.1.1.time_stack.0.attn1.to_q.weight":
            "down_blocks.0.attentions.0.temporal_transformer_blocks.0.attn1.to_q.weight",
        "input_blocks.1.1.time_pos_embed.2.weight": "down_blocks.0.attentions.0.time_pos_embed.linear_2.weight",
        "input_blocks.1.1.time_mixer.mix_factor": "down_blocks.0.attentions.0.time_mixer.mix_factor",
        "input_blocks.2.0.op.weight": "down_blocks.0.downsamplers.0.conv.weight",
        "input_blocks.3.0.skip_connection.weight": "down_blocks.1.resnets.0.spatial_res_block.conv_shortcut.weight",
        "middle_block.1.time_stack.0.attn2.to_k.weight":
            "mid_block.attentions.0.temporal_transformer_blocks.0.attn2.to_k.weight",
        "middle_block.2.emb_layers.1.weight": "mid_block.resnets.1.spatial_res_block.time_emb_proj.weight",
        "output_blocks.1.1.conv.weight": "up_blocks.0.upsamplers.0.conv.weight",
        "output_blocks.3.1.proj_out.weight": "up_blocks.1.attentions.1.proj_out.weight",
    }
    for s, d in pairs.items():
        assert torch.equal(sd[P + s], conv[d]), (s, d)
    # Every tensor is some source tensor, unchanged (the seeded values are distinct per key).
    by_value = {(tuple(v.shape), v.flatten()[:4].tolist().__repr__()): k for k, v in sd.items()}
    for k, v in conv.items():
        assert (tuple(v.shape), v.flatten()[:4].tolist().__repr__()) in by_value, k


def test_loads_and_matches_stability_forward(converted):
    """from_pretrained of the folder, then the forward on the fixture's inputs equals SGM's VideoUNet output
    (weights drawn by seeded_tensor from the same key names: the fixture's model and this one are the same)."""
    _, _, out = converted
    unet = SV3DUNet.from_pretrained(str(out)).eval()
    io = load_file(str(DATA / "io.safetensors"))
    with torch.no_grad():
        y1 = unet(io["sample"], io["timestep"], io["encoder_hidden_states"], io["added_time_ids"]).sample
        y2 = unet(io["sample"], io["timestep"], io["encoder_hidden_states"], io["added_time_ids"]).sample
    assert torch.isfinite(y1).all() and torch.equal(y1, y2)
    expected = io["sgm_output"].reshape(y1.shape)  # SGM: [B*F, C, h, w]
    assert expected.abs().mean() > 0.05  # not a degenerate fixture
    torch.testing.assert_close(y1, expected, atol=2e-4, rtol=1e-4)


def test_refuses_wrong_files(tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(other))
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    for f, words in ((other, "has no 'model.diffusion_model.'"), (text, "cannot be read"),
                     (tmp_path / "absent.safetensors", "no such file")):
        with pytest.raises(SV3DCheckpointError) as e:
            convert_sv3d_checkpoint(f, tmp_path / "out")
        assert str(f) in str(e.value) and words in str(e.value) and "sv3d_p.safetensors" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_refuses_wrong_shapes_and_keys(tmp_path):
    shapes = sgm_tiny_state_shapes()
    bad = tmp_path / "bad.safetensors"
    sgm_checkpoint(bad, dict(shapes, **{"input_blocks.1.1.proj_in.weight": (32, 16)}))
    with pytest.raises(SV3DCheckpointError, match=r"1 tensors of the wrong shape.*input_blocks|proj_in"):
        convert_sv3d_checkpoint(bad, tmp_path / "out", config=TINY)
    extra = tmp_path / "extra.safetensors"
    sgm_checkpoint(extra, dict(shapes, **{"input_blocks.1.9.weight": (3,)}))
    with pytest.raises(SV3DCheckpointError, match=r"1 SGM UNet keys with no diffusers name: model\.diffusion_model\."
                                                  r"input_blocks\.1\.9\.weight"):
        convert_sv3d_checkpoint(extra, tmp_path / "out", config=TINY)
    # The tiny file against the paper-scale config: the dims are named, not hundreds of keys.
    small = tmp_path / "small.safetensors"
    sgm_checkpoint(small, {k: v for k, v in shapes.items()})
    with pytest.raises(SV3DCheckpointError, match="label_emb input width is 160"):
        convert_sv3d_checkpoint(small, tmp_path / "out")
    with pytest.raises(SV3DCheckpointError, match=r"block_out_channels\[0\] is 32 in the file, 320 expected"):
        convert_sv3d_checkpoint(small, tmp_path / "out", variant="sv3d_p")
    assert not (tmp_path / "out").exists()


def test_paper_scale_mapping_covers_the_diffusers_unet():
    """At paper scale (meta tensors: no memory), the hand-written SGM layout converts onto every key of
    SV3DUNet(sv3d_p) with the right shapes; sv3d_u differs only in label_emb's input width."""
    from gsv3d_pl.models.sv3d_convert import convert_sgm_unet, sv3d_unet_config

    for variant, adm in (("sv3d_p", 1280), ("sv3d_u", 256)):
        cfg = sv3d_unet_config(variant)
        shapes = sgm_tiny_state_shapes(c0=320, mult=(1, 2, 4, 4), n_res=2, attn_levels=(0, 1, 2), adm=adm, ctx=1024)
        sd = {P + k: torch.empty(v, device="meta") for k, v in shapes.items()}
        conv, unmapped = convert_sgm_unet(sd, cfg)
        with torch.device("meta"):
            target = {k: tuple(v.shape) for k, v in SV3DUNet(**cfg).state_dict().items()}
        assert unmapped == [] and {k: tuple(v.shape) for k, v in conv.items()} == target


def test_cli_subcommand(tmp_path, capsys):
    src = tmp_path / "sv3d_p.safetensors"
    sgm_checkpoint(src, sgm_tiny_state_shapes())
    text = tmp_path / "x.txt"
    text.write_text("hello")
    assert tool.main(["convert-sv3d", str(text), str(tmp_path / "o")]) == 2
    assert str(text) in capsys.readouterr().err
    # The tiny file is neither variant: refused with the reason (exit 2), nothing written.
    assert tool.main(["convert-sv3d", str(src), str(tmp_path / "o"), "--variant", "sv3d_p"]) == 2
    assert "320 expected" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_cli_success_prints_what_was_written(tmp_path, capsys, monkeypatch):
    """Exit 0 and the report, with the variant table patched so the tiny file passes as 'sv3d_p'."""
    import gsv3d_pl.models.sv3d_convert as conv_mod

    monkeypatch.setitem(conv_mod.VARIANT_ADM_CHANNELS, "sv3d_p", TINY["projection_class_embeddings_input_dim"])
    monkeypatch.setattr(conv_mod, "sv3d_unet_config", lambda variant="sv3d_p": dict(TINY))
    src = tmp_path / "sv3d_p.safetensors"
    sd = sgm_checkpoint(src, sgm_tiny_state_shapes())
    out = tmp_path / "weights" / "sv3d_p_unet"
    assert tool.main(["convert-sv3d", str(src), str(out)]) == 0
    text = capsys.readouterr().out
    n = sum(v.numel() for v in sd.values())
    assert f"{n:,} parameters" in text and "sv3d_p UNet" in text and str(out) in text
    assert json.loads((out / "config.json").read_text())["block_out_channels"] == list(TINY["block_out_channels"])
    assert (out / "diffusion_pytorch_model.safetensors").is_file()
