"""Offline weights: where every external file is looked for, and the error when one is missing.

Nothing in this project downloads weights at run time. Each pretrained component declares a :class:`WeightSpec`
(what it is, the config key that points at it, the candidate local paths, where a user gets it). A
missing file raises :class:`MissingWeightsError` *before* training starts, naming all of that.

A spec may also carry a download recipe (:class:`HubFile` or :class:`UrlFile`) that puts the file exactly where
the spec looks: the Hugging Face hub cache :func:`hf_cache_dir`, or ``$TORCH_HOME/hub/checkpoints``. Only
``gsv3d weights --config X --fetch`` runs it, when the user asks; runs themselves stay offline.

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
from typing import Any

from gsv3d_pl.hub import hf_cache_dir
from gsv3d_pl.io import atomic_path

__all__ = ["WeightSpec", "HubFile", "UrlFile", "MissingWeightsError", "torch_hub_dir", "hf_cache_dir", "resolve",
           "require_files"]


def torch_hub_dir() -> Path:
    """``$TORCH_HOME/hub`` (default ``~/.cache/torch/hub``), where torchvision/torchmetrics look."""
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch"
    )
    return Path(home) / "hub"


# The download functions, looked up here at call time (tests replace these names; nothing else calls them).
def snapshot_download(*args: Any, **kwargs: Any) -> str:
    import huggingface_hub

    return huggingface_hub.snapshot_download(*args, **kwargs)


def hf_hub_download(*args: Any, **kwargs: Any) -> str:
    import huggingface_hub

    return huggingface_hub.hf_hub_download(*args, **kwargs)


def download_url_to_file(*args: Any, **kwargs: Any) -> None:
    import torch.hub

    torch.hub.download_url_to_file(*args, **kwargs)


_GLOB = set("*?[")


@dataclass(frozen=True)
class HubFile:
    """Download recipe: files of Hugging Face model repo ``repo_id`` into the hub cache (:func:`hf_cache_dir`).

    Attributes:
        repo_id: e.g. "stabilityai/sd-vae-ft-mse".
        files: a file name or glob pattern, or several, relative to ``subfolder``.
        subfolder: a folder inside the repo ("unet"), or "" for the top.

    One plain file name is fetched with ``hf_hub_download``, anything else with ``snapshot_download`` and
    ``allow_patterns``; either way ``refs/main`` ends up naming the snapshot :func:`gsv3d_pl.hub.hub_path` reads.
    """

    repo_id: str
    files: str | tuple[str, ...]
    subfolder: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.files, str):
            object.__setattr__(self, "files", (self.files,))

    def patterns(self) -> list[str]:
        sub = self.subfolder.strip("/")
        return [f"{sub}/{f}" if sub else f for f in self.files]

    def describe(self) -> str:
        return f"hf://{self.repo_id} {' '.join(self.patterns())}"

    def fetch(self) -> None:
        cache = hf_cache_dir()
        if len(self.files) == 1 and not _GLOB & set(self.files[0]):
            hf_hub_download(self.repo_id, self.files[0], subfolder=self.subfolder.strip("/") or None,
                            cache_dir=cache)
        else:
            snapshot_download(self.repo_id, allow_patterns=self.patterns(), cache_dir=cache)


@dataclass(frozen=True)
class UrlFile:
    """Download recipe: ``url`` into the exact file ``dest``, written beside it first and renamed when complete."""

    url: str
    dest: Path

    def describe(self) -> str:
        return f"{self.url} -> {self.dest}"

    def fetch(self) -> None:
        dest = Path(self.dest).expanduser()
        with atomic_path(dest) as tmp:
            download_url_to_file(self.url, tmp, progress=True)



@dataclass
class WeightSpec:
    """One external weight file or folder.

    Attributes:
        name: human name, e.g. "LPIPS AlexNet backbone".
        config_key: the config key that sets its path, e.g. "model.init_args.vae.init_args.path".
        candidates: paths tried in order; the first that exists wins.
        source: where a user gets it (a URL or a command), printed.
        explicit: the path the config gave, if any (it then is the only candidate).
        fetch: how ``gsv3d weights --fetch`` downloads it into the first candidate's place (None: it cannot,
            e.g. a run's own checkpoint or a licence-gated file). Never used when ``explicit`` is set.
    """

    name: str
    config_key: str
    candidates: list[Path] = field(default_factory=list)
    source: str = ""
    explicit: str | os.PathLike | None = None
    fetch: HubFile | UrlFile | None = None

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
