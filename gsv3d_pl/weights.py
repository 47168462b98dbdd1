"""Offline weights: where every external file is looked for, and the error when one is missing.

Nothing in this project downloads weights. Each pretrained component declares a :class:`WeightSpec`
(what it is, the config key that points at it, the candidate local paths, where a user gets it). A
missing file raises :class:`MissingWeightsError` *before* training starts, naming all of that.
``gsv3d weights --config X`` prints the same information for every spec a config needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["WeightSpec", "MissingWeightsError", "torch_hub_dir", "hf_cache_dir", "resolve", "REGISTRY", "register"]


def torch_hub_dir() -> Path:
    """``$TORCH_HOME/hub`` (default ``~/.cache/torch/hub``), where torchvision/torchmetrics look."""
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch"
    )
    return Path(home) / "hub"


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"
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


# Components that need external files register a function returning their specs for a given
# constructor-argument dict; `gsv3d weights` walks a parsed config and calls these.
REGISTRY: dict[str, callable] = {}


def register(class_path: str):
    """Decorator: ``@register("gsv3d_pl.models.encoders.VAE")`` on ``fn(init_args: dict) -> list[WeightSpec]``."""

    def deco(fn):
        REGISTRY[class_path] = fn
        return fn

    return deco
