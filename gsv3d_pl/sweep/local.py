"""``gsv3d sweep --local``: the sweep's tasks one after another on this machine, through the same sbatch scripts.

A chained sweep runs each task's stages in order (task 0: stage 1, stage 2, ...; then task 1, ...), which is what
``--dependency=aftercorr`` gives on SLURM; a stage that fails skips the later stages of its task only. A task whose
stage is shared with an identical task (:mod:`gsv3d_pl.sweep.dedupe`) does not run it: the task that trains it
runs first (if it has not yet), and the shared stage's outcome is this task's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from gsv3d_pl.sweep.expand import Task

__all__ = ["run_local", "run_local_stages"]


def _env() -> dict[str, str]:
    # No SLURM_* variables: Lightning must not think it is inside a job (it would pick SLURMEnvironment).
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    # The scripts call `command: gsv3d` by name. Locally that must be the gsv3d of the environment running this
    # sweep (e.g. .venv/bin/gsv3d called by path, venv not activated), so its bin folder goes first on PATH.
    # Only when that folder holds a gsv3d: a system python must not put /usr/bin ahead of the user's PATH.
    bin_dir = sysconfig.get_path("scripts") or os.path.dirname(sys.executable or "")
    if bin_dir and os.path.isfile(os.path.join(bin_dir, "gsv3d")):
        rest = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir]
        env["PATH"] = os.pathsep.join([bin_dir, *rest])
    return env


def _run_task(script: str | os.PathLike, index: int, env: dict[str, str]) -> int:
    proc = subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": str(index),
                                                      "GSV3D_SWEEP_LOCAL": "1"}, check=False)
    return proc.returncode


def run_local(script: str | os.PathLike, tasks: Sequence[Task], stream: TextIO | None = None) -> int:
    """Run the tasks one after another through the same script, without SLURM; a shared task (identical to another,
    ``same_as``) is not run and has that task's outcome. Returns the number of failed tasks."""
    env = _env()
    out = stream or sys.stdout
    rcs: dict[int, int] = {}
    for t in tasks:
        if t.shared:
            continue
        print(f"[gsv3d sweep --local] task {t.index}/{len(tasks) - 1}: {t.run} seed {t.seed} -> {t.run_dir}",
              file=out, flush=True)
        rcs[t.index] = rc = _run_task(script, t.index, env)
        if rc != 0:
            print(f"[gsv3d sweep --local] task {t.index} failed with exit code {rc}",
                  file=stream or sys.stderr, flush=True)
    for t in tasks:
        if t.shared:
            print(f"[gsv3d sweep --local] task {t.index}: {t.run} seed {t.seed} = task {t.same_as} "
                  f"({t.same_as_run}): identical resolved config, not run again", file=out, flush=True)
    return sum(rcs.get(t.same_as if t.shared else t.index, 0) != 0 for t in tasks)


_SKIPPED = -1  # a stage not run because an earlier stage of its task (or of the task it shares) failed


def run_local_stages(stages: Sequence[tuple[str, str | os.PathLike | Path, Sequence[Task]]],
                     stream: TextIO | None = None) -> int:
    """A chained sweep without SLURM: for each task index, every stage's script in order (``stages`` is
    [(name, script, tasks)] in chain order, the same task indices in each). A shared stage (``same_as``) is run
    once, by the task that trains it, first if need be. Returns the number of failed tasks (a task fails at its
    first failing stage, its own or a shared one; its later stages are skipped)."""
    if not stages:
        return 0
    env = _env()
    out = stream or sys.stdout
    err = stream or sys.stderr
    names = [name for name, _, _ in stages]
    by_stage = [{t.index: t for t in tasks} for _, _, tasks in stages]
    indices = sorted(by_stage[0])
    if any(sorted(b) != indices for b in by_stage):
        raise ValueError("run_local_stages: every stage must have the same task indices")
    done: dict[tuple[int, int], int] = {}  # (stage position, index of a training task) -> exit code

    def ensure(si: int, k: int) -> int:
        """Exit code of stage ``si`` of task ``k``: runs it (and the earlier stages it needs) unless done."""
        t = by_stage[si][k]
        if t.shared:
            return ensure(si, t.same_as)
        if (si, k) in done:
            return done[(si, k)]
        if si > 0 and ensure(si - 1, k) != 0:
            done[(si, k)] = _SKIPPED
            return _SKIPPED
        print(f"[gsv3d sweep --local] task {k}/{indices[-1]}, stage {names[si]}: {t.run} seed {t.seed} -> "
              f"{t.stage_dir}", file=out, flush=True)
        done[(si, k)] = rc = _run_task(stages[si][1], k, env)
        if rc != 0:
            later = names[si + 1:]
            print(f"[gsv3d sweep --local] task {k}, stage {names[si]} failed with exit code {rc}"
                  + (f"; skipping its later stages ({', '.join(later)})" if later else ""), file=err, flush=True)
        return rc

    failed = 0
    for k in indices:
        for si, name in enumerate(names):
            t = by_stage[si][k]
            if t.shared:
                print(f"[gsv3d sweep --local] task {k}/{indices[-1]}, stage {name}: {t.run} seed {t.seed} = task "
                      f"{t.same_as} ({t.same_as_run}): identical resolved config, shares {t.stage_dir}",
                      file=out, flush=True)
            rc = ensure(si, k)
            if rc != 0:
                failed += 1
                if t.shared:  # the owner's failure was printed when it ran
                    later = names[si + 1:]
                    why = (f"failed with exit code {rc}" if rc != _SKIPPED else
                           "was not run (an earlier stage of that task failed)")
                    print(f"[gsv3d sweep --local] task {k}, stage {name}: shared with task {t.same_as}, which {why}"
                          + (f"; skipping its later stages ({', '.join(later)})" if later else ""),
                          file=err, flush=True)
                break
    return failed
