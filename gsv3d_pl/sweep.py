"""Sweeps: a YAML file of runs × seeds -> one SLURM array job (or local runs) -> the paper's ablation table.

A sweep file (see ``configs/sweeps/ablations.yaml``)::

    name: ablations                       # output folder runs/<name> (default: the file's stem)
    base: configs/decoder/objaverse.yaml  # one path or a list, composed in order with --config
    overrides: {trainer.max_steps: 1000}  # dotted config keys -> values, applied to every run
    seeds: [0, 1, 2]
    max_parallel: 6                       # P in --array=0-(K-1)%P (default: all K at once)
    test: true                            # after fit, `gsv3d test` the final checkpoint into the run folder
    test_ckpt: "{run_dir}/checkpoints/last.ckpt"
    runs:
      - name: no_rgb                      # run folder runs/<name>/no_rgb/seed<k>
        label: w/o RGB loss               # row of the report table (default: from the name)
        overlays: [configs/ablations/no_rgb.yaml]
        overrides: {}
    slurm: {partition: gpu, nodes: 1, gpus_per_node: 4, cpus_per_task: 8, mem: 64G, time: "24:00:00",
            account: null, extra: ["--qos=normal"], setup: ["source .venv/bin/activate"], command: gsv3d}

Relative paths are relative to the directory ``gsv3d sweep`` runs from (the repository root), as for
``gsv3d fit --config``; the generated script uses absolute paths.

Each task (one run × one seed) trains with ``srun gsv3d fit --config base... --config overlay... --k=v...
--seed_everything=<seed> --trainer.default_root_dir=<run folder> --trainer.devices=<ntasks per node>
--trainer.num_nodes=<nodes>``. The run folder is stable across requeues and ``--ckpt_path`` is *not* passed to
fit, so Lightning's SLURMEnvironment (the single requeue owner) resumes from the newest ``hpc_ckpt_*.ckpt`` it
saved there on SIGUSR1. Marker files ``fit.done`` / ``test.done`` in the run folder make a restarted task skip
finished phases; ``FAILED`` records the failing command for ``gsv3d report``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ABLATION_LABELS",
    "METRIC_COLUMNS",
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

# Report rows for the paper's ablation names (run name -> row label), in the paper's order.
ABLATION_LABELS: dict[str, str] = {
    "no_rgb": "w/o RGB loss",
    "no_depth": "w/o Depth loss",
    "n8": "N = 8",
    "n4": "N = 4",
    "no_dino": "w/o DINO encoder",
    "full": "Full Model",
}

# (metrics.json key, column header, decimals) — the paper's ablation columns, then geometry.
METRIC_COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("psnr", "PSNR↑", 3),
    ("ssim", "SSIM↑", 3),
    ("lpips", "LPIPS↓", 3),
    ("fid", "FID↓", 2),
    ("kid", "KID↓", 2),
    ("chamfer", "CD↓", 3),
    ("iou", "IoU↑", 3),
    ("fscore", "F-Score↑", 3),
)

# Keys the sweep owns: each task sets them itself, so a sweep file must not.
_MANAGED_KEYS = {
    "seed_everything": "use the sweep's `seeds:` list",
    "trainer.default_root_dir": "each task gets the stable folder <out>/<run>/seed<k>",
    "trainer.devices": "set `slurm.gpus_per_node` (it is also --ntasks-per-node)",
    "trainer.num_nodes": "set `slurm.nodes`",
    "ckpt_path": "fit must not pass a checkpoint: SLURMEnvironment resumes from hpc_ckpt_*.ckpt",
    "config": "use `base:` and the runs' `overlays:`",
}
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_+][A-Za-z0-9_+]*)*$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MANIFEST = "sweep.json"


class SweepError(ValueError):
    """A sweep file or sweep folder is invalid; the message names the file and line."""


# --------------------------------------------------------------------------------------------------------------
# Loading with line numbers


class _Mapping(dict):
    """A dict that remembers the 1-based line of each key (``.lines``) and of itself (``.line``)."""

    line: int = 0
    lines: dict[str, int]


class _Sequence(list):
    line: int = 0
    lines: list[int]


class _LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings/sequences carry the source line of every entry (from the node marks)."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _Mapping:
    loader.flatten_mapping(node)
    out = _Mapping()
    out.line, out.lines = node.start_mark.line + 1, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in out:
            raise SweepError(f"{loader.name}:{key_node.start_mark.line + 1}: duplicate key {key!r}")
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = key_node.start_mark.line + 1
    return out


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> _Sequence:
    out = _Sequence(loader.construct_object(child, deep=True) for child in node.value)
    out.line, out.lines = node.start_mark.line + 1, [child.start_mark.line + 1 for child in node.value]
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def _load_yaml_with_lines(path: Path) -> Any:
    text = path.read_text()
    loader = _LineLoader(text)
    loader.name = str(path)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML: {e}") from e
    finally:
        loader.dispose()


# --------------------------------------------------------------------------------------------------------------
# Schema


@dataclass(frozen=True)
class SlurmResources:
    """The ``slurm:`` section. ``gpus_per_node`` is also ``--ntasks-per-node`` and ``trainer.devices`` (1 task
    on CPU sweeps); ``extra`` are additional ``#SBATCH`` flags; ``setup`` shell lines run before each task;
    ``command`` is how the job invokes the CLI (e.g. ``/abs/.venv/bin/gsv3d``); ``signal`` is sent
    ``signal_seconds`` before the time limit and must be the one Lightning's SLURMEnvironment listens to
    (``requeue_signal``, SIGUSR1 by default)."""

    partition: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem: str | None = None
    time: str | None = None
    account: str | None = None
    job_name: str | None = None
    extra: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    command: str = "gsv3d"
    signal: str = "SIGUSR1"
    signal_seconds: int = 120

    @property
    def ntasks_per_node(self) -> int:
        """One task per GPU (Lightning's DDP rank = SLURM task); one task on CPU sweeps."""
        return max(1, self.gpus_per_node)


@dataclass(frozen=True)
class RunSpec:
    """One entry of ``runs:``: ``overlays`` are config files composed after the base; ``overrides`` map dotted
    keys to values. ``line`` is where it starts in the sweep file (for error messages)."""

    name: str
    label: str
    overlays: tuple[Path, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)
    line: int = 0
    override_lines: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Sweep:
    """A validated sweep file (:func:`load_sweep`)."""

    path: Path
    name: str
    base: tuple[Path, ...]
    runs: tuple[RunSpec, ...]
    seeds: tuple[int, ...] = (0,)
    overrides: dict[str, Any] = field(default_factory=dict)
    override_lines: dict[str, int] = field(default_factory=dict)
    slurm: SlurmResources = field(default_factory=SlurmResources)
    max_parallel: int | None = None
    test: bool = True
    test_ckpt: str = "{run_dir}/checkpoints/last.ckpt"

    @property
    def num_tasks(self) -> int:
        return len(self.runs) * len(self.seeds)


@dataclass(frozen=True)
class Task:
    """One array task = one run × one seed. ``args`` follow ``gsv3d fit`` / ``gsv3d test`` (shared by both)."""

    index: int
    run: str
    seed: int
    run_dir: Path
    args: tuple[str, ...]


_TOP_KEYS = {"name", "base", "overrides", "seeds", "max_parallel", "runs", "slurm", "test", "test_ckpt"}
_RUN_KEYS = {"name", "label", "overlays", "overrides"}
_SLURM_KEYS = {f for f in SlurmResources.__dataclass_fields__}


def _where(path: Path, mapping: Any, key: str | int | None = None) -> str:
    line = 0
    if isinstance(mapping, _Mapping):
        line = mapping.lines.get(key, mapping.line) if key is not None else mapping.line
    elif isinstance(mapping, _Sequence):
        line = mapping.lines[key] if isinstance(key, int) and key < len(mapping.lines) else mapping.line
    return f"{path}:{line}" if line else str(path)


def _check_keys(path: Path, mapping: Any, allowed: set[str], what: str) -> None:
    if not isinstance(mapping, dict):
        raise SweepError(f"{_where(path, mapping)}: {what} must be a mapping, got {type(mapping).__name__}")
    for key in mapping:
        if key not in allowed:
            import difflib

            close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SweepError(
                f"{_where(path, mapping, key)}: unknown key {key!r} in {what}{hint}; "
                f"allowed: {', '.join(sorted(allowed))}"
            )


def _as_path_list(path: Path, parent: Any, key: str, value: Any, root: Path) -> tuple[Path, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise SweepError(f"{_where(path, parent, key)}: `{key}` must be a path or a list of paths")
    out = []
    for i, item in enumerate(items):
        p = Path(os.path.expanduser(item))
        p = p if p.is_absolute() else root / p
        if not p.is_file():
            where = _where(path, items, i) if isinstance(items, _Sequence) else _where(path, parent, key)
            raise SweepError(f"{where}: config file {item!r} not found (looked at {p}; relative paths are "
                             f"relative to the current directory {root})")
        out.append(p.resolve())
    return tuple(out)


def _check_overrides(path: Path, parent: Any, key: str, value: Any) -> tuple[dict[str, Any], dict[str, int]]:
    if value is None:
        return {}, {}
    if not isinstance(value, dict):
        raise SweepError(f"{_where(path, parent, key)}: `{key}` must be a mapping of dotted config keys to values, "
                         f"e.g. {{trainer.max_steps: 100}}")
    lines = {}
    for k in value:
        where = _where(path, value, k)
        if not isinstance(k, str) or not _KEY_RE.match(k):
            raise SweepError(f"{where}: override key {k!r} is not a dotted config key like model.init_args.lambda_rgb")
        if k in _MANAGED_KEYS:
            raise SweepError(f"{where}: `{k}` is set by the sweep itself: {_MANAGED_KEYS[k]}")
        lines[k] = value.lines.get(k, 0) if isinstance(value, _Mapping) else 0
    return dict(value), lines


def _positive_int(path: Path, parent: Any, key: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SweepError(f"{_where(path, parent, key)}: `{key}` must be an integer >= {minimum}, got {value!r}")
    return value


def load_sweep(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Sweep:
    """Read and check a sweep file: schema, keys, types, that every config file exists, that there is at least
    one run. Does not import the model classes (see :func:`validate_configs` for that).

    Args:
        path: the sweep YAML.
        root: directory that relative config paths are resolved against (default: the current directory).

    Raises:
        SweepError: naming ``file:line`` and what to change.
    """
    path = Path(path)
    root = Path(root or os.getcwd()).resolve()
    if not path.is_file():
        raise SweepError(f"sweep file {path} not found")
    doc = _load_yaml_with_lines(path)
    if doc is None:
        raise SweepError(f"{path}:1: the sweep file is empty; it needs `base:` and `runs:`")
    _check_keys(path, doc, _TOP_KEYS, "the sweep file")
    for required in ("base", "runs"):
        if required not in doc:
            raise SweepError(f"{path}:{doc.line}: missing required key `{required}`")

    name = doc.get("name", path.stem)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise SweepError(f"{_where(path, doc, 'name')}: `name` must be a folder name ([A-Za-z0-9_.-]), got {name!r}")
    base = _as_path_list(path, doc, "base", doc["base"], root)
    if not base:
        raise SweepError(f"{_where(path, doc, 'base')}: `base` lists no config file")
    overrides, override_lines = _check_overrides(path, doc, "overrides", doc.get("overrides"))

    seeds = doc.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) and not isinstance(seeds, bool) else seeds
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise SweepError(f"{_where(path, doc, 'seeds')}: `seeds` must be a non-empty list of integers >= 0")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"{_where(path, doc, 'seeds')}: `seeds` has duplicates: {list(seeds)}")

    runs_doc = doc["runs"]
    if not isinstance(runs_doc, list):
        raise SweepError(f"{_where(path, doc, 'runs')}: `runs` must be a list of {{name, overlays, overrides}}")
    if not runs_doc:
        raise SweepError(f"{_where(path, doc, 'runs')}: `runs` is empty: a sweep needs at least one run")
    runs: list[RunSpec] = []
    for i, run in enumerate(runs_doc):
        _check_keys(path, run, _RUN_KEYS, f"runs[{i}]")
        where = _where(path, runs_doc, i)
        rname = run.get("name")
        if not isinstance(rname, str) or not _NAME_RE.match(rname):
            raise SweepError(f"{where}: runs[{i}] needs a `name` that is a folder name ([A-Za-z0-9_.-]), got {rname!r}")
        if any(r.name == rname for r in runs):
            raise SweepError(f"{where}: duplicate run name {rname!r}")
        label = run.get("label", ABLATION_LABELS.get(rname, rname))
        if not isinstance(label, str):
            raise SweepError(f"{_where(path, run, 'label')}: `label` must be a string")
        overlays = _as_path_list(path, run, "overlays", run.get("overlays") or [], root)
        r_over, r_lines = _check_overrides(path, run, "overrides", run.get("overrides"))
        runs.append(RunSpec(rname, label, overlays, r_over, line=run.line, override_lines=r_lines))

    slurm_doc = doc.get("slurm") or _Mapping()
    _check_keys(path, slurm_doc, _SLURM_KEYS, "`slurm`")
    kw: dict[str, Any] = {}
    for key in ("nodes", "cpus_per_task", "signal_seconds"):
        if key in slurm_doc:
            kw[key] = _positive_int(path, slurm_doc, key, slurm_doc[key])
    if "gpus_per_node" in slurm_doc:
        kw["gpus_per_node"] = _positive_int(path, slurm_doc, "gpus_per_node", slurm_doc["gpus_per_node"], 0)
    for key in ("partition", "mem", "time", "account", "job_name", "command", "signal"):
        value = slurm_doc.get(key)
        if value is not None:
            if key == "time" and isinstance(value, int):
                value = str(value)  # minutes
            if not isinstance(value, str) or not value.strip() or "\n" in value:
                raise SweepError(f"{_where(path, slurm_doc, key)}: `slurm.{key}` must be a one-line string")
            kw[key] = value
    if "signal" in kw and not re.fullmatch(r"(SIG)?[A-Z0-9]+", kw["signal"]):
        raise SweepError(f"{_where(path, slurm_doc, 'signal')}: `slurm.signal` must be a signal name like SIGUSR1 "
                         f"(sent to the job steps, where Lightning listens; not 'B:...', which only reaches the "
                         f"batch shell), got {kw['signal']!r}")
    for key in ("extra", "setup"):
        value = slurm_doc.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) and "\n" not in v for v in value):
            raise SweepError(f"{_where(path, slurm_doc, key)}: `slurm.{key}` must be a list of one-line strings")
        if key == "extra":
            for j, line in enumerate(value):
                flag = line.removeprefix("#SBATCH").strip()
                if not flag.startswith("-"):
                    raise SweepError(f"{_where(path, value, j)}: `slurm.extra` entries are sbatch flags like "
                                     f"'--qos=high' (or '#SBATCH --qos=high'), got {line!r}")
            value = [line.removeprefix("#SBATCH").strip() for line in value]
        kw[key] = tuple(value)

    max_parallel = doc.get("max_parallel")
    if max_parallel is not None:
        max_parallel = _positive_int(path, doc, "max_parallel", max_parallel)
    test = doc.get("test", True)
    if not isinstance(test, bool):
        raise SweepError(f"{_where(path, doc, 'test')}: `test` must be true or false")
    test_ckpt = doc.get("test_ckpt", Sweep.test_ckpt)
    if not isinstance(test_ckpt, str) or "{run_dir}" not in test_ckpt:
        raise SweepError(f"{_where(path, doc, 'test_ckpt')}: `test_ckpt` must be a path containing {{run_dir}}")

    return Sweep(
        path=path.resolve(), name=name, base=base, runs=tuple(runs), seeds=tuple(seeds), overrides=overrides,
        override_lines=override_lines, slurm=SlurmResources(**kw), max_parallel=max_parallel, test=test,
        test_ckpt=test_ckpt,
    )


