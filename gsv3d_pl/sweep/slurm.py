"""The SLURM array jobs: one ``.sbatch`` per stage (one array task per run × seed), ``tasks.txt``, ``sweep.json``,
``submit.sh`` (chained sweeps), and submission.

Task ``$SLURM_ARRAY_TASK_ID`` runs ``srun gsv3d fit ARGS`` in its stage folder, then (``test: true``) ``srun gsv3d
test ARGS --ckpt_path <final checkpoint>``. The folder is stable across requeues and ``--ckpt_path`` is *not*
passed to fit, so Lightning's SLURMEnvironment (the single requeue owner) resumes from the newest
``hpc_ckpt_*.ckpt`` it saved there on SIGUSR1. Marker files ``fit.done`` / ``test.done`` in the stage folder make
a restarted task skip finished phases; ``FAILED`` records the failing command for ``gsv3d report``. The generated
scripts use absolute paths.

A chained sweep has one array job per stage, submitted in order, stage i+1 with
``--dependency=aftercorr:<job of stage i>``: its task k starts once task k of stage i has *completed* (exit 0),
so a requeued upstream task (SIGUSR1 -> requeue -> pending again) holds back only its own downstream task, and
the other runs' chains go on. ``--kill-on-invalid-dep=yes`` cancels a downstream task whose upstream task failed
instead of leaving it pending forever. Why not one task running the whole chain: each stage keeps its own
resources (``stages[i].slurm``: time, GPUs) and its own requeue cycle, and a finished stage is never re-queued
because a later one hit its time limit.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gsv3d_pl.io import atomic_path, write_json_atomic, write_text_atomic
from gsv3d_pl.sweep.expand import Task, expand_tasks
from gsv3d_pl.sweep.spec import MANIFEST, StageSpec, Sweep, SweepError

__all__ = ["StageFiles", "SweepFiles", "describe_chain", "done_marker", "render_sbatch", "write_sweep", "write_sweep_files", "submit",
           "submit_chain"]

DEPENDENCY = "aftercorr"  # task k of a stage waits for task k of the stage before it


def done_marker(stage: StageSpec) -> str:
    """The marker file in a stage's folder that says the stage is finished (what the next stage waits for)."""
    return "test.done" if stage.test else "fit.done"


def _previous(sweep: Sweep, stage: StageSpec) -> StageSpec | None:
    i = sweep.stages.index(stage)
    return sweep.stages[i - 1] if i > 0 else None


def _sbatch_header(sweep: Sweep, stage: StageSpec, num_tasks: int, log_dir: Path) -> list[str]:
    s = stage.slurm
    parallel = min(sweep.max_parallel or num_tasks, num_tasks)
    job_name = s.job_name or "gsv3d-" + sweep.name
    lines = [
        f"--job-name={job_name}-{stage.name}" if stage.name else f"--job-name={job_name}",
        f"--array=0-{num_tasks - 1}%{parallel}",
        f"--nodes={s.nodes}",
        # One task per GPU: Lightning maps SLURM_PROCID/SLURM_LOCALID to DDP ranks; must equal trainer.devices.
        f"--ntasks-per-node={s.ntasks_per_node}",
        f"--cpus-per-task={s.cpus_per_task}",
    ]
    if s.gpus_per_node:
        lines.append(f"--gpus-per-node={s.gpus_per_node}")
    for key, flag in (("partition", "partition"), ("account", "account"), ("mem", "mem"), ("time", "time")):
        if getattr(s, key):
            lines.append(f"--{flag}={getattr(s, key)}")
    lines += [
        # SIGUSR1 goes to the job steps (the `srun` Lightning processes, not this shell) `signal_seconds` before
        # the time limit; SLURMEnvironment then saves hpc_ckpt_<n>.ckpt and runs `scontrol requeue`.
        f"--signal={s.signal}@{s.signal_seconds}",
        "--requeue",
        "--open-mode=append",  # a requeued task appends to its log instead of truncating it
        f"--output={log_dir}/{stage.name + '_' if stage.name else ''}%A_%a.out",
    ]
    if _previous(sweep, stage) is not None:
        # The upstream task failed -> cancel this one (the default leaves it pending: DependencyNeverSatisfied).
        lines.append("--kill-on-invalid-dep=yes")
    lines += list(s.extra)
    return [f"#SBATCH {shlex.join(shlex.split(line))}" for line in lines]


