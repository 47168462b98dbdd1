"""CPU threading of the rasterizer: one persistent, fork-aware thread pool and a scoped intra-op thread count.

Both CPU compositors run many small, cache-sized pieces of work. OpenMP's per-op fork/join would dominate them
(and idle-spinning OpenMP workers make it 10x worse on a loaded machine), so each piece runs single-threaded
and the pieces are spread over Python threads instead; torch ops and the ``nogil`` numba kernels release the
GIL, so those threads do run in parallel.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["thread_pool", "intra_op_threads", "cpu_threads", "run_ranges"]

_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def thread_pool(workers: int) -> ThreadPoolExecutor:
    """A persistent pool per size.

    Reusing the same OS threads keeps malloc's per-thread arenas (and so the RSS) from multiplying across calls.
    Keyed by pid: a forked child (e.g. a DataLoader worker) must not reuse the parent's pool, whose threads do
    not exist in the child.
    """
    key = (os.getpid(), workers)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gsv3d-raster")
    return _POOLS[key]


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count of the calling thread to ``n``."""
    old = torch.get_num_threads()
    if old == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def cpu_threads(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Single-threaded ops on CPU (the policy above); on GPU the thread count is left as it is."""
    return intra_op_threads(1) if device.type == "cpu" else contextlib.nullcontext()


def run_ranges(kernel: Callable[..., None], n: int, *args, chunks_per_worker: int = 4) -> None:
    """Run ``kernel(i0, i1, *args)`` over [0, n) in contiguous ranges on torch's intra-op thread budget.

    Meant for serial kernels that release the GIL (the numba ones are ``nogil``). This replaces numba's ``prange``
    threading layers: the OpenMP one spins (30x slower per call on a loaded machine), the workqueue one is neither
    thread- nor fork-safe (DataLoader workers, Lightning callbacks), and TBB is an extra dependency. Several
    ranges per worker balance uneven work (tiles with many or few Gaussians).
    """
    workers = max(1, min(torch.get_num_threads(), n))
    if workers == 1:
        kernel(0, n, *args)
        return
    k = min(n, workers * chunks_per_worker)
    bounds = [n * c // k for c in range(k + 1)]
    ex = thread_pool(workers)
    for f in [ex.submit(kernel, bounds[c], bounds[c + 1], *args) for c in range(k)]:
        f.result()
