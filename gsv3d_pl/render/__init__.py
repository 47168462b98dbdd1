"""Differentiable 3D Gaussian rasterisation with two interchangeable backends.

``rasterize(..., backend="torch")`` is the project's own rasterizer (CPU and GPU, autograd with an analytic
compositing backward); ``backend="gsplat"`` calls ``gsplat.rasterization(render_mode="RGB+ED")`` (CUDA
only). Both implement DESIGN.md's "Rasterisation semantics" (= gsplat's defaults), so results agree to float32
precision. ``backend="auto"`` picks gsplat for CUDA tensors when its kernels load, else torch, and logs the
choice once per process.

On CPU tensors the "torch" backend composites with compiled numba kernels (:mod:`.numba_backend`, ~20-50x faster)
when numba imports, else with the pure-PyTorch compositor (:mod:`.torch_backend`); both give the same results.
The choice is :func:`set_cpu_kernel` or the environment variable ``GSV3D_CPU_KERNEL`` = ``auto`` (default: numba
when available) | ``numba`` (error without numba) | ``torch``. CUDA tensors always use the PyTorch compositor.
"""

from __future__ import annotations

from gsv3d_pl.render.rasterizer import (
    Backend, cpu_kernel, project_gaussians, rasterize, rasterize_gaussians, resolve_backend, set_cpu_kernel,
)
from gsv3d_pl.render.render import Renders, render

__all__ = [
    "rasterize", "rasterize_gaussians", "resolve_backend", "project_gaussians", "Backend", "set_cpu_kernel",
    "cpu_kernel", "render", "Renders",
]
