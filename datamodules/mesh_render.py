"""Headless mesh renderer for dataset views: moderngl + EGL (Mesa llvmpipe on CPU, NVIDIA driver on GPU nodes).

What it renders, per camera (OpenCV ``c2w`` [4, 4] and ``K`` [3, 3] from :mod:`gsv3d_pl.cameras`):

- ``rgb`` [H, W, 3]: albedo (baseColor texture × baseColorFactor × vertex colour) lit by a world-fixed Lambert
  rig plus ambient, anti-aliased with MSAA, composited on the background colour. The lights are fixed in the
  world (not on the camera) so one surface point has the same colour in every view: the GS decoder predicts
  view-independent colours, and a headlight would make the views disagree.
- ``alpha`` [H, W, 1]: coverage in [0, 1] (MSAA-resolved, so edges are fractional).
- ``depth`` [H, W, 1]: planar camera-space z in world units at each pixel centre, 0 on background. It comes
  from a second, single-sample pass that writes the interpolated camera z into a float32 target, which is the
  exact linearisation of the z-buffer (no 24-bit quantisation, no averaging of depths across an edge).

Projection: the GL projection is built from K so that pixel (u, v) has its centre at (u + 0.5, v + 0.5), exactly
as :func:`gsv3d_pl.cameras.pixel_rays` and the Gaussian rasteriser see it. Rows come back top-to-bottom.

Meshes are read with trimesh (:func:`load_mesh`): scene graphs with node transforms, several primitives, PBR and
simple materials, vertex/face colours, alpha OPAQUE/MASK/BLEND, meshes without UVs or normals. Anything that
cannot be rendered raises :class:`BadMeshError` with a short reason (it is logged to ``skipped.jsonl`` by the
datamodule). Objects are normalised: bounding box centred at the origin, largest side 1.

One GL context per process, created lazily on first use, so a renderer object can be built in the parent and used in
forked DataLoader workers (each creates its own context). Mesa's llvmpipe cannot render in a child forked *after* the
parent rendered (its thread pool does not survive fork): that case raises a clear error instead of hanging; use the
'spawn' start method there (``prepare_data`` does).
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "BadMeshError",
    "MeshData",
    "Primitive",
    "RenderOutput",
    "MeshRenderer",
    "load_mesh",
    "get_gl_context",
    "projection_from_K",
]


class BadMeshError(Exception):
    """An object that cannot be rendered; ``str(err)`` is the reason written to ``skipped.jsonl``."""


# ----------------------------------------------------------------------------------------------------------------
# Mesh loading
# ----------------------------------------------------------------------------------------------------------------

ALPHA_OPAQUE, ALPHA_MASK, ALPHA_BLEND = 0, 1, 2
_ALPHA_MODES = {"OPAQUE": ALPHA_OPAQUE, "MASK": ALPHA_MASK, "BLEND": ALPHA_BLEND}


@dataclass
class Primitive:
    """One drawable piece: a trimesh geometry instanced at one scene-graph node, in normalised world coordinates.

    Attributes:
        positions: [V, 3] float32 vertex positions (normalised world frame).
        normals: [V, 3] float32 unit vertex normals (world frame).
        uvs: [V, 2] float32 texture coordinates in trimesh's convention (v = 0 at the image bottom), or None.
        colors: [V, 4] float32 RGBA in [0, 1]: vertex colour × material factor (white when absent).
        faces: [F, 3] uint32 triangle indices.
        texture: [h, w, 4] uint8 RGBA base-colour image, row 0 = top, or None.
        alpha_mode: ALPHA_OPAQUE, ALPHA_MASK or ALPHA_BLEND.
        alpha_cutoff: MASK threshold.
    """

    positions: np.ndarray
    normals: np.ndarray
    uvs: np.ndarray | None
    colors: np.ndarray
    faces: np.ndarray
    texture: np.ndarray | None = None
    alpha_mode: int = ALPHA_OPAQUE
    alpha_cutoff: float = 0.5


@dataclass
class MeshData:
    """A loaded, normalised object.

    ``norm_center`` [3] and ``norm_scale`` map the source frame to the normalised one:
    ``normalised = (v - norm_center) * norm_scale`` for the vertices ``v`` of ``trimesh.load(path, force="mesh")``
    (scene-graph transforms applied).
    """

    primitives: list[Primitive]
    norm_center: np.ndarray = field(default_factory=lambda: np.zeros(3))
    norm_scale: float = 1.0

    @property
    def num_faces(self) -> int:
        return sum(len(p.faces) for p in self.primitives)

    @property
    def bounding_radius(self) -> float:
        """Radius of the origin-centred sphere that holds every vertex (for near/far planes)."""
        return float(max(np.linalg.norm(p.positions, axis=-1).max() for p in self.primitives))


def _as_factor(value, n: int) -> np.ndarray:
    """Material factors come as uint8 (trimesh) or float; returns float32 [n] in [0, 1]."""
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if np.asarray(value).dtype == np.uint8 or arr.max(initial=0.0) > 1.0:
        arr = arr / 255.0
    out = np.ones(n, dtype=np.float32)
    out[: min(n, arr.size)] = arr[:n]
    return np.clip(out, 0.0, 1.0)


def _texture_array(image, max_size: int) -> np.ndarray | None:
    """PIL image -> [h, w, 4] uint8 (row 0 = top), downscaled so its longest side is at most ``max_size``."""
    if image is None:
        return None
    from PIL import Image

    img = image.convert("RGBA")
    if max(img.size) > max_size:
        s = max_size / max(img.size)
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BILINEAR)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def _primitive_from_trimesh(mesh, transform: np.ndarray, max_texture_size: int) -> Primitive | None:
    """A trimesh.Trimesh at a node transform [4, 4] -> Primitive in the source world frame (not yet normalised)."""
    import trimesh

    faces = np.asarray(mesh.faces, dtype=np.int64).reshape(-1, 3)
    verts = np.asarray(mesh.vertices, dtype=np.float64).reshape(-1, 3)
    if len(faces) == 0 or len(verts) == 0:
        return None
    if faces.min() < 0 or faces.max() >= len(verts):
        raise BadMeshError("face indices out of range")
    if not np.isfinite(verts).all():
        raise BadMeshError("NaN/inf vertices")
    visual = mesh.visual
    uvs = texture = None
    alpha_mode, cutoff = ALPHA_OPAQUE, 0.5
    colors = np.ones((len(verts), 4), dtype=np.float32)  # [V, 4]

    if isinstance(visual, trimesh.visual.ColorVisuals):
        if visual.kind == "face":
            # Per-face colours: give every face its own three vertices so the colour stays flat.
            fc = np.asarray(visual.face_colors, dtype=np.float32) / 255.0  # [F, 4]
            verts = verts[faces].reshape(-1, 3)
            normals = np.repeat(np.asarray(mesh.face_normals, dtype=np.float64), 3, axis=0)
            colors = np.repeat(fc, 3, axis=0)
            faces = np.arange(len(verts), dtype=np.int64).reshape(-1, 3)
            mesh = None
        elif visual.kind == "vertex":
            colors = np.asarray(visual.vertex_colors, dtype=np.float32)[:, :4] / 255.0
        if colors[:, 3].min() < 1.0:
            alpha_mode = ALPHA_BLEND
    elif isinstance(visual, trimesh.visual.TextureVisuals):
        mat = visual.material
        if visual.uv is not None and len(visual.uv) == len(verts):
            uvs = np.asarray(visual.uv, dtype=np.float32)[:, :2]
        if isinstance(mat, trimesh.visual.material.PBRMaterial):
            factor = _as_factor(mat.baseColorFactor if mat.baseColorFactor is not None else [1, 1, 1, 1], 4)
            tex_img = mat.baseColorTexture
            alpha_mode = _ALPHA_MODES.get(str(mat.alphaMode or "OPAQUE").upper(), ALPHA_OPAQUE)
            if mat.alphaCutoff is not None:
                cutoff = float(mat.alphaCutoff)
        else:  # SimpleMaterial (OBJ/MTL)
            factor = _as_factor(getattr(mat, "diffuse", None) if getattr(mat, "diffuse", None) is not None
                                else [255, 255, 255, 255], 4)
            tex_img = getattr(mat, "image", None)
        colors = colors * factor[None]
        vattr = getattr(visual, "vertex_attributes", None) or {}
        if "color" in vattr and len(vattr["color"]) == len(verts):
            colors = colors * _as_factor(vattr["color"], 4)[None] if np.ndim(vattr["color"]) == 1 else \
                colors * (np.asarray(vattr["color"], dtype=np.float32)[:, :4] / (255.0 if np.asarray(
                    vattr["color"]).dtype == np.uint8 else 1.0))
        if uvs is not None and tex_img is not None:
            texture = _texture_array(tex_img, max_texture_size)
        if texture is None:
            uvs = None
    if mesh is not None:
        normals = np.asarray(mesh.vertex_normals, dtype=np.float64)  # computed by trimesh when the file has none
    T = np.asarray(transform, dtype=np.float64)
    pos = verts @ T[:3, :3].T + T[:3, 3]  # [V, 3]
    try:
        nmat = np.linalg.inv(T[:3, :3]).T
    except np.linalg.LinAlgError:
        nmat = np.linalg.pinv(T[:3, :3]).T
    nrm = normals @ nmat.T
    nrm = nrm / np.maximum(np.linalg.norm(nrm, axis=-1, keepdims=True), 1e-12)
    if not np.isfinite(pos).all():
        raise BadMeshError("NaN/inf vertices after the node transform")
    nrm = np.nan_to_num(nrm)  # a zero normal makes the shader fall back to the flat face normal
    return Primitive(
        positions=pos.astype(np.float32), normals=nrm.astype(np.float32), uvs=uvs,
        colors=np.ascontiguousarray(colors, dtype=np.float32), faces=faces.astype(np.uint32),
        texture=texture, alpha_mode=alpha_mode, alpha_cutoff=cutoff,
    )


def load_mesh(path: str | os.PathLike, max_faces: int | None = None, max_texture_size: int = 2048,
              normalize: bool = True) -> MeshData:
    """Load a .glb/.gltf/.obj/... file with trimesh into renderable, normalised primitives.

    Args:
        path: mesh file.
        max_faces: objects with more triangles are rejected (``BadMeshError``); None = no limit.
        max_texture_size: textures are downscaled to this longest side (speed; views are ≤ 576²).
        normalize: centre the bounding box at the origin and scale its largest side to 1.
    Raises:
        BadMeshError: unreadable/corrupt file, missing external resource, empty scene, no faces, NaN/inf vertices,
            too many faces, zero-size object.
    """
    import trimesh

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BadMeshError(f"file not found: {path}")
    try:
        scene = trimesh.load(path, force="scene", process=False)
    except BadMeshError:
        raise
    except Exception as e:  # trimesh raises many types (KeyError, ValueError, OSError, struct.error, ...)
        raise BadMeshError(f"unreadable ({type(e).__name__}: {str(e)[:200]})") from None
    if scene is None or len(scene.geometry) == 0:
        raise BadMeshError("empty scene")
    prims: list[Primitive] = []
    n_faces = 0
    try:
        for node in scene.graph.nodes_geometry:
            transform, geom_name = scene.graph[node]
            geom = scene.geometry.get(geom_name)
            if not isinstance(geom, trimesh.Trimesh):
                continue  # point clouds, paths: nothing to shade
            n_faces += len(geom.faces)
            if max_faces is not None and n_faces > max_faces:
                raise BadMeshError(f"too many faces (> max_faces={max_faces})")
            prim = _primitive_from_trimesh(geom, transform, max_texture_size)
            if prim is not None:
                prims.append(prim)
    except BadMeshError:
        raise
    except Exception as e:
        raise BadMeshError(f"unsupported content ({type(e).__name__}: {str(e)[:200]})") from None
    if not prims:
        raise BadMeshError("no faces")
    center, scale = np.zeros(3), 1.0
    if normalize:
        lo = np.min([p.positions[p.faces.reshape(-1)].min(0) for p in prims], axis=0)
        hi = np.max([p.positions[p.faces.reshape(-1)].max(0) for p in prims], axis=0)
        extent = float((hi - lo).max())
        if not math.isfinite(extent) or extent <= 1e-12:
            raise BadMeshError("zero-size object")
        center, scale = (lo + hi) / 2.0, 1.0 / extent
        for p in prims:
            p.positions = ((p.positions - center) * scale).astype(np.float32)
    return MeshData(prims, norm_center=np.asarray(center, dtype=np.float64), norm_scale=float(scale))


# ----------------------------------------------------------------------------------------------------------------
# GL context (one per process)
# ----------------------------------------------------------------------------------------------------------------

_CTX_LOCK = threading.Lock()
_CTX: dict = {"pid": None, "ctx": None}


def get_gl_context():
    """The process's moderngl standalone EGL context, created on first use (and again after a fork)."""
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