# --------------------------------------------------------------------------------------------------------------
# Expansion and validation against the CLI parser


def _render_value(value: Any) -> str:
    """A YAML/JSON scalar or structure as jsonargparse reads it back from ``--key=value``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    return json.dumps(value)


def _config_args(sweep: Sweep, run: RunSpec) -> list[str]:
    args: list[str] = []
    for p in (*sweep.base, *run.overlays):
        args += ["--config", str(p)]
    merged = {**sweep.overrides, **run.overrides}  # a run's override wins over the sweep-wide one
    args += [f"--{k}={_render_value(v)}" for k, v in merged.items()]
    return args


_RUN_DIR = "@@RUN_DIR@@"  # placeholder in re-rooted overrides (see validate_configs), replaced per task
_REROOT_KEYS = ("trainer.callbacks", "trainer.logger")


def expand_tasks(
    sweep: Sweep, out_dir: str | os.PathLike, rerooted: dict[str, dict[str, str]] | None = None
) -> list[Task]:
    """Runs × seeds, run-major. Task i trains in ``<out_dir>/<run>/seed<k>`` (absolute), the same folder on every
    requeue and every regeneration of the script.

    Args:
        rerooted: per run, extra overrides from :func:`validate_configs` that move paths the config derived from
            its own ``default_root_dir`` (checkpoint dirpath, logger save_dir) into the task's run folder.
    """
    out_dir = Path(out_dir).resolve()
    tasks = []
    for run in sweep.runs:
        for seed in sweep.seeds:
            run_dir = out_dir / run.name / f"seed{seed}"
            fixes = (rerooted or {}).get(run.name, {})
            args = [
                *_config_args(sweep, run),
                *(f"--{k}={v.replace(_RUN_DIR, str(run_dir))}" for k, v in fixes.items()),
                f"--seed_everything={seed}",
                f"--trainer.default_root_dir={run_dir}",
                f"--trainer.devices={sweep.slurm.ntasks_per_node}",
                f"--trainer.num_nodes={sweep.slurm.nodes}",
            ]
            tasks.append(Task(len(tasks), run.name, seed, run_dir, tuple(args)))
    return tasks


class _ParsedOnly(Exception):
    def __init__(self, config: Any) -> None:
        super().__init__("parsed")
        self.config = config


def _parse_only(args: Sequence[str]) -> Any:
    """Parse ``gsv3d fit`` arguments with the project's LightningCLI parser (class paths resolved, init_args
    type-checked) without instantiating model, data or trainer. Raises jsonargparse's ArgumentError."""
    from lightning.pytorch.cli import LightningArgumentParser

    from gsv3d_pl.cli import build_cli

    class _Parser(LightningArgumentParser):
        def instantiate_classes(self, cfg, *a, **k):  # the parse is done: stop before building anything
            raise _ParsedOnly(cfg)

    import warnings

    try:
        with warnings.catch_warnings():
            # LightningCLI warns that `args` differ from sys.argv (they are meant to, here) and about the seed.
            warnings.simplefilter("ignore", UserWarning)
            build_cli(args=list(args), run=False, parser_class=_Parser, parser_kwargs={"exit_on_error": False},
                      seed_everything_default=False)
    except _ParsedOnly as done:
        return done.config
    raise RuntimeError("LightningCLI returned without instantiating classes")  # pragma: no cover


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


