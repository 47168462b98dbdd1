"""Headless mesh renderer for dataset views: moderngl + EGL (Mesa llvmpipe on CPU, NVIDIA driver on GPU nodes).

What it renders, per camera (OpenCV ``c2w`` [4, 4] and ``K`` [3, 3] from :mod:`gsv3d_pl.cameras`):

- ``rgb`` [H, W, 3]: albedo (baseColor texture × baseColorFactor × vertex colour) lit by a world-fixed Lambert
  rig plus ambient (evaluated per vertex), anti-aliased with s×s supersampling (default 2×2: four coverage
  samples per pixel, like 4× MSAA), composited on the background colour. The lights are fixed in the world
  (not on the camera) so one surface point has the same colour in every view: the GS decoder predicts
  view-independent colours, and a headlight would make the views disagree.
- ``alpha`` [H, W, 1]: coverage in [0, 1] (the mean over the sub-samples, so edges are fractional).
- ``depth`` [H, W, 1]: planar camera-space z in world units, 0 where no sub-sample is covered (so depth > 0
  exactly where alpha > 0). Every sub-sample stores, in a float32 target, the z that its triangle has at the
  *pixel centre*: 1/z is affine in screen space on a triangle, so extrapolating it by its screen derivatives is
  exact (no z-buffer quantisation either). The pixel takes the value most covered sub-samples agree on (ties:
  the nearest). Wherever one triangle's plane covers most of the pixel this is exactly the centre depth that a
  single-sample render (or a ray cast) gives, and at an edge it is one surface's depth, never an average of two.

Why supersampling and not MSAA: on Mesa's llvmpipe (the CPU path) 4× MSAA added ~35 ms per 256² view to the
rasterisation of a 50k-face mesh even with a trivial fragment shader, while rendering 512² single-sampled costs
~15 ms more than 256². One pass at 2× resolution with two render targets (colour, z) and a small resolve pass
replace the MSAA colour pass plus a separate single-sample depth pass (benchmarks/bench_render.py).

Projection: the GL projection is built from K so that pixel (u, v) has its centre at (u + 0.5, v + 0.5), exactly
as :func:`gsv3d_pl.cameras.pixel_rays` and the Gaussian rasteriser see it. Rows come back top-to-bottom.

Meshes come from :func:`datamodules.mesh_io.load_mesh` (normalised, :class:`BadMeshError` for bad files), the GL
context from :func:`datamodules.gl_context.get_gl_context` (one per process, fork-aware), the GLSL programs from
:mod:`datamodules.shaders`; their names stay importable from here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from datamodules.gl_context import get_gl_context
from datamodules.mesh_io import ALPHA_BLEND, ALPHA_MASK, BadMeshError, MeshData, Primitive, load_mesh
from datamodules.shaders import (
    FS_MESH,
    FS_RESOLVE,
    SAME_TOL,
    VS_FULLSCREEN,
    VS_MESH,
    resolve_supersampled,
    shader_source,
)

__all__ = [
    "BadMeshError",
    "MeshData",
    "Primitive",
    "RenderOutput",
    "MeshRenderer",
    "load_mesh",
    "get_gl_context",
    "projection_from_K",
    "resolve_supersampled",
]


def projection_from_K(K: np.ndarray, width: int, height: int, near: float, far: float) -> np.ndarray:
    """GL projection [4, 4] that maps OpenCV camera coordinates (x right, y down, z forward) to clip space.

    Pixel centres: NDC x = 2·(fx·x/z + cx)/W − 1, so pixel u (covering window x ∈ [u, u+1]) has its centre at
    u + 0.5, matching K's convention. y is *not* flipped: window row y = image row v, so ``Framebuffer.read``
    returns rows top-to-bottom. Depth maps z ∈ [near, far] to NDC [−1, 1].
    """
    fx, fy, cx, cy = float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2])
    s = float(K[0, 1])
    P = np.zeros((4, 4), dtype=np.float64)
    P[0, 0], P[0, 1], P[0, 2] = 2 * fx / width, 2 * s / width, 2 * cx / width - 1.0
    P[1, 1], P[1, 2] = 2 * fy / height, 2 * cy / height - 1.0
    P[2, 2], P[2, 3] = (far + near) / (far - near), -2.0 * far * near / (far - near)
    P[3, 2] = 1.0
    return P


@dataclass
class RenderOutput:
    """Rendered views, channels-last float32 tensors.

    Attributes:
        rgb: [C, H, W, 3] in [0, 1], composited on the background.
        alpha: [C, H, W, 1] coverage in [0, 1].
        depth: [C, H, W, 1] planar camera z in world units, 0 on background.
    """

    rgb: Tensor
    alpha: Tensor
    depth: Tensor


class _GPUMesh:
    """GL buffers of one MeshData (vertex layout: pos3 nrm3 uv2 col4, float32), each with its program variant."""

    def __init__(self, ctx, program, mesh: MeshData):
        self.items = []  # (program, vao, texture|None, primitive)
        self._res = []
        self.radius = mesh.bounding_radius  # for the near/far planes
        for p in mesh.primitives:
            V = len(p.positions)
            uv = p.uvs if p.uvs is not None else np.zeros((V, 2), np.float32)
            data = np.concatenate([p.positions, p.normals, uv, p.colors], axis=1).astype(np.float32)  # [V, 12]
            vbo = ctx.buffer(np.ascontiguousarray(data).tobytes())
            ibo = ctx.buffer(np.ascontiguousarray(p.faces, dtype=np.uint32).tobytes())
            textured = p.texture is not None and p.uvs is not None
            vertex_colors = bool(np.ptp(p.colors, axis=0).max() > 0) if V else False
            prog = program(textured, vertex_colors, p.alpha_mode == ALPHA_MASK)
            names = ("in_pos", "in_nrm", "in_uv", "in_col")
            # attributes a variant does not read are skipped with padding ("3x4" = 12 bytes)
            fmt = " ".join(f if n in prog else f[0] + "x4" for f, n in zip(("3f", "3f", "2f", "4f"), names))
            vao = ctx.vertex_array(prog, [(vbo, fmt, *[n for n in names if n in prog])], index_buffer=ibo,
                                   index_element_size=4)
            tex = None
            if textured:
                h, w = p.texture.shape[:2]
                tex = ctx.texture((w, h), 4, np.ascontiguousarray(p.texture).tobytes(), alignment=1)
                tex.build_mipmaps()
                # bilinear in the nearest mip level: ~10% less CPU per view than trilinear on llvmpipe, and the
                # 2×2 supersampling already blends across level transitions
                tex.filter = (ctx.LINEAR_MIPMAP_NEAREST, ctx.LINEAR)
                tex.repeat_x = tex.repeat_y = True
            self.items.append((prog, vao, tex, p))
            self._res += [vbo, ibo, vao] + ([tex] if tex is not None else [])

    def release(self):
        for r in self._res:
            r.release()
        self._res, self.items = [], []


class MeshRenderer:
    """Renders RGB / alpha / depth views of a :class:`MeshData` for OpenCV cameras.

    Args:
        width, height: image size in pixels (height defaults to width).
        supersample: s: every pixel is the mean of s×s sub-samples (2 = four samples, like 4× MSAA; 1 = off).
        ambient: ambient light term; the two world-fixed directional lights add up to ~0.7 more.
        background: default background colour (float or RGB triple) for :meth:`render`.
        max_faces: :meth:`render_file` rejects larger objects.
        max_texture_size: textures are downscaled to this longest side on load.
    """

    # World-fixed lights (+Y up): a key light from above-front-right and a weaker fill from behind-left.
    LIGHT_DIRS = ((0.45, 0.8, 0.4), (-0.5, 0.3, -0.8))
    LIGHT_INTENSITIES = (0.55, 0.25)

    def __init__(self, width: int = 256, height: int | None = None, supersample: int = 2, ambient: float = 0.4,
                 background: float | tuple[float, float, float] = 1.0, max_faces: int | None = None,
                 max_texture_size: int = 2048):
        if not 1 <= int(supersample) <= 4:
            raise ValueError(f"supersample must be in 1..4 (1 = no anti-aliasing, 2 = 2×2), got {supersample}")
        self.width = int(width)
        self.height = int(height if height is not None else width)
        self.supersample = int(supersample)
        self.ambient = float(ambient)
        self.background = background
        self.max_faces = max_faces
        self.max_texture_size = int(max_texture_size)
        self._pid = None

    def settings(self) -> dict:
        """Everything that changes the pixels (recorded in the cache manifest)."""
        return {
            "renderer": "moderngl-v2", "width": self.width, "height": self.height, "supersample": self.supersample,
            "ambient": self.ambient, "lights": [list(d) for d in self.LIGHT_DIRS],
            "light_intensities": list(self.LIGHT_INTENSITIES), "max_texture_size": self.max_texture_size,
            "max_faces": self.max_faces,
        }

    # -- GL resources, created lazily per process --------------------------------------------------------------
    def _ensure_gl(self):
        if self._pid == os.getpid():
            return
        ctx = get_gl_context()
        self.ctx = ctx
        self._progs = {}
        # Views are rendered in groups of G, each into its own s×-resolution target (RGBA8 premultiplied colour
        # and coverage + R32F camera z + a z-buffer), resolved into row block g of a W × G·H target, and read back
        # once per group: llvmpipe then bins view g+1 while its threads rasterise view g, instead of draining its
        # pipeline at every view (~7 ms of 34 per 256² view). G is bounded by ~64 MB of targets.
        # The projection is built for W×H; the s× viewport only samples the same image plane more finely.
        S, W, H = self.supersample, self.width, self.height
        per_view = (W * S) * (H * S) * 12 + W * H * 8  # bytes: colour 4 + z 4 + z-buffer 4 per sub-sample
        self.group = int(max(1, min(8, (64 << 20) // per_view)))
        self._targets = []  # (fbo, colour texture, z texture)
        for _ in range(self.group):
            tex = [ctx.texture((W * S, H * S), 4), ctx.texture((W * S, H * S), 1, dtype="f4")]
            for t in tex:
                t.filter = (ctx.NEAREST, ctx.NEAREST)
            fbo = ctx.framebuffer(color_attachments=tex, depth_attachment=ctx.depth_renderbuffer((W * S, H * S)))
            self._targets.append((fbo, *tex))
        # Resolve pass: s×s box filter of the colour, voted centre depth, at W×H.
        self._prog_resolve = ctx.program(vertex_shader=VS_FULLSCREEN, fragment_shader=FS_RESOLVE % {"s": S})
        # units 1 and 2: unit 0 holds the mesh textures, and a render target must never be bound where it is sampled
        self._prog_resolve["u_col"].value, self._prog_resolve["u_z"].value = 1, 2
        self._prog_resolve["u_same_tol"].value = SAME_TOL
        self._vao_resolve = ctx.vertex_array(self._prog_resolve, [])
        self._fbo_out = ctx.framebuffer(color_attachments=[
            ctx.renderbuffer((W, H * self.group), 4), ctx.renderbuffer((W, H * self.group), 1, dtype="f4")])
        self._pid = os.getpid()

    def _program(self, textured: bool, vertex_colors: bool, mask: bool):
        """The shading program variant, compiled once per process."""
        key = (textured, vertex_colors, mask)
        if key not in self._progs:
            vs, fs = (shader_source(src, self.supersample, *key) for src in (VS_MESH, FS_MESH))
            prog = self.ctx.program(vertex_shader=vs, fragment_shader=fs)
            dirs = np.asarray(self.LIGHT_DIRS, dtype=np.float32)
            dirs = dirs / np.linalg.norm(dirs, axis=-1, keepdims=True)
            prog["u_light_dir"].write(dirs.tobytes())
            prog["u_light_int"].write(np.asarray(self.LIGHT_INTENSITIES, np.float32).tobytes())
            prog["u_ambient"].value = self.ambient
            if textured:
                prog["u_tex"].value = 0
            self._progs[key] = prog
        return self._progs[key]

    def upload(self, mesh: MeshData) -> _GPUMesh:
        """Upload a mesh once to render many batches of cameras; call ``.release()`` when done."""
        self._ensure_gl()
        return _GPUMesh(self.ctx, self._program, mesh)

    # -- rendering ---------------------------------------------------------------------------------------------
    def render_raw(self, mesh: MeshData | _GPUMesh, c2w, K) -> tuple[np.ndarray, np.ndarray]:
        """Fast path for caching: premultiplied colour and depth as numpy arrays.

        Args:
            mesh: a MeshData (uploaded and released inside) or an uploaded ``_GPUMesh``.
            c2w: [C, 4, 4] OpenCV camera-to-world (tensor or array).
            K: [C, 3, 3] intrinsics for this renderer's width/height.
        Returns:
            rgba: [C, H, W, 4] uint8, premultiplied RGB (i.e. on black) and coverage alpha.
            depth: [C, H, W] float32 planar z, 0 on background.
        """
        self._ensure_gl()
        ctx = self.ctx
        c2w = np.asarray(c2w.detach().cpu() if isinstance(c2w, Tensor) else c2w, dtype=np.float64).reshape(-1, 4, 4)
        K = np.asarray(K.detach().cpu() if isinstance(K, Tensor) else K, dtype=np.float64).reshape(-1, 3, 3)
        if len(K) == 1 and len(c2w) > 1:
            K = np.repeat(K, len(c2w), axis=0)
        if len(K) != len(c2w):
            raise ValueError(f"render: got {len(c2w)} c2w but {len(K)} K")
        own = isinstance(mesh, MeshData)
        gpu = self.upload(mesh) if own else mesh
        radius = gpu.radius
        C, H, W = len(c2w), self.height, self.width
        rgba = np.empty((C, H, W, 4), dtype=np.uint8)  # [C, H, W, 4]
        depth = np.empty((C, H, W), dtype=np.float32)  # [C, H, W]
        opaque = [it for it in gpu.items if it[3].alpha_mode != ALPHA_BLEND]
        blended = [it for it in gpu.items if it[3].alpha_mode == ALPHA_BLEND]
        progs = list({id(it[0]): it[0] for it in gpu.items}.values())
        G = self.group
        try:
            # No culling: Objaverse meshes are often single-sided or inconsistently wound (and culling the back
            # faces of closed meshes measured no faster on llvmpipe: early depth test already rejects them).
            ctx.disable(ctx.CULL_FACE)
            ctx.blend_func = ctx.ONE, ctx.ONE_MINUS_SRC_ALPHA
            for start in range(0, C, G):
                n = min(G, C - start)
                for g in range(n):
                    i = start + g
                    fbo = self._targets[g][0]
                    w2c = np.linalg.inv(c2w[i])
                    d = float(np.linalg.norm(c2w[i, :3, 3]))
                    near = max(d - radius * 1.01, 1e-3 * max(d, 1.0), 1e-4)
                    far = max(d + radius * 1.01, near * 2.0)
                    w2c_b = w2c.T.astype(np.float32).tobytes()  # GL uniforms are column-major
                    proj_b = projection_from_K(K[i], W, H, near, far).T.astype(np.float32).tobytes()
                    cam_b = c2w[i, :3, 3].astype(np.float32).tobytes()
                    for prog in progs:
                        prog["u_w2c"].write(w2c_b)
                        prog["u_proj"].write(proj_b)
                        prog["u_cam_pos"].write(cam_b)
                    fbo.use()
                    ctx.enable(ctx.DEPTH_TEST)
                    fbo.clear(0.0, 0.0, 0.0, 0.0, depth=1.0)
                    fbo.depth_mask = True
                    for it in opaque:  # alpha 1 after the MASK test: plain writes, no blending (cheaper)
                        self._draw(*it)
                    if blended:
                        ctx.enable(ctx.BLEND)
                        fbo.depth_mask = False  # transparent surfaces do not hide what is behind them
                        for it in blended:
                            self._draw(*it)
                        fbo.depth_mask = True
                        ctx.disable(ctx.BLEND)
                # Resolve each view into row block g of the output. Only after all renders of the group: sampling a
                # target waits for its rendering, which must not stall the renders queued behind it.
                ctx.disable(ctx.DEPTH_TEST | ctx.BLEND)
                for g in range(n):
                    _, tex_col, tex_z = self._targets[g]
                    self._fbo_out.viewport = (0, g * H, W, H)
                    self._fbo_out.use()
                    self._prog_resolve["u_row0"].value = g * H
                    tex_col.use(1)
                    tex_z.use(2)
                    self._vao_resolve.render(ctx.TRIANGLES, vertices=3)
                # one readback per group; rows come back top-to-bottom, view after view
                box = (0, 0, W, n * H)
                self._fbo_out.read_into(rgba[start:start + n], viewport=box, components=4, attachment=0, alignment=1)
                self._fbo_out.read_into(depth[start:start + n], viewport=box, components=1, attachment=1,
                                        dtype="f4", alignment=1)
        finally:
            ctx.disable(ctx.BLEND)
            if own:
                gpu.release()
        return rgba, depth

    @staticmethod
    def _draw(prog, vao, tex, prim: Primitive):
        prog["u_alpha_mode"].value = prim.alpha_mode
        if "u_cutoff" in prog:
            prog["u_cutoff"].value = prim.alpha_cutoff
        if "u_factor" in prog:
            prog["u_factor"].write(np.ascontiguousarray(prim.colors[0], dtype=np.float32).tobytes())
        if tex is not None:
            tex.use(0)
        vao.render()

    def render(self, mesh: MeshData | _GPUMesh, c2w, K, background: float | tuple | None = None) -> RenderOutput:
        """Render views of ``mesh`` for OpenCV cameras.

        Args:
            mesh: a loaded MeshData (see :func:`load_mesh`) or an uploaded mesh (:meth:`upload`).
            c2w: [C, 4, 4] OpenCV camera-to-world.
            K: [C, 3, 3] (or [3, 3]) intrinsics with pixel centres at u + 0.5.
            background: RGB or grey level; None uses the renderer's default (white).
        Returns:
            RenderOutput with rgb [C, H, W, 3], alpha [C, H, W, 1], depth [C, H, W, 1] (float32, CPU).
        """
        rgba, depth = self.render_raw(mesh, c2w, K)
        bg = torch.as_tensor(self.background if background is None else background, dtype=torch.float32)
        bg = bg.expand(3) if bg.numel() == 1 else bg.reshape(3)
        x = torch.from_numpy(rgba).float() / 255.0  # [C, H, W, 4]
        alpha = x[..., 3:]
        rgb = x[..., :3] + (1.0 - alpha) * bg  # premultiplied over the background
        return RenderOutput(rgb=rgb.clamp_(0, 1), alpha=alpha.contiguous(), depth=torch.from_numpy(depth)[..., None])

    def render_file(self, path: str | os.PathLike, c2w, K, background=None) -> tuple[RenderOutput, MeshData]:
        """Load (normalised) and render a mesh file. Raises BadMeshError for bad files."""
        mesh = load_mesh(path, max_faces=self.max_faces, max_texture_size=self.max_texture_size)
        return self.render(mesh, c2w, K, background), mesh