def _path_expr(template: str) -> str:
    """A shell word for ``template`` with ``{run_dir}`` / ``{stage_dir}`` as ``"$RUN_DIR"`` / ``"$STAGE_DIR"``."""
    out = []
    for part in re.split(r"(\{run_dir\}|\{stage_dir\})", template):
        if part == "{run_dir}":
            out.append('"$RUN_DIR"')
        elif part == "{stage_dir}":
            out.append('"$STAGE_DIR"')
        elif part:
            out.append(shlex.quote(part))
    return "".join(out)


def render_sbatch(
    sweep: Sweep, tasks: Sequence[Task], out_dir: str | os.PathLike, workdir: str | os.PathLike | None = None
) -> str:
    """The array-job script of one stage (``tasks`` all of that stage): task ``$SLURM_ARRAY_TASK_ID`` runs
    ``srun <command> fit ARGS`` then (if the stage tests) ``srun <command> test ARGS --ckpt_path <final
    checkpoint>`` in its stage folder; a later stage of a chain first checks that the earlier stage's task finished.
    Arguments are shell-quoted with :func:`shlex.quote`, so values with spaces or quotes survive. With
    ``GSV3D_SWEEP_LOCAL=1`` the same script runs one task without SLURM (``srun`` becomes a plain call): that is
    ``gsv3d sweep --local``."""
    if not tasks:
        raise SweepError("the sweep has no tasks")
    if len({t.stage for t in tasks}) != 1:
        raise SweepError(f"render_sbatch: tasks of one stage expected, got stages {sorted({t.stage for t in tasks})}")
    stage = sweep.stage(tasks[0].stage)
    prev = _previous(sweep, stage)
    out_dir = Path(out_dir).resolve()
    workdir = Path(workdir or os.getcwd()).resolve()
    cmd_q = shlex.join(shlex.split(stage.slurm.command))
    what = f"{len(sweep.runs)} runs x {len(sweep.seeds)} seeds = {len(tasks)} array tasks"
    if stage.name:
        n = len(sweep.stages)
        lines = [
            "#!/bin/bash",
            f"# Generated by `gsv3d sweep {sweep.path}`: stage {sweep.stages.index(stage) + 1}/{n} {stage.name!r} "
            f"of a chained sweep, {what}",
            f"# (task index -> run folder in {out_dir / 'tasks.txt'}). Submit the whole chain with: "
            f"bash {out_dir / 'submit.sh'}",
        ]
        if prev is not None:
            lines.append(f"# This array is submitted with --dependency={DEPENDENCY}:<job id of stage {prev.name!r}>: "
                         f"task k starts once task k of {prev.name!r} completed.")
    else:
        lines = [
            "#!/bin/bash",
            f"# Generated by `gsv3d sweep {sweep.path}`: {what}",
            f"# (task index -> run folder in {out_dir / 'tasks.txt'}). Submit with: sbatch {out_dir / 'sweep.sbatch'}",
        ]
    phase = f"{stage.name} " if stage.name else ""
    lines += [
        *_sbatch_header(sweep, stage, len(tasks), out_dir / "slurm"),
        "",
        "set -Eeuo pipefail  # -E: the ERR trap below also fires inside functions",
        f"cd {shlex.quote(str(workdir))}",
        *stage.slurm.setup,
        "",
        'if [[ -n "${GSV3D_SWEEP_LOCAL:-}" ]]; then',
        "  # `gsv3d sweep --local`: the same steps, one process, no SLURM.",
        '  srun() { while [[ "${1:-}" == --* ]]; do shift; done; "$@"; }',
        "fi",
        'TASK="${SLURM_ARRAY_TASK_ID:?this is an array job: submit it with sbatch (or run gsv3d sweep --local)}"',
        'case "$TASK" in',
    ]
    for t in tasks:
        lines.append(f"  {t.index}) RUN_DIR={shlex.quote(str(t.run_dir))}  # run {t.run}, seed {t.seed}")
        lines.append(f"     ARGS=({' '.join(shlex.quote(a) for a in t.args)}) ;;")
    lines += [
        '  *) echo "gsv3d sweep: no task $TASK in this script (0..' + str(len(tasks) - 1) + ')" >&2; exit 2 ;;',
        "esac",
        f"STAGE_DIR={_path_expr('{run_dir}/' + stage.name if stage.name else '{run_dir}')}",
        "",
        'mkdir -p "$STAGE_DIR"',
        'rm -f "$STAGE_DIR/FAILED"',
        f'PHASE="{phase}setup"',
        'trap \'rc=$?; echo "$PHASE: exit $rc at line $LINENO" > "$STAGE_DIR/FAILED"; trap - ERR\' ERR',
        f'echo "[gsv3d sweep] {phase}task $TASK -> $STAGE_DIR (restart ${{SLURM_RESTART_COUNT:-0}}) on $(hostname) '
        'at $(date)"',
        "",
    ]
    if prev is not None:
        marker = f'"$RUN_DIR"/{shlex.quote(prev.name)}/{done_marker(prev)}'
        lines += [
            f"if [[ ! -e {marker} ]]; then  # aftercorr guarantees it on SLURM; this catches a stage run on its own",
            f'  echo "gsv3d sweep: stage {prev.name} of this task has not finished ($RUN_DIR/{prev.name}/'
            f'{done_marker(prev)} is missing): submit the chain with gsv3d sweep --submit, or bash '
            f'{out_dir / "submit.sh"}" >&2',
            "  false",
            "fi",
        ]
    lines += [
        'if [[ ! -e "$STAGE_DIR/fit.done" ]]; then',
        f'  PHASE="{phase}fit"',
        "  # No --ckpt_path on purpose: after a requeue, SLURMEnvironment resumes from the newest hpc_ckpt_*.ckpt in",
        "  # the stage folder (passing --ckpt_path, even 'last', would bypass it).",
        f'  srun --kill-on-bad-exit=1 {cmd_q} fit "${{ARGS[@]}}"',
        '  touch "$STAGE_DIR/fit.done"',
        "fi",
    ]
    if stage.test:
        shown = stage.test_ckpt.replace("{run_dir}", "$RUN_DIR").replace("{stage_dir}", "$STAGE_DIR")
        lines += [
            'if [[ ! -e "$STAGE_DIR/test.done" ]]; then',
            f'  PHASE="{phase}test"',
            f"  CKPT={_path_expr(stage.test_ckpt)}",
            '  if [[ ! -f "$CKPT" ]]; then  # e.g. checkpoints under a logger\'s version folder: newest last*.ckpt',
            '    CKPT="$(find "$STAGE_DIR" -name \'last*.ckpt\' -printf \'%T@ %p\\n\' | sort -n | tail -n 1 \\',
            '      | cut -d" " -f2-)"',
            "  fi",
            '  if [[ -z "$CKPT" || ! -f "$CKPT" ]]; then',
            f'    echo "gsv3d sweep: fit finished but no checkpoint {shown} (nor any last*.ckpt under '
            '$STAGE_DIR): enable ModelCheckpoint(save_last=True) in the config" >&2',
            "    false",
            "  fi",
            '  echo "[gsv3d sweep] testing $CKPT"',
            f'  srun --kill-on-bad-exit=1 {cmd_q} test "${{ARGS[@]}}" --ckpt_path "$CKPT"',
            '  touch "$STAGE_DIR/test.done"',
            "fi",
        ]
    lines += [f'echo "[gsv3d sweep] {phase}task $TASK done at $(date)"', ""]
    return "\n".join(lines)


