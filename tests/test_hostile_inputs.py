"""Hostile inputs, part 1: checkpoints that would run code, killed checkpoint writes, resume and config errors.

Images: tests/test_hostile_images.py. The render and latent caches: tests/test_hostile_cache.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from gsv3d_pl import cli
from gsv3d_pl.checkpoints import AtomicCheckpointIO, CheckpointReadError, read_checkpoint, resolve_resume
from gsv3d_pl.stages.handoff import load_decoder, resolve_decoder_class
from gsv3d_pl.tools import predict as predict_tool
from tests.images import write_rgba


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["gsv3d"])  # LightningCLI warns when pytest's own argv differs from args

ROOT = Path(__file__).resolve().parents[1]
TINY_DECODER = str(ROOT / "configs" / "decoder" / "tiny.yaml")
TINY_DISTILL = str(ROOT / "configs" / "distill" / "tiny.yaml")


class Payload:
    """Unpickling this runs ``touch <sentinel>``: what a malicious .ckpt does under ``weights_only=False``."""

    def __init__(self, sentinel: Path):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def evil_checkpoint(path: Path, sentinel: Path, stage: str = "distill") -> Path:
    torch.save({"state_dict": {"x": torch.zeros(1)}, "gsv3d": {"stage": stage}, "payload": Payload(sentinel)}, path)
    return path


@pytest.fixture(scope="module")
def decoder_ckpt(tmp_path_factory) -> Path:
    """A real stage-1 checkpoint of configs/decoder/tiny.yaml, as `gsv3d fit` writes its record."""
    tmp = tmp_path_factory.mktemp("dec")
    stage, _ = predict_tool.load_stage([TINY_DECODER])
    ckpt = {"state_dict": stage.state_dict()}
    stage.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp / "decoder.ckpt")
    return tmp / "decoder.ckpt"


def distill_overlay(tmp_path: Path, decoder: Path) -> list[str]:
    overlay = {"trainer": {"default_root_dir": str(tmp_path / "run"), "logger": False},
               "model": {"init_args": {"decoder_ckpt": str(decoder)}},
               "data": {"init_args": {"cache_dir": str(tmp_path / "cache")}}}
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    return [TINY_DISTILL, str(tmp_path / "overlay.yaml")]


# ---------------------------------------------------------------------------------------- safe loading

def test_the_loader_refuses_a_pickle_payload_and_never_suggests_unsafe_loading(tmp_path):
    sentinel = tmp_path / "pwned"
    ckpt = evil_checkpoint(tmp_path / "evil.ckpt", sentinel)
    with pytest.raises(CheckpointReadError) as e:
        read_checkpoint(ckpt, "--ckpt_path")
    msg = str(e.value)
    assert not sentinel.exists()
    assert str(ckpt) in msg and "refused" in msg and ("os.system" in msg or "posix.system" in msg)
    assert "weights_only=False" not in msg and "weights_only` set to `False" not in msg


def test_predict_refuses_a_pickle_payload_checkpoint(tmp_path, decoder_ckpt, capsys):
    sentinel = tmp_path / "pwned"
    evil = evil_checkpoint(tmp_path / "evil.ckpt", sentinel)
    img = write_rgba(tmp_path / "in.png")
    configs = distill_overlay(tmp_path, decoder_ckpt)
    code = predict_tool.main(["--config", configs[0], "--config", configs[1], "--ckpt_path", str(evil),
                              "--image", str(img), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and not sentinel.exists(), err
    assert str(evil) in err and "refused" in err and "weights_only=False" not in err
    assert not (tmp_path / "out").exists()


def test_the_apps_loading_refuses_a_pickle_payload_checkpoint(tmp_path, decoder_ckpt):
    from gsv3d_pl.tools import app as app_tool

    sentinel = tmp_path / "pwned"
    evil = evil_checkpoint(tmp_path / "evil.ckpt", sentinel)
    configs = distill_overlay(tmp_path, decoder_ckpt)
    args = app_tool.build_parser().parse_args(["--config", configs[0], "--config", configs[1], "--ckpt_path", str(evil)])
    with pytest.raises(ValueError, match="refused"):
        app_tool.build_runner(args)
    assert not sentinel.exists()


def test_decoder_ckpt_refuses_a_pickle_payload(tmp_path):
    sentinel = tmp_path / "pwned"
    evil = evil_checkpoint(tmp_path / "evil.ckpt", sentinel, stage="decoder")
    with pytest.raises(ValueError) as e:
        load_decoder(evil)
    assert not sentinel.exists()
    assert "model.init_args.decoder_ckpt" in str(e.value) and str(evil) in str(e.value)
    # and through a stage-2 config, as `gsv3d fit` / `test` / sweeps build it
    with pytest.raises(ValueError, match="refused"):
        predict_tool.load_stage(distill_overlay(tmp_path, evil))
    assert not sentinel.exists()


@pytest.mark.parametrize("class_path, init_args", [
    ("os.system", {"command": "touch {sentinel}"}),  # a callable outside the project
    ("gsv3d_pl.io.write_text_atomic", {"path": "{sentinel}", "text": "x"}),  # a project function, not a module
    ("subprocess.Popen", {"args": ["touch", "{sentinel}"]}),
])
def test_a_decoder_record_naming_a_non_module_callable_is_refused(tmp_path, class_path, init_args):
    sentinel = tmp_path / "pwned"
    init_args = yaml.safe_load(yaml.safe_dump(init_args).replace("{sentinel}", str(sentinel)))
    record = {"class_path": class_path, "init_args": init_args}
    # a checkpoint torch loads with weights_only=True: only strings, dicts and tensors
    path = tmp_path / "record.ckpt"
    torch.save({"state_dict": {"decoder.w": torch.zeros(2)}, "gsv3d": {"stage": "decoder", "decoder": record}}, path)
    with pytest.raises(ValueError) as e:
        load_decoder(path)
    assert not sentinel.exists()
    assert class_path in str(e.value) and str(path) in str(e.value) and "refused" in str(e.value)


@pytest.mark.parametrize("class_path", [
    "gsv3d_pl.stages.distill_stage.DistillStage",  # a stage: it would load a further checkpoint of the record's choice
    "gsv3d_pl.models.sv3d.UNetSpatioTemporalConditionModel",  # a third-party class reached through a project module
])
def test_project_paths_reach_only_the_projects_own_networks(class_path):
    with pytest.raises(ValueError, match="refused"):
        resolve_decoder_class(class_path)


def test_a_decoder_class_the_config_lists_is_trusted():
    with pytest.raises(ValueError, match="model.init_args.decoder_classes"):
        resolve_decoder_class("torch.nn.Linear")
    assert resolve_decoder_class("torch.nn.Linear", trusted=["torch.nn.Linear"]) is torch.nn.Linear
    with pytest.raises(ValueError, match="not a torch.nn.Module subclass"):
        resolve_decoder_class("os.system", trusted=["os.system"])


def test_the_real_stage1_checkpoint_still_loads(decoder_ckpt):
    decoder, meta = load_decoder(decoder_ckpt)
    assert meta["decoder"]["class_path"] == "gsv3d_pl.models.gs_decoder.GSDecoder"
    assert type(decoder).__name__ == "GSDecoder"


# ---------------------------------------------------------------------------------------- --ckpt_path

def _valid(path: Path, step: int) -> Path:
    torch.save({"state_dict": {"w": torch.full((2,), float(step))}, "global_step": step}, path)
    return path


def test_ckpt_path_last_takes_the_newest_checkpoint_that_loads(tmp_path):
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    older = _valid(ck / "step000002.ckpt", 2)
    last = _valid(ck / "last.ckpt", 3)
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated, and the newest
    os.utime(older, (time.time() - 60, time.time() - 60))
    path, warnings = resolve_resume([str(ck)])
    assert path == str(older.resolve())
    assert len(warnings) == 1 and str(last.resolve()) in warnings[0] and "truncated" in warnings[0]


def test_ckpt_path_last_on_an_empty_run_says_it_starts_from_scratch(tmp_path, capsys):
    from gsv3d_pl.config import parse_config

    cfg = parse_config(["--config", TINY_DECODER, f"--trainer.default_root_dir={tmp_path / 'typo'}",
                        "--ckpt_path=last"])
    err = capsys.readouterr().err.strip().splitlines()
    assert cfg.ckpt_path is None
    assert len(err) == 1 and "starting from scratch" in err[0] and str(tmp_path / "typo" / "checkpoints") in err[0]


@pytest.mark.parametrize("kind", ["truncated", "random"])
def test_fit_with_an_unreadable_ckpt_path_exits_2_naming_the_file(tmp_path, decoder_ckpt, capsys, kind):
    bad = tmp_path / "bad.ckpt"
    data = decoder_ckpt.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if kind == "truncated" else os.urandom(4096))
    run = tmp_path / "run"
    code = cli.main(["fit", "--config", TINY_DECODER, f"--trainer.default_root_dir={run}", f"--ckpt_path={bad}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(bad) in err[0], err
    assert "weights_only" not in err[0] and not run.exists()


# ---------------------------------------------------------------------------------------- config errors

@pytest.mark.parametrize("override, key", [
    ("--model.init_args.lr=-1", "model.init_args.lr"),
    ("--data.init_args.resolution=60", "data.init_args.resolution"),  # the tiny VAE downsamples by 8
    ("--data.init_args.num_input_views=0", "data.init_args.num_input_views"),
])
def test_fit_with_a_bad_value_exits_2_with_one_line_before_rendering(tmp_path, capsys, override, key):
    run, cache = tmp_path / "run", tmp_path / "cache"
    code = cli.main(["fit", "--config", TINY_DECODER, f"--trainer.default_root_dir={run}",
                     f"--data.init_args.cache_dir={cache}", override])
    full = capsys.readouterr().err
    err = [ln for ln in full.strip().splitlines() if ln.startswith("gsv3d fit")]
    assert code == 2 and len(err) == 1 and key in err[0], err
    assert "Traceback" not in full and "Given value" not in full  # no chained tracebacks, no config dump
    assert override.split("=")[1] in err[0]  # the value
    assert not run.exists() and not cache.exists()  # no run folder, nothing rendered


# ---------------------------------------------------------------------------------------- crash-safe writes

def test_the_cli_writes_checkpoints_atomically(tmp_path):
    c = cli.build_cli(args=["--config", TINY_DECODER, f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert isinstance(c.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


@pytest.mark.slow
def test_a_checkpoint_write_killed_half_way_never_truncates_last_ckpt(tmp_path):
    """$TMPDIR on another file system (/dev/shm): kill `gsv3d fit` while it rewrites last.ckpt, then resume."""
    if not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a file system other than the test's folder")
    megabytes = 128
    full = megabytes * 2**20
    tmpdir = Path("/dev/shm") / f"gsv3d-test-{os.getpid()}-{tmp_path.name}"
    tmpdir.mkdir()
    run = tmp_path / "run"
    cfg = {"trainer": {"default_root_dir": str(run), "max_steps": 40, "accelerator": "cpu", "logger": False,
                       "enable_progress_bar": False, "enable_model_summary": False,
                       "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                      "init_args": {"dirpath": "checkpoints", "save_last": True,
                                                    "every_n_train_steps": 1, "save_top_k": 1}}]},
           "model": {"class_path": "tests.hostile_models.BigCheckpointModel", "init_args": {"megabytes": megabytes}},
           "data": {"class_path": "tests.hostile_models.NumbersData"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "gsv3d_pl", "fit", "--config", str(tmp_path / "cfg.yaml")]
    ck = run / "checkpoints"
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        caught, whole = None, False
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline and caught is None:
            if not whole:  # wait for one complete last.ckpt, then catch a later rewrite half-way
                whole = (ck / "last.ckpt").exists() and (ck / "last.ckpt").stat().st_size >= full
                time.sleep(0.01)
                continue
            time.sleep(0.001)  # leave the core to the writer; a 128 MB write takes tens of ms
            try:
                for entry in os.scandir(ck):
                    size = entry.stat().st_size
                    if "last" in entry.name and 0 < size < 0.8 * full:
                        os.kill(proc.pid, signal.SIGKILL)
                        caught = (entry.name, size)
                        break
            except FileNotFoundError:
                pass  # a temporary file renamed between scandir and stat
        proc.wait(60)
        assert caught is not None, "never saw a checkpoint write in progress: " + proc.stderr.read().decode()[-2000:]
        # last.ckpt is whole: the write in progress was a temporary file beside it
        saved = torch.load(ck / "last.ckpt", map_location="cpu", weights_only=True)
        assert saved["state_dict"]["ballast"].numel() == megabytes * 2**18
        step = int(saved["global_step"])

        res = subprocess.run(cmd + ["--ckpt_path=last", f"--trainer.max_steps={step + 2}"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "Restoring states from the checkpoint path" in res.stderr + res.stdout
        assert int(torch.load(ck / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]) == step + 2
        assert not [p for p in os.listdir(ck) if p.startswith(".")], os.listdir(ck)  # the orphan was cleaned
        assert not [p for p in tmpdir.rglob("*") if p.is_file() and p.stat().st_size > 2**20]  # nothing in $TMPDIR
    finally:
        if "proc" in locals() and proc.poll() is None:
            proc.kill()
        import shutil

        shutil.rmtree(tmpdir, ignore_errors=True)


def test_orphan_cleanup_only_takes_the_projects_temp_files(tmp_path):
    from gsv3d_pl.checkpoints import clean_orphan_temp_files
    from gsv3d_pl.io import atomic_path

    keep = _valid(tmp_path / "last.ckpt", 1)
    other = tmp_path / ".hidden_user_file.ckpt"
    other.write_text("x")
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "last.ckpt", suffix=".ckpt") as tmp:
        Path(tmp).write_bytes(b"half")
        orphan = Path(tmp)
        os.link(tmp, tmp + ".keep")  # atomic_path removes its temp file on an exception; a SIGKILL would not
        raise KeyboardInterrupt
    os.replace(str(orphan) + ".keep", orphan)
    assert clean_orphan_temp_files([str(tmp_path)]) == [str(orphan)]
    assert keep.exists() and other.exists() and not orphan.exists()


def test_atomic_checkpoint_io_round_trip_and_refusal(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, tmp_path / "a" / "x.ckpt")
    assert torch.equal(io.load_checkpoint(tmp_path / "a" / "x.ckpt")["state_dict"]["w"], torch.ones(3))
    assert os.listdir(tmp_path / "a") == ["x.ckpt"]
    sentinel = tmp_path / "pwned"
    evil = evil_checkpoint(tmp_path / "evil.ckpt", sentinel)
    with pytest.raises(CheckpointReadError):
        io.load_checkpoint(evil)
    assert not sentinel.exists()
    torch.load(evil, weights_only=False)  # the payload is real: loading it unsafely runs it
    assert sentinel.exists()


def test_a_checkpoint_cannot_widen_the_trust_list_or_change_the_model_class(tmp_path):
    from gsv3d_pl.config import parse_config

    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {
        "_class_path": "gsv3d_pl.stages.decoder_stage.DecoderStage", "lr": 0.002,
        "decoder_classes": ["evil.Module"]}}, path)
    hp = cli.checkpoint_hparams(parse_config(["--config", TINY_DECODER, f"--ckpt_path={path}"], subcommand="test"))
    assert hp["dict_kwargs"] == {"lr": 0.002}  # merged as Lightning does, without the trust list
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "gsv3d_pl.stages.distill_stage.DistillStage"}},
               path)
    with pytest.raises(ValueError, match="config builds"):
        cli.checkpoint_hparams(parse_config(["--config", TINY_DECODER, f"--ckpt_path={path}"], subcommand="test"))


def test_the_app_prunes_only_its_own_old_result_folders(tmp_path):
    from gsv3d_pl.app import AppRunner

    class Pipe:
        num_steps = 2

    runner = AppRunner(Pipe(), 64, tmp_path, keep_results_s=60)
    old, new, user = tmp_path / "chair-0123abcd", tmp_path / "chair-89abcdef", tmp_path / "my-notes"
    for d in (old, new, user):
        d.mkdir()
    for d in (old, user):
        os.utime(d, (time.time() - 3600, time.time() - 3600))
    assert runner.prune_results() == [old]
    assert not old.exists() and new.exists() and user.exists()
    assert AppRunner(Pipe(), 64, tmp_path, keep_results_s=None).prune_results() == []
