"""How many triangles a mesh file holds at least, read from its header: ``max_faces`` refuses a 2M-face file before
trimesh parses it (a full parse of such a file peaks at 1-1.5 GB).

:func:`face_count_lower_bound` never reads the geometry: GLB's JSON chunk (the accessor counts of the primitives
the scene uses), a small .gltf's JSON, PLY's ``element face N``, OFF's counts line, binary STL's triangle count. OBJ
and ASCII STL have no header, so their face lines are counted with ``bytes.count`` over the file, a fraction of a
second for 100 MB. Each number is a lower bound of what :func:`datamodules.mesh_io.load_mesh` counts (polygons
become two or more triangles), so a file it refuses is one the full parse would refuse too. Anything the
function does not understand gives None, and the full parse decides.
"""

from __future__ import annotations

import json
import os
import struct

__all__ = ["face_count_lower_bound"]

_MAX_JSON = 64 * 2**20  # a larger glTF JSON is left to the full parse (it is the parse, not a header)
_CHUNK = 16 * 2**20


def face_count_lower_bound(path: str | os.PathLike) -> int | None:
    """A lower bound of the triangles in the mesh file ``path``, from its header; None when unknown."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    reader = {".glb": _glb, ".gltf": _gltf, ".ply": _ply, ".obj": _obj, ".off": _off, ".stl": _stl}.get(ext)
    if reader is None:
        return None
    try:
        with open(path, "rb") as f:
            return reader(f)
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError, struct.error, RecursionError):
        return None  # malformed: the full parse gives the reason


def _gltf_triangles(doc: dict) -> int:
    """Triangles of the meshes reachable from the glTF's scene, each mesh counted once (instances may add more)."""
    accessors, meshes, nodes = doc.get("accessors", []), doc.get("meshes", []), doc.get("nodes", [])
    scenes = doc.get("scenes") or [{"nodes": list(range(len(nodes)))}]
    stack = list(scenes[int(doc.get("scene", 0))].get("nodes", []))
    seen_nodes, used = set(), set()
    while stack:
        n = int(stack.pop())
        if n in seen_nodes:
            continue
        seen_nodes.add(n)
        node = nodes[n]
        if "mesh" in node:
            used.add(int(node["mesh"]))
        stack += node.get("children", [])
    total = 0
    for m in used:
        for prim in meshes[m].get("primitives", []):
            acc = prim["indices"] if "indices" in prim else prim["attributes"]["POSITION"]
            count = int(accessors[int(acc)]["count"])
            mode = int(prim.get("mode", 4))
            total += count // 3 if mode == 4 else max(count - 2, 0) if mode in (5, 6) else 0
    return total


def _glb(f) -> int | None:
    magic, _, _, chunk_len, chunk_type = struct.unpack("<4sIIII", f.read(20))
    if magic != b"glTF" or chunk_type != 0x4E4F534A or chunk_len > _MAX_JSON:  # "JSON"
        return None
    return _gltf_triangles(json.loads(f.read(chunk_len)))


def _gltf(f) -> int | None:
    if os.fstat(f.fileno()).st_size > _MAX_JSON:
        return None
    return _gltf_triangles(json.loads(f.read()))


def _ply(f) -> int | None:
    head = f.read(65536)
    end = head.find(b"end_header")
    if not head.startswith(b"ply") or end < 0:
        return None
    for line in head[:end].decode("ascii", "replace").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "element" and parts[1] == "face":
            return int(parts[2])
    return 0


def _off(f) -> int | None:
    words = []
    for line in f.read(65536).decode("ascii", "replace").splitlines():
        words += line.split("#")[0].split()
        if len(words) >= 3 + bool(words and words[0].endswith("OFF")):
            break
    if words and words[0].endswith("OFF"):
        words = words[1:]
    return int(words[1]) if len(words) >= 2 else None


def _count_lines(f, tokens: tuple[bytes, ...]) -> int:
    """Occurrences of the tokens in the file, in chunks (a token cut by a chunk boundary is counted once)."""
    keep = max(len(t) for t in tokens) - 1
    carry, total = b"\n" * keep, 0
    while chunk := f.read(_CHUNK):
        data = carry + chunk
        total += sum(data.count(t) for t in tokens)
        carry = data[-keep:]
    return total


def _obj(f) -> int:
    return _count_lines(f, (b"\nf ", b"\nf\t"))


def _stl(f) -> int | None:
    head = f.read(84)
    size = os.fstat(f.fileno()).st_size
    if len(head) == 84 and size == 84 + 50 * struct.unpack("<I", head[80:84])[0]:
        return struct.unpack("<I", head[80:84])[0]  # binary STL: the count is in the header
    if not head.lstrip().lower().startswith(b"solid"):
        return None
    f.seek(0)
    return _count_lines(f, (b"endfacet",))
