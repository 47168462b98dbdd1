"""The sweep file: its schema (:class:`Sweep`, :class:`StageSpec`, :class:`RunSpec`, :class:`SlurmResources`) and
:func:`load_sweep`.

A single-stage sweep (every run trains one config, then ``gsv3d test`` scores it)::

    name: ablations                       # output folder runs/<name> (default: the file's stem)
    base: configs/decoder/objaverse.yaml  # one path or a list, composed in order with --config
    overrides: {trainer.max_steps: 1000}  # dotted config keys -> values, applied to every run
    seeds: [0, 1, 2]
    max_parallel: 6                       # P in --array=0-(K-1)%P (default: all K at once)
    dedupe: true                          # identical resolved stage configs train once (the default)
    test: true                            # after fit, `gsv3d test` the final checkpoint into the run folder
    test_ckpt: "{run_dir}/checkpoints/last.ckpt"
    runs:
      - name: no_rgb                      # run folder runs/<name>/no_rgb/seed<k>
        label: w/o RGB loss               # row of the report table (default: from the name)
        overlays: [configs/ablations/no_rgb.yaml]
        overrides: {}
    slurm: {partition: gpu, nodes: 1, gpus_per_node: 4, cpus_per_task: 8, mem: 64G, time: "24:00:00",
            account: null, extra: ["--qos=normal"], setup: ["source .venv/bin/activate"], command: gsv3d}

A chained sweep (``stages:``; see ``configs/sweeps/ablations.yaml``): every run × seed is a pipeline of stages,
each trained in its own folder ``<out>/<run>/seed<k>/<stage>``; a later stage reads an earlier one's checkpoint
through the ``{run_dir}`` placeholder (= ``<out>/<run>/seed<k>``)::

    stages:
      - name: decoder                     # [A-Za-z][A-Za-z0-9_]*: folder and SLURM job name
        base: [configs/decoder/objaverse.yaml, configs/trainer/gpu.yaml]
        test: false                       # default: true for the last stage only
      - name: distill
        base: [configs/distill/objaverse.yaml, configs/trainer/gpu.yaml]
        overrides: {model.init_args.decoder_ckpt: "{run_dir}/decoder/checkpoints/last.ckpt"}
        test_ckpt: "{stage_dir}/checkpoints/last.ckpt"   # the default
        slurm: {time: "24:00:00"}         # optional: keys that differ from the top-level `slurm:` for this stage
    overrides: {data.init_args.cache_dir: data/cache}    # applied to every stage
    runs:
      - name: no_rgb
        overlays: {distill: [configs/ablations/distill_no_rgb.yaml]}     # keyed by stage
      - name: n4
        overlays: {decoder: [configs/ablations/n4.yaml], distill: [configs/ablations/n4.yaml]}
        overrides: {distill: {trainer.max_steps: 10}}                     # keyed by stage too

On SLURM each stage is its own array job and stage i+1 is submitted with ``--dependency=aftercorr:<job of
stage i>``: its task k starts once task k of stage i completed. The runs' report scores the last stage with
``test: true``.

Identical stages run once (``dedupe: true``, the default): two tasks of a stage whose *resolved* configs (what
``gsv3d fit`` would save as the run's ``config.yaml``, seed included, the stage's own output folder left out) are
equal train once; the other task's later stages read the shared folder (:mod:`gsv3d_pl.sweep.dedupe`). In
``ablations.yaml`` the rows w/o RGB and w/o Depth change only the distill stage, so their decoders are Full's.
``dedupe: false`` trains every task (e.g. to measure run-to-run nondeterminism).

Placeholders ``{run_dir}`` and ``{stage_dir}`` (the stage's own folder) are replaced in the sweep file's override
values and ``test_ckpt``, not inside config files; ``{run_dir}/<earlier stage>`` is that stage's folder *as
shared*: the folder of the task that trained it.

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

from gsv3d_pl.sweep.lines import (
    Mapping,
    SweepError,
    as_path_list,
    check_keys,
    check_overrides,
    load_yaml_with_lines,
    positive_int,
    where,
)
from gsv3d_pl.sweep.resources import SLURM_KEYS, SlurmResources, load_slurm, merged_slurm

__all__ = ["ABLATION_LABELS", "MANIFEST", "PLACEHOLDERS", "RunSpec", "SlurmResources", "StageSpec", "Sweep",
           "SweepError", "load_sweep", "substitute"]

# Report rows for the paper's ablation names (run name -> row label), in the paper's order.
ABLATION_LABELS: dict[str, str] = {
    "no_rgb": "w/o RGB loss",
    "no_depth": "w/o Depth loss",
    "n8": "N = 8",
    "n4": "N = 4",
    "no_dino": "w/o DINO encoder",
    "full": "Full Model",
}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Stage names become folder names and shell variable names (JOB_<stage> in submit.sh): no dots or dashes.
_STAGE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")

# The sweep folder's manifest: written by `write_sweep`, read by `collect_results`.
MANIFEST = "sweep.json"

# Placeholders of override values and test_ckpt, replaced per task: the task's folder and the stage's folder.
PLACEHOLDERS = ("{run_dir}", "{stage_dir}")


# `{run_dir}/<stage>` followed by `/` or the end: a path into that stage's folder.
_STAGE_REF = re.compile(r"\{run_dir\}/([A-Za-z][A-Za-z0-9_]*)(?=/|$)")


def substitute(value: Any, run_dir: str | os.PathLike, stage_dir: str | os.PathLike,
               stage_dirs: dict[str, Path] | None = None) -> Any:
    """``value`` with :data:`PLACEHOLDERS` replaced in every string (also inside lists and dicts). Plain
    ``str.replace``, not ``str.format``: other braces (``"step{step:06d}"``) stay as they are. ``stage_dirs``
    maps earlier stages to the folder this task reads them from: ``{run_dir}/<stage>`` becomes that folder (another
    run's, where the stage is shared with it; :mod:`gsv3d_pl.sweep.dedupe`)."""
    if isinstance(value, str):
        if stage_dirs:
            value = _STAGE_REF.sub(lambda m: str(stage_dirs.get(m.group(1), m.group(0))), value)
        return value.replace("{run_dir}", str(run_dir)).replace("{stage_dir}", str(stage_dir))
    if isinstance(value, dict):
        return {k: substitute(v, run_dir, stage_dir, stage_dirs) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [substitute(v, run_dir, stage_dir, stage_dirs) for v in value]
    return value


# --------------------------------------------------------------------------------------------------------------
# Schema


@dataclass(frozen=True)
class StageSpec:
    """One stage of every run: its config files, overrides, whether ``gsv3d test`` follows its fit, and its
    SLURM resources. A single-stage sweep has one stage named ``""`` whose folder is the run folder itself (the
    layout sweeps had before chains); a chained sweep's stage ``s`` trains in ``<run folder>/<s>``."""

    name: str
    base: tuple[Path, ...]
    overrides: dict[str, Any] = field(default_factory=dict)
    override_lines: dict[str, int] = field(default_factory=dict)
    test: bool = True
    test_ckpt: str = "{stage_dir}/checkpoints/last.ckpt"
    slurm: SlurmResources = field(default_factory=SlurmResources)
    line: int = 0

    def folder(self, run_dir: Path) -> Path:
        """Where this stage trains for the task whose folder is ``run_dir``."""
        return run_dir / self.name if self.name else run_dir

    @property
    def label(self) -> str:
        """How messages name the stage (``stage 'distill'``; nothing for a single-stage sweep)."""
        return f"stage {self.name!r}" if self.name else ""


@dataclass(frozen=True)
class RunSpec:
    """One entry of ``runs:``. ``overlays`` are config files composed after the base; ``overrides`` map dotted
    keys to values. In a single-stage sweep they are the run's lists; in a chained sweep they are empty and
    ``stage_overlays`` / ``stage_overrides`` hold them per stage name. ``line`` is where the run starts in the
    sweep file (for error messages)."""

    name: str
    label: str
    overlays: tuple[Path, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)
    line: int = 0
    override_lines: dict[str, int] = field(default_factory=dict)
    stage_overlays: dict[str, tuple[Path, ...]] = field(default_factory=dict)
    stage_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    stage_override_lines: dict[str, dict[str, int]] = field(default_factory=dict)

    def overlays_for(self, stage: str) -> tuple[Path, ...]:
        return self.overlays if stage == "" else self.stage_overlays.get(stage, ())

    def overrides_for(self, stage: str) -> dict[str, Any]:
        return self.overrides if stage == "" else self.stage_overrides.get(stage, {})

    def override_line(self, stage: str, key: str) -> int | None:
        lines = self.override_lines if stage == "" else self.stage_override_lines.get(stage, {})
        return lines.get(key)


@dataclass(frozen=True)
class Sweep:
    """A validated sweep file (:func:`load_sweep`). ``stages`` is the pipeline every run × seed goes through; a
    single-stage sweep's one stage (named ``""``) is built from ``base``, ``test``, ``test_ckpt`` and ``slurm``.
    ``overrides`` apply to every stage, before the stage's and the run's own. ``dedupe``: tasks of a stage with
    identical resolved configs train once (:mod:`gsv3d_pl.sweep.dedupe`)."""

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
    stages: tuple[StageSpec, ...] = ()
    dedupe: bool = True

    def __post_init__(self) -> None:
        if not self.stages:  # single-stage: one unnamed stage whose folder is the run folder
            stage = StageSpec("", self.base, test=self.test, test_ckpt=self.test_ckpt, slurm=self.slurm)
            object.__setattr__(self, "stages", (stage,))

    @property
    def chained(self) -> bool:
        """True for a sweep file with ``stages:`` (stage folders, one array job per stage)."""
        return bool(self.stages[0].name)

    @property
    def num_tasks(self) -> int:
        """Array tasks per stage: runs × seeds."""
        return len(self.runs) * len(self.seeds)

    def stage(self, name: str) -> StageSpec:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r} in {self.path} (stages: {[s.name for s in self.stages]})")

    @property
    def result_stage(self) -> StageSpec | None:
        """The stage whose ``gsv3d test`` the report reads: the last one with ``test: true`` (None: none tests)."""
        return next((s for s in reversed(self.stages) if s.test), None)


_TOP_KEYS = {"name", "base", "overrides", "seeds", "max_parallel", "runs", "slurm", "test", "test_ckpt", "stages",
             "dedupe"}
_CHAIN_MOVED = {"base": "stages[i].base", "test": "stages[i].test", "test_ckpt": "stages[i].test_ckpt"}
_STAGE_KEYS = {"name", "base", "overrides", "test", "test_ckpt", "slurm"}
_RUN_KEYS = {"name", "label", "overlays", "overrides"}


def _check_test_ckpt(path: Path, doc: Any, default: str) -> str:
    test_ckpt = doc.get("test_ckpt", default)
    if not isinstance(test_ckpt, str) or not any(p in test_ckpt for p in PLACEHOLDERS):
        raise SweepError(f"{where(path, doc, 'test_ckpt')}: `test_ckpt` must be a path containing {{run_dir}} "
                         f"or {{stage_dir}}, e.g. \"{{stage_dir}}/checkpoints/last.ckpt\"")
    return test_ckpt


def _check_test(path: Path, doc: Any, default: bool) -> bool:
    test = doc.get("test", default)
    if not isinstance(test, bool):
        raise SweepError(f"{where(path, doc, 'test')}: `test` must be true or false")
    return test


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _check_placeholders(path: Path, overrides: Any, stage_names: list[str], index: int | None) -> None:
    """Placeholders are spelt right, and a stage reads only earlier stages' folders: ``{run_dir}/<s>/...`` with
    ``s`` this stage or a later one would wait for a file that does not exist yet (``index`` None: the sweep-wide
    overrides, which every stage gets)."""
    if not isinstance(overrides, dict):
        return
    for key, value in overrides.items():
        for s in _strings(value):
            for token in re.findall(r"\{([A-Za-z_-]+)\}", s):
                if f"{{{token}}}" not in PLACEHOLDERS and difflib.get_close_matches(token, ["run_dir", "stage_dir"],
                                                                                  n=1, cutoff=0.75):
                    raise SweepError(f"{where(path, overrides, key)}: unknown placeholder {{{token}}} in `{key}`; "
                                     f"the placeholders are {', '.join(PLACEHOLDERS)}")
            for later in re.findall(r"\{run_dir\}/([A-Za-z][A-Za-z0-9_]*)(?:/|$)", s):
                if later in stage_names and (index is None or stage_names.index(later) >= index):
                    who = "the sweep-wide overrides (every stage gets them)" if index is None else \
                        f"stage {stage_names[index]!r}"
                    raise SweepError(f"{where(path, overrides, key)}: `{key}` of {who} reads {{run_dir}}/{later}/, "
                                     f"the folder of stage {later!r}, which does not run before it; a stage can "
                                     "read only earlier stages' outputs (reorder `stages:`)")


def _load_stages(path: Path, doc: Any, root: Path, top_slurm: Any) -> tuple[StageSpec, ...]:
    stages_doc = doc["stages"]
    if not isinstance(stages_doc, list) or not stages_doc:
        raise SweepError(f"{where(path, doc, 'stages')}: `stages` must be a non-empty list of {{name, base, "
                         "overrides, test, test_ckpt, slurm}}, in the order they run")
    names: list[str] = []
    for i, st in enumerate(stages_doc):
        check_keys(path, st, _STAGE_KEYS, f"stages[{i}]")
        sname = st.get("name")
        at = where(path, st, "name") if "name" in st else where(path, stages_doc, i)
        if not isinstance(sname, str) or not _STAGE_RE.match(sname):
            raise SweepError(f"{at}: stages[{i}] needs a `name` made of letters, digits and _ (starting with a "
                             f"letter; it names the stage's folder and SLURM job), got {sname!r}")
        if sname in names:
            raise SweepError(f"{at}: duplicate stage name {sname!r}")
        names.append(sname)
    stages = []
    for i, st in enumerate(stages_doc):
        if "base" not in st:
            raise SweepError(f"{where(path, stages_doc, i)}: stage {names[i]!r} is missing `base` (its config files)")
        base = as_path_list(path, st, "base", st["base"], root, f"stages[{i}].base")
        if not base:
            raise SweepError(f"{where(path, st, 'base')}: stage {names[i]!r}: `base` lists no config file")
        over, lines = check_overrides(path, st, "overrides", st.get("overrides"), f"stages[{i}].overrides")
        _check_placeholders(path, st.get("overrides"), names, i)
        stage_slurm = st.get("slurm")
        if stage_slurm is not None:
            check_keys(path, stage_slurm, SLURM_KEYS, f"stages[{i}].slurm")
        slurm = load_slurm(path, merged_slurm(top_slurm, stage_slurm), f"stages[{i}].slurm")
        stages.append(StageSpec(
            names[i], base, over, lines, test=_check_test(path, st, i == len(stages_doc) - 1),
            test_ckpt=_check_test_ckpt(path, st, StageSpec.test_ckpt), slurm=slurm, line=st.line,
        ))
    return tuple(stages)


def _stage_keyed(path: Path, run: Any, key: str, i: int, stages: tuple[StageSpec, ...]) -> Mapping:
    """A chained run's ``overlays`` / ``overrides``: a mapping whose keys are stage names."""
    value = run.get(key)
    if value is None:
        return Mapping()
    names = [s.name for s in stages]
    example = {"overlays": f"{{{names[-1]}: [configs/ablations/x.yaml]}}",
               "overrides": f"{{{names[-1]}: {{trainer.max_steps: 10}}}}"}[key]
    if not isinstance(value, dict):
        raise SweepError(f"{where(path, run, key)}: runs[{i}].{key}: in a chained sweep (`stages:`) {key} are "
                         f"keyed by stage, e.g. {key}: {example}; stages: {', '.join(names)}")
    for sname in value:
        if sname not in names:
            close = difflib.get_close_matches(str(sname), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SweepError(f"{where(path, value, sname)}: runs[{i}].{key} names {sname!r}, which is not a stage of "
                             f"this sweep{hint}; stages: {', '.join(names)} (in a chained sweep {key} are keyed by "
                             f"stage, e.g. {key}: {example})")
    return value


def _load_runs(path: Path, doc: Any, root: Path, stages: tuple[StageSpec, ...] | None) -> tuple[RunSpec, ...]:
    runs_doc = doc["runs"]
    if not isinstance(runs_doc, list):
        raise SweepError(f"{where(path, doc, 'runs')}: `runs` must be a list of {{name, overlays, overrides}}")
    if not runs_doc:
        raise SweepError(f"{where(path, doc, 'runs')}: `runs` is empty: a sweep needs at least one run")
    runs: list[RunSpec] = []
    for i, run in enumerate(runs_doc):
        check_keys(path, run, _RUN_KEYS, f"runs[{i}]")
        at = where(path, runs_doc, i)
        rname = run.get("name")
        if not isinstance(rname, str) or not _NAME_RE.match(rname):
            raise SweepError(f"{at}: runs[{i}] needs a `name` that is a folder name ([A-Za-z0-9_.-]), got {rname!r}")
        if any(r.name == rname for r in runs):
            raise SweepError(f"{at}: duplicate run name {rname!r}")
        label = run.get("label", ABLATION_LABELS.get(rname, rname))
        if not isinstance(label, str):
            raise SweepError(f"{where(path, run, 'label')}: `label` must be a string")
        if stages is None:
            overlays = as_path_list(path, run, "overlays", run.get("overlays") or [], root)
            r_over, r_lines = check_overrides(path, run, "overrides", run.get("overrides"))
            runs.append(RunSpec(rname, label, overlays, r_over, line=run.line, override_lines=r_lines))
            continue
        names = [s.name for s in stages]
        st_overlays, st_over, st_lines = {}, {}, {}
        ov_doc = _stage_keyed(path, run, "overlays", i, stages)
        for sname in ov_doc:
            st_overlays[sname] = as_path_list(path, ov_doc, sname, ov_doc[sname] or [], root,
                                              f"runs[{i}].overlays.{sname}")
        ovr_doc = _stage_keyed(path, run, "overrides", i, stages)
        for sname in ovr_doc:
            st_over[sname], st_lines[sname] = check_overrides(path, ovr_doc, sname, ovr_doc[sname],
                                                              f"runs[{i}].overrides.{sname}")
            _check_placeholders(path, ovr_doc[sname], names, names.index(sname))
        runs.append(RunSpec(rname, label, line=run.line, stage_overlays=st_overlays, stage_overrides=st_over,
                            stage_override_lines=st_lines))
    return tuple(runs)


def load_sweep(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Sweep:
    """Read and check a sweep file: schema, keys, types, that every config file exists, that there is at least
    one run; in a chained sweep, that stage names are valid and unique, that overlays/overrides name existing
    stages and that a stage reads only earlier stages' folders. Does not import the model classes
    (:func:`gsv3d_pl.sweep.validate_configs` does that).

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
    doc = load_yaml_with_lines(path)
    if doc is None:
        raise SweepError(f"{path}:1: the sweep file is empty; it needs `base:` (or `stages:`) and `runs:`")
    check_keys(path, doc, _TOP_KEYS, "the sweep file")
    chained = "stages" in doc
    if chained:
        for key, moved in _CHAIN_MOVED.items():
            if key in doc:
                raise SweepError(f"{where(path, doc, key)}: `{key}` is per stage in a chained sweep (`stages:`): "
                                 f"move it to {moved}")
    for required in ("runs",) if chained else ("base", "runs"):
        if required not in doc:
            raise SweepError(f"{path}:{doc.line}: missing required key `{required}`")

    name = doc.get("name", path.stem)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise SweepError(f"{where(path, doc, 'name')}: `name` must be a folder name ([A-Za-z0-9_.-]), got {name!r}")
    overrides, override_lines = check_overrides(path, doc, "overrides", doc.get("overrides"))

    seeds = doc.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) and not isinstance(seeds, bool) else seeds
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise SweepError(f"{where(path, doc, 'seeds')}: `seeds` must be a non-empty list of integers >= 0")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"{where(path, doc, 'seeds')}: `seeds` has duplicates: {list(seeds)}")

    top_slurm = doc.get("slurm") or Mapping()
    slurm = load_slurm(path, top_slurm)
    max_parallel = doc.get("max_parallel")
    if max_parallel is not None:
        max_parallel = positive_int(path, doc, "max_parallel", max_parallel)
    dedupe = doc.get("dedupe", True)
    if not isinstance(dedupe, bool):
        raise SweepError(f"{where(path, doc, 'dedupe')}: `dedupe` must be true or false (true: tasks of a stage "
                         "with identical resolved configs train once)")

    if chained:
        stages = _load_stages(path, doc, root, top_slurm)
        _check_placeholders(path, doc.get("overrides"), [s.name for s in stages], None)
        runs = _load_runs(path, doc, root, stages)
        return Sweep(path=path.resolve(), name=name, base=(), runs=runs, seeds=tuple(seeds), overrides=overrides,
                     override_lines=override_lines, slurm=slurm, max_parallel=max_parallel,
                     test=any(s.test for s in stages), stages=stages, dedupe=dedupe)

    base = as_path_list(path, doc, "base", doc["base"], root)
    if not base:
        raise SweepError(f"{where(path, doc, 'base')}: `base` lists no config file")
    runs = _load_runs(path, doc, root, None)
    return Sweep(
        path=path.resolve(), name=name, base=base, runs=runs, seeds=tuple(seeds), overrides=overrides,
        override_lines=override_lines, slurm=slurm, max_parallel=max_parallel, test=_check_test(path, doc, True),
        test_ckpt=_check_test_ckpt(path, doc, Sweep.test_ckpt), dedupe=dedupe,
    )
