"""Offline weights: where every external file is looked for, and the error when one is missing.

Nothing in this project downloads weights. Each pretrained component declares a :class:`WeightSpec`
(what it is, the config key that points at it, the candidate local paths, where a user gets it). A
missing file raises :class:`MissingWeightsError` *before* training starts, naming all of that.

A class that needs external files says so with a static/class method
``weight_specs(init_args: dict, key_prefix: str) -> list[WeightSpec]``: ``init_args`` are its constructor
arguments, ``key_prefix`` the config key of its node (e.g. ``"model.init_args.vae"``), so its specs name full
keys (``"model.init_args.vae.init_args.path"``). ``gsv3d weights --config X`` finds these methods through
each ``class_path`` of the parsed config and prints every spec.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gsv3d_pl.hub import hf_cache_dir

__all__ = ["WeightSpec", "MissingWeightsError", "torch_hub_dir", "hf_cache_dir", "resolve", "require_files"]


def torch_hub_dir() -> Path:
    """``$TORCH_HOME/hub`` (default ``~/.cache/torch/hub``), where torchvision/torchmetrics look."""
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch"
    )
    return Path(home) / "hub"


@dataclass
class WeightSpec:
    """One external weight file or folder.

    Attributes:
        name: human name, e.g. "LPIPS AlexNet backbone".
        config_key: the config key that sets its path, e.g. "model.init_args.vae.init_args.path".
        candidates: paths tried in order; the first that exists wins.
        source: where a user gets it (a URL or a command), printed, never fetched.
        explicit: the path the config gave, if any (it then is the only candidate).
    """

    name: str
    config_key: str
    candidates: list[Path] = field(default_factory=list)
    source: str = ""
    explicit: str | os.PathLike | None = None

    def paths(self) -> list[Path]:
        if self.explicit:
            return [Path(self.explicit).expanduser()]
        return [Path(p).expanduser() for p in self.candidates]

    def find(self) -> Path | None:
        for p in self.paths():
            if p.exists():
                return p
        return None

    def status(self) -> str:
        return "found" if self.find() is not None else "MISSING"


class MissingWeightsError(FileNotFoundError):
    """A pretrained component's weights are not on disk. The message says what, where and how."""

    def __init__(self, specs: WeightSpec | list[WeightSpec]):
        self.specs = [specs] if isinstance(specs, WeightSpec) else list(specs)
        lines = ["Missing pretrained weights (nothing is downloaded at run time):"]
        for s in self.specs:
            lines.append(f"  - {s.name}")
            lines.append(f"      config key: {s.config_key}")
            lines.append("      looked in:  " + "\n                  ".join(str(p) for p in s.paths()))
            if s.source:
                lines.append(f"      get it:     {s.source}")
        lines.append("Put the files there (or set the config key to their local path), "
                     "then check with `gsv3d weights --config <your config>`.")
        super().__init__("\n".join(lines))


def resolve(spec: WeightSpec) -> Path:
    """The first existing path of ``spec``, or raise :class:`MissingWeightsError`."""
    found = spec.find()
    if found is None:
        raise MissingWeightsError(spec)
    return found


def require_files(folder: Path, spec: WeightSpec, required: Sequence[str] = (), one_of: Sequence[str] = ()) -> Path | None:
    """Check a resolved weights folder: every ``required`` file and at least one of ``one_of`` must be in it.

    Returns:
        the first existing ``one_of`` file (None when ``one_of`` is empty).
    Raises:
        MissingWeightsError: naming the first absent file, with ``spec``'s name, config key and source.
    """
    missing = [f for f in required if not (folder / f).exists()]
    present = next((folder / f for f in one_of if (folder / f).exists()), None)
    if one_of and present is None:
        missing.append(one_of[0])
    if missing:
        raise MissingWeightsError(WeightSpec(spec.name, spec.config_key, source=spec.source, explicit=folder / missing[0]))
    return present
