"""Runs × seeds (× stages) -> tasks, and every composed config checked with the CLI parser before anything is
written.

Each task (one run × one seed, of one stage) trains with ``gsv3d fit --config base... --config overlay...
--k=v... --seed_everything=<seed> --trainer.default_root_dir=<stage folder> --trainer.devices=<ntasks per node>
--trainer.num_nodes=<nodes>``; ``gsv3d test`` gets the same arguments. The run folder ``<out>/<run>/seed<k>``
is absolute and the same on every requeue and every regeneration of the script; a single-stage sweep trains in
it, a chained sweep's stage ``s`` in ``<run folder>/<s>``. Given an ``identify`` function, tasks of a stage with
identical resolved configs train once and later stages read the shared folder (:mod:`gsv3d_pl.sweep.dedupe`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsv3d_pl.config import ConfigError, config_args, parse_config
from gsv3d_pl.sweep.dedupe import share_identical
from gsv3d_pl.sweep.spec import RunSpec, StageSpec, Sweep, SweepError, substitute

__all__ = ["Task", "expand_tasks", "reroot_key", "validate_configs"]


@dataclass(frozen=True)
class Task:
    """One array task = one run × one seed of one stage. ``args`` follow ``gsv3d fit`` / ``gsv3d test`` (shared
    by both). ``index`` is the task's index in its stage's array: the same (run, seed) has the same index in every
    stage, which is what ``--dependency=aftercorr`` pairs. ``stage_dir`` is where the stage's outputs are (= ``run_dir``
    in a single-stage sweep, whose one stage is named ``""``).

    Identical stages (:mod:`gsv3d_pl.sweep.dedupe`): ``identity`` is the hash of the resolved config (None: not
    computed); a task with ``same_as`` (the index of the task of this stage that trains the identical config, of run
    ``same_as_run``) does not train, and its ``stage_dir`` is that task's folder. ``prev_dir``: the folder of the
    previous stage this task reads (the shared one where that stage is shared; None for the first stage)."""

    index: int
    run: str
    seed: int
    run_dir: Path
    args: tuple[str, ...]
    stage: str = ""
    stage_dir: Path | None = None
    prev_dir: Path | None = None
    identity: str | None = None
    same_as: int | None = None
    same_as_run: str | None = None

    def __post_init__(self) -> None:
        if self.stage_dir is None:
            object.__setattr__(self, "stage_dir", self.run_dir)

    @property
    def shared(self) -> bool:
        """True: another task of this stage trains this identical config; this one does not train."""
        return self.same_as is not None


def _render_value(value: Any) -> str:
    """A YAML/JSON scalar or structure as jsonargparse reads it back from ``--key=value``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    return json.dumps(value)


def _override_args(overrides: dict[str, Any]) -> list[str]:
    return [f"--{k}={_render_value(v)}" for k, v in overrides.items()]


def _config_files(stage: StageSpec, run: RunSpec) -> list[Path]:
    return [*stage.base, *run.overlays_for(stage.name)]


def _overrides(sweep: Sweep, stage: StageSpec, run: RunSpec) -> dict[str, Any]:
    """The sweep's, then the stage's, then the run's (for this stage): later ones win."""
    return {**sweep.overrides, **stage.overrides, **run.overrides_for(stage.name)}


def _run_args(sweep: Sweep, stage: StageSpec, run: RunSpec, run_dir: Path | None = None,
              stage_dirs: dict[str, Path] | None = None) -> list[str]:
    """``--config`` for the base and the run's overlays, then the overrides, placeholders replaced for the task
    in ``run_dir`` (left as they are without one: only for reading the composed config's own paths);
    ``stage_dirs``: where the task reads earlier stages from (see :func:`~gsv3d_pl.sweep.spec.substitute`)."""
    overrides = _overrides(sweep, stage, run)
    if run_dir is not None:
        overrides = substitute(overrides, run_dir, stage.folder(run_dir), stage_dirs)
    return config_args(_config_files(stage, run), _override_args(overrides))


