"""The numba import and the ``_jit`` decorator shared by the compiled CPU kernels.

A module of its own so that :mod:`.numba_backend` (which builds on :mod:`.param_table`) and
:mod:`.numba_projection` (which :mod:`.param_table` builds on) can both use them without an import cycle.
"""

from __future__ import annotations

import functools
import logging

__all__ = ["numba", "numba_available", "_jit", "_IMPORT_ERROR"]

log = logging.getLogger(__name__)

try:
    import numba
    from numba import njit

    _IMPORT_ERROR: Exception | None = None
except Exception as e:  # pragma: no cover - exercised only where numba is missing
    numba = None
    _IMPORT_ERROR = e


def _jit(fn=None, **options):
    """``njit(nogil=True, fastmath=False, **options)`` with an on-disk cache when some cache location is writable.

    numba raises at decoration time when ``cache=True`` finds neither a writable ``__pycache__`` next to the source
    nor a writable user-wide cache dir (read-only installs in containers); then compile per process instead.
    """
    if fn is None:
        return lambda f: _jit(f, **options)
    if numba is None:
        return fn
    try:
        return njit(cache=True, nogil=True, fastmath=False, **options)(fn)
    except RuntimeError as e:  # "cannot cache function ...: no locator available"
        log.info("numba on-disk cache unavailable (%s); kernels are compiled once per process", e)
        return njit(cache=False, nogil=True, fastmath=False, **options)(fn)


@functools.lru_cache(maxsize=1)
def numba_available() -> bool:
    """True when numba imports (the compiled CPU kernels can be used)."""
    return numba is not None
