"""Identical stages run once: tasks of one stage whose resolved configs are equal share one training.

In the paper's Table 2 the rows w/o RGB and w/o Depth change only stage 2 (distillation): their stage-1 decoders
are Full's. :func:`share_identical` groups a stage's tasks by :func:`config_identity`; one task of each group
trains (the *owner*), the others are *shared*: they do not train, and their later stages read the owner's folder
(``{run_dir}/decoder/...`` in an override becomes ``<owner's run folder>/decoder/...``, see
:func:`gsv3d_pl.sweep.spec.substitute`). Stages are processed in chain order, so a later stage's identity is taken
*after* its inputs were pointed at the shared folders: two distill stages are identical only if they read the same
decoder.

The identity of a task's stage is the sha256 of a canonical serialisation of its **resolved** config: what
``gsv3d fit ARGS`` parses (config files, overlays, overrides, the task's seed, devices, nodes and re-rooted paths;
interpolation resolved, class defaults filled in), i.e. what the run saves as its ``config.yaml``, with

- the ``config`` entries (the list of ``--config`` files) and ``__path__`` left out: files that compose to the same
  config are the same config (``configs/ablations/full.yaml`` is empty on purpose);
- pure output locations left out: ``trainer.default_root_dir`` is dropped and every string under the task's own
  stage folder (checkpoint ``dirpath``, logger ``save_dir``) has that prefix replaced by ``{stage_dir}``;
- ``json.dumps(..., sort_keys=True, default=str)``.

Inputs stay in it (a checkpoint to read, a data cache), and so does the seed: seeds never share.

The owner of a group is the reference run ``full`` when it is in the group (the report's reference row keeps its
whole chain in its own folders), else the group's first task in the sweep's run order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gsv3d_pl.sweep.spec import SweepError

if TYPE_CHECKING:
    from gsv3d_pl.sweep.expand import Task

__all__ = ["REFERENCE_RUN", "SharedStage", "canonical_config", "config_identity", "describe_shared", "shared_stages",
           "share_identical"]

REFERENCE_RUN = "full"  # owns its group when it is in one (the row `gsv3d report` compares the others with)
OUTPUT_PLACEHOLDER = "{stage_dir}"
_NOT_CONFIG = ("config", "__path__")  # where the values came from, not what they are


def _strip(value: Any, stage_dir: str) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v, stage_dir) for k, v in value.items() if k not in _NOT_CONFIG}
    if isinstance(value, (list, tuple)):
        return [_strip(v, stage_dir) for v in value]
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str) and (value == stage_dir or value.startswith(stage_dir + "/")):
        return OUTPUT_PLACEHOLDER + value[len(stage_dir):]
    return value


def canonical_config(config: Any, stage_dir: str | Path) -> dict[str, Any]:
    """A parsed config (jsonargparse Namespace of :func:`gsv3d_pl.config.parse_config`, or a dict) as plain data
    without its origin (``config``, ``__path__``) and its output locations (``trainer.default_root_dir``; the
    prefix ``stage_dir`` of any string -> ``{stage_dir}``)."""
    d = config.clone().as_dict() if hasattr(config, "as_dict") else json.loads(json.dumps(config, default=str))
    trainer = d.get("trainer")
    if isinstance(trainer, dict):
        trainer.pop("default_root_dir", None)
    return _strip(d, str(stage_dir).rstrip("/"))


def config_identity(task: Task) -> str:
    """sha256 (hex) of the canonical JSON of the task's resolved config (see the module docstring)."""
    from gsv3d_pl.config import ConfigError, parse_config

    try:
        config = parse_config(task.args)
    except ConfigError as e:
        where = f"run {task.run!r}, seed {task.seed}" + (f", stage {task.stage!r}" if task.stage else "")
        raise SweepError(f"{where}: composing its config to compare it with the other tasks failed: {e}") from e
    canon = canonical_config(config, task.stage_dir)
    text = json.dumps(canon, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def share_identical(tasks: Sequence[Task], identify: Callable[[Task], str],
                    reference: str = REFERENCE_RUN) -> list[Task]:
    """The tasks of one stage with ``identity`` set and, for every task whose identity an earlier owner has,
    ``same_as`` / ``same_as_run`` naming the owner and ``stage_dir`` the owner's folder (the task does not train)."""
    ids = [identify(t) for t in tasks]
    owners: dict[str, Task] = {}
    for t, ident in zip(tasks, ids, strict=True):
        if ident not in owners or (t.run == reference and owners[ident].run != reference):
            owners[ident] = t
    out = []
    for t, ident in zip(tasks, ids, strict=True):
        owner = owners[ident]
        if owner is t:
            out.append(dataclasses.replace(t, identity=ident))
        else:
            out.append(dataclasses.replace(t, identity=ident, same_as=owner.index, same_as_run=owner.run,
                                           stage_dir=owner.stage_dir))
    return out


@dataclass(frozen=True)
class SharedStage:
    """``run``'s stage ``stage`` is ``same_as``'s (identical resolved config) for ``seeds``."""

    stage: str
    run: str
    same_as: str
    seeds: tuple[int, ...]

    def describe(self, labels: dict[str, str] | None = None) -> str:
        """``no_rgb/decoder = full/decoder (identical resolved config; seeds 0, 1)`` (with ``labels``: the rows'
        labels instead of the run names)."""
        name = (labels or {}).get
        a, b = name(self.run, self.run), name(self.same_as, self.same_as)
        if self.stage:
            a, b = f"{a}/{self.stage}", f"{b}/{self.stage}"
        seeds = ", ".join(map(str, self.seeds))
        return f"{a} = {b} (identical resolved config; seed{'s' if len(self.seeds) > 1 else ''} {seeds})"


def shared_stages(tasks: Sequence[Task]) -> list[SharedStage]:
    """The shared (run, stage) pairs of ``tasks`` (every stage), in chain and run order, seeds gathered."""
    groups: dict[tuple[str, str, str], list[int]] = {}
    for t in tasks:
        if t.same_as_run is not None:
            groups.setdefault((t.stage, t.run, t.same_as_run), []).append(t.seed)
    return [SharedStage(stage, run, other, tuple(seeds)) for (stage, run, other), seeds in groups.items()]


def describe_shared(tasks: Sequence[Task]) -> list[str]:
    """One line per :class:`SharedStage` of ``tasks``, for ``gsv3d sweep``'s plan."""
    return [s.describe() for s in shared_stages(tasks)]