def reroot_key(stage: str, run: str) -> str:
    """Key of :func:`validate_configs`' result: the run name in a single-stage sweep (as before chains), else
    ``<stage>/<run>`` (neither name can contain a slash)."""
    return f"{stage}/{run}" if stage else run


_RUN_DIR = "@@RUN_DIR@@"  # placeholder in re-rooted overrides (see validate_configs), replaced per task
_REROOT_KEYS = ("trainer.callbacks", "trainer.logger")


def _stages(sweep: Sweep, stage: str | None) -> tuple[StageSpec, ...]:
    if stage is None:
        return sweep.stages
    try:
        return (sweep.stage(stage),)
    except KeyError as e:
        raise SweepError(str(e.args[0])) from None


def expand_tasks(
    sweep: Sweep, out_dir: str | os.PathLike, rerooted: dict[str, dict[str, str]] | None = None,
    stage: str | None = None, identify: Callable[[Task], str] | None = None,
) -> list[Task]:
    """Runs × seeds, run-major, for one stage (``stage``) or every stage one after another (None; a single-stage
    sweep has one). Task i of a stage trains in ``<out_dir>/<run>/seed<k>`` (absolute; a chained sweep's stage in
    its subfolder), the same folder on every requeue and every regeneration of the script.

    Args:
        rerooted: per :func:`reroot_key`, extra overrides from :func:`validate_configs` that move paths the config
            derived from its own ``default_root_dir`` (checkpoint dirpath, logger save_dir) into the task's folder.
        identify: task -> identity of its resolved config (:func:`gsv3d_pl.sweep.dedupe.config_identity`): with
            it (and ``sweep.dedupe``), tasks of a stage with equal identities train once
            (:func:`~gsv3d_pl.sweep.dedupe.share_identical`) and later stages read the shared folders. None: every
            task trains in its own folders.
    """
    out_dir = Path(out_dir).resolve()
    identify = identify if sweep.dedupe else None
    tasks: list[Task] = []
    read_from: dict[tuple[str, str, int], Path] = {}  # (stage, run, seed) -> the folder its outputs are in
    wanted = _stages(sweep, stage)
    last = max(sweep.stages.index(s) for s in wanted)
    for i, st in enumerate(sweep.stages[:last + 1]):
        stage_tasks = []
        index = 0
        for run in sweep.runs:
            for seed in sweep.seeds:
                run_dir = out_dir / run.name / f"seed{seed}"
                stage_dir = st.folder(run_dir)
                earlier = {s.name: read_from[(s.name, run.name, seed)] for s in sweep.stages[:i]}
                fixes = (rerooted or {}).get(reroot_key(st.name, run.name), {})
                args = [
                    *_run_args(sweep, st, run, run_dir, earlier),
                    *(f"--{k}={v.replace(_RUN_DIR, str(stage_dir))}" for k, v in fixes.items()),
                    f"--seed_everything={seed}",
                    f"--trainer.default_root_dir={stage_dir}",
                    f"--trainer.devices={st.slurm.ntasks_per_node}",
                    f"--trainer.num_nodes={st.slurm.nodes}",
                ]
                prev = earlier[sweep.stages[i - 1].name] if i else None
                stage_tasks.append(Task(index, run.name, seed, run_dir, tuple(args), st.name, stage_dir, prev))
                index += 1
        if identify is not None:
            stage_tasks = share_identical(stage_tasks, identify)
        for t in stage_tasks:
            read_from[(st.name, t.run, t.seed)] = t.stage_dir
        if st in wanted:
            tasks += stage_tasks
    return tasks


def _first_lines(text: str, n: int = 12) -> str:
    lines = str(text).strip().splitlines()
    return "\n    ".join(lines[:n] + (["..."] if len(lines) > n else []))


def _reroot(value: Any, old_root: str) -> tuple[Any, bool]:
    """Replace the prefix ``old_root`` of every path string in a nested config value by the task placeholder."""
    if isinstance(value, str) and (value == old_root or value.startswith(old_root.rstrip("/") + "/")):
        return _RUN_DIR + value[len(old_root.rstrip("/")):], True
    if isinstance(value, dict):
        items = {k: _reroot(v, old_root) for k, v in value.items()}
        return {k: v for k, (v, _) in items.items()}, any(c for _, c in items.values())
    if isinstance(value, (list, tuple)):
        items = [_reroot(v, old_root) for v in value]
        return [v for v, _ in items], any(c for _, c in items)
    return value, False