def _write_script(path: Path, text: str) -> None:
    """Atomic write of an executable script: :func:`~gsv3d_pl.io.atomic_path` gives new files the usual mode
    (0666 & ~umask, readable by the cluster's other readers), which lacks the execute bits sbatch needs."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o755)


@dataclass(frozen=True)
class StageFiles:
    """One stage's array job: its script, its tasks, and the stage it waits for (None: the first)."""

    name: str
    script: Path
    tasks: tuple[Task, ...]
    depends_on: str | None = None


@dataclass(frozen=True)
class SweepFiles:
    """What :func:`write_sweep_files` wrote: the stages' scripts in submission order, ``tasks.txt``, the manifest,
    and (chained sweeps) ``submit.sh``."""

    stages: tuple[StageFiles, ...]
    tasks_file: Path
    manifest: Path
    submit_script: Path | None = None

    @property
    def chained(self) -> bool:
        return bool(self.stages[0].name)


def _submit_script(files: Sequence[StageFiles]) -> str:
    lines = ["#!/bin/bash",
             "# Submit the chained sweep: one array job per stage; stage i+1 waits task by task for stage i",
             f"# (--dependency={DEPENDENCY}: task k starts when task k of the previous stage completed). Prints the job ids.",
             "set -euo pipefail"]
    for f in files:
        dep = f" --dependency={DEPENDENCY}:$JOB_{f.depends_on}" if f.depends_on else ""
        lines.append(f"JOB_{f.name}=$(sbatch --parsable{dep} {shlex.quote(str(f.script))} | cut -d';' -f1)")
        lines.append(f'echo "stage {f.name}: array job $JOB_{f.name}"')
    return "\n".join(lines) + "\n"


