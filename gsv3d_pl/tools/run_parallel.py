"""Run independent ``gsv3d fit`` stages side by side, each on its own share of the CPU cores.

    python -m gsv3d_pl.tools.run_parallel [--threads 1] CONFIG [CONFIG ...] [-- EXTRA FIT ARGS]
    python -m gsv3d_pl.tools.run_parallel --seeds 1 2 [--seed-key model.init_args.e2e_seed] CONFIG

``--seeds`` runs each config once per seed, side by side: ``--seed_everything=S`` (and every ``--seed-key`` =
S), in ``<default_root_dir>_seed<S>`` (``make demo-seeds``: stage 2 of the demo at two more seeds).

Why: the miniature's stages are many small ops. On a 2-core laptop one fit with 2 intra-op threads is barely
faster than with 1 (OpenMP's fork/join costs about what the second core gives), so two independent stages that
each get one core finish in about the time of the longer one. ``make demo`` trains the SV3D fine-tune and the
GS decoder this way; neither reads the other's outputs.

Each stage writes its whole output to ``<trainer.default_root_dir>/fit.log``. The terminal shows one progress bar
per stage (its global step, which a :class:`StepFile` callback in the child writes beside the log), then each stage's summary lines (those that start
with ``[``, e.g. ``[heldout eval] ...``). When a stage finishes, the ones still running share its cores: the parent
writes their new thread count to a ``threads`` file beside each log, which :class:`StepFile` applies
(``torch.set_num_threads``) at its next step. If a stage fails, the others are stopped, the failed log's tail is
printed, and the exit status is the failed stage's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lightning.pytorch import Callback
from tqdm.auto import tqdm

__all__ = ["Job", "fit_job", "plan_jobs", "run_jobs", "share_threads", "main"]

_REPORTER = json.dumps({"class_path": "gsv3d_pl.tools.run_parallel.StepFile", "init_args": {"every": 5}})
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")


class StepFile(Callback):
    """Writes ``<global step> <max_steps>`` to ``<default_root_dir>/progress`` every ``every`` training steps, and
    takes the intra-op thread count the parent leaves in ``<default_root_dir>/threads`` (cores freed by a stage
    that finished).

    The parent's progress bars read it: Lightning's own bar prints nothing while its output is a file.
    """

    def __init__(self, every: int = 5):
        self.every = max(1, int(every))
        self._threads_mtime: float | None = None

    def _take_threads(self, root: str) -> None:
        path = Path(root, "threads")
        try:
            mtime = path.stat().st_mtime
            if mtime == self._threads_mtime:
                return
            n = int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):  # none yet, or read mid-write: the next step tries again
            return
        import torch

        self._threads_mtime = mtime
        if n >= 1 and n != torch.get_num_threads():
            torch.set_num_threads(n)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._take_threads(trainer.default_root_dir)
        step = trainer.global_step
        if trainer.is_global_zero and (step % self.every == 0 or step >= (trainer.max_steps or 0) > 0):
            Path(trainer.default_root_dir, "progress").write_text(f"{step} {trainer.max_steps}\n")


@dataclass
class Job:
    """One child process: ``argv`` run with ``env`` additions, all output to ``log``; its ``progress`` file (see
    :class:`StepFile`) sits beside the log."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    total: int | None = None  # expected steps (the bar's length before the child reports its own)


def _root_dir(config: str) -> str:
    """``trainer.default_root_dir`` of a fit config (where its log goes)."""
    import yaml

    path = Path(config)
    if not path.is_file():
        raise SystemExit(f"run_parallel: config {config} not found")
    cfg = yaml.safe_load(path.read_text()) or {}
    root = (cfg.get("trainer") or {}).get("default_root_dir")
    if not root:
        raise SystemExit(f"run_parallel: {config} sets no trainer.default_root_dir; each stage needs its own run "
                         "folder for its fit.log")
    return str(root)


def _run_folder(config: str, extra: Sequence[str] = ()) -> str:
    """The config's run folder, or the last ``--trainer.default_root_dir=`` override in ``extra``."""
    roots = [a.split("=", 1)[1] for a in extra if a.startswith("--trainer.default_root_dir=")]
    return roots[-1] if roots else _root_dir(config)


def fit_job(config: str, threads: int, extra: Sequence[str] = ()) -> Job:
    """The job that runs ``gsv3d fit --config CONFIG`` on ``threads`` intra-op threads."""
    import yaml

    root = _run_folder(config, extra)  # an override moves the run folder, and the log with it
    steps = ((yaml.safe_load(Path(config).read_text()) or {}).get("trainer") or {}).get("max_steps")
    argv = [sys.executable, "-m", "gsv3d_pl", "fit", "--config", config,
            f"--trainer.callbacks+={_REPORTER}", *extra]
    return Job(name=Path(root).name, argv=argv, log=Path(root) / "fit.log",
               env={v: str(threads) for v in _THREAD_VARS},
               total=int(steps) if isinstance(steps, int) and steps > 0 else None)


def _progress(job: Job) -> tuple[int, int] | None:
    """(global step, max_steps) a child last wrote (:class:`StepFile`)."""
    try:
        step, total = (job.log.parent / "progress").read_text().split()
        return int(step), int(total)
    except (OSError, ValueError):  # not written yet, or read mid-write
        return None


