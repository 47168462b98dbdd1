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
    "resolve_supersampled",
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
    nrm = np.nan_to_num(nrm)  # a zero normal gets half the directional light in the shader
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

# Lighting is per vertex (Gouraud) and folded into the colour: on llvmpipe every varying costs set-up time per
# triangle, which made the 50k-face benchmark mesh geometry-bound. Each primitive gets the program variant it needs
# (TEX: a base-colour texture; VCOL: colours that vary per vertex, else a uniform factor; MASK: alpha-tested), so
# a textured mesh interpolates 3 floats (UV, light) and a plain one 1, instead of 13 for per-pixel lighting. The
# camera z needs no varying: with the projection below w_clip = z_cam, so z = 1 / gl_FragCoord.w.
_VS = """
uniform mat4 u_w2c;    // world -> OpenCV camera
uniform mat4 u_proj;   // OpenCV camera -> clip (built from K)
uniform vec3 u_cam_pos;
uniform float u_ambient;
uniform vec3 u_light_dir[2];
uniform float u_light_int[2];
in vec3 in_pos;
in vec3 in_nrm;
#ifdef TEX
in vec2 in_uv;
out vec2 v_uv;
#endif
#ifdef VCOL
in vec4 in_col;
out vec4 v_col;   // albedo × light (rgb may exceed 1 before the texture multiplies it), alpha
#else
out float v_light;
#endif
void main() {
    vec4 pc = u_w2c * vec4(in_pos, 1.0);
    float light = u_ambient;
    if (dot(in_nrm, in_nrm) > 1e-12) {
        vec3 n = normalize(in_nrm);
        if (dot(n, u_cam_pos - in_pos) < 0.0) n = -n;   // two-sided lighting
        for (int i = 0; i < 2; ++i) light += u_light_int[i] * max(dot(n, u_light_dir[i]), 0.0);
    } else {
        light += 0.5 * (u_light_int[0] + u_light_int[1]);   // degenerate normal: half the directional light
    }
#ifdef TEX
    v_uv = in_uv;
#endif
#ifdef VCOL
    v_col = vec4(in_col.rgb * light, in_col.a);
#else
    v_light = light;
#endif
    gl_Position = u_proj * pc;
}
"""

_FS = """
uniform int u_alpha_mode;   // 0 opaque, 1 mask, 2 blend
#ifdef MASK
uniform float u_cutoff;
#endif
#ifdef TEX
uniform sampler2D u_tex;
in vec2 v_uv;
#endif
#ifdef VCOL
in vec4 v_col;
#else
uniform vec4 u_factor;      // the primitive's one colour (material factor × constant vertex colour)
in float v_light;
#endif
layout(location = 0) out vec4 f_color;
layout(location = 1) out vec4 f_depth;   // float32 R target: only .r is stored, .a drives the blend
void main() {
    // 1/z = gl_FragCoord.w is affine in screen space on a triangle, so its screen derivatives are exact: store
    // the z this triangle has at the centre of the output pixel, not at this sub-sample. Sub-samples of one
    // triangle then agree exactly, and the resolve needs no depth averaging. (Derivatives before any discard.)
    vec2 to_centre = vec2(0.5 * float(S - 1)) - vec2(ivec2(gl_FragCoord.xy) % S);
    float inv_z = gl_FragCoord.w + dFdx(gl_FragCoord.w) * to_centre.x + dFdy(gl_FragCoord.w) * to_centre.y;
    // A triangle seen almost edge-on can extrapolate anywhere (even behind the camera): stay within 5%.
    inv_z = clamp(inv_z, gl_FragCoord.w / 1.05, gl_FragCoord.w * 1.05);
#ifdef VCOL
    vec4 c = v_col;
#else
    vec4 c = vec4(u_factor.rgb * v_light, u_factor.a);
#endif
#ifdef TEX
    // trimesh UVs have v = 0 at the image bottom; the texture is uploaded with row 0 = image top.
    c *= texture(u_tex, vec2(v_uv.x, 1.0 - v_uv.y));
#endif
    float a = c.a;
#ifdef MASK
    if (a < u_cutoff) discard;   // only this variant may discard: with a discard in the shader llvmpipe
#endif                           // cannot depth-test before shading, and every hidden fragment gets shaded
    if (u_alpha_mode != 2) a = 1.0;
    f_color = vec4(clamp(c.rgb, 0.0, 1.0) * a, a);   // premultiplied: blends and resolves correctly at edges
    // Both targets share the blend func (ONE, ONE_MINUS_SRC_ALPHA): w = 1 replaces the stored z, w = 0 keeps it.
    // Mostly transparent BLEND surfaces (a < 0.5) carry no depth.
    float w = (u_alpha_mode == 2 && a < 0.5) ? 0.0 : 1.0;
    f_depth = vec4(w / max(inv_z, 1e-30), 0.0, 0.0, w);
}
"""