def write_sweep_files(
    sweep: Sweep,
    out_dir: str | os.PathLike,
    workdir: str | os.PathLike | None = None,
    rerooted: dict[str, dict[str, str]] | None = None,
) -> SweepFiles:
    """Write the stages' scripts (``<out_dir>/sweep.sbatch`` for a single-stage sweep, ``<out_dir>/<stage>.sbatch``
    for each stage of a chained one, with ``<out_dir>/submit.sh``), ``<out_dir>/tasks.txt`` (one line per task:
    [stage,] index, run, seed, folder, the quoted fit arguments) and ``<out_dir>/sweep.json`` (the manifest
    ``gsv3d report`` reads). Atomic."""
    out_dir = Path(out_dir).resolve()
    (out_dir / "slurm").mkdir(parents=True, exist_ok=True)
    stage_files = []
    for i, st in enumerate(sweep.stages):
        tasks = expand_tasks(sweep, out_dir, rerooted, st.name)
        script = out_dir / (f"{st.name}.sbatch" if st.name else "sweep.sbatch")
        _write_script(script, render_sbatch(sweep, tasks, out_dir, workdir))
        stage_files.append(StageFiles(st.name, script, tuple(tasks), sweep.stages[i - 1].name if i else None))
    if sweep.chained:
        rows = ["# stage\tindex\trun\tseed\tstage_dir\tgsv3d fit arguments"]
        rows += [f"{t.stage}\t{t.index}\t{t.run}\t{t.seed}\t{t.stage_dir}\t{shlex.join(t.args)}"
                 for f in stage_files for t in f.tasks]
    else:
        rows = ["# index\trun\tseed\trun_dir\tgsv3d fit arguments"]
        rows += [f"{t.index}\t{t.run}\t{t.seed}\t{t.run_dir}\t{shlex.join(t.args)}" for t in stage_files[0].tasks]
    write_text_atomic(out_dir / "tasks.txt", "\n".join(rows) + "\n")
    result = sweep.result_stage
    first = stage_files[0].tasks
    manifest = {
        "name": sweep.name,
        "sweep_file": str(sweep.path),
        "seeds": list(sweep.seeds),
        "runs": [{"name": r.name, "label": r.label} for r in sweep.runs],
        "tasks": [{"index": t.index, "run": t.run, "seed": t.seed, "run_dir": str(t.run_dir)} for t in first],
    }
    submit_script = None
    if sweep.chained:
        manifest["stages"] = [{"name": f.name, "script": str(f.script), "depends_on": f.depends_on,
                               "dependency": DEPENDENCY if f.depends_on else None, "test": sweep.stage(f.name).test}
                              for f in stage_files]
        manifest["result_stage"] = result.name if result else None
        for entry, t in zip(manifest["tasks"], first, strict=True):
            entry["result_dir"] = str(result.folder(t.run_dir)) if result else None
        submit_script = out_dir / "submit.sh"
        _write_script(submit_script, _submit_script(stage_files))
    write_json_atomic(out_dir / MANIFEST, manifest)  # indent 2 + a final newline
    return SweepFiles(tuple(stage_files), out_dir / "tasks.txt", out_dir / MANIFEST, submit_script)