def validate_configs(sweep: Sweep) -> dict[str, dict[str, str]]:
    """Compose every run's config (base + overlays + overrides + the sweep's own keys) with the CLI parser, as
    ``gsv3d fit`` will on the cluster, so a typo fails here and not hours later in the queue.

    Returns:
        per run, the re-rooting overrides (see :func:`_reroot_overrides`) to pass to :func:`write_sweep`.

    Raises:
        SweepError: naming the run, the sweep-file line of the offending override (found by re-parsing each
            override alone) or of the run, and jsonargparse's message.
    """
    tasks = expand_tasks(sweep, Path(tempfile.gettempdir()) / "gsv3d-sweep-validate")
    by_run = {t.run: t for t in tasks}  # one seed per run is enough: seeds differ in seed_everything only
    rerooted: dict[str, dict[str, str]] = {}
    for run in sweep.runs:
        try:
            _parse_only(by_run[run.name].args)
            rerooted[run.name] = _reroot_overrides(_parse_only(_config_args(sweep, run)))
            if rerooted[run.name]:  # the composed config with the moved paths must parse too
                _parse_only(expand_tasks(sweep, Path(tempfile.gettempdir()) / "gsv3d-sweep-validate",
                                         rerooted)[by_run[run.name].index].args)
            continue
        except Exception as e:  # jsonargparse raises ArgumentError (or TypeError/ValueError from YAML)
            error = e
        base_args = [a for p in (*sweep.base, *run.overlays) for a in ("--config", str(p))]
        # Which override breaks it? Compose base + overlays alone, then add one override at a time.
        try:
            _parse_only(base_args)
        except Exception as e:
            raise SweepError(
                f"{sweep.path}:{run.line}: run {run.name!r}: composing its config files failed "
                f"({', '.join(str(p) for p in (*sweep.base, *run.overlays))}):\n    {_first_lines(str(e))}"
            ) from e
        merged = {**sweep.overrides, **run.overrides}
        for key, value in merged.items():
            try:
                _parse_only([*base_args, f"--{key}={_render_value(value)}"])
            except Exception as e:
                line = run.override_lines.get(key) if key in run.overrides else sweep.override_lines.get(key)
                raise SweepError(
                    f"{sweep.path}:{line or run.line}: run {run.name!r}: override `{key}: {value!r}` is not "
                    f"valid for this config:\n    {_first_lines(str(e))}"
                ) from e
        raise SweepError(f"{sweep.path}:{run.line}: run {run.name!r}: its config does not parse:\n"
                         f"    {_first_lines(str(error))}") from error
    return rerooted