def _reroot_overrides(config: Any) -> dict[str, str]:
    """Stage configs write ``dirpath: "${....default_root_dir}/checkpoints"``; omegaconf resolves that inside the
    config file, i.e. with the *file's* default_root_dir, before ``--trainer.default_root_dir`` overrides it. Left
    alone, every task of a sweep would share one checkpoint folder. Returns full-list overrides of
    ``trainer.callbacks`` / ``trainer.logger`` with those paths moved under the task's folder."""
    old_root = config.get("trainer.default_root_dir")
    if not isinstance(old_root, str) or not old_root.strip("/."):
        return {}
    d = config.clone().as_dict()
    out = {}
    for key in _REROOT_KEYS:
        section, name = key.split(".")
        value, changed = _reroot(d.get(section, {}).get(name), old_root)
        if changed:
            out[key] = json.dumps(value, default=str)
    return out


def _who(stage: StageSpec, run: RunSpec) -> str:
    return f"run {run.name!r}" + (f", stage {stage.name!r}" if stage.name else "")


def _explain_failure(sweep: Sweep, stage: StageSpec, run: RunSpec, error: ConfigError) -> SweepError:
    """Which part of a run breaks its config: its config files, one override (by the sweep-file line of that
    override, found by composing the files with each override alone), or only their combination."""
    base_args = config_args(_config_files(stage, run))
    line = run.line
    try:
        parse_config(base_args)
    except ConfigError as e:
        return SweepError(
            f"{sweep.path}:{line}: {_who(stage, run)}: composing its config files failed "
            f"({', '.join(str(p) for p in _config_files(stage, run))}):\n    {_first_lines(str(e))}"
        )
    for key, value in _overrides(sweep, stage, run).items():
        try:
            parse_config([*base_args, *_override_args({key: value})])
        except ConfigError as e:
            at = (run.override_line(stage.name, key) if key in run.overrides_for(stage.name)
                  else stage.override_lines.get(key) if key in stage.overrides else sweep.override_lines.get(key))
            return SweepError(
                f"{sweep.path}:{at or line}: {_who(stage, run)}: override `{key}: {value!r}` is not "
                f"valid for this config:\n    {_first_lines(str(e))}"
            )
    return SweepError(f"{sweep.path}:{line}: {_who(stage, run)}: its config does not parse:\n"
                      f"    {_first_lines(str(error))}")


def validate_configs(sweep: Sweep) -> dict[str, dict[str, str]]:
    """Compose every run's config of every stage (base + overlays + overrides + the sweep's own keys) with the
    CLI parser, as ``gsv3d fit`` will on the cluster, so a typo fails here and not hours later in the queue.
    Nothing is built (a later stage's input checkpoint need not exist yet).

    Returns:
        per :func:`reroot_key`, the re-rooting overrides (see :func:`_reroot_overrides`) to pass to
        ``write_sweep``.

    Raises:
        SweepError: naming the run (and stage), the sweep-file line of the offending override (found by re-parsing
            each override alone) or of the run, and jsonargparse's message.
    """
    scratch = Path(tempfile.gettempdir()) / "gsv3d-sweep-validate"
    rerooted: dict[str, dict[str, str]] = {}
    for stage in sweep.stages:
        tasks = expand_tasks(sweep, scratch, stage=stage.name)
        by_run = {t.run: t for t in tasks}  # one seed per run is enough: seeds differ in seed_everything only
        for run in sweep.runs:
            key = reroot_key(stage.name, run.name)
            try:
                parse_config(by_run[run.name].args)
                rerooted[key] = _reroot_overrides(parse_config(_run_args(sweep, stage, run)))
                if rerooted[key]:  # the composed config with the moved paths must parse too
                    parse_config(expand_tasks(sweep, scratch, rerooted, stage.name)[by_run[run.name].index].args)
            except ConfigError as e:
                raise _explain_failure(sweep, stage, run, e) from e
    return rerooted
