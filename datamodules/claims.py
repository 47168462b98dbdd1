"""Per-object claim files: two ``data prepare`` runs on one cache never render the same object twice.

Before an object is rendered, its claim ``<cache>/claims/<name>.claim`` is created holding the owner's host, pid,
process start time and the claim time: the record is written to a temporary file first, which is then hard-linked
to the claim path (``os.link`` fails when the path exists: an atomic create-with-content, on local file systems and
on NFS), so a claim is never seen, or left by a crash, empty. Whoever creates it renders the object and removes the
claim; everyone else renders other objects and comes back later.

A claim is stale, and is broken, when its owner ran on this host and is gone (pid dead, or reused by a process that
started later; a live owner keeps its claim however long it renders), when its owner ran on another host and it is
older than ``CLAIM_STALE_S`` (an owner that crashed), or when it is empty or unreadable (left by an older version
that filled the claim in after creating it) and older than ``EMPTY_STALE_S``. Breaking renames the claim to a unique
name (atomic) and re-reads that file: when it is not the very claim judged stale (a fresh claim took its place in
between), it is put back if the path is still free, and the object is not claimed.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

__all__ = ["CLAIM_STALE_S", "EMPTY_STALE_S", "claim_path", "try_claim", "release", "claim_owner"]

CLAIM_STALE_S = 1800.0  # longer than any one object's render; only matters for owners on other hosts
EMPTY_STALE_S = 60.0  # an empty or unparseable claim (older versions) older than this is stale


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


def _read(path: str) -> tuple[tuple, dict] | None:
    """(identity, record) of the claim at ``path``, None when there is none. The identity (inode, mtime, bytes) tells
    this claim from any claim created later; the record is {} for an empty or unparseable claim."""
    try:
        with open(path, "rb") as f:
            st, data = os.fstat(f.fileno()), f.read()
    except FileNotFoundError:
        return None
    except OSError:  # unreadable (another user's umask): judged by its age, like an owner on another host
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(path)
            return (st.st_ino, st.st_mtime_ns, None), {"unreadable": True}
        return None
    try:
        rec = json.loads(data)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        rec = {}
    return (st.st_ino, st.st_mtime_ns, data), rec if isinstance(rec, dict) else {}


def _stale(ident: tuple, rec: dict, stale_s: float) -> bool:
    age = time.time() - ident[1] / 1e9  # the file's mtime
    if not rec:
        return age > EMPTY_STALE_S
    if rec.get("host") == socket.gethostname() and isinstance(rec.get("pid"), int):
        return not _alive(rec["pid"], rec.get("start"))  # on this host liveness decides, whatever the age
    return age > stale_s


def _unique(path: str, suffix: str) -> str:
    return f"{path}.{os.urandom(8).hex()}.{suffix}"


def _create(path: str, text: str) -> bool:
    """Create ``path`` holding ``text`` unless it exists (True when created)."""
    tmp = _unique(path, "tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: create, then fill in (a crash between: EMPTY_STALE_S)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(text)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _break(path: str, ident: tuple) -> bool:
    """Move the stale claim ``ident`` away from ``path``; False when the claim there is no longer that one."""
    aside = _unique(path, "broken")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True  # released in between
    now = _read(aside)
    if now is None or now[0] == ident:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(aside)
        return True
    with contextlib.suppress(OSError):  # a fresh claim: put it back unless the path was claimed again meanwhile
        os.link(aside, path)
    os.unlink(aside)
    return False


def try_claim(claims_dir: str, name: str, stale_s: float = CLAIM_STALE_S) -> bool:
    """Create the claim of ``name``; True when this process now holds it, False when a live owner does."""
    path = claim_path(claims_dir, name)
    os.makedirs(claims_dir, exist_ok=True)
    rec = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid()), "time": time.time()}
    text = json.dumps(rec)
    for _ in range(2):  # the second try follows breaking a stale claim
        if _create(path, text):
            return True
        old = _read(path)
        if old is None:
            continue  # released in between
        if not _stale(*old, stale_s) or not _break(path, old[0]):
            return False
    return False


def release(claims_dir: str, name: str) -> None:
    """Remove this process's claim of ``name`` (left alone when another process holds it now)."""
    path = claim_path(claims_dir, name)
    rec = (_read(path) or (None, {}))[1]
    if rec.get("pid") == os.getpid() and rec.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def claim_owner(claims_dir: str, name: str) -> str:
    """``host:pid`` of the claim's owner, for messages ("" when there is no claim)."""
    got = _read(claim_path(claims_dir, name))
    return "" if got is None else f"{got[1].get('host', '?')}:{got[1].get('pid', '?')}"
