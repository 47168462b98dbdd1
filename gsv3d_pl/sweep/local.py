"""``gsv3d sweep --local``: the sweep's tasks one after another on this machine, through the same sbatch script."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from typing import TextIO

from gsv3d_pl.sweep.expand import Task

__all__ = ["run_local"]


def run_local(script: str | os.PathLike, tasks: Sequence[Task], stream: TextIO | None = None) -> int:
    """Run the tasks one after another through the same script, without SLURM (``SLURM_*`` variables removed so
    Lightning does not think it is inside a job). Returns the number of failed tasks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    failed = 0
    for t in tasks:
        print(f"[gsv3d sweep --local] task {t.index}/{len(tasks) - 1}: {t.run} seed {t.seed} -> {t.run_dir}",
              file=stream or sys.stdout, flush=True)
        proc = subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": str(t.index),
                                                         "GSV3D_SWEEP_LOCAL": "1"}, check=False)
        if proc.returncode != 0:
            failed += 1
            print(f"[gsv3d sweep --local] task {t.index} failed with exit code {proc.returncode}",
                  file=stream or sys.stderr, flush=True)
    return failed
