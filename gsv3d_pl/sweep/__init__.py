"""Sweeps: a YAML file of runs × seeds -> one SLURM array job (or local runs) -> the paper's ablation table.

- :mod:`~gsv3d_pl.sweep.spec`: the sweep file's schema and :func:`load_sweep` (errors name ``file:line``);
- :mod:`~gsv3d_pl.sweep.expand`: runs × seeds -> :class:`Task` arguments; :func:`validate_configs` composes each
  run's config with the CLI parser (nothing is built);
- :mod:`~gsv3d_pl.sweep.slurm`: the array-job script, ``tasks.txt``, the ``sweep.json`` manifest, :func:`submit`;
- :mod:`~gsv3d_pl.sweep.local`: :func:`run_local`, the same script without SLURM;
- :mod:`~gsv3d_pl.sweep.report`: :func:`collect_results` and :func:`format_table` (``gsv3d report``).

    sweep = load_sweep("configs/sweeps/ablations.yaml")
    script, _, tasks = write_sweep(sweep, "runs/ablations", rerooted=validate_configs(sweep))
    job_id = submit(script)                       # or run_local(script, tasks)
    print(format_table(collect_results("runs/ablations")))
"""

from gsv3d_pl.sweep.expand import Task, expand_tasks, validate_configs
from gsv3d_pl.sweep.local import run_local
from gsv3d_pl.sweep.report import RunResult, collect_results, format_table
from gsv3d_pl.sweep.slurm import render_sbatch, submit, write_sweep
from gsv3d_pl.sweep.spec import ABLATION_LABELS, MANIFEST, RunSpec, SlurmResources, Sweep, SweepError, load_sweep

__all__ = [
    "ABLATION_LABELS",
    "MANIFEST",
    "RunResult",
    "RunSpec",
    "SlurmResources",
    "Sweep",
    "SweepError",
    "Task",
    "collect_results",
    "expand_tasks",
    "format_table",
    "load_sweep",
    "render_sbatch",
    "run_local",
    "submit",
    "validate_configs",
    "write_sweep",
]