def _shader_source(body: str, supersample: int, textured: bool, vertex_colors: bool, mask: bool) -> str:
    flags = (("TEX", textured), ("VCOL", vertex_colors), ("MASK", mask))
    defines = "".join(f"#define {name}\n" for name, on in flags if on)
    # S, the supersampling factor, is a compile-time constant so that the per-fragment modulo folds away
    return f"#version 330\nconst int S = {int(supersample)};\n" + defines + body


# Supersample resolve, run on the GL side so that only W×H pixels are read back (a numpy resolve of a 512² view
# took ~25 ms, as long as rendering it). resolve_supersampled() below is the same rule in numpy, for tests.
_VS_FULLSCREEN = """
#version 330
void main() {   // one triangle that covers the viewport
    vec2 p = vec2(float((gl_VertexID << 1) & 2), float(gl_VertexID & 2));
    gl_Position = vec4(2.0 * p - 1.0, 0.0, 1.0);
}
"""

_FS_RESOLVE = """
#version 330
uniform sampler2D u_col;   // [H·s, W·s] premultiplied RGBA
uniform sampler2D u_z;     // [H·s, W·s] camera z at the pixel centre of each sub-sample's triangle, 0 = uncovered
const int S = %(s)d;       // compile-time: the loops unroll and zs[] lives in registers (dynamic indexing is slow)
uniform float u_same_tol;
uniform int u_row0;        // this view's first row in the W × G·H output
layout(location = 0) out vec4 o_col;
layout(location = 1) out vec4 o_z;
void main() {
    ivec2 p0 = (ivec2(gl_FragCoord.xy) - ivec2(0, u_row0)) * S;
    const int m = S * S;
    vec4 acc = vec4(0.0);
    float zs[m];
    for (int k = 0; k < m; ++k) {
        ivec2 pk = p0 + ivec2(k %% S, k / S);
        acc += texelFetch(u_col, pk, 0);
        zs[k] = texelFetch(u_z, pk, 0).r;
    }
    // the surface most sub-samples agree on (ties: the nearest) is the one under the pixel centre
    float best_z = 0.0, best_n = 0.0;
    for (int k = 0; k < m; ++k) {
        if (zs[k] <= 0.0) continue;
        float n = 0.0;
        for (int j = 0; j < m; ++j) n += (zs[j] > 0.0 && abs(zs[j] - zs[k]) <= u_same_tol * zs[k]) ? 1.0 : 0.0;
        if (n > best_n || (n == best_n && zs[k] < best_z)) { best_n = n; best_z = zs[k]; }
    }
    o_col = acc / float(m);
    o_z = vec4(best_z, 0.0, 0.0, 1.0);
}
"""

SAME_TOL = 1e-4  # sub-samples whose centre depths differ by less than this (relative) see the same surface


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


def resolve_supersampled(rgba: np.ndarray, z: np.ndarray, s: int, same_tol: float = SAME_TOL
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Box-filter an s×s supersampled view down to pixels (numpy reference of the renderer's GL resolve pass).

    Each sub-sample's ``z`` is the depth its triangle has at the *pixel centre* (the fragment shader extrapolates
    along the triangle's plane). The pixel's depth is the value most covered sub-samples agree on (ties: the
    nearest), i.e. the surface most likely under the centre; it is exact wherever one triangle covers most of the
    pixel and never an average of two surfaces.

    Args:
        rgba: [H·s, W·s, 4] uint8 premultiplied colour and coverage.
        z: [H·s, W·s] float32 centre depth per sub-sample, 0 where uncovered.
        s: supersampling factor.
        same_tol: relative difference below which two sub-samples see the same surface.
    Returns:
        rgba: [H, W, 4] uint8 mean of the sub-samples (rounded).
        depth: [H, W] float32 as above, 0 where no sub-sample is covered.
    """
    if s == 1:
        return rgba, z
    Hs, Ws = z.shape
    H, W = Hs // s, Ws // s
    acc = rgba.reshape(H, s, W, s, 4).sum(axis=(1, 3), dtype=np.uint32)  # [H, W, 4]
    out = ((acc + (s * s) // 2) // (s * s)).astype(np.uint8)
    zs = z.reshape(H, s, W, s).transpose(0, 2, 1, 3).reshape(H, W, s * s)  # [H, W, s²]
    covered = zs > 0
    same = covered[..., None, :] & (np.abs(zs[..., None, :] - zs[..., :, None]) <= same_tol * zs[..., :, None])
    votes = np.where(covered, same.sum(-1), -1)  # [H, W, s²]: sub-samples that agree with sub-sample k
    # most votes first, then the nearest: order by (votes desc, z asc)
    key = votes.astype(np.float64) * 1e6 - np.where(covered, zs, 0.0) / (zs.max() + 1.0)
    best = np.take_along_axis(zs, key.argmax(-1)[..., None], -1)[..., 0]
    depth = np.where(covered.any(-1), best, 0.0).astype(np.float32)
    return out, depth


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
        self._prog_resolve = ctx.program(vertex_shader=_VS_FULLSCREEN, fragment_shader=_FS_RESOLVE % {"s": S})
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
            vs, fs = (_shader_source(src, self.supersample, *key) for src in (_VS, _FS))
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
