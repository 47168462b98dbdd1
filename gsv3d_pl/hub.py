"""Local Hugging Face hub cache look-ups: the snapshot that ``refs/main`` names, never the network.

A cache folder ``models--org--name/`` holds ``refs/main`` (a commit hash) and ``snapshots/<hash>/...``; after an
update it holds several snapshots and only the one ``refs/main`` names is current. :func:`hub_path` asks
``huggingface_hub`` for that snapshot with ``local_files_only=True`` (no request is ever made) and turns every
"not cached" error into a placeholder path, so a :class:`~gsv3d_pl.weights.WeightSpec` can still say where it
looked.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["hf_cache_dir", "hub_snapshot", "hub_path"]


def hf_cache_dir() -> Path:
    """The hub cache: ``$HF_HUB_CACHE``, ``$HUGGINGFACE_HUB_CACHE``, ``$HF_HOME/hub``, ``$XDG_CACHE_HOME/huggingface/hub``,
    else ``huggingface_hub.constants.HF_HUB_CACHE`` (``~/.cache/huggingface/hub``).

    The variables are read at call time: ``huggingface_hub.constants`` froze them when it was first imported,
    and a job (or a test) may set them later.
    """
    from huggingface_hub import constants

    def expand(value: str) -> Path:
        return Path(os.path.expandvars(os.path.expanduser(value)))

    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return expand(os.environ[var])
    if os.environ.get("HF_HOME"):
        return expand(os.environ["HF_HOME"]) / "hub"
    if os.environ.get("XDG_CACHE_HOME"):
        return expand(os.environ["XDG_CACHE_HOME"]) / "huggingface" / "hub"
    return Path(constants.HF_HUB_CACHE)


def _repo_folder(repo_id: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return hf_cache_dir() / repo_folder_name(repo_id=repo_id, repo_type="model")


def hub_snapshot(repo_id: str, subpath: str = "", revision: str = "main") -> Path | None:
    """The cached snapshot folder ``refs/<revision>`` of model repo ``repo_id`` names, or None if it is not cached.

    ``subpath`` (a file or folder inside the repo) narrows huggingface_hub's completeness check to what the
    caller needs, so a partial download (``--include 'unet/*'``) still counts.
    """
    from huggingface_hub import snapshot_download

    patterns = [subpath, f"{subpath.rstrip('/')}/*"] if subpath else None
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=hf_cache_dir(), local_files_only=True,
                                   allow_patterns=patterns)
    except (OSError, ValueError):  # LocalEntryNotFoundError / IncompleteSnapshotError (OSError), bad repo id (ValueError)
        return None
    return Path(folder)


def hub_path(repo_id: str, subpath: str = "") -> Path:
    """``subpath`` inside the current (``refs/main``) cached snapshot of ``repo_id``; the path may not exist.

    Without a cached snapshot it is ``<cache>/models--org--name/snapshots/<revision>/<subpath>``: a
    placeholder that does not exist, for messages that say where the file was looked for.
    """
    snapshot = hub_snapshot(repo_id, subpath)
    if snapshot is None:
        snapshot = _repo_folder(repo_id) / "snapshots" / "<revision>"
    return snapshot / subpath if subpath else snapshot