# ----------------------------------------------------------------------------------------------------------------
# Renderer
# ----------------------------------------------------------------------------------------------------------------

_VS = """
#version 330
uniform mat4 u_w2c;    // world -> OpenCV camera
uniform mat4 u_proj;   // OpenCV camera -> clip (built from K)
in vec3 in_pos;
in vec3 in_nrm;
in vec2 in_uv;
in vec4 in_col;
out vec3 v_pos;
out vec3 v_nrm;
out vec2 v_uv;
out vec4 v_col;
out float v_z;
void main() {
    vec4 pc = u_w2c * vec4(in_pos, 1.0);
    v_pos = in_pos;
    v_nrm = in_nrm;
    v_uv = in_uv;
    v_col = in_col;
    v_z = pc.z;
    gl_Position = u_proj * pc;
}
"""

_FS_COMMON = """
#version 330
uniform sampler2D u_tex;
uniform bool u_has_tex;
uniform int u_alpha_mode;   // 0 opaque, 1 mask, 2 blend
uniform float u_cutoff;
in vec3 v_pos;
in vec3 v_nrm;
in vec2 v_uv;
in vec4 v_col;
in float v_z;
vec4 base_color() {
    vec4 c = v_col;
    // trimesh UVs have v = 0 at the image bottom; the texture is uploaded with row 0 = image top.
    if (u_has_tex) c *= texture(u_tex, vec2(v_uv.x, 1.0 - v_uv.y));
    return c;
}
"""

