"""Differentiable 3D Gaussian rasterisation with three interchangeable backends.

:func:`render` renders :class:`~gsv3d_pl.gaussians.Gaussians` at camera-to-world cameras (channels-first,
chunked over views, always float32); :func:`rasterize` is the lower-level call with gsplat's signature.

Backends (``backend=``, one switch):

- ``"gsplat"``: ``gsplat.rasterization(render_mode="RGB+ED")``, CUDA tensors only.
- ``"numba"``: the project's compiled CPU kernels (:mod:`.numba_backend`), float32/float64 CPU tensors.
- ``"torch"``: the project's pure-PyTorch compositor (:mod:`.torch_backend`), any device.
- ``"auto"`` (default): gsplat for CUDA tensors when its kernels load, else numba for float CPU tensors when
  numba imports, else torch; the choice is logged once per process.

All three agree to float32 precision, with gsplat's default semantics (also in ``docs/conventions.md``):

- EWA projection with the perspective Jacobian, where the camera-space x/z and y/z used in the Jacobian are
  clamped to 1.3x the half-FoV tangent (gsplat's ``lim_x``/``lim_y``); 2D covariance + 0.3·I.
- Culling: camera z < ``near_plane``, opacity < 1/255, empty footprint inside the image.
- Footprint: the opacity-aware box ``extend · sqrt(Σ2D_xx|yy)`` with ``extend = min(3.33, sqrt(2 ln(255 o)))``;
  outside it α < 1/255 analytically, so enumerating only the box loses nothing.
- α = min(0.999, o·exp(-½ dᵀΣ⁻¹d)) with d = mean2d - pixel centre (u + 0.5, v + 0.5). Pairs with α < 1/255
  (or a negative exponent) are skipped.
- Front-to-back order by the camera z of the Gaussian centre; a pixel stops *before* the Gaussian that would
  bring its transmittance to T <= 1e-4.
- rgb = Σ wᵢcᵢ + (1 − A)·bg, A = Σ wᵢ, depth = Σ wᵢzᵢ / max(A, 1e-10) ("ED"), wᵢ = αᵢ Tᵢ.
- Gradients flow to means, quats, scales, opacities and colors; the cut-offs, the 0.999 clamp and the T stop
  are not differentiated.

Modules: :mod:`.projection` (quaternions, covariances, EWA, the constants), :mod:`.inputs` (the flattened
inputs the backends take), :mod:`.param_table` (the table both CPU compositors read, and its ``projection``
switch: PyTorch autograd or the compiled kernels of :mod:`.numba_projection`), :mod:`.threads` (CPU threading),
:mod:`.rasterizer` (the switch), :mod:`.multiview` (the helper).
"""

from __future__ import annotations

from gsv3d_pl.render.multiview import Renders, render
from gsv3d_pl.render.projection import project_gaussians, quat_to_rotmat
from gsv3d_pl.render.rasterizer import BACKENDS, Backend, rasterize, rasterize_gaussians, resolve_backend

__all__ = [
    "render", "Renders", "rasterize", "rasterize_gaussians", "resolve_backend", "project_gaussians",
    "quat_to_rotmat", "Backend", "BACKENDS",
]