# --------------------------------------------------------------------------------------------------------------
# The sbatch script


def _sbatch_header(sweep: Sweep, num_tasks: int, log_dir: Path) -> list[str]:
    s = sweep.slurm
    parallel = min(sweep.max_parallel or num_tasks, num_tasks)
    lines = [
        f"--job-name={s.job_name or 'gsv3d-' + sweep.name}",
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
        f"--output={log_dir}/%A_%a.out",
        *s.extra,
    ]
    return [f"#SBATCH {shlex.join(shlex.split(line))}" for line in lines]


def render_sbatch(
    sweep: Sweep, tasks: Sequence[Task], out_dir: str | os.PathLike, workdir: str | os.PathLike | None = None
) -> str:
    """The array-job script: task ``$SLURM_ARRAY_TASK_ID`` runs ``srun <command> fit ARGS`` then (if ``test``)
    ``srun <command> test ARGS --ckpt_path <final checkpoint>`` in its run folder. Arguments are shell-quoted
    with :func:`shlex.quote`, so values with spaces or quotes survive. With ``GSV3D_SWEEP_LOCAL=1`` the same
    script runs one task without SLURM (``srun`` becomes a plain call): that is ``gsv3d sweep --local``."""
    if not tasks:
        raise SweepError("the sweep has no tasks")
    out_dir = Path(out_dir).resolve()
    workdir = Path(workdir or os.getcwd()).resolve()
    cmd = shlex.split(sweep.slurm.command)
    cmd_q = shlex.join(cmd)
    lines = [
        "#!/bin/bash",
        f"# Generated by `gsv3d sweep {sweep.path}`: {len(sweep.runs)} runs x {len(sweep.seeds)} seeds = "
        f"{len(tasks)} array tasks",
        f"# (task index -> run folder in {out_dir / 'tasks.txt'}). Submit with: sbatch {out_dir / 'sweep.sbatch'}",
        *_sbatch_header(sweep, len(tasks), out_dir / "slurm"),
        "",
        "set -Eeuo pipefail  # -E: the ERR trap below also fires inside functions",
        f"cd {shlex.quote(str(workdir))}",
        *sweep.slurm.setup,
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
        "",
        'mkdir -p "$RUN_DIR"',
        'rm -f "$RUN_DIR/FAILED"',
        'PHASE=setup',
        'trap \'rc=$?; echo "$PHASE: exit $rc at line $LINENO" > "$RUN_DIR/FAILED"; trap - ERR\' ERR',
        'echo "[gsv3d sweep] task $TASK -> $RUN_DIR (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname) at $(date)"',
        "",
        'if [[ ! -e "$RUN_DIR/fit.done" ]]; then',
        "  PHASE=fit",
        "  # No --ckpt_path on purpose: after a requeue, SLURMEnvironment resumes from the newest hpc_ckpt_*.ckpt in",
        "  # the run folder (passing --ckpt_path, even 'last', would bypass it).",
        f'  srun --kill-on-bad-exit=1 {cmd_q} fit "${{ARGS[@]}}"',
        '  touch "$RUN_DIR/fit.done"',
        "fi",
    ]
    if sweep.test:
        preferred = sweep.test_ckpt.replace("{run_dir}", "$RUN_DIR")
        ckpt_expr = '"$RUN_DIR"'.join(shlex.quote(part) if part else "" for part in sweep.test_ckpt.split("{run_dir}"))
        lines += [
            'if [[ ! -e "$RUN_DIR/test.done" ]]; then',
            "  PHASE=test",
            f"  CKPT={ckpt_expr}",
            '  if [[ ! -f "$CKPT" ]]; then  # e.g. checkpoints under a logger\'s version folder: newest last*.ckpt',
            '    CKPT="$(find "$RUN_DIR" -name \'last*.ckpt\' -printf \'%T@ %p\\n\' | sort -n | tail -n 1 \\',
            '      | cut -d" " -f2-)"',
            "  fi",
            '  if [[ -z "$CKPT" || ! -f "$CKPT" ]]; then',
            f'    echo "gsv3d sweep: fit finished but no checkpoint {preferred} (nor any last*.ckpt under $RUN_DIR):'
            ' enable ModelCheckpoint(save_last=True) in the config" >&2',
            "    false",
            "  fi",
            '  echo "[gsv3d sweep] testing $CKPT"',
            f'  srun --kill-on-bad-exit=1 {cmd_q} test "${{ARGS[@]}}" --ckpt_path "$CKPT"',
            '  touch "$RUN_DIR/test.done"',
            "fi",
        ]
    lines += ['echo "[gsv3d sweep] task $TASK done at $(date)"', ""]
    return "\n".join(lines)


