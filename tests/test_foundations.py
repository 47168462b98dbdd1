"""The shared foundations: atomic writes (io), the one config reader (config), the batch table (batch), the orbit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from gsv3d_pl.batch import BATCH_KEYS, BatchError, check_batch, check_novel_views
from gsv3d_pl.config import ConfigError, instantiate_section, parse_config
from gsv3d_pl.io import atomic_dir, atomic_path, atomic_write, write_json_atomic
from gsv3d_pl.orbit import INPUT_FRAME, NUM_FRAMES, input_frames, orbit_angles, orbit_azimuths_deg

ROOT = Path(__file__).resolve().parents[1]


# ---- io -----------------------------------------------------------------------------------------------------
def test_atomic_write_keeps_the_old_file_on_error_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "metrics.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write('{"a": 2, "trunc')
            raise RuntimeError("killed mid-write")
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_atomic_path_keeps_the_suffix_for_format_sniffing_writers(tmp_path):
    with atomic_path(tmp_path / "grid.png") as tmp:
        assert tmp.endswith(".png") and Path(tmp).parent == tmp_path
        Path(tmp).write_bytes(b"png")
    assert (tmp_path / "grid.png").read_bytes() == b"png"


def test_atomic_dir_swaps_a_whole_folder(tmp_path):
    out = tmp_path / "lora"
    with atomic_dir(out) as d:
        Path(d, "weights.bin").write_text("v1")
    with pytest.raises(ValueError):
        with atomic_dir(out) as d:
            Path(d, "weights.bin").write_text("half")
            raise ValueError
    assert Path(out, "weights.bin").read_text() == "v1"
    with atomic_dir(out) as d:
        Path(d, "new.bin").write_text("v2")
    assert sorted(p.name for p in out.iterdir()) == ["new.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]


# ---- config -------------------------------------------------------------------------------------------------
def test_parse_config_composes_like_fit_and_accepts_a_saved_config(tmp_path):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    cfg = parse_config(["--config", str(ROOT / "configs/decoder/tiny.yaml"), "--trainer.max_steps=7",
                        "--trainer.default_root_dir", str(tmp_path / "run")])
    assert torch.equal(torch.rand(3), expected)  # reading a config does not reseed the caller's RNG
    assert cfg.trainer.max_steps == 7 and cfg.model.class_path == "gsv3d_pl.DecoderStage"
    assert cfg.trainer.callbacks[0].init_args.dirpath == str(tmp_path / "run" / "checkpoints")  # rerooted
    # a run's saved config.yaml has the subcommand's own keys (ckpt_path): accepted for test/predict too
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump({**yaml.safe_load((ROOT / "configs/decoder/tiny.yaml").read_text()),
                                     "ckpt_path": None}))
    for sub in ("fit", "test", "predict"):
        assert parse_config(["--config", str(saved)], subcommand=sub).ckpt_path is None


def test_parse_config_names_the_bad_key():
    with pytest.raises(ConfigError, match="lamda_rgb"):
        parse_config(["--config", str(ROOT / "configs/decoder/tiny.yaml"), "--model.init_args.lamda_rgb=0"])


def test_instantiate_section_builds_only_that_section(tmp_path):
    cfg = parse_config(["--config", str(ROOT / "configs/decoder/tiny.yaml"),
                        f"--data.init_args.cache_dir={tmp_path}", "--model.init_args.vae.init_args.path=/nope"])
    dm = instantiate_section(cfg, "data")  # the model (with its impossible VAE path) is never built
    assert type(dm).__name__ == "ObjaverseDataModule" and dm.resolution == 64
    with pytest.raises(ConfigError, match="no 'nothing' section"):
        instantiate_section(cfg, "nothing", object)


# ---- batch --------------------------------------------------------------------------------------------------
def _item(Q=23, N=4, H=16) -> dict:
    d = {"uid": "x", "mesh_path": "x.glb", "norm_center": torch.zeros(3), "norm_scale": torch.tensor(1.0),
         "input_indices": torch.tensor(input_frames(N)), "input_images": torch.rand(N, 3, H, H),
         "input_c2w": torch.eye(4).expand(N, 4, 4), "input_K": torch.eye(3).expand(N, 3, 3),
         "cond_image": torch.rand(3, H, H), "target_images": torch.rand(Q, 3, H, H),
         "target_alphas": torch.rand(Q, 1, H, H), "target_depths": torch.rand(Q, 1, H, H),
         "target_c2w": torch.eye(4).expand(Q, 4, 4), "target_K": torch.eye(3).expand(Q, 3, 3),
         "orbit_polars_rad": torch.rand(NUM_FRAMES), "orbit_azimuths_rad": torch.rand(NUM_FRAMES)}
    return d


def test_check_batch_names_the_key():
    assert check_batch(_item(), batched=False) == {"N": 4, "H": 16, "W": 16, "Q": 23}
    bad = _item()
    bad["target_alphas"] = torch.rand(22, 1, 16, 16)
    with pytest.raises(BatchError, match="'target_alphas' has Q = 22"):
        check_batch(bad, batched=False)
    bad = _item()
    del bad["cond_image"]
    with pytest.raises(BatchError, match=r"missing key\(s\) \['cond_image'\]"):
        check_batch(bad, batched=False)
    bad = _item()
    bad["input_indices"] = bad["input_indices"].float()
    with pytest.raises(BatchError, match="integer"):
        check_batch(bad, batched=False)
    with pytest.raises(BatchError, match="21 orbit frames"):
        check_batch(_item(Q=12, N=2), batched=False)
    with pytest.raises(BatchError, match="missing"):
        check_novel_views({"pred_images": torch.rand(1, 2, 3, 4, 4)})
    assert not BATCH_KEYS["uid"].optional and BATCH_KEYS["target_latents"].optional


# ---- orbit --------------------------------------------------------------------------------------------------
def test_orbit_facts():
    az = orbit_azimuths_deg()
    assert len(az) == NUM_FRAMES == 21 and INPUT_FRAME == 20 and az[INPUT_FRAME] == 0.0
    assert torch.allclose(az[:2], torch.tensor([360 / 21, 720 / 21], dtype=torch.float64))
    assert input_frames(4) == [4, 9, 15, 20] and input_frames(1) == [20] and input_frames(21) == list(range(21))
    assert all(INPUT_FRAME in input_frames(n) and len(input_frames(n)) == n for n in range(1, 22))
    with pytest.raises(ValueError, match=r"\[1, 21\]"):
        input_frames(0)
    pol, azr = orbit_angles(2, elevation_deg=torch.tensor([0.0, 30.0]))
    assert pol.shape == azr.shape == (2, 21)
    assert torch.allclose(pol[:, 0], torch.deg2rad(torch.tensor([90.0, 60.0])))