_FS_COLOR = _FS_COMMON + """
uniform vec3 u_cam_pos;
uniform float u_ambient;
uniform vec3 u_light_dir[2];
uniform float u_light_int[2];
out vec4 f_color;
void main() {
    vec4 c = base_color();
    float a = c.a;
    if (u_alpha_mode == 1) { if (a < u_cutoff) discard; a = 1.0; }
    else if (u_alpha_mode == 0) { a = 1.0; }
    vec3 n = v_nrm;
    if (dot(n, n) < 1e-12) n = cross(dFdx(v_pos), dFdy(v_pos));   // no normal: flat face normal
    n = normalize(n);
    if (dot(n, u_cam_pos - v_pos) < 0.0) n = -n;                    // two-sided lighting
    float light = u_ambient;
    for (int i = 0; i < 2; ++i) light += u_light_int[i] * max(dot(n, u_light_dir[i]), 0.0);
    vec3 rgb = clamp(c.rgb * light, 0.0, 1.0);
    f_color = vec4(rgb * a, a);   // premultiplied: blends and resolves correctly at edges
}
"""

_FS_DEPTH = _FS_COMMON + """
out float f_depth;
void main() {
    vec4 c = base_color();
    if (u_alpha_mode == 1 && c.a < u_cutoff) discard;
    if (u_alpha_mode == 2 && c.a < 0.5) discard;   // mostly transparent BLEND surfaces carry no depth
    f_depth = v_z;
}
"""


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
    """GL buffers of one MeshData (vertex layout: pos3 nrm3 uv2 col4, float32)."""

    def __init__(self, ctx, progs, mesh: MeshData):
        self.items = []  # (vao_color, vao_depth, texture|None, primitive)
        self._res = []
        for p in mesh.primitives:
            V = len(p.positions)
            uv = p.uvs if p.uvs is not None else np.zeros((V, 2), np.float32)
            data = np.concatenate([p.positions, p.normals, uv, p.colors], axis=1).astype(np.float32)  # [V, 12]
            vbo = ctx.buffer(np.ascontiguousarray(data).tobytes())
            ibo = ctx.buffer(np.ascontiguousarray(p.faces, dtype=np.uint32).tobytes())
            vaos = []
            for prog in progs:
                names = [n for n in ("in_pos", "in_nrm", "in_uv", "in_col") if n in prog]
                fmt = " ".join(f if n in names else f.split("f")[0] + "x4"
                               for f, n in zip(("3f", "3f", "2f", "4f"), ("in_pos", "in_nrm", "in_uv", "in_col")))
                vaos.append(ctx.vertex_array(prog, [(vbo, fmt, *names)], index_buffer=ibo, index_element_size=4))
            tex = None
            if p.texture is not None:
                h, w = p.texture.shape[:2]
                tex = ctx.texture((w, h), 4, np.ascontiguousarray(p.texture).tobytes(), alignment=1)
                tex.build_mipmaps()
                tex.filter = (ctx.LINEAR_MIPMAP_LINEAR, ctx.LINEAR)
                tex.repeat_x = tex.repeat_y = True
            self.items.append((vaos[0], vaos[1], tex, p))
            self._res += [vbo, ibo, *vaos] + ([tex] if tex is not None else [])

    def release(self):
        for r in self._res:
            r.release()
        self._res, self.items = [], []


