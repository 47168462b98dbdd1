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

Identical stages (:mod:`gsv3d_pl.sweep.dedupe`): a task whose stage is shared with another task's identical one is
left out of that stage's array (its case entry says so and exits 0). A later stage's task that reads a shared
stage waits for the task that trains it: such tasks are submitted as further arrays of the same script, one per
upstream task, with ``--dependency=afterok:<job>_<task>`` (``submit.sh`` and :func:`submit_chain` pass
``--array`` / ``--dependency`` per :class:`Submission`); the others keep ``aftercorr``. ``max_parallel`` (``%P``)
then applies to each of a stage's arrays.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gsv3d_pl.io import atomic_path, write_json_atomic, write_text_atomic
from gsv3d_pl.sweep.dedupe import describe_shared, shared_stages
from gsv3d_pl.sweep.expand import Task, expand_tasks
from gsv3d_pl.sweep.spec import MANIFEST, StageSpec, Sweep, SweepError

__all__ = ["StageFiles", "Submission", "SweepFiles", "array_spec", "describe_chain", "describe_plan", "done_marker",
           "render_sbatch", "write_sweep", "write_sweep_files", "submit", "submit_chain"]

DEPENDENCY = "aftercorr"  # task k of a stage waits for task k of the stage before it
SHARED_DEPENDENCY = "afterok"  # ...or, where that stage is shared, for the one task that trains it: <job>_<task>


def array_spec(indices: Sequence[int]) -> str:
    """``--array`` indices, runs compressed: [0, 1, 2, 5, 7, 8] -> ``0-2,5,7-8``."""
    parts: list[str] = []
    idx = sorted(indices)
    i = 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        parts.append(str(idx[i]) if i == j else f"{idx[i]}-{idx[j]}")
        i = j + 1
    return ",".join(parts)


def _own(tasks: Sequence[Task]) -> list[Task]:
    """The tasks that train (not shared with an identical task)."""
    return [t for t in tasks if not t.shared]


def done_marker(stage: StageSpec) -> str:
    """The marker file in a stage's folder that says the stage is finished (what the next stage waits for)."""
    return "test.done" if stage.test else "fit.done"


def _previous(sweep: Sweep, stage: StageSpec) -> StageSpec | None:
    i = sweep.stages.index(stage)
    return sweep.stages[i - 1] if i > 0 else None


def _parallel(sweep: Sweep, num_tasks: int) -> int:
    return min(sweep.max_parallel or num_tasks, num_tasks)


