"""UV atlas of a mesh (xatlas) and its rasterisation into texels: for every texel, the 3D surface point it shows.

The texel map is what the bake needs: a texture of positions and normals. It is drawn with the project's headless
OpenGL context (:func:`datamodules.gl_context.get_gl_context`, Mesa llvmpipe on CPU), each triangle placed at its
UV coordinates, with the world position and normal as interpolated attributes (UV space is flat, so the
interpolation is affine and exact). Conventions: the image row 0 is the top, UV v = 0 at the bottom (glTF/trimesh:
trimesh flips v on export), so texel (row r, column c) has its centre at UV ((c + 0.5) / T, 1 - (r + 0.5) / T).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["UVMesh", "uv_unwrap", "TexelMap", "rasterize_atlas"]


@dataclass
class UVMesh:
    """A mesh with one UV per vertex: vertices along the atlas' seams are duplicated (xatlas' ``vmapping``)."""

    vertices: np.ndarray  # [V, 3] float32
    faces: np.ndarray  # [F, 3] int64
    uvs: np.ndarray  # [V, 2] float32 in [0, 1], v up
    normals: np.ndarray  # [V, 3] float32 unit, area-weighted vertex normals of the un-split mesh


def uv_unwrap(vertices: np.ndarray, faces: np.ndarray, texture_size: int, padding: int = 4) -> UVMesh:
    """Cut the mesh into charts and pack them into one square atlas (xatlas).

    Args:
        vertices: [V0, 3], faces: [F, 3].
        texture_size: the atlas' target side in texels (xatlas sizes charts for it).
        padding: texels between charts, so that bilinear/mipmapped lookups near a seam do not read the
            neighbouring chart (the gutter is filled with the chart's own edge colours by the bake).
    Returns:
        :class:`UVMesh` with the same faces' order.
    """
    import trimesh
    import xatlas

    v = np.ascontiguousarray(vertices, np.float32)
    f = np.ascontiguousarray(faces, np.uint32)
    atlas = xatlas.Atlas()
    atlas.add_mesh(v, f)
    pack = xatlas.PackOptions()
    pack.resolution = int(texture_size)
    pack.padding = int(padding)
    pack.bilinear = True
    # Default chart options: charts follow normal and curvature changes, which is what a baked texture wants.
    atlas.generate(xatlas.ChartOptions(), pack)
    vmapping, new_faces, uvs = atlas[0]  # [V], [F, 3], [V, 2]
    normals = trimesh.Trimesh(v, f.astype(np.int64), process=False).vertex_normals  # [V0, 3]
    return UVMesh(vertices=v[vmapping], faces=new_faces.astype(np.int64), uvs=uvs.astype(np.float32),
                  normals=np.asarray(normals, np.float32)[vmapping])


@dataclass
class TexelMap:
    """What each texel of a T×T atlas shows (row 0 = top of the image)."""

    position: np.ndarray  # [T, T, 3] float32 world point (0 where not covered)
    normal: np.ndarray  # [T, T, 3] float32 unit normal (0 where not covered)
    covered: np.ndarray  # [T, T] bool: the texel centre lies in some triangle


_VS = """#version 330
in vec2 in_uv;
in vec3 in_pos;
in vec3 in_nrm;
out vec3 v_pos;
out vec3 v_nrm;
void main() {
    v_pos = in_pos;
    v_nrm = in_nrm;
    gl_Position = vec4(in_uv * 2.0 - 1.0, 0.0, 1.0);
}
"""
_FS = """#version 330
in vec3 v_pos;
in vec3 v_nrm;
layout(location = 0) out vec4 o_pos;
layout(location = 1) out vec4 o_nrm;
void main() {
    o_pos = vec4(v_pos, 1.0);   // alpha 1 marks a covered texel
    o_nrm = vec4(v_nrm, 0.0);
}
"""


def rasterize_atlas(mesh: UVMesh, size: int) -> TexelMap:
    """Draw the atlas at ``size``×``size``: per texel the interpolated world position and normal.

    Only texels whose centre falls inside a triangle are covered (the GL rule); the half-covered texels along
    chart borders are filled from their covered neighbours by the bake (:func:`gsv3d_pl.export.bake.fill_texture`).
    """
    from datamodules.gl_context import get_gl_context

    ctx = get_gl_context()
    data = np.concatenate([mesh.uvs, mesh.vertices, mesh.normals], axis=1).astype(np.float32)  # [V, 8]
    prog = ctx.program(vertex_shader=_VS, fragment_shader=_FS)
    vbo = ctx.buffer(np.ascontiguousarray(data).tobytes())
    ibo = ctx.buffer(np.ascontiguousarray(mesh.faces, np.uint32).tobytes())
    vao = ctx.vertex_array(prog, [(vbo, "2f 3f 3f", "in_uv", "in_pos", "in_nrm")], index_buffer=ibo,
                           index_element_size=4)
    targets = [ctx.texture((size, size), 4, dtype="f4") for _ in range(2)]
    fbo = ctx.framebuffer(color_attachments=targets)
    try:
        fbo.use()
        ctx.viewport = (0, 0, size, size)
        ctx.disable(ctx.DEPTH_TEST | ctx.CULL_FACE | ctx.BLEND)
        fbo.clear(0.0, 0.0, 0.0, 0.0)
        vao.render()
        out = [np.frombuffer(fbo.read(components=4, dtype="f4", attachment=i), np.float32).reshape(size, size, 4)
               for i in range(2)]
    finally:
        for r in (vao, fbo, *targets, ibo, vbo, prog):
            r.release()
    # GL rows run bottom-up (window y = UV v); the image's row 0 is the top (v = 1).
    pos, nrm = out[0][::-1], out[1][::-1]
    covered = pos[..., 3] > 0.5
    n = nrm[..., :3]
    n = n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
    return TexelMap(position=np.ascontiguousarray(pos[..., :3] * covered[..., None]),
                    normal=np.ascontiguousarray(n * covered[..., None]), covered=np.ascontiguousarray(covered))
