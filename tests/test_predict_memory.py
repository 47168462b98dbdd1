"""`gsv3d predict --dtype / --offload`: the dtype rules on CPU, the pipeline's casts and the offload context
manager (the end-to-end bf16 run is in tests/test_predict.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gsv3d_pl.inference.pipeline import DTYPES, on_device
from gsv3d_pl.tools import predict as predict_tool
from tests.images import write_rgba


class RecordingModule(nn.Module):
    """A module that records the devices it is moved to (and moves for real, cpu -> cpu)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.moves: list[str] = []

    def to(self, *args, **kwargs):
        self.moves.append(str(args[0] if args else kwargs.get("device")))
        return super().to(*args, **kwargs)


def test_on_device_moves_and_returns(monkeypatch):
    import gsv3d_pl.inference.pipeline as pipeline

    m = RecordingModule()
    # Its parameters are on the CPU; target another device: moved there for the block, back afterwards.
    monkeypatch.setattr(pipeline, "_module_device", lambda mod: torch.device("cpu"))
    monkeypatch.setattr(nn.Module, "to", lambda self, *a, **k: self)  # no real move to "meta" (no data back)
    with on_device(m, "meta") as got:
        assert got is m and m.moves == ["meta"]
    assert m.moves == ["meta", "cpu"]


def test_on_device_restores_when_the_block_raises(monkeypatch):
    import gsv3d_pl.inference.pipeline as pipeline

    m = RecordingModule()
    monkeypatch.setattr(pipeline, "_module_device", lambda mod: torch.device("cpu"))
    monkeypatch.setattr(nn.Module, "to", lambda self, *a, **k: self)
    with pytest.raises(RuntimeError, match="boom"):
        with on_device(m, "meta"):
            raise RuntimeError("boom")
    assert m.moves == ["meta", "cpu"]


def test_on_device_is_a_noop_on_cpu_or_disabled():
    m = RecordingModule()
    w = m.lin.weight.detach().clone()
    with on_device(m, "cpu"):  # already there: nothing moves
        pass
    with on_device(m, "meta", enabled=False):
        pass
    with on_device(None, "meta") as got:
        assert got is None
    assert m.moves == [] and torch.equal(m.lin.weight, w) and m.lin.weight.device.type == "cpu"


def test_on_device_real_move_keeps_weights():
    """A real round trip through the context manager (cpu -> cpu as the only device here) keeps the weights."""
    m = RecordingModule()
    w = m.lin.weight.detach().clone()
    with on_device(m, torch.device("cpu")):
        assert m.lin.weight.device.type == "cpu"
    assert torch.equal(m.lin.weight, w)


def test_fp16_on_cpu_exits_2_before_loading(tmp_path, capsys):
    img = write_rgba(tmp_path / "a.png")
    code = predict_tool.main(["--config", "x.yaml", "--image", str(img), "--out", str(tmp_path / "o"),
                              "--device", "cpu", "--dtype", "fp16", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--dtype fp16 is not supported on CPU" in err and "bf16" in err
    assert not (tmp_path / "o").exists()


def test_dtype_defaults_and_help():
    args = predict_tool.build_parser().parse_args(["--config", "c.yaml", "--image", "a.png", "--device", "cpu"])
    device, dtype, msg = predict_tool._device_and_dtype(args)
    assert device.type == "cpu" and dtype is torch.float32 and msg is None
    args.dtype = "bf16"
    assert predict_tool._device_and_dtype(args)[1] is torch.bfloat16
    help_text = predict_tool.build_parser().format_help()
    assert "--dtype" in help_text and "--offload" in help_text and "no-op on CPU" in help_text.replace("\n", " ")
    assert set(DTYPES) == {"fp32", "fp16", "bf16"}


def test_cast_weights_keeps_decoder_and_buffers_fp32():
    """ImageTo3D(dtype=bf16) casts the UNet, VAE, CLIP and DINO networks; the decoder and the encoders'
    normalisation buffers stay fp32."""
    from gsv3d_pl.inference import ImageTo3D
    from gsv3d_pl.models import SV3D, VAE, CLIPImageEmbedder, DINOEncoder

    decoder = nn.Linear(2, 2)
    pipe = ImageTo3D(SV3D(), VAE(), CLIPImageEmbedder(), decoder, DINOEncoder(), dtype=torch.bfloat16)
    assert pipe.sv3d.unet.dtype == torch.bfloat16 and pipe.vae.vae.dtype == torch.bfloat16
    assert next(pipe.clip.visual.parameters()).dtype == torch.bfloat16
    assert next(pipe.dino.vit.parameters()).dtype == torch.bfloat16
    assert decoder.weight.dtype == torch.float32
    assert pipe.clip.mean.dtype == torch.float32 and pipe.dino.std.dtype == torch.float32
    assert pipe.device.type == "cpu" and not pipe.offload
