"""`python -m gsv3d_pl.tools.run_parallel`: independent stages side by side (what `make demo` trains with)."""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import pytest

from gsv3d_pl.tools.run_parallel import Job, StepFile, fit_job, plan_jobs, run_jobs, share_threads


def _job(tmp_path: Path, name: str, code: str, **env) -> Job:
    log = tmp_path / name / "fit.log"
    return Job(name=name, argv=[sys.executable, "-c", code], log=log, env={k: str(v) for k, v in env.items()})


def _stage(steps: int, exit_code: int = 0, sleep: float = 0.05) -> str:
    # A fake stage: reports its step as StepFile does, prints a summary line and the thread count it was given.
    return (
        "import os, sys, time, pathlib\n"
        "root = pathlib.Path(os.environ['ROOT'])\n"
        f"for s in range({steps} + 1):\n"
        f"    (root / 'progress').write_text(f'{{s}} {steps}\\n'); time.sleep({sleep})\n"
        "print('noise line')\n"
        "print('[stage] done with', os.environ.get('OMP_NUM_THREADS'), 'threads', flush=True)\n"
        f"sys.exit({exit_code})\n"
    )


def test_jobs_run_side_by_side_and_report_their_summaries(tmp_path):
    jobs = [_job(tmp_path, n, _stage(4), ROOT=tmp_path / n, OMP_NUM_THREADS=1) for n in ("a", "b")]
    out = io.StringIO()
    t0 = time.perf_counter()
    assert run_jobs(jobs, poll_s=0.05, out=out) == 0
    assert time.perf_counter() - t0 < 20
    text = out.getvalue()
    for n in ("a", "b"):
        assert "[stage] done with 1 threads" in (tmp_path / n / "fit.log").read_text()
        assert f"{n} ({tmp_path / n / 'fit.log'}):" in text
    assert "noise line" not in text  # only the [..] summary lines reach the terminal
    assert "4/4" in text  # the bars read the children's progress files


def test_a_failed_stage_stops_the_others_and_shows_its_log(tmp_path):
    slow = _job(tmp_path, "slow", _stage(10_000, sleep=0.05), ROOT=tmp_path / "slow")
    bad = _job(tmp_path, "bad", "import sys; print('Traceback: boom'); sys.exit(3)")
    out = io.StringIO()
    t0 = time.perf_counter()
    assert run_jobs([slow, bad], poll_s=0.05, out=out) == 3
    assert time.perf_counter() - t0 < 60  # the slow stage (500 s) was stopped, not waited for
    text = out.getvalue()
    assert "stage bad failed (exit 3)" in text and "Traceback: boom" in text


def test_fit_job_reads_the_run_folder_and_steps_of_a_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("trainer:\n  default_root_dir: runs/x_mini\n  max_steps: 240\n")
    job = fit_job(str(cfg), threads=1)
    assert job.log == Path("runs/x_mini/fit.log") and job.total == 240 and job.name == "x_mini"
    assert job.env["OMP_NUM_THREADS"] == "1"
    assert job.argv[1:5] == ["-m", "gsv3d_pl", "fit", "--config"]
    assert any("StepFile" in a for a in job.argv)
    moved = fit_job(str(cfg), threads=2, extra=["--trainer.default_root_dir=/tmp/elsewhere"])
    assert moved.log == Path("/tmp/elsewhere/fit.log") and moved.env["OMP_NUM_THREADS"] == "2"
    (tmp_path / "bad.yaml").write_text("trainer: {max_steps: 3}\n")
    with pytest.raises(SystemExit, match="default_root_dir"):
        fit_job(str(tmp_path / "bad.yaml"), threads=1)


def test_step_file_writes_the_global_step(tmp_path):
    from types import SimpleNamespace

    cb = StepFile(every=5)
    tr = SimpleNamespace(global_step=3, max_steps=12, is_global_zero=True, default_root_dir=str(tmp_path))
    cb.on_train_batch_end(tr, None, None, None, 0)
    assert not (tmp_path / "progress").exists()  # not a multiple of 5
    tr.global_step = 10
    cb.on_train_batch_end(tr, None, None, None, 0)
    assert (tmp_path / "progress").read_text().split() == ["10", "12"]
    tr.global_step = 12  # the last step is always written
    cb.on_train_batch_end(tr, None, None, None, 0)
    assert (tmp_path / "progress").read_text().split() == ["12", "12"]


def test_a_finished_stage_hands_its_cores_to_the_one_still_running(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    quick = _job(tmp_path, "quick", _stage(1), ROOT=tmp_path / "quick")
    # the slow stage waits for its threads file, as StepFile would read it, and prints what it got
    slow = _job(tmp_path, "slow", "import pathlib, time, os\np = pathlib.Path(os.environ['ROOT']) / 'threads'\n"
                "t = time.time()\nwhile not p.exists() and time.time() - t < 20: time.sleep(0.02)\n"
                "print('[stage] threads', p.read_text().strip() if p.exists() else None, flush=True)\n",
                ROOT=tmp_path / "slow")
    assert run_jobs([quick, slow], poll_s=0.05, out=io.StringIO()) == 0
    assert "[stage] threads 2" in (tmp_path / "slow" / "fit.log").read_text()
    # the child side: StepFile applies a new count once, at its next step
    jobs = [Job("a", [], tmp_path / "a" / "fit.log"), Job("b", [], tmp_path / "b" / "fit.log")]
    for j in jobs:
        j.log.parent.mkdir()
    share_threads(jobs, [0, 1], cores=4)
    assert (tmp_path / "a" / "threads").read_text().split() == ["2"]
    before = torch.get_num_threads()
    try:
        from types import SimpleNamespace

        tr = SimpleNamespace(global_step=1, max_steps=9, is_global_zero=True, default_root_dir=str(tmp_path / "a"))
        target = 1 if before != 1 else 2
        (tmp_path / "a" / "threads").write_text(f"{target}\n")
        StepFile().on_train_batch_end(tr, None, None, None, 0)
        assert torch.get_num_threads() == target
    finally:
        torch.set_num_threads(before)


def test_seeds_run_each_config_once_per_seed_in_its_own_folder(tmp_path):
    cfg = tmp_path / "d.yaml"
    cfg.write_text("trainer:\n  default_root_dir: runs/distill_mini\n  max_steps: 60\n")
    jobs = plan_jobs([str(cfg)], seeds=[1, 2], seed_keys=["model.init_args.e2e_seed"], threads=1)
    assert [j.log for j in jobs] == [Path("runs/distill_mini_seed1/fit.log"), Path("runs/distill_mini_seed2/fit.log")]
    for s, j in zip((1, 2), jobs):
        assert f"--seed_everything={s}" in j.argv and f"--model.init_args.e2e_seed={s}" in j.argv
        assert f"--trainer.default_root_dir=runs/distill_mini_seed{s}" in j.argv and j.total == 60
    assert [j.log for j in plan_jobs([str(cfg)], threads=1)] == [Path("runs/distill_mini/fit.log")]
    moved = plan_jobs([str(cfg)], extra=["--trainer.default_root_dir=/tmp/d"], seeds=[3], threads=1)
    assert moved[0].log == Path("/tmp/d_seed3/fit.log")  # a folder override moves the seed folders with it
    with pytest.raises(SystemExit, match="--seed-key needs --seeds"):
        plan_jobs([str(cfg)], seed_keys=["x"])
