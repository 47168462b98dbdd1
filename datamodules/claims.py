"""Per-object claim files: two ``data prepare`` runs on one cache never render the same object twice.

Before an object is rendered, its claim ``<cache>/claims/<name>.claim`` is created with ``O_CREAT | O_EXCL`` (atomic
on local file systems and on NFSv3+), holding the owner's host, pid, process start time and the claim time. Whoever
creates it renders the object and removes the claim; everyone else renders other objects and comes back later. A
claim is stale, and is broken, when its owner ran on this host and is gone (pid dead, or reused by a process that
started later), or when it is older than ``CLAIM_STALE_S`` (an owner on another host that crashed). Breaking a stale
claim re-reads it first, so a fresh claim is not broken; two processes breaking the same stale claim at the same
instant can both render the object, which costs time but never corrupts it (every write is atomic).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

__all__ = ["CLAIM_STALE_S", "claim_path", "try_claim", "release", "claim_owner"]

CLAIM_STALE_S = 1800.0  # longer than any one object's render; only matters for owners on other hosts


def claim_path(claims_dir: str, name: str) -> str:
    """The claim file of one object (``name``: its file-name stem, :func:`datamodules.sources.uid_filename`)."""
    return os.path.join(claims_dir, f"{name}.claim")


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid from its first owner."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        pass
    return start is None or _start_time(pid) in (None, start)


def _read(path: str) -> dict | None:
    """The claim's record, {} for one that is being written or is unreadable, None when there is none."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        rec = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return rec if isinstance(rec, dict) else {}


def _stale(path: str, rec: dict, stale_s: float) -> bool:
    try:
        age = time.time() - os.stat(path).st_mtime  # the file's mtime: a half-written record still ages
    except FileNotFoundError:
        return True
    if age > stale_s:
        return True
    if rec.get("host") == socket.gethostname() and isinstance(rec.get("pid"), int):
        return not _alive(rec["pid"], rec.get("start"))
    return False


def try_claim(claims_dir: str, name: str, stale_s: float = CLAIM_STALE_S) -> bool:
    """Create the claim of ``name``; True when this process now holds it, False when a live owner does."""
    path = claim_path(claims_dir, name)
    os.makedirs(claims_dir, exist_ok=True)
    rec = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid()), "time": time.time()}
    for _ in range(2):  # the second try follows breaking a stale claim
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            old = _read(path)
            if old is None:
                continue  # released in between
            if not _stale(path, old, stale_s) or _read(path) != old:  # live, or re-claimed since it was read
                return False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(rec))
        return True
    return False


def release(claims_dir: str, name: str) -> None:
    """Remove this process's claim of ``name`` (left alone when another process holds it now)."""
    path = claim_path(claims_dir, name)
    rec = _read(path)
    if rec is not None and rec.get("pid") == os.getpid() and rec.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def claim_owner(claims_dir: str, name: str) -> str:
    """``host:pid`` of the claim's owner, for messages ("" when there is no claim)."""
    rec = _read(claim_path(claims_dir, name)) or {}
    return f"{rec.get('host', '?')}:{rec.get('pid', '?')}" if rec else ""
