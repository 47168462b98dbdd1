"""Sweeps: a YAML file of runs × seeds -> one SLURM array job (or local runs) -> the paper's ablation table.

- :mod:`~gsv3d_pl.sweep.spec`: the sweep file's schema (single-stage, or a chain of ``stages:``) and
  :func:`load_sweep` (errors name ``file:line``, via :mod:`~gsv3d_pl.sweep.lines`);
- :mod:`~gsv3d_pl.sweep.expand`: runs × seeds (× stages) -> :class:`Task` arguments; :func:`validate_configs`
  composes each run's config of each stage with the CLI parser (nothing is built);
- :mod:`~gsv3d_pl.sweep.dedupe`: tasks of a stage with identical resolved configs train once
  (:func:`config_identity`), later stages read the shared folder;
- :mod:`~gsv3d_pl.sweep.slurm`: one array-job script per stage, ``tasks.txt``, the ``sweep.json`` manifest,
  ``submit.sh``; :func:`submit` / :func:`submit_chain` (later stages ``--dependency=aftercorr``);
- :mod:`~gsv3d_pl.sweep.local`: :func:`run_local` / :func:`run_local_stages`, the same scripts without SLURM;
- :mod:`~gsv3d_pl.sweep.report`: :func:`collect_results` and :func:`format_table` (``gsv3d report``), with the
  paired per-object comparison of :mod:`~gsv3d_pl.sweep.paired`.

    sweep = load_sweep("configs/sweeps/ablations.yaml")
    files = write_sweep_files(sweep, "runs/ablations", rerooted=validate_configs(sweep), identify=config_identity)
    jobs = submit_chain(files)                    # or run_local_stages([(f.name, f.script, f.tasks) ...])
    print(format_table(collect_results("runs/ablations")))
"""

from gsv3d_pl.sweep.dedupe import SharedStage, config_identity, shared_stages
from gsv3d_pl.sweep.expand import Task, expand_tasks, validate_configs
from gsv3d_pl.sweep.local import run_local, run_local_stages
from gsv3d_pl.sweep.paired import PairedDiff, paired_bootstrap, paired_differences
from gsv3d_pl.sweep.report import RunResult, collect_results, format_table, paired_comparison
from gsv3d_pl.sweep.slurm import (
    StageFiles,
    Submission,
    SweepFiles,
    describe_chain,
    describe_plan,
    render_sbatch,
    submit,
    submit_chain,
    write_sweep,
    write_sweep_files,
)
from gsv3d_pl.sweep.spec import (
    ABLATION_LABELS,
    MANIFEST,
    RunSpec,
    SlurmResources,
    StageSpec,
    Sweep,
    SweepError,
    load_sweep,
)

__all__ = [
    "ABLATION_LABELS",
    "MANIFEST",
    "PairedDiff",
    "RunResult",
    "RunSpec",
    "SharedStage",
    "SlurmResources",
    "StageFiles",
    "StageSpec",
    "Submission",
    "Sweep",
    "SweepError",
    "SweepFiles",
    "Task",
    "collect_results",
    "config_identity",
    "describe_chain",
    "describe_plan",
    "expand_tasks",
    "format_table",
    "load_sweep",
    "paired_bootstrap",
    "paired_comparison",
    "paired_differences",
    "render_sbatch",
    "run_local",
    "run_local_stages",
    "shared_stages",
    "submit",
    "submit_chain",
    "validate_configs",
    "write_sweep",
    "write_sweep_files",
]
