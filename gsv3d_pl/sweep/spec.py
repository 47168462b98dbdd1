"""The sweep file: its schema (:class:`Sweep`, :class:`RunSpec`, :class:`SlurmResources`) and :func:`load_sweep`.

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
``gsv3d fit --config``. Every error names ``file:line`` (the YAML is loaded with each entry's line) and what to
change. :func:`load_sweep` does not import the model classes: :func:`gsv3d_pl.sweep.validate_configs` composes
each run's config with the CLI parser.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ABLATION_LABELS", "MANIFEST", "RunSpec", "SlurmResources", "Sweep", "SweepError", "load_sweep"]

# Report rows for the paper's ablation names (run name -> row label), in the paper's order.
ABLATION_LABELS: dict[str, str] = {
    "no_rgb": "w/o RGB loss",
    "no_depth": "w/o Depth loss",
    "n8": "N = 8",
    "n4": "N = 4",
    "no_dino": "w/o DINO encoder",
    "full": "Full Model",
}

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

# The sweep folder's manifest: written by `write_sweep`, read by `collect_results`.
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


def _load_slurm(path: Path, slurm_doc: Any) -> SlurmResources:
    """The ``slurm:`` section, checked key by key."""
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
    return SlurmResources(**kw)


def load_sweep(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Sweep:
    """Read and check a sweep file: schema, keys, types, that every config file exists, that there is at least
    one run. Does not import the model classes (:func:`gsv3d_pl.sweep.validate_configs` does that).

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

    slurm = _load_slurm(path, doc.get("slurm") or _Mapping())

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
        override_lines=override_lines, slurm=slurm, max_parallel=max_parallel, test=test,
        test_ckpt=test_ckpt,
    )