def _atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_sweep(
    sweep: Sweep,
    out_dir: str | os.PathLike,
    workdir: str | os.PathLike | None = None,
    rerooted: dict[str, dict[str, str]] | None = None,
) -> tuple[Path, Path, list[Task]]:
    """Write ``<out_dir>/sweep.sbatch``, ``<out_dir>/tasks.txt`` (one line per task: index, run, seed, run folder,
    the quoted fit arguments) and ``<out_dir>/sweep.json`` (the manifest ``gsv3d report`` reads). Atomic.

    Returns:
        (script path, tasks path, tasks)
    """
    out_dir = Path(out_dir).resolve()
    tasks = expand_tasks(sweep, out_dir, rerooted)
    script = render_sbatch(sweep, tasks, out_dir, workdir)
    (out_dir / "slurm").mkdir(parents=True, exist_ok=True)
    _atomic_write(out_dir / "sweep.sbatch", script, 0o755)
    rows = ["# index\trun\tseed\trun_dir\tgsv3d fit arguments"]
    rows += [f"{t.index}\t{t.run}\t{t.seed}\t{t.run_dir}\t{shlex.join(t.args)}" for t in tasks]
    _atomic_write(out_dir / "tasks.txt", "\n".join(rows) + "\n")
    manifest = {
        "name": sweep.name,
        "sweep_file": str(sweep.path),
        "seeds": list(sweep.seeds),
        "runs": [{"name": r.name, "label": r.label} for r in sweep.runs],
        "tasks": [{"index": t.index, "run": t.run, "seed": t.seed, "run_dir": str(t.run_dir)} for t in tasks],
    }
    _atomic_write(out_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return out_dir / "sweep.sbatch", out_dir / "tasks.txt", tasks


def submit(script: str | os.PathLike, sbatch: str = "sbatch") -> str:
    """``sbatch --parsable SCRIPT`` -> the array job id. Raises RuntimeError with sbatch's message on failure."""
    try:
        proc = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise RuntimeError(f"`{sbatch}` not found: submit from a SLURM login node, or use --local") from e
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]  # --parsable prints "jobid[;cluster]"


