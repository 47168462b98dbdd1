"""`gsv3d predict`: bad input, atomic output folders, config loading, text -> image, and the end-to-end
image -> 3D run with a tiny distill checkpoint built in the test (preprocessing: tests/test_preprocess.py)."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gsv3d_pl.inference import ImageInputError, atomic_output_dir, preprocess_image
from gsv3d_pl.tools import predict as predict_tool
from tests.images import write_rgb_white, write_rgba

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ helpers

def no_leftovers(parent: Path, name: str) -> bool:
    """Neither the output folder nor any temporary (hidden) sibling of it exists."""
    if not parent.exists():
        return True
    hidden = [p for p in parent.iterdir() if p.name.startswith(".") and name in p.name]
    return not (parent / name).exists() and not hidden


# ------------------------------------------------------------------------------------------------ bad input

def _bad_not_image(p: Path):
    p.write_text("this is not an image\n")


def _bad_corrupt(p: Path):
    write_rgba(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])  # truncated PNG


def _bad_zero_size(p: Path):
    p.write_bytes(b"")


def _bad_small(p: Path):
    write_rgba(p, size=48)


def _bad_zero_dims(p: Path):
    # a structurally valid PNG header declaring a 0 x 0 image
    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 0, 0, 8, 6, 0, 0, 0)
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _bad_cluttered(p: Path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(p)


BAD_CASES = {
    "not_an_image": (_bad_not_image, "not an image"),
    "corrupt": (_bad_corrupt, "corrupt or truncated"),
    "zero_bytes": (_bad_zero_size, "empty (0 bytes)"),
    "zero_dims": (_bad_zero_dims, "image"),
    "too_small": (_bad_small, "at least 64 px"),
    "no_alpha_cluttered": (_bad_cluttered, "an RGBA image is needed"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_image_is_named_and_leaves_nothing(case, tmp_path, capsys):
    make, expected = BAD_CASES[case]
    img = tmp_path / f"{case}.png"
    make(img)
    with pytest.raises(ImageInputError) as exc:
        preprocess_image(img, size=64)
    assert str(img) in str(exc.value) and expected in str(exc.value)

    out = tmp_path / "out" / case
    code = predict_tool.main(["--config", str(tmp_path / "unused.yaml"), "--image", str(img), "--out", str(out),
                              "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert str(img) in err and expected in err
    assert no_leftovers(out.parent, case)


def test_folder_of_only_bad_images_leaves_nothing(tmp_path, capsys):
    src = tmp_path / "imgs"
    src.mkdir()
    _bad_small(src / "a.png")
    _bad_not_image(src / "b.jpg")
    out = tmp_path / "results"
    code = predict_tool.main(["--config", "x.yaml", "--image", str(src), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "a.png" in err and "b.jpg" in err
    assert not out.exists()


def test_missing_image_and_empty_folder(tmp_path, capsys):
    assert predict_tool.main(["--config", "x.yaml", "--image", str(tmp_path / "nope.png"), "--quiet"]) == 1
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert predict_tool.main(["--config", "x.yaml", "--image", str(tmp_path / "empty"), "--quiet"]) == 2
    assert "holds no images" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ atomic output

def test_atomic_output_dir_all_or_nothing(tmp_path):
    out = tmp_path / "res"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            (tmp / "half.ply").write_text("partial")
            raise RuntimeError("boom")
    assert no_leftovers(tmp_path, "res")

    with atomic_output_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (out / "a.txt").read_text() == "1"

    # a failed rerun keeps the previous result intact
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            (tmp / "b.txt").write_text("2")
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]

    # a successful rerun replaces it
    with atomic_output_dir(out) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["c.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]

    with pytest.raises(FileExistsError):
        with atomic_output_dir(out, overwrite=False):
            pass


def test_existing_output_refused_without_overwrite(tmp_path, capsys):
    img = write_rgba(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code = predict_tool.main(["--config", "x.yaml", "--image", str(img), "--out", str(out), "--quiet"])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").exists()


def test_prompt_without_pipeline_folder_is_missing_weights(tmp_path, capsys):
    from gsv3d_pl.inference import text_to_image
    from gsv3d_pl.weights import MissingWeightsError

    missing = tmp_path / "no_such_pipeline"
    with pytest.raises(MissingWeightsError) as exc:
        text_to_image("a cup", missing)
    assert str(missing) in str(exc.value) and "--t2i_pipeline" in str(exc.value)
    code = predict_tool.main(["--config", "x.yaml", "--prompt", "a cup", "--t2i_pipeline", str(missing),
                              "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "Missing pretrained weights" in err and str(missing) in err
    assert not (tmp_path / "o").exists()
    assert predict_tool.main(["--config", "x.yaml", "--prompt", "a cup"]) == 2
    assert "--t2i_pipeline" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ configs

@pytest.mark.parametrize("saved_by", [{"ckpt_path": None}, {"ckpt_path": None, "verbose": True}], ids=["fit", "test"])
def test_load_stage_takes_a_saved_run_config(tmp_path, saved_by):
    """A run's saved config.yaml holds its subcommand's keys (``ckpt_path``; ``verbose`` from `gsv3d test`):
    accepted. Only the model is built (no datamodule, no logger folders); the data settings come from
    ``data.init_args``, the input frames by the datamodule's rule."""
    import yaml

    from gsv3d_pl.orbit import input_frames

    cfg = yaml.safe_load((ROOT / "configs" / "decoder" / "tiny.yaml").read_text())
    cfg.update(saved_by)
    cfg["trainer"]["default_root_dir"] = str(tmp_path / "run")
    cfg["data"]["init_args"]["cache_dir"] = str(tmp_path / "cache")
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(cfg, sort_keys=False))
    stage, settings = predict_tool.load_stage([str(saved)])
    assert type(stage).__name__ == "DecoderStage"
    init = cfg["data"]["init_args"]
    assert settings["resolution"] == init["resolution"] and settings["num_input_views"] == init["num_input_views"]
    assert settings["eval_input_indices"] == input_frames(init["num_input_views"]) == [4, 9, 15, 20]
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_bad_config_key_is_named_with_exit_2(tmp_path, capsys):
    img = write_rgba(tmp_path / "a.png")
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  init_args:\n    lamda_rgb: 0.0\n")
    tiny = str(ROOT / "configs" / "decoder" / "tiny.yaml")
    code = predict_tool.main(["--config", tiny, "--config", str(typo), "--image", str(img), "--out",
                              str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "lamda_rgb" in err and str(typo) in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ text -> image

def build_tiny_t2i_pipeline(folder: Path) -> Path:
    """A random-init Stable-Diffusion pipeline (tiny UNet/VAE/CLIP text encoder, a 54-token BPE vocabulary
    written here, so nothing is downloaded), saved with ``save_pretrained``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=32,
    )
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=64, max_position_embeddings=77,
    ))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tok_dir = folder / "tokenizer_src"
    tok_dir.mkdir(parents=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out = folder / "pipeline"
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_t2i(tmp_path_factory) -> Path:
    return build_tiny_t2i_pipeline(tmp_path_factory.mktemp("t2i"))


@pytest.mark.slow
def test_text_to_image_with_tiny_local_pipeline(tiny_t2i):
    from gsv3d_pl.inference import text_to_image

    a = text_to_image("a red cup", tiny_t2i, num_steps=2, size=64, seed=3)
    b = text_to_image("a red cup", tiny_t2i, num_steps=2, size=64, seed=3)
    assert a.size == (64, 64) and a.mode == "RGB"
    arr = np.asarray(a)
    assert arr.std() > 0 and np.array_equal(arr, np.asarray(b))  # deterministic for a seed


# ------------------------------------------------------------------------------------------------ end to end
# A tiny "demo checkpoint" made in the test: the stage-1 decoder of configs/decoder/tiny.yaml (random init,
# saved as a DecoderStage checkpoint) and a DistillStage checkpoint with non-zero LoRA weights.

def _read_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    import yaml

    tmp = tmp_path_factory.mktemp("demo")
    dec_yaml = ROOT / "configs" / "decoder" / "tiny.yaml"
    dec_args = _read_yaml(dec_yaml)["model"]["init_args"]["decoder"]["init_args"]
    # The stage-1 checkpoint as `gsv3d fit` writes it (the stage's own hook records the decoder's class/args).
    dec_stage, _ = predict_tool.load_stage([str(dec_yaml)])
    dec_ckpt = {"state_dict": dec_stage.state_dict()}
    dec_stage.on_save_checkpoint(dec_ckpt)
    torch.save(dec_ckpt, tmp / "decoder.ckpt")

    overlay = {
        "trainer": {"default_root_dir": str(tmp / "run"), "logger": False},
        "model": {"init_args": {"decoder_ckpt": str(tmp / "decoder.ckpt")}},
        "data": {"init_args": {"cache_dir": str(tmp / "cache")}},
    }
    (tmp / "overlay.yaml").write_text(yaml.safe_dump(overlay, sort_keys=False))
    configs = [ROOT / "configs" / "distill" / "tiny.yaml", tmp / "overlay.yaml"]

    stage, settings = predict_tool.load_stage([str(c) for c in configs])
    ckpt = {"state_dict": stage.state_dict()}
    stage.on_save_checkpoint(ckpt)
    g = torch.Generator().manual_seed(0)
    for k, v in ckpt["state_dict"].items():
        if "lora_B" in k:  # peft initialises B to zero: make the adapter do something, to see it load
            v.copy_(torch.randn(v.shape, generator=g) * 0.02)
    torch.save(ckpt, tmp / "distill.ckpt")
    n = len(settings["eval_input_indices"])
    side = settings["resolution"] // dec_args.get("vae_factor", 8) * dec_args["upsample"]
    return {"tmp": tmp, "configs": [str(c) for c in configs], "ckpt": tmp / "distill.ckpt", "stage": stage,
            "lora": {k: v for k, v in ckpt["state_dict"].items() if "lora_B" in k}, "num_gaussians": n * side * side}


def _count_frames(path: Path) -> int:
    if path.suffix == ".gif":
        return Image.open(path).n_frames
    import imageio.v2 as imageio

    reader = imageio.get_reader(path, format="FFMPEG")
    try:
        return reader.count_frames()
    finally:
        reader.close()


def _check_outputs(folder: Path, num_gaussians: int, frames: int) -> None:
    from gsv3d_pl.gaussians import Gaussians

    names = {p.name for p in folder.iterdir()}
    for required in ("gaussians.ply", "views.png", "depth.png", "renders.png", "input.png"):
        assert required in names, f"{required} missing in {folder}: {names}"
    video = [folder / n for n in names if n.startswith("turntable.")]
    assert len(video) == 1 and video[0].suffix in (".mp4", ".gif")
    assert _count_frames(video[0]) == frames
    g = Gaussians.load_ply(folder / "gaussians.ply")
    assert g.num_gaussians == num_gaussians and torch.isfinite(g.means).all()
    for png in ("views.png", "depth.png", "renders.png", "input.png"):
        arr = np.asarray(Image.open(folder / png).convert("RGB")).astype(np.float32)
        assert arr.std() > 2.0, f"{png} is constant"
    views = np.asarray(Image.open(folder / "views.png"))
    assert views.shape[0] > views.shape[1] / 7 * 2  # 3 rows of 7 frames


@pytest.mark.slow
def test_load_checkpoint_restores_lora_and_rejects_stage1(demo):
    stage = demo["stage"]
    for k in demo["lora"]:
        dict(stage.named_parameters())[k].data.zero_()
    predict_tool.load_checkpoint(stage, str(demo["ckpt"]))
    params = dict(stage.named_parameters())
    for k, v in demo["lora"].items():
        assert torch.equal(params[k].detach(), v)
    bad = demo["tmp"] / "stage1.ckpt"
    torch.save({"state_dict": {}, "gsv3d": {"stage": "decoder"}}, bad)
    with pytest.raises(ValueError, match="stage-1"):
        predict_tool.load_checkpoint(stage, str(bad))
    with pytest.raises(FileNotFoundError):
        predict_tool.load_checkpoint(stage, str(demo["tmp"] / "missing.ckpt"))


@pytest.mark.slow
def test_predict_folder_rgba_and_rgb_white(demo, tmp_path, capsys):
    src = tmp_path / "images"
    src.mkdir()
    write_rgba(src / "rgba.png")
    write_rgb_white(src / "white.jpg", color=(30, 60, 200))
    _bad_small(src / "tiny.png")  # one bad image does not stop the others
    out = tmp_path / "out"
    code = predict_tool.main([
        *sum((["--config", c] for c in demo["configs"]), []), "--ckpt_path", str(demo["ckpt"]),
        "--image", str(src), "--out", str(out), "--num_steps", "2", "--turntable_frames", "5",
        "--render_size", "32", "--elevation", "10", "--quiet",
    ])
    err = capsys.readouterr().err
    assert code == 1 and "tiny.png" in err and "at least 64 px" in err  # the bad one is reported
    assert sorted(p.name for p in out.iterdir()) == ["rgba", "white"]  # no temp folders, nothing for tiny.png
    for name in ("rgba", "white"):
        _check_outputs(out / name, demo["num_gaussians"], frames=5)
    # the preprocessed inputs are the object on white, centred
    for name, colour in (("rgba", (200, 40, 30)), ("white", (30, 60, 200))):
        inp = np.asarray(Image.open(out / name / "input.png")).astype(np.float32)
        assert np.allclose(inp[0, 0], 255, atol=1) and np.allclose(inp[32, 32], colour, atol=12)


@pytest.mark.slow
def test_predict_from_text_prompt(demo, tiny_t2i, tmp_path):
    out = tmp_path / "cup"
    code = predict_tool.main([
        *sum((["--config", c] for c in demo["configs"]), []), "--ckpt_path", str(demo["ckpt"]),
        "--prompt", "a red cup", "--t2i_pipeline", str(tiny_t2i), "--t2i_steps", "2", "--t2i_size", "64",
        "--out", str(out), "--num_steps", "2", "--turntable_frames", "3", "--render_size", "32",
        "--video_format", "gif", "--quiet",
    ])
    assert code == 0
    _check_outputs(out, demo["num_gaussians"], frames=3)
    assert (out / "turntable.gif").exists()


@pytest.mark.slow
def test_decoder_only_config_is_refused(tmp_path, capsys):
    img = write_rgba(tmp_path / "a.png")
    code = predict_tool.main(["--config", str(ROOT / "configs" / "decoder" / "tiny.yaml"), "--image", str(img),
                              "--out", str(tmp_path / "o"), "--quiet",
                              "--config", str(_data_overlay(tmp_path))])
    assert code == 2 and "needs a distill config" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _data_overlay(tmp_path: Path) -> Path:
    import yaml

    p = tmp_path / "overlay.yaml"
    p.write_text(yaml.safe_dump({"trainer": {"logger": False, "default_root_dir": str(tmp_path / "run")},
                                 "data": {"init_args": {"cache_dir": str(tmp_path / "cache")}}}))
    return p


@pytest.mark.slow
def test_predict_bf16_on_cpu(demo, tmp_path, capsys):
    """--dtype bf16 on CPU: the UNet/VAE/CLIP/DINO run in bf16, the decoder in fp32; all outputs written."""
    img = write_rgba(tmp_path / "a.png")
    out = tmp_path / "out"
    code = predict_tool.main([
        *sum((["--config", c] for c in demo["configs"]), []), "--ckpt_path", str(demo["ckpt"]),
        "--image", str(img), "--out", str(out), "--num_steps", "2", "--turntable_frames", "3",
        "--render_size", "32", "--device", "cpu", "--dtype", "bf16", "--offload",
    ])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "bf16 weights" in err and "--offload does nothing on CPU" in err
    _check_outputs(out, demo["num_gaussians"], frames=3)