def write_sweep(
    sweep: Sweep,
    out_dir: str | os.PathLike,
    workdir: str | os.PathLike | None = None,
    rerooted: dict[str, dict[str, str]] | None = None,
) -> tuple[Path, Path, list[Task]]:
    """:func:`write_sweep_files`, returning (the first stage's script, the tasks file, every stage's tasks): for a
    single-stage sweep, (``sweep.sbatch``, ``tasks.txt``, its tasks)."""
    files = write_sweep_files(sweep, out_dir, workdir, rerooted)
    return files.stages[0].script, files.tasks_file, [t for f in files.stages for t in f.tasks]


def submit(script: str | os.PathLike, sbatch: str = "sbatch", dependency: str | None = None) -> str:
    """``sbatch --parsable [--dependency=DEP] SCRIPT`` -> the array job id. Raises RuntimeError with sbatch's message
    on failure."""
    cmd = [sbatch, "--parsable", *([f"--dependency={dependency}"] if dependency else []), str(script)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise RuntimeError(f"`{sbatch}` not found: submit from a SLURM login node, or use --local") from e
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]  # --parsable prints "jobid[;cluster]"


def submit_chain(files: SweepFiles, sbatch: str = "sbatch") -> list[tuple[str, str]]:
    """Submit every stage's array job in order, each later one with ``--dependency=aftercorr:<previous job id>``.
    Returns [(stage, job id)]. If a submission fails, the RuntimeError names the jobs already submitted (and how
    to withdraw them)."""
    jobs: dict[str, str] = {}
    for f in files.stages:
        dep = f"{DEPENDENCY}:{jobs[f.depends_on]}" if f.depends_on else None
        try:
            jobs[f.name] = submit(f.script, sbatch, dep)
        except RuntimeError as e:
            if not jobs:
                raise
            done = ", ".join(f"{s or 'sweep'}={j}" for s, j in jobs.items())
            raise RuntimeError(f"{e} (submitting stage {f.name!r}); already submitted: {done}: withdraw them with "
                               f"`scancel {' '.join(jobs.values())}` or submit this stage by hand with "
                               f"sbatch --dependency={dep} {f.script}") from e
    return list(jobs.items())


def describe_chain(files: SweepFiles) -> str:
    """The stages of a chained sweep and their dependencies, for ``gsv3d sweep --dry-run``."""
    n = len(files.stages[0].tasks)
    lines = [f"# chained sweep: {len(files.stages)} stages, each an array job of {n} tasks (one per run x seed); "
             f"submit with `bash {files.submit_script}` or `gsv3d sweep FILE --submit`"]
    for i, f in enumerate(files.stages, 1):
        dep = (f"--dependency={DEPENDENCY}:<job id of {f.depends_on}> (task k waits for task k of {f.depends_on})"
               if f.depends_on else "no dependency")
        lines.append(f"#   stage {i} {f.name}: {f.script}  {dep}")
    return "\n".join(lines) + "\n"
