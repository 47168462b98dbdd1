"""The `gsv3d` command: help, tool dispatch, config parsing and errors."""

import subprocess
import sys
from pathlib import Path

import pytest

from gsv3d_pl.cli import TOOLS, main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "decoder" / "tiny.yaml"


def run_main(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    out = capsys.readouterr()
    return exc.value.code, out.out + out.err


def test_help_lists_subcommands_and_tools(capsys):
    code, out = run_main(["--help"], capsys)
    assert code == 0
    for sub in ("fit", "validate", "test", "predict"):
        assert sub in out
    for tool in TOOLS:
        assert f"gsv3d {tool}" in out


def test_fit_help(capsys):
    code, out = run_main(["fit", "--help"], capsys)
    assert code == 0
    assert "--trainer.max_steps" in out and "--model" in out and "--data" in out


@pytest.mark.parametrize("entry", [["gsv3d"], [sys.executable, "-m", "gsv3d_pl"]])
def test_entry_points_are_the_same_command(entry):
    exe = [str(Path(sys.executable).parent / "gsv3d")] if entry == ["gsv3d"] else entry
    res = subprocess.run([*exe, "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "gsv3d data" in res.stdout and "{fit,validate,test,predict}" in res.stdout


def test_misspelled_key_is_named(tmp_path, capsys):
    bad = tmp_path / "typo.yaml"
    bad.write_text("model:\n  init_args:\n    lamda_rgb: 0.0\n")
    code, out = run_main(["fit", "--config", str(TINY), "--config", str(bad), "--print_config"], capsys)
    assert code != 0
    assert "lamda_rgb" in out


def test_misspelled_trainer_key_is_named(tmp_path, capsys):
    bad = tmp_path / "typo.yaml"
    bad.write_text("trainer:\n  max_stepz: 3\n")
    code, out = run_main(["fit", "--config", str(TINY), "--config", str(bad), "--print_config"], capsys)
    assert code != 0
    assert "max_stepz" in out


def test_run_paths_follow_default_root_dir():
    from jsonargparse import Namespace

    from gsv3d_pl.cli import reroot_run_paths

    def cfg(ckpt_dir, save_dir):
        return Namespace(
            default_root_dir="runs/sweep/a/seed0",
            logger=[Namespace(class_path="lightning.pytorch.loggers.CSVLogger",
                              init_args=Namespace(save_dir=save_dir, name="csv"))],
            callbacks=[Namespace(class_path="lightning.pytorch.callbacks.ModelCheckpoint",
                                 init_args=Namespace(dirpath=ckpt_dir, save_last=True))],
        )

    c = cfg("checkpoints", ".")  # the configs' relative form
    reroot_run_paths(c)
    assert c.callbacks[0].init_args.dirpath == "runs/sweep/a/seed0/checkpoints"
    assert c.logger[0].init_args.save_dir == "runs/sweep/a/seed0"
    c = cfg("/abs/ckpts", "runs/sweep/a/seed0")  # absolute, or already under the root: unchanged
    reroot_run_paths(c)
    assert c.callbacks[0].init_args.dirpath == "/abs/ckpts"
    assert c.logger[0].init_args.save_dir == "runs/sweep/a/seed0"
    c = cfg(None, ".")  # no dirpath: the run folder's checkpoints/, not Lightning's versioned default
    reroot_run_paths(c)
    assert c.callbacks[0].init_args.dirpath == "runs/sweep/a/seed0/checkpoints"


def test_data_prepare_overrides_and_config_errors(tmp_path, capsys):
    code, out = run_main(["data", "prepare", "--help"], capsys)
    assert code == 0 and "--config" in out and "--data.init_args" in out
    # Overrides go through the fit parser: a misspelled key and a bad value are both named; exit status 2.
    assert main(["data", "prepare", "--config", str(TINY), "--data.init_args.supersampel=2"]) == 2
    err = capsys.readouterr().err
    assert "supersampel" in err and str(TINY) in err
    assert main(["data", "prepare", "--config", str(TINY), "--data.init_args.supersample=0"]) == 2
    assert "data.init_args.supersample must be in 1..4" in capsys.readouterr().err
    small = ["--data.init_args.toy_objects=2", "--data.init_args.resolution=16", "--data.init_args.num_extra_views=0",
             f"--data.init_args.cache_dir={tmp_path / 'cache'}"]
    assert main(["data", "prepare", "--config", str(TINY), *small]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("rendered=2 skipped=0 repaired=0 cache=") and str(tmp_path / "cache") in last


def test_weights_tool_through_the_command(capsys):
    assert main(["weights", "--config", str(TINY)]) == 0
    assert "No external weight files" in capsys.readouterr().out
