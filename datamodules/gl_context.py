"""The process's headless OpenGL context (moderngl + EGL), created lazily on first use and again after a fork.

A renderer object can therefore be built in the parent and used in forked DataLoader workers (each creates its own
context). Mesa's llvmpipe cannot render in a child forked *after* the parent rendered (its thread pool does not
survive fork): that case raises a clear error instead of hanging; use the 'spawn' start method there
(``prepare_data`` does). ``GSV3D_GL_BACKEND`` picks another glcontext backend than ``egl``.
"""

from __future__ import annotations

import os
import threading
from typing import Any

__all__ = ["get_gl_context"]

_CTX_LOCK = threading.Lock()
_CTX: dict = {"pid": None, "ctx": None}


def get_gl_context() -> Any:
    """The process's ``moderngl.Context`` (standalone, EGL), created on first use (and again after a fork)."""
    import moderngl

    with _CTX_LOCK:
        if _CTX["ctx"] is not None and _CTX["pid"] != os.getpid() and "llvmpipe" in _CTX.get("renderer", ""):
            # Mesa's llvmpipe keeps its rasteriser threads in process-global state; after fork they are gone and
            # any draw in the child hangs forever. Fail loudly instead.
            raise RuntimeError(
                "this process was forked from one that already used the llvmpipe GL renderer, which cannot work "
                "after fork. Render in the parent only, or start workers with the 'spawn' context "
                "(DataLoader(multiprocessing_context='spawn'), multiprocessing.get_context('spawn')).")
        if _CTX["ctx"] is None or _CTX["pid"] != os.getpid():
            backend = os.environ.get("GSV3D_GL_BACKEND", "egl")
            try:
                ctx = moderngl.create_standalone_context(require=330, backend=backend)
            except Exception as e:
                raise RuntimeError(
                    f"could not create a headless OpenGL context (backend={backend!r}): {e}. "
                    "Install Mesa's EGL (apt: libegl1 libgl1-mesa-dri) or the NVIDIA driver's EGL, "
                    "or set GSV3D_GL_BACKEND to another glcontext backend."
                ) from e
            _CTX.update(pid=os.getpid(), ctx=ctx, renderer=str(ctx.info.get("GL_RENDERER", "")))
        return _CTX["ctx"]
