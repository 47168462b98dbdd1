"""Checkpoints in and out: the one reader of checkpoint files, crash-safe writes, and resume resolution.

- :func:`read_checkpoint` is the only way the project reads a ``.ckpt`` a user names. It loads with
  ``weights_only=True`` (tensors and plain containers only: a file cannot run code), and its errors name the file,
  the option it came from and what was expected.
- :class:`AtomicCheckpointIO` is the ``CheckpointIO`` every ``gsv3d`` run uses: a checkpoint is written to a
  temporary file beside its target, fsynced and moved into place with ``os.replace``. Lightning's default goes
  through ``$TMPDIR`` and, when that is another file system (node-local ``/tmp``, a shared run folder), copies onto
  the final name, so a kill during the copy truncates ``last.ckpt``.
- :func:`resolve_resume` turns ``--ckpt_path last`` into the newest checkpoint that loads.
"""

from __future__ import annotations

import glob
import os
import pickle
import re
import zipfile
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from gsv3d_pl.io import atomic_path

__all__ = ["CheckpointReadError", "read_checkpoint", "check_checkpoint", "AtomicCheckpointIO", "resolve_resume",
           "clean_orphan_temp_files", "TEMP_PREFIX"]

#: Prefix of :func:`gsv3d_pl.io.atomic_path`'s temporary files: what a killed write leaves behind.
TEMP_PREFIX = ".tmp_"


class CheckpointReadError(ValueError):
    """A checkpoint file that cannot be read (truncated, not a torch file, or holding Python objects)."""


def _refusal(path: str, option: str, expected: str, err: BaseException) -> str:
    """One message for a file torch cannot load with ``weights_only=True``; never suggests loading it unsafely."""
    where = f"{option} {path}" if option else str(path)
    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:  # a pickle that names a Python callable or class: exactly what weights_only refuses to run
        return (f"{where}: refused: the file holds Python objects, not only tensors (it references "
                f"{found.group(1)}). Checkpoints are loaded as data only, so a file cannot run code. Expected "
                f"{expected}; use a checkpoint written by gsv3d.")
    if isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in text:
        return f"{where}: cannot read it: it is not a torch checkpoint (not a pickle of tensors). Expected {expected}."
    if isinstance(err, (zipfile.BadZipFile, EOFError, RuntimeError)) or "zip" in text.lower():
        return (f"{where}: cannot read it: the file is truncated or is not a torch checkpoint "
                f"({type(err).__name__}). Expected {expected}.")
    return f"{where}: cannot read it ({type(err).__name__}: {text.splitlines()[0] if text else ''}). Expected {expected}."


def read_checkpoint(path: str | os.PathLike, option: str = "", expected: str = "a Lightning checkpoint (.ckpt)",
                    mmap: bool = False, map_location: Any = "cpu", require_state_dict: bool = True) -> dict:
    """Load a checkpoint as data only (``weights_only=True``) and check it is a Lightning checkpoint.

    Args:
        path: the file.
        option: where the path came from in messages, e.g. ``"--ckpt_path"`` or a config key.
        expected: what the caller wants, in messages ("a stage-1 (DecoderStage) checkpoint").
        mmap: map the tensors instead of reading them (cheap validity check of large files).
        require_state_dict: a Lightning checkpoint (with ``state_dict``); False: any dict of tensors (weights).

    Returns:
        the checkpoint dict (it has a ``state_dict``).

    Raises:
        FileNotFoundError: no such file. CheckpointReadError (a ValueError): anything else, naming the file.
    """
    path = os.fspath(path)
    where = f"{option} {path}" if option else path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: no such file; expected {expected}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - every failure becomes one message naming the file
        raise CheckpointReadError(_refusal(path, option, expected, e)) from None
    if not isinstance(ckpt, dict):
        raise CheckpointReadError(f"{where}: holds a {type(ckpt).__name__}, not a dict; expected {expected}")
    if require_state_dict and not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointReadError(f"{where}: has no 'state_dict', so it is not a Lightning checkpoint; expected {expected}")
    return ckpt


def check_checkpoint(path: str | os.PathLike, option: str = "--ckpt_path") -> None:
    """Raise :class:`CheckpointReadError` / FileNotFoundError unless ``path`` loads (tensors mapped, not read)."""
    read_checkpoint(path, option, mmap=True)


def _is_local(path: str) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose writes cannot leave a truncated checkpoint, wherever ``$TMPDIR`` is.

    Local paths: ``torch.save`` into a temporary file in the target's folder, fsync, ``os.replace``. Remote
    (fsspec) paths keep Lightning's own write. Loading is ``weights_only=True`` unless Lightning asks otherwise.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(os.fspath(path)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = os.fspath(path).removeprefix("file://")
        with atomic_path(path, suffix=".ckpt") as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        if weights_only is False or not _is_local(os.fspath(path)):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return read_checkpoint(os.fspath(path).removeprefix("file://"), "--ckpt_path",
                               map_location=map_location or "cpu", require_state_dict=False)


def clean_orphan_temp_files(folders: Iterable[str]) -> list[str]:
    """Delete the temporary checkpoint files that killed writes left in ``folders``; returns what was deleted."""
    removed = []
    for folder in folders:
        for f in glob.glob(os.path.join(glob.escape(folder), f"{TEMP_PREFIX}*.ckpt")):
            try:
                os.unlink(f)
                removed.append(f)
            except OSError:
                pass
    return removed


def resolve_resume(folders: Sequence[str]) -> tuple[str | None, list[str]]:
    """``--ckpt_path last``: the newest ``*.ckpt`` in ``folders`` that loads.

    Returns:
        (path or None when no checkpoint loads, [one warning per checkpoint that did not load]).
    """
    found = {os.path.abspath(f) for d in folders for f in glob.glob(os.path.join(glob.escape(d), "*.ckpt"))
             if not os.path.basename(f).startswith(TEMP_PREFIX)}
    # newest first; at equal times last*.ckpt first (ModelCheckpoint writes it right after the step file)
    order = sorted(found, key=lambda f: (os.path.getmtime(f), os.path.basename(f).startswith("last")), reverse=True)
    warnings = []
    for f in order:
        try:
            check_checkpoint(f, option="")
        except (CheckpointReadError, FileNotFoundError, OSError) as e:
            warnings.append(f"--ckpt_path last: skipping {f}: {e}")
            continue
        return f, warnings
    return None, warnings
