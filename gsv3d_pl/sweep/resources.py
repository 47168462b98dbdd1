"""The ``slurm:`` section of a sweep file (and a stage's ``slurm:`` keys over it): :class:`SlurmResources`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gsv3d_pl.sweep.lines import Mapping, SweepError, check_keys, positive_int, where

__all__ = ["SLURM_KEYS", "SlurmResources", "load_slurm", "merged_slurm"]


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


SLURM_KEYS = {f for f in SlurmResources.__dataclass_fields__}


def load_slurm(path: Path, slurm_doc: Any, what: str = "`slurm`") -> SlurmResources:
    """The ``slurm:`` section, checked key by key."""
    check_keys(path, slurm_doc, SLURM_KEYS, what)
    kw: dict[str, Any] = {}
    for key in ("nodes", "cpus_per_task", "signal_seconds"):
        if key in slurm_doc:
            kw[key] = positive_int(path, slurm_doc, key, slurm_doc[key])
    if "gpus_per_node" in slurm_doc:
        kw["gpus_per_node"] = positive_int(path, slurm_doc, "gpus_per_node", slurm_doc["gpus_per_node"], 0)
    for key in ("partition", "mem", "time", "account", "job_name", "command", "signal"):
        value = slurm_doc.get(key)
        if value is not None:
            if key == "time" and isinstance(value, int):
                value = str(value)  # minutes
            if not isinstance(value, str) or not value.strip() or "\n" in value:
                raise SweepError(f"{where(path, slurm_doc, key)}: `slurm.{key}` must be a one-line string")
            kw[key] = value
    if "signal" in kw and not re.fullmatch(r"(SIG)?[A-Z0-9]+", kw["signal"]):
        raise SweepError(f"{where(path, slurm_doc, 'signal')}: `slurm.signal` must be a signal name like SIGUSR1 "
                         f"(sent to the job steps, where Lightning listens; not 'B:...', which only reaches the "
                         f"batch shell), got {kw['signal']!r}")
    for key in ("extra", "setup"):
        value = slurm_doc.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) and "\n" not in v for v in value):
            raise SweepError(f"{where(path, slurm_doc, key)}: `slurm.{key}` must be a list of one-line strings")
        if key == "extra":
            for j, line in enumerate(value):
                flag = line.removeprefix("#SBATCH").strip()
                if not flag.startswith("-"):
                    raise SweepError(f"{where(path, value, j)}: `slurm.extra` entries are sbatch flags like "
                                     f"'--qos=high' (or '#SBATCH --qos=high'), got {line!r}")
                if flag.startswith(("--dependency", "-d")):
                    raise SweepError(f"{where(path, value, j)}: `slurm.extra` must not set --dependency: "
                                     "`gsv3d sweep --submit` chains the stages' array jobs itself (aftercorr)")
            value = [line.removeprefix("#SBATCH").strip() for line in value]
        kw[key] = tuple(value)
    return SlurmResources(**kw)


def merged_slurm(top: Any, stage_doc: Any) -> Mapping:
    """The top-level ``slurm:`` with a stage's ``slurm:`` keys on top (each key keeps the line it came from)."""
    out = Mapping()
    out.line = getattr(stage_doc, "line", 0) or getattr(top, "line", 0)
    out.lines = {}
    for doc in (top, stage_doc):
        if isinstance(doc, dict):
            out.update(doc)
            out.lines.update(getattr(doc, "lines", {}))
    return out
