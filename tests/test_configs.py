"""Every YAML under configs/ parses (`fit --config X --print_config`), so a broken config fails CI.

Stage configs (decoder/, distill/) parse alone; overlays (trainer/, ablations/) parse composed on the
tiny decoder config; sweep files go through the sweep loader, which validates every run it expands.
"""

from pathlib import Path

import pytest
import yaml

from gsv3d_pl.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
BASE = CONFIGS / "decoder" / "tiny.yaml"
OVERLAY_DIRS = ("trainer", "ablations")


def all_yaml():
    return sorted(p for p in CONFIGS.rglob("*.yaml"))


def test_there_are_configs():
    names = {p.relative_to(CONFIGS).as_posix() for p in all_yaml()}
    for required in ("decoder/tiny.yaml", "distill/tiny.yaml", "decoder/objaverse.yaml",
                     "distill/objaverse.yaml", "trainer/cpu.yaml", "trainer/gpu.yaml"):
        assert required in names


@pytest.mark.parametrize("path", [p for p in all_yaml() if p.parent.name != "sweeps"],
                         ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_config_parses(path, capsys):
    configs = [BASE, path] if path.parent.name in OVERLAY_DIRS else [path]
    if path.parent.name == "recipes":  # stage-2 recipes overlay a stage-2 config
        configs = [CONFIGS / "distill" / "mini.yaml", path]
    args = ["fit"]
    for c in configs:
        args += ["--config", str(c)]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--print_config"])
    out = capsys.readouterr()
    assert exc.value.code == 0, out.err
    printed = yaml.safe_load(out.out)
    assert printed["model"]["class_path"].startswith("gsv3d_pl.")
    assert printed["data"]["class_path"].startswith("datamodules.")


@pytest.mark.parametrize("path", sorted((CONFIGS / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_sweep_file_parses(path):
    from gsv3d_pl.sweep import load_sweep

    sweep = load_sweep(path)
    assert len(sweep.runs) > 0
