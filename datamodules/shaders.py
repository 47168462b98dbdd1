"""The renderer's GLSL programs: the mesh shading variants, the supersample resolve, and the resolve in numpy.

:func:`resolve_supersampled` is the resolve pass's rule (box-filtered colour, the depth most sub-samples agree on)
written again in numpy, as the reference the tests hold the GL pass to.
"""

from __future__ import annotations

import numpy as np

__all__ = ["VS_MESH", "FS_MESH", "VS_FULLSCREEN", "FS_RESOLVE", "SAME_TOL", "shader_source", "resolve_supersampled"]

# Lighting is per vertex (Gouraud) and folded into the colour: on llvmpipe every varying costs set-up time per
# triangle, which made the 50k-face benchmark mesh geometry-bound. Each primitive gets the program variant it needs
# (TEX: a base-colour texture; VCOL: colours that vary per vertex, else a uniform factor; MASK: alpha-tested), so
# a textured mesh interpolates 3 floats (UV, light) and a plain one 1, instead of 13 for per-pixel lighting. The
# camera z needs no varying: with mesh_render.projection_from_K's matrix w_clip = z_cam, so z = 1 / gl_FragCoord.w.
VS_MESH = """
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

FS_MESH = """
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


def shader_source(body: str, supersample: int, textured: bool, vertex_colors: bool, mask: bool) -> str:
    flags = (("TEX", textured), ("VCOL", vertex_colors), ("MASK", mask))
    defines = "".join(f"#define {name}\n" for name, on in flags if on)
    # S, the supersampling factor, is a compile-time constant so that the per-fragment modulo folds away
    return f"#version 330\nconst int S = {int(supersample)};\n" + defines + body


# Supersample resolve, run on the GL side so that only W×H pixels are read back (a numpy resolve of a 512² view
# took ~25 ms, as long as rendering it). resolve_supersampled() below is the same rule in numpy, for tests.
VS_FULLSCREEN = """
#version 330
void main() {   // one triangle that covers the viewport
    vec2 p = vec2(float((gl_VertexID << 1) & 2), float(gl_VertexID & 2));
    gl_Position = vec4(2.0 * p - 1.0, 0.0, 1.0);
}
"""

FS_RESOLVE = """
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