def _summary(log: Path, tail_lines: int = 0) -> list[str]:
    """A finished child's summary lines (``[...]`` prefixed), or its last ``tail_lines`` lines."""
    text = log.read_text(errors="replace").replace("\r", "\n") if log.is_file() else ""
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    if tail_lines:
        return lines[-tail_lines:]
    return [ln for ln in lines if ln.startswith("[")]


def run_jobs(jobs: Sequence[Job], poll_s: float = 2.0, out=sys.stdout) -> int:
    """Start every job, show their progress, wait for all; 0 if all succeed, else the first failure's status."""
    procs: list[subprocess.Popen] = []
    bars = [tqdm(total=j.total, desc=f"{j.name:<14}", position=i, unit="step", leave=True, file=out,
                 dynamic_ncols=True) for i, j in enumerate(jobs)]
    handles = []
    try:
        for j in jobs:
            j.log.parent.mkdir(parents=True, exist_ok=True)
            (j.log.parent / "progress").unlink(missing_ok=True)  # a previous run's
            (j.log.parent / "threads").unlink(missing_ok=True)
            fh = open(j.log, "wb")
            handles.append(fh)
            procs.append(subprocess.Popen(j.argv, stdout=fh, stderr=subprocess.STDOUT,
                                          env={**os.environ, **j.env}, start_new_session=True))
        failed: int | None = None
        done: set[int] = set()
        while True:
            codes = [p.poll() for p in procs]
            finished = {i for i, c in enumerate(codes) if c == 0}
            if finished - done:  # hand the finished stages' cores to the others
                done = finished
                share_threads(jobs, [i for i, c in enumerate(codes) if c is None])
            for j, bar in zip(jobs, bars):
                prog = _progress(j)
                if prog is not None and (prog[0], prog[1]) != (bar.n, bar.total):
                    bar.n, bar.total = prog[0] if prog[1] <= 0 else min(prog[0], prog[1]), max(prog[1], 0) or None
                    bar.refresh()
            bad = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                failed = bad[0]
                break
            if all(c == 0 for c in codes):
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        failed = -1
    finally:
        for p in procs:  # stop whatever still runs (a failure elsewhere, or Ctrl-C)
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for fh in handles:
            fh.close()
        for bar in bars:
            bar.close()
    if failed == -1:
        print("run_parallel: interrupted; every stage was stopped (their checkpoints resume them)", file=out)
        return 130
    if failed is not None:
        j, code = jobs[failed], procs[failed].returncode
        print(f"\nrun_parallel: stage {j.name} failed (exit {code}); the others were stopped. "
              f"The end of {j.log}:", file=out)
        for ln in _summary(j.log, tail_lines=25):
            print(f"  {ln}", file=out)
        return int(code) or 1
    for j in jobs:
        lines = _summary(j.log)
        if lines:
            print(f"\n{j.name} ({j.log}):", file=out)
            for ln in lines:
                print(f"  {ln}", file=out)
    return 0


def share_threads(jobs: Sequence[Job], running: Sequence[int], cores: int | None = None) -> None:
    """Write each running job's new intra-op thread count (the machine's cores split among them) to its
    ``threads`` file, read by :class:`StepFile` in the child."""
    if not running:
        return
    n = max(1, (cores or os.cpu_count() or 1) // len(running))
    for i in running:
        path = jobs[i].log.parent / "threads"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{n}\n")
        os.replace(tmp, path)  # atomic: the child never reads half a number


def plan_jobs(configs: Sequence[str], extra: Sequence[str] = (), threads: int | None = None,
              seeds: Sequence[int] | None = None, seed_keys: Sequence[str] = ()) -> list[Job]:
    """One job per config, or per config × seed: ``--seed_everything=S``, each of ``seed_keys`` = S, and the run
    folder ``<default_root_dir>_seed<S>``. ``threads`` None: the machine's cores split evenly (at least 1)."""
    if seed_keys and not seeds:
        raise SystemExit("run_parallel: --seed-key needs --seeds")
    runs = [(c, list(extra)) for c in configs] if not seeds else [
        (c, [*extra, f"--seed_everything={s}", *(f"--{k}={s}" for k in seed_keys),
             f"--trainer.default_root_dir={_run_folder(c, extra).rstrip('/')}_seed{s}"])
        for c in configs for s in seeds]
    threads = threads or max(1, (os.cpu_count() or 1) // len(runs))
    return [fit_job(c, threads, x) for c, x in runs]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="python -m gsv3d_pl.tools.run_parallel", description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="+", help="fit configs of independent stages (each its own default_root_dir)")
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads per stage (default: the machine's cores split evenly, at least 1)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="run each config once per seed, in <default_root_dir>_seed<S>, with --seed_everything=S")
    ap.add_argument("--seed-key", action="append", default=[],
                    help="a config key set to the seed too (repeatable), e.g. model.init_args.e2e_seed")
    a = ap.parse_args(argv)
    jobs = plan_jobs(a.configs, extra, a.threads, a.seeds, a.seed_key)
    threads = jobs[0].env["OMP_NUM_THREADS"]
    roots = [j.log.parent for j in jobs]
    if len(set(roots)) != len(roots):
        raise SystemExit(f"run_parallel: two configs share a run folder ({[str(r) for r in roots]}); they would "
                         "overwrite each other")
    print(f"run_parallel: {len(jobs)} stages side by side, {threads} thread(s) each; logs: "
          + ", ".join(str(j.log) for j in jobs), flush=True)
    return run_jobs(jobs)


if __name__ == "__main__":
    sys.exit(main())
