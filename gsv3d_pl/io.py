"""Atomic file and folder writes: the one place the project writes outputs that must never be half-written.

A reader (a resumed job, a second rank, a user's viewer) sees either the old file or the new one, never a
truncated one: every write goes to a temporary sibling in the same folder (same file system) and is moved
into place with ``os.replace``, which is atomic on POSIX and Windows.

    with atomic_write("metrics.json") as f:        # text; "wb" for bytes
        json.dump(obj, f)
    write_json_atomic("heldout_eval.json", obj)
    with atomic_path("model.ply") as tmp:          # for writers that want a path (PIL, numpy, torch.save)
        image.save(tmp, format="PNG")
    with atomic_dir("runs/x/lora") as tmp_dir:     # a whole folder, swapped in at the end
        unet.save_lora_adapter(tmp_dir)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "atomic_path", "atomic_dir", "write_text_atomic", "write_json_atomic"]


def _read_umask() -> int:
    """The process umask. ``os.umask`` can only read it by setting it, and a file another thread creates in
    between would get the wrong mode, so Linux's ``/proc/self/status`` (``Umask:`` in octal, 4.7+) comes first."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)  # put it back
    return old


_UMASK = _read_umask()


def _fsync_file(path: str) -> None:
    # POSIX fsyncs through a read-only descriptor (the writer may have made the file read-only); Windows'
    # FlushFileBuffers needs write access.
    fd = os.open(path, os.O_RDONLY if os.name == "posix" else os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: str) -> None:
    if os.name != "posix":
        return  # Windows cannot open a folder for fsync; NTFS journals the rename
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems (e.g. some network mounts) refuse fsync on a folder
    finally:
        os.close(fd)


def _parent(path: str | os.PathLike) -> str:
    parent = os.path.dirname(os.path.abspath(os.fspath(path)))
    os.makedirs(parent, exist_ok=True)
    return parent


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it is fsynced and replaces ``path``, on error it is
    removed.

    ``suffix`` defaults to ``path``'s own (some writers pick the format from it, e.g. PIL, imageio).
    """
    path = os.fspath(path)
    suffix = Path(path).suffix if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(dir=_parent(path), prefix=f".tmp_{Path(path).name}.", suffix=suffix)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual mode (callers may chmod again)
    try:
        yield tmp
        _fsync_file(tmp)  # the data reaches the disk before the rename can: no empty file after a crash
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))  # and the rename itself survives a power loss
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """``open(path, mode)`` that only replaces ``path`` once the block finished without an exception."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f  # closed (flushed) here; atomic_path fsyncs it before the replace


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_write(path) as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2, **kwargs: Any) -> None:
    """Write ``obj`` as JSON (and a final newline) to ``path`` atomically; ``kwargs`` go to ``json.dump``."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=indent, **kwargs)
        f.write("\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[str]:
    """Yield an empty temporary folder beside ``path``; on success it takes ``path``'s place.

    An existing ``path`` is moved aside first (``rename`` cannot replace a non-empty folder) and deleted only
    after the new folder is in place, so an interruption leaves either the old or the new folder at ``path``.
    """
    path = os.path.abspath(os.fspath(path))
    parent = _parent(path)
    name = os.path.basename(path)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp_{name}.")
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; the result is an ordinary folder
    try:
        yield tmp
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(dir=parent, prefix=f".old_{name}.")
            os.replace(path, os.path.join(old, name))
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:  # put the old folder back
                os.replace(os.path.join(old, name), path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