def _sbatch_header(sweep: Sweep, stage: StageSpec, indices: Sequence[int], log_dir: Path) -> list[str]:
    s = stage.slurm
    job_name = s.job_name or "gsv3d-" + sweep.name
    lines = [
        f"--job-name={job_name}-{stage.name}" if stage.name else f"--job-name={job_name}",
        f"--array={array_spec(indices)}%{_parallel(sweep, len(indices))}",
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
    own = _own(tasks)
    what = f"{len(sweep.runs)} runs x {len(sweep.seeds)} seeds = {len(tasks)} array tasks"
    if len(own) < len(tasks):
        what += (f", {len(tasks) - len(own)} of them shared with an identical task (not run: "
                 f"--array={array_spec([t.index for t in own])})")
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
            if any(t.prev_dir is not None and t.prev_dir != prev.folder(t.run_dir) for t in own):
                lines.append(f"# A task whose {prev.name!r} is shared with another run's identical one is submitted "
                             f"apart, with --dependency={SHARED_DEPENDENCY}:<job>_<task that trains it> (submit.sh).")
    else:
        lines = [
            "#!/bin/bash",
            f"# Generated by `gsv3d sweep {sweep.path}`: {what}",
            f"# (task index -> run folder in {out_dir / 'tasks.txt'}). Submit with: sbatch {out_dir / 'sweep.sbatch'}",
        ]
    phase = f"{stage.name} " if stage.name else ""
    lines += [
        *_sbatch_header(sweep, stage, [t.index for t in own], out_dir / "slurm"),
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
        if t.shared:
            note = (f"{t.run} seed {t.seed}{' ' + stage.name if stage.name else ''} = task {t.same_as} "
                    f"({t.same_as_run}): identical resolved config, trained once in {t.stage_dir}")
            lines.append(f"  {t.index}) echo {shlex.quote('[gsv3d sweep] task ' + str(t.index) + ': ' + note)}; "
                         "exit 0 ;;  # not in --array")
            continue
        lines.append(f"  {t.index}) RUN_DIR={shlex.quote(str(t.run_dir))}  # run {t.run}, seed {t.seed}")
        if prev is not None:
            lines.append(f"     PREV_DIR={shlex.quote(str(t.prev_dir or prev.folder(t.run_dir)))}"
                         + (f"  # {prev.name} shared with an identical task" if t.prev_dir is not None
                            and t.prev_dir != prev.folder(t.run_dir) else ""))
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
        # PREV_DIR: this task's folder of the previous stage, or the one it shares (the task that trained it)
        marker = f'"$PREV_DIR"/{done_marker(prev)}'
        lines += [
            f"if [[ ! -e {marker} ]]; then  # the dependency guarantees it on SLURM; this catches a stage run on "
            "its own",
            f'  echo "gsv3d sweep: stage {prev.name} of this task has not finished ($PREV_DIR/'
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
class Submission:
    """One ``sbatch`` of a stage's script: the array indices it runs and what they wait for. ``name``: its job id's
    variable ``JOB_<name>`` in ``submit.sh`` (the stage's name for its first submission, ``<stage>__2``, ... for
    the others). ``after``: the submission it waits for (of stage ``after_stage``; None: none); ``after_task``
    None: ``aftercorr`` (task k after task k of ``after``), else ``afterok`` on that one task of ``after`` (the task
    that trains the shared upstream stage). ``array_flag``: ``--array=...`` to pass to sbatch when the indices are
    not the script's own ``#SBATCH --array`` (None: they are)."""

    name: str
    stage: str
    indices: tuple[int, ...]
    after: str | None = None
    after_stage: str | None = None
    after_task: int | None = None
    array_flag: str | None = None

    @property
    def array(self) -> str:
        """The indices as ``--array`` writes them (without ``%P``)."""
        return array_spec(self.indices)

    def dependency(self, job_id: str) -> str | None:
        """``--dependency`` value given ``after``'s job id."""
        if self.after is None:
            return None
        if self.after_task is None:
            return f"{DEPENDENCY}:{job_id}"
        return f"{SHARED_DEPENDENCY}:{job_id}_{self.after_task}"

    def sbatch_args(self, job_id: str | None) -> list[str]:
        """The flags of this submission's ``sbatch`` (``job_id``: the job id of ``after``)."""
        dep = self.dependency(job_id) if job_id is not None else None
        return [*([self.array_flag] if self.array_flag else []), *([f"--dependency={dep}"] if dep else [])]

    def describe(self) -> str:
        if self.after is None:
            return "no dependency"
        if self.after_task is None:
            return (f"--dependency={DEPENDENCY}:<job id of {self.after}> (task k waits for task k of "
                    f"{self.after_stage})")
        return (f"--dependency={SHARED_DEPENDENCY}:<job id of {self.after}>_{self.after_task} (they read the "
                f"{self.after_stage} of task {self.after_task}, identical to theirs)")


@dataclass(frozen=True)
class StageFiles:
    """One stage's array job: its script, its tasks (shared ones included), the stage it waits for (None: the
    first) and its :class:`Submission` s (one, unless some tasks read a shared upstream stage)."""

    name: str
    script: Path
    tasks: tuple[Task, ...]
    depends_on: str | None = None
    submissions: tuple[Submission, ...] = ()


def _plan_submissions(sweep: Sweep, per_stage: Sequence[Sequence[Task]]) -> list[tuple[Submission, ...]]:
    """Each stage's submissions. The first stage: one, its training tasks. A later stage's training tasks are
    grouped by what they wait for: task k of the previous stage's submission that runs it (``aftercorr``), or, where
    the previous stage of task k is shared, the one task that trains it (``afterok:<job>_<task>``)."""
    out: list[tuple[Submission, ...]] = []
    runs_in: dict[int, str] = {}  # index of a training task of the previous stage -> its submission's name
    for i, (st, tasks) in enumerate(zip(sweep.stages, per_stage, strict=True)):
        own = _own(tasks)
        groups: dict[tuple[str | None, int | None], list[int]] = {}
        if i == 0:
            groups[(None, None)] = [t.index for t in own]
        else:
            prev = {t.index: t for t in per_stage[i - 1]}
            for t in own:
                p = prev[t.index]
                key = (runs_in[p.same_as], p.same_as) if p.shared else (runs_in[p.index], None)
                groups.setdefault(key, []).append(t.index)
        # aftercorr first (the stage's own name goes to the submission of the unshared tasks), then by task
        ordered = sorted(groups.items(), key=lambda kv: (kv[0][1] is not None, kv[0][1] or 0, kv[0][0] or ""))
        header = tuple(t.index for t in own)
        subs = []
        for n, ((after, after_task), indices) in enumerate(ordered, 1):
            name = st.name if n == 1 else f"{st.name}__{n}"
            flag = None if tuple(indices) == header else \
                f"--array={array_spec(indices)}%{_parallel(sweep, len(indices))}"
            subs.append(Submission(name, st.name, tuple(indices), after, sweep.stages[i - 1].name if i else None,
                                   after_task, flag))
        runs_in = {k: sub.name for sub in subs for k in sub.indices}
        out.append(tuple(subs))
    return out


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
             f"# (--dependency={DEPENDENCY}: task k starts when task k of the previous stage completed; a task that",
             f"# reads a shared stage waits with --dependency={SHARED_DEPENDENCY}:<job>_<task> for the one task that "
             "trains it). Prints the job ids.",
             "set -euo pipefail"]
    for f in files:
        for sub in f.submissions:
            flags = "".join(f" {a}" for a in sub.sbatch_args(f"${{JOB_{sub.after}}}" if sub.after else None))
            lines.append(f"JOB_{sub.name}=$(sbatch --parsable{flags} {shlex.quote(str(f.script))} | cut -d';' -f1)")
            what = f"stage {f.name}" if sub.name == f.name else f"stage {f.name} (tasks {sub.array})"
            lines.append(f'echo "{what}: array job $JOB_{sub.name}"')
    return "\n".join(lines) + "\n"


def write_sweep_files(
    sweep: Sweep,
    out_dir: str | os.PathLike,
    workdir: str | os.PathLike | None = None,
    rerooted: dict[str, dict[str, str]] | None = None,
    identify: Callable[[Task], str] | None = None,
) -> SweepFiles:
    """Write the stages' scripts (``<out_dir>/sweep.sbatch`` for a single-stage sweep, ``<out_dir>/<stage>.sbatch``
    for each stage of a chained one, with ``<out_dir>/submit.sh``), ``<out_dir>/tasks.txt`` (one line per task:
    [stage,] index, run, seed, folder, the quoted fit arguments) and ``<out_dir>/sweep.json`` (the manifest
    ``gsv3d report`` reads). Atomic.

    ``identify`` (:func:`gsv3d_pl.sweep.dedupe.config_identity`; needs the training environment): tasks of a
    stage with identical resolved configs train once (see :func:`expand_tasks`); None: every task trains."""
    out_dir = Path(out_dir).resolve()
    (out_dir / "slurm").mkdir(parents=True, exist_ok=True)
    every = expand_tasks(sweep, out_dir, rerooted, identify=identify)
    per_stage = [[t for t in every if t.stage == st.name] for st in sweep.stages]
    plans = _plan_submissions(sweep, per_stage)
    stage_files = []
    for i, (st, tasks) in enumerate(zip(sweep.stages, per_stage, strict=True)):
        script = out_dir / (f"{st.name}.sbatch" if st.name else "sweep.sbatch")
        _write_script(script, render_sbatch(sweep, tasks, out_dir, workdir))
        stage_files.append(StageFiles(st.name, script, tuple(tasks), sweep.stages[i - 1].name if i else None,
                                      plans[i]))

    def fit_args(t: Task) -> str:
        if t.shared:
            return f"(not run: identical resolved config to task {t.same_as}, {t.same_as_run} seed {t.seed})"
        return shlex.join(t.args)

    if sweep.chained:
        rows = ["# stage\tindex\trun\tseed\tstage_dir\tgsv3d fit arguments"]
        rows += [f"{t.stage}\t{t.index}\t{t.run}\t{t.seed}\t{t.stage_dir}\t{fit_args(t)}"
                 for f in stage_files for t in f.tasks]
    else:
        rows = ["# index\trun\tseed\trun_dir\tgsv3d fit arguments"]
        rows += [f"{t.index}\t{t.run}\t{t.seed}\t{t.stage_dir}\t{fit_args(t)}" for t in stage_files[0].tasks]
    write_text_atomic(out_dir / "tasks.txt", "\n".join(rows) + "\n")
    result = sweep.result_stage
    first = stage_files[0].tasks
    by_key = {(t.stage, t.index): t for t in every}
    manifest = {
        "name": sweep.name,
        "sweep_file": str(sweep.path),
        "seeds": list(sweep.seeds),
        "runs": [{"name": r.name, "label": r.label} for r in sweep.runs],
        "tasks": [{"index": t.index, "run": t.run, "seed": t.seed, "run_dir": str(t.run_dir)} for t in first],
        # identical resolved stage configs trained once (gsv3d_pl/sweep/dedupe.py): checked or not
        "dedupe": identify is not None and sweep.dedupe,
        "shared_stages": [{"stage": sh.stage, "run": sh.run, "same_as": sh.same_as, "seeds": list(sh.seeds)}
                          for sh in shared_stages(every)],
    }
    for entry, t in zip(manifest["tasks"], first, strict=True):
        shared = {st.name: by_key[(st.name, t.index)].same_as_run for st in sweep.stages
                  if by_key[(st.name, t.index)].shared}
        if shared:
            entry["shared"] = shared  # stage -> the run whose identical stage this task reads
        if not sweep.chained:
            entry["result_dir"] = str(t.stage_dir)
    submit_script = None
    if sweep.chained:
        manifest["stages"] = [
            {"name": f.name, "script": str(f.script), "depends_on": f.depends_on,
             "dependency": DEPENDENCY if f.depends_on else None, "test": sweep.stage(f.name).test,
             "submissions": [{"name": sub.name, "array": sub.array,
                              "dependency": sub.dependency(f"<{sub.after}>") if sub.after else None}
                             for sub in f.submissions]}
            for f in stage_files]
        manifest["result_stage"] = result.name if result else None
        for entry, t in zip(manifest["tasks"], first, strict=True):
            entry["result_dir"] = str(by_key[(result.name, t.index)].stage_dir) if result else None
        submit_script = out_dir / "submit.sh"
        _write_script(submit_script, _submit_script(stage_files))
    write_json_atomic(out_dir / MANIFEST, manifest)  # indent 2 + a final newline
    return SweepFiles(tuple(stage_files), out_dir / "tasks.txt", out_dir / MANIFEST, submit_script)


def write_sweep(
    sweep: Sweep,
    out_dir: str | os.PathLike,
    workdir: str | os.PathLike | None = None,
    rerooted: dict[str, dict[str, str]] | None = None,
    identify: Callable[[Task], str] | None = None,
) -> tuple[Path, Path, list[Task]]:
    """:func:`write_sweep_files`, returning (the first stage's script, the tasks file, every stage's tasks): for a
    single-stage sweep, (``sweep.sbatch``, ``tasks.txt``, its tasks)."""
    files = write_sweep_files(sweep, out_dir, workdir, rerooted, identify)
    return files.stages[0].script, files.tasks_file, [t for f in files.stages for t in f.tasks]


def submit(script: str | os.PathLike, sbatch: str = "sbatch", dependency: str | None = None,
           args: Sequence[str] = ()) -> str:
    """``sbatch --parsable [ARGS] [--dependency=DEP] SCRIPT`` -> the array job id. Raises RuntimeError with sbatch's
    message on failure."""
    cmd = [sbatch, "--parsable", *args, *([f"--dependency={dependency}"] if dependency else []), str(script)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise RuntimeError(f"`{sbatch}` not found: submit from a SLURM login node, or use --local") from e
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]  # --parsable prints "jobid[;cluster]"


def submit_chain(files: SweepFiles, sbatch: str = "sbatch") -> list[tuple[str, str]]:
    """Submit every stage's array job(s) in order (:class:`Submission`), each later one with
    ``--dependency=aftercorr:<previous job id>`` (``afterok:<job id>_<task>`` for tasks that read a shared stage).
    Returns [(submission name, job id)]: the stage's name for its first submission. If a submission fails, the
    RuntimeError names the jobs already submitted (and how to withdraw them)."""
    jobs: dict[str, str] = {}
    for f in files.stages:
        for sub in f.submissions:
            dep = sub.dependency(jobs[sub.after]) if sub.after else None
            try:
                jobs[sub.name] = submit(f.script, sbatch, dep, [sub.array_flag] if sub.array_flag else [])
            except RuntimeError as e:
                if not jobs:
                    raise
                done = ", ".join(f"{s or 'sweep'}={j}" for s, j in jobs.items())
                by_hand = " ".join(["sbatch", *sub.sbatch_args(jobs.get(sub.after or "")), str(f.script)])
                raise RuntimeError(f"{e} (submitting stage {f.name!r}); already submitted: {done}: withdraw them "
                                   f"with `scancel {' '.join(jobs.values())}` or submit this stage by hand with "
                                   f"{by_hand}") from e
    return list(jobs.items())


def describe_chain(files: SweepFiles) -> str:
    """The stages of a chained sweep, their dependencies and the stages shared between runs, for
    ``gsv3d sweep --dry-run``."""
    n = len(files.stages[0].tasks)
    lines = [f"# chained sweep: {len(files.stages)} stages, each an array job of {n} tasks (one per run x seed); "
             f"submit with `bash {files.submit_script}` or `gsv3d sweep FILE --submit`"]
    for i, f in enumerate(files.stages, 1):
        own = _own(f.tasks)
        trains = f" ({len(own)} train, {n - len(own)} shared)" if len(own) < n else ""
        if len(f.submissions) <= 1:
            dep = f.submissions[0].describe() if f.submissions else "no dependency"
            lines.append(f"#   stage {i} {f.name}{trains}: {f.script}  {dep}")
            continue
        lines.append(f"#   stage {i} {f.name}{trains}: {f.script}, submitted {len(f.submissions)} times:")
        for sub in f.submissions:
            lines.append(f"#     {sub.name}: tasks {sub.array}  {sub.describe()}")
    return "\n".join(lines + describe_plan(files)) + "\n"


def describe_plan(files: SweepFiles) -> list[str]:
    """Comment lines naming the shared stages (``#   no_rgb/decoder = full/decoder (identical resolved config;
    seeds 0, 1)``); empty when every task trains."""
    every = [t for f in files.stages for t in f.tasks]
    shared = describe_shared(every)
    if not shared:
        return []
    skipped = sum(t.shared for t in every)
    return [f"# identical stages run once ({skipped} of {len(every)} tasks do not train; their later stages read "
            "the shared folder):", *(f"#   {line}" for line in shared)]