def run_local(script: str | os.PathLike, tasks: Sequence[Task], stream=None) -> int:
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


# --------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class RunResult:
    """One run's row: per-seed status (``ok`` | ``missing`` | ``running`` | ``failed`` | ``invalid``) and the
    metric values of the ``ok`` seeds."""

    name: str
    label: str
    seeds: dict[int, str] = field(default_factory=dict)
    values: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def num_ok(self) -> int:
        return sum(s == "ok" for s in self.seeds.values())


def _read_metrics(path: Path) -> dict[str, float | None]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    out: dict[str, float | None] = {}
    for key, _, _ in METRIC_COLUMNS:
        entry = data.get(key)
        value = entry.get("value") if isinstance(entry, dict) else entry
        if value is None or (isinstance(value, (int, float)) and math.isfinite(value)):
            out[key] = None if value is None else float(value)
        else:
            raise ValueError(f"{key}.value is {value!r}, expected a finite number")
    return out


def collect_results(sweep_dir: str | os.PathLike) -> list[RunResult]:
    """Every run × seed of a sweep folder, in the sweep's order. Uses ``sweep.json`` (written by ``gsv3d sweep``)
    to know what was expected, so a task that never started shows as ``missing``; without it, scans
    ``<dir>/<run>/seed<k>/``. Status of a task: ``ok`` (metrics.json read), ``failed`` (a ``FAILED`` marker),
    ``invalid`` (unreadable metrics.json), ``running`` (folder exists, no metrics yet), ``missing`` (no folder)."""
    sweep_dir = Path(sweep_dir)
    manifest_path = sweep_dir / MANIFEST
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
            runs = [(r["name"], r["label"]) for r in manifest["runs"]]
            tasks = [(t["run"], int(t["seed"]), Path(t["run_dir"])) for t in manifest["tasks"]]
        except (ValueError, KeyError, TypeError) as e:
            raise SweepError(f"{manifest_path}: not a gsv3d sweep manifest ({e}); regenerate it with `gsv3d sweep`") \
                from e
        # Resolve the run folders relative to where the sweep folder is now (it may have been copied).
        tasks = [(r, s, sweep_dir / r / f"seed{s}") if not d.is_dir() else (r, s, d) for r, s, d in tasks]
    else:
        tasks = sorted(
            (p.parent.name, int(p.name[4:]), p)
            for p in sweep_dir.glob("*/seed*")
            if p.is_dir() and p.name[4:].isdigit()
        )
        if not tasks:
            raise SweepError(f"{sweep_dir}: no {MANIFEST} and no <run>/seed<k>/ folders: is this a sweep folder?")
        names = list(dict.fromkeys(r for r, _, _ in tasks))
        order = list(ABLATION_LABELS)
        names.sort(key=lambda n: (order.index(n) if n in order else len(order), n))
        runs = [(n, ABLATION_LABELS.get(n, n)) for n in names]
    results = {name: RunResult(name, label) for name, label in runs}
    for run, seed, run_dir in tasks:
        res = results[run]
        metrics = run_dir / "metrics.json"
        if metrics.is_file():
            try:
                values = _read_metrics(metrics)
            except (ValueError, OSError) as e:
                res.seeds[seed] = "invalid"
                res.notes.append(f"seed {seed}: {metrics}: {e}")
                continue
            res.seeds[seed] = "ok"
            for key, v in values.items():
                if v is not None:
                    res.values.setdefault(key, []).append(v)
        elif (run_dir / "FAILED").is_file():
            res.seeds[seed] = "failed"
            reason = (run_dir / "FAILED").read_text().strip()
            res.notes.append(f"seed {seed}: failed: {reason} (logs: {sweep_dir}/slurm/)")
        elif (run_dir / "test.done").is_file():
            res.seeds[seed] = "failed"
            res.notes.append(f"seed {seed}: `gsv3d test` finished but wrote no metrics.json (are the metric callbacks "
                             f"in the config?)")
        elif run_dir.is_dir():
            res.seeds[seed] = "running"
            res.notes.append(f"seed {seed}: no metrics.json yet (still running, or killed: see {sweep_dir}/slurm/)")
        else:
            res.seeds[seed] = "missing"
            res.notes.append(f"seed {seed}: not started ({run_dir} does not exist)")
    return list(results.values())


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))  # sample std over seeds