class MeshRenderer:
    """Renders RGB / alpha / depth views of a :class:`MeshData` for OpenCV cameras.

    Args:
        width, height: image size in pixels (height defaults to width).
        samples: MSAA samples for RGB/alpha (clamped to what the GL driver allows; llvmpipe: 4).
        ambient: ambient light term; the two world-fixed directional lights add up to ~0.7 more.
        background: default background colour (float or RGB triple) for :meth:`render`.
        max_faces: :meth:`render_file` rejects larger objects.
        max_texture_size: textures are downscaled to this longest side on load.
    """

    # World-fixed lights (+Y up): a key light from above-front-right and a weaker fill from behind-left.
    LIGHT_DIRS = ((0.45, 0.8, 0.4), (-0.5, 0.3, -0.8))
    LIGHT_INTENSITIES = (0.55, 0.25)

    def __init__(self, width: int = 256, height: int | None = None, samples: int = 4, ambient: float = 0.4,
                 background: float | tuple[float, float, float] = 1.0, max_faces: int | None = None,
                 max_texture_size: int = 2048):
        self.width = int(width)
        self.height = int(height if height is not None else width)
        self.requested_samples = int(samples)
        self.ambient = float(ambient)
        self.background = background
        self.max_faces = max_faces
        self.max_texture_size = int(max_texture_size)
        self._pid = None

    def settings(self) -> dict:
        """Everything that changes the pixels (recorded in the cache manifest)."""
        return {
            "renderer": "moderngl-v1", "width": self.width, "height": self.height, "samples": self.requested_samples,
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
        self.samples = max(0, min(self.requested_samples, ctx.max_samples)) if self.requested_samples > 1 else 0
        W, H = self.width, self.height
        self._prog_color = ctx.program(vertex_shader=_VS, fragment_shader=_FS_COLOR)
        self._prog_depth = ctx.program(vertex_shader=_VS, fragment_shader=_FS_DEPTH)
        for prog in (self._prog_color, self._prog_depth):
            if "u_tex" in prog:
                prog["u_tex"].value = 0
        dirs = np.asarray(self.LIGHT_DIRS, dtype=np.float32)
        dirs = dirs / np.linalg.norm(dirs, axis=-1, keepdims=True)
        self._prog_color["u_light_dir"].write(dirs.tobytes())
        self._prog_color["u_light_int"].write(np.asarray(self.LIGHT_INTENSITIES, np.float32).tobytes())
        self._prog_color["u_ambient"].value = self.ambient
        # Colour pass: MSAA RGBA8 (premultiplied) + depth, resolved into a single-sample RGBA8 target.
        self._fbo_msaa = ctx.framebuffer(
            color_attachments=[ctx.renderbuffer((W, H), 4, samples=self.samples)],
            depth_attachment=ctx.depth_renderbuffer((W, H), samples=self.samples),
        )
        self._fbo_resolve = ctx.framebuffer(color_attachments=[ctx.renderbuffer((W, H), 4)])
        # Depth pass: single sample, camera z at pixel centres into float32.
        self._fbo_depth = ctx.framebuffer(
            color_attachments=[ctx.renderbuffer((W, H), 1, dtype="f4")],
            depth_attachment=ctx.depth_renderbuffer((W, H)),
        )
        self._pid = os.getpid()

    def upload(self, mesh: MeshData) -> _GPUMesh:
        """Upload a mesh once to render many batches of cameras; call ``.release()`` when done."""
        self._ensure_gl()
        return _GPUMesh(self.ctx, (self._prog_color, self._prog_depth), mesh)

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
        radius = max(float(np.linalg.norm(it[3].positions, axis=-1).max()) for it in gpu.items)
        C, H, W = len(c2w), self.height, self.width
        rgba = np.empty((C, H, W, 4), dtype=np.uint8)  # [C, H, W, 4]
        depth = np.empty((C, H, W), dtype=np.float32)  # [C, H, W]
        opaque = [it for it in gpu.items if it[3].alpha_mode != ALPHA_BLEND]
        blended = [it for it in gpu.items if it[3].alpha_mode == ALPHA_BLEND]
        try:
            ctx.enable(ctx.DEPTH_TEST)
            ctx.disable(ctx.CULL_FACE)  # Objaverse meshes are often single-sided or inconsistently wound
            for i in range(C):
                w2c = np.linalg.inv(c2w[i])
                d = float(np.linalg.norm(c2w[i, :3, 3]))
                near = max(d - radius * 1.01, 1e-3 * max(d, 1.0), 1e-4)
                far = max(d + radius * 1.01, near * 2.0)
                proj = projection_from_K(K[i], W, H, near, far)
                w2c_b = w2c.T.astype(np.float32).tobytes()  # GL uniforms are column-major
                proj_b = proj.T.astype(np.float32).tobytes()
                cam_b = c2w[i, :3, 3].astype(np.float32).tobytes()
                # colour pass
                self._fbo_msaa.use()
                self._fbo_msaa.clear(0.0, 0.0, 0.0, 0.0, depth=1.0)
                self._prog_color["u_w2c"].write(w2c_b)
                self._prog_color["u_proj"].write(proj_b)
                self._prog_color["u_cam_pos"].write(cam_b)
                ctx.enable(ctx.BLEND)
                ctx.blend_func = ctx.ONE, ctx.ONE_MINUS_SRC_ALPHA
                self._fbo_msaa.depth_mask = True
                for it in opaque:
                    self._draw(self._prog_color, it[0], it[2], it[3])
                self._fbo_msaa.depth_mask = False  # transparent surfaces do not hide what is behind them
                for it in blended:
                    self._draw(self._prog_color, it[0], it[2], it[3])
                self._fbo_msaa.depth_mask = True
                ctx.disable(ctx.BLEND)
                ctx.copy_framebuffer(self._fbo_resolve, self._fbo_msaa)
                rgba[i] = np.frombuffer(self._fbo_resolve.read(components=4, alignment=1), np.uint8).reshape(H, W, 4)
                # depth pass
                self._fbo_depth.use()
                self._fbo_depth.clear(0.0, 0.0, 0.0, 0.0, depth=1.0)
                self._prog_depth["u_w2c"].write(w2c_b)
                self._prog_depth["u_proj"].write(proj_b)
                for it in gpu.items:
                    self._draw(self._prog_depth, it[1], it[2], it[3])
                depth[i] = np.frombuffer(self._fbo_depth.read(components=1, dtype="f4", alignment=1),
                                         np.float32).reshape(H, W)
        finally:
            if own:
                gpu.release()
        return rgba, depth

    @staticmethod
    def _draw(prog, vao, tex, prim: Primitive):
        if "u_has_tex" in prog:
            prog["u_has_tex"].value = tex is not None
        if "u_alpha_mode" in prog:
            prog["u_alpha_mode"].value = prim.alpha_mode
        if "u_cutoff" in prog:
            prog["u_cutoff"].value = prim.alpha_cutoff
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