def _status_word(res: RunResult) -> str:
    """What a row shows when no seed has numbers: the most telling status among its seeds."""
    for word in ("failed", "invalid", "running", "missing"):
        if word in res.seeds.values():
            return word
    return "missing"


def format_table(results: Sequence[RunResult], fmt: str = "md") -> str:
    """The ablation table. ``md``: one row per run, ``mean ± std`` over the seeds with numbers (std only with
    ≥ 2 seeds), ``(k/n seeds)`` when some are missing, a status word when none has numbers, then notes naming
    every missing/failed seed. ``csv``: machine-readable, one row per run with ``<metric>_mean``, ``<metric>_std``,
    ``num_ok``, ``num_seeds`` and ``status`` columns."""
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        header = ["row", "run", "status", "num_ok", "num_seeds"]
        for key, _, _ in METRIC_COLUMNS:
            header += [f"{key}_mean", f"{key}_std"]
        writer.writerow(header)
        for res in results:
            status = "ok" if res.num_ok == len(res.seeds) else (_status_word(res) if not res.num_ok else "partial")
            row: list[Any] = [res.label, res.name, status, res.num_ok, len(res.seeds)]
            for key, _, _ in METRIC_COLUMNS:
                vals = res.values.get(key)
                if vals:
                    mean, std = _mean_std(vals)
                    row += [repr(mean), "" if std is None else repr(std)]
                else:
                    row += ["", ""]
            writer.writerow(row)
        return buf.getvalue()
    if fmt != "md":
        raise ValueError(f"unknown format {fmt!r}: use 'md' or 'csv'")

    header = ["Method", *(h for _, h, _ in METRIC_COLUMNS)]
    rows = []
    for res in results:
        if not res.num_ok:
            rows.append([res.label, *([_status_word(res)] * len(METRIC_COLUMNS))])
            continue
        partial = f" ({res.num_ok}/{len(res.seeds)} seeds)" if res.num_ok < len(res.seeds) else ""
        row = [res.label + partial]
        for key, _, digits in METRIC_COLUMNS:
            vals = res.values.get(key)
            if not vals:
                row.append("n/a")
                continue
            mean, std = _mean_std(vals)
            row.append(f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}"))
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    seeds = sorted({len(r.seeds) for r in results})
    out.append("")
    out.append(f"mean ± sample std over {'/'.join(map(str, seeds))} seed(s); n/a: metric not computed.")
    notes = [f"- {r.label} ({r.name}) {n}" for r in results for n in r.notes]
    if notes:
        out += ["", "Incomplete runs:", *notes]
    return "\n".join(out) + "\n"
