"""Where the objects come from, and which split each belongs to.

Sources (any combination): the generated toy set (``toy_objects``), a uid list file, LVIS categories
(``objaverse.load_lvis_annotations()``), and a folder of mesh files (``mesh_dir``): either every mesh file in it
(``mesh_layout: files``) or Google Scanned Objects' ``<object>/meshes/model.obj`` folders (``mesh_layout: gso``),
optionally narrowed to the names of a list file (``mesh_list``). A Z-up ``mesh_dir`` (GSO) is rotated once into
+Y-up GLB copies under ``converted_dir``, which the renders and the geometry metrics then read. Uids resolve through the
``objaverse`` cache layout ``<objaverse_root>/hf-objaverse-v1/{object-paths.json.gz, glbs/...}``; the package's
``_VERSIONED_PATH`` is redirected at call time (:func:`objaverse_root`), so a bare objaverse cache works offline.

Splits hash the uid (:func:`uid_fraction`), so an object keeps its split on every machine and as the set grows.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["MESH_EXTS", "MESH_LAYOUTS", "GSO_MESH", "ObjectSources", "objaverse_root", "read_name_list",
           "split_objects", "uid_fraction", "uid_seed", "uid_filename"]

MESH_EXTS = (".glb", ".gltf", ".obj", ".ply", ".stl", ".off")
MESH_LAYOUTS = ("files", "gso")
GSO_MESH = os.path.join("meshes", "model.obj")  # Google Scanned Objects: <root>/<object>/meshes/model.obj
# mesh_up_axis: null takes the layout's convention (GSO's scans are Z-up, in metres).
_LAYOUT_UP_AXIS = {"files": "y", "gso": "z"}


# A uid is used as a file name as it is only when it cannot leave its folder or hide: these characters, no leading
# dot (".", "..", "..x"), at most 200 characters. Every other uid gets an encoded name (see uid_filename).
_PLAIN_UID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}")


def uid_filename(uid: str) -> str:
    """The file-name stem of a uid in the caches: the uid itself when it is plain (Objaverse's hex uids, GSO names,
    ``a__b`` mesh paths), else a percent-encoded form that stays inside its folder.

    Deterministic and one-to-one: every encoded form contains ``%`` and a plain uid never does; a form longer than
    200 characters is cut and ends in ``%%`` + a hash (``%%`` never occurs in percent-encoding). A hostile uid such
    as ``..x``, ``../../etc`` or ``a/b`` cannot name a path outside ``objects/``. In caches written before uids were
    escaped, only plain uids (characters ``[A-Za-z0-9_.-]``, no leading dot, 1 to 200 characters) keep their
    paths; any other uid is rendered (and encoded) again, once, under its escaped name.
    """
    if _PLAIN_UID.fullmatch(uid):
        return uid
    safe = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-"
    raw = uid.encode("utf-8", "surrogatepass")
    enc = "".join(chr(b) if chr(b) in safe and not (i == 0 and b == 0x2E) else f"%{b:02X}" for i, b in enumerate(raw))
    if len(enc) > 200:
        enc = enc[:160] + "%%" + hashlib.sha1(raw).hexdigest()[:20]
    return enc or "%"  # the empty uid: "%" alone is no percent-encoding of anything else


def uid_fraction(uid: str, salt: str = "") -> float:
    """Deterministic pseudo-uniform number in [0, 1) from a uid (stable across machines and Python runs)."""
    h = hashlib.sha1(f"{salt}{uid}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def uid_seed(uid: str) -> int:
    """A 56-bit RNG seed from a uid (the object's random extra cameras)."""
    return int.from_bytes(hashlib.sha1(uid.encode()).digest()[:7], "big")


def read_name_list(path: str, key: str) -> list[str]:
    """Names from a list file: one per line (``#`` starts a comment, blank lines are skipped) or a JSON list.

    ``key`` (e.g. ``data.init_args.uids_file``) names the setting in the error for a missing file.
    """
    full = os.path.expanduser(path)
    if not os.path.isfile(full):
        raise FileNotFoundError(f"{key}={path!r} does not exist")
    text = Path(full).read_text()
    if text.lstrip().startswith("["):
        return [str(u) for u in json.loads(text)]
    return [ln.split("#")[0].strip() for ln in text.splitlines() if ln.split("#")[0].strip()]


@contextlib.contextmanager
def objaverse_root(root: str | os.PathLike) -> Iterator[Any]:
    """Temporarily point the ``objaverse`` package at ``<root>/hf-objaverse-v1`` (it reads the global at call time)."""
    import objaverse

    old = objaverse._VERSIONED_PATH
    objaverse._VERSIONED_PATH = os.path.join(os.path.expanduser(os.fspath(root)), "hf-objaverse-v1")
    try:
        yield objaverse
    finally:
        objaverse._VERSIONED_PATH = old


@dataclass
class ObjectSources:
    """The requested objects of a datamodule; field meanings as in ``ObjaverseDataModule``'s arguments, plus
    ``converted_dir``: where a Z-up ``mesh_dir``'s +Y-up copies go (the datamodule passes ``<cache_dir>/y_up``).

    Error messages name the ``data.init_args`` key to change.
    """

    objaverse_root: str
    mesh_dir: str | None = None
    uids_file: str | None = None
    lvis_categories: list[str] | None = None
    toy_objects: int = 0
    max_objects: int | None = None
    download: bool = False
    download_processes: int = 4
    mesh_layout: str = "files"
    mesh_list: str | None = None
    mesh_up_axis: str | None = None
    converted_dir: str | None = None

    def __post_init__(self) -> None:
        if self.mesh_layout not in MESH_LAYOUTS:
            raise ValueError(f"data.init_args.mesh_layout must be one of {MESH_LAYOUTS}, got {self.mesh_layout!r}")
        if self.mesh_up_axis not in (None, "y", "z"):
            raise ValueError(f"data.init_args.mesh_up_axis must be y, z or null (the layout's: files y, gso z), "
                             f"got {self.mesh_up_axis!r}")
        if self.mesh_list and not self.mesh_dir:
            raise ValueError("data.init_args.mesh_list selects objects of data.init_args.mesh_dir: set mesh_dir too")

    @property
    def up_axis(self) -> str:
        """The up axis of ``mesh_dir``'s files: ``mesh_up_axis``, else the layout's (files: y, gso: z)."""
        return self.mesh_up_axis or _LAYOUT_UP_AXIS[self.mesh_layout]

    def mesh_dir_objects(self) -> list[tuple[str, str]]:
        """[(uid, source mesh path)] of ``mesh_dir``, narrowed to ``mesh_list`` (in the list's order) when set.

        ``files``: every mesh file, uid = relative path without extension (``/`` -> ``__``). ``gso``: every
        ``<object>/meshes/model.obj``, uid = the object's folder name.
        """
        root = Path(os.path.expanduser(self.mesh_dir))
        if not root.is_dir():
            what = (": point it at your local Google Scanned Objects copy (<mesh_dir>/<object>/meshes/model.obj; "
                    "docs/evaluation.md)" if self.mesh_layout == "gso" else "")
            raise FileNotFoundError(f"data.init_args.mesh_dir={self.mesh_dir!r} is not a folder{what}")
        out = self._gso_objects(root) if self.mesh_layout == "gso" else self._mesh_files(root)
        return self._select(out) if self.mesh_list else out

    def _mesh_files(self, root: Path) -> list[tuple[str, str]]:
        out = []
        for p in sorted(root.rglob("*")):
            if p.suffix.lower() in MESH_EXTS and p.is_file():
                uid = str(p.relative_to(root).with_suffix("")).replace(os.sep, "__")
                out.append((uid, str(p)))
        if not out:
            raise FileNotFoundError(f"data.init_args.mesh_dir={self.mesh_dir!r} holds no {'/'.join(MESH_EXTS)} files")
        return out

    def _gso_objects(self, root: Path) -> list[tuple[str, str]]:
        out = [(d.name, str(d / GSO_MESH)) for d in sorted(root.iterdir()) if (d / GSO_MESH).is_file()]
        if out:
            return out
        # The usual mistake: a folder one level above or below the object folders.
        deeper = sorted({p.parents[2] for p in root.glob(os.path.join("*", "*", GSO_MESH))})
        if (root / GSO_MESH).is_file():
            hint = f"; it is one object's folder: point mesh_dir at its parent {str(root.parent)!r}"
        elif deeper:
            hint = f"; the object folders are one level down, in {str(deeper[0])!r}: point mesh_dir there"
        else:
            hint = (". Unzip each GSO object into a folder named after it (<mesh_dir>/<object>/meshes/model.obj, "
                    "<mesh_dir>/<object>/materials/textures/texture.png), or use mesh_layout: files for other folders")
        raise FileNotFoundError(f"data.init_args.mesh_dir={self.mesh_dir!r} has no <object>/{GSO_MESH} "
                                f"(mesh_layout: gso, Google Scanned Objects' layout){hint}")

    def _select(self, objs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        names = list(dict.fromkeys(read_name_list(self.mesh_list, "data.init_args.mesh_list")))
        if not names:
            raise ValueError(f"data.init_args.mesh_list={self.mesh_list!r} lists no objects")
        found = dict(objs)
        missing = [n for n in names if n not in found]
        if missing:
            what = "object folders" if self.mesh_layout == "gso" else "uids (relative paths without extension)"
            raise FileNotFoundError(
                f"data.init_args.mesh_list={self.mesh_list!r}: {len(missing)} of {len(names)} names are not "
                f"{what} of mesh_dir={self.mesh_dir!r}, e.g. {missing[:5]}; mesh_dir has e.g. {list(found)[:5]}")
        return [(n, found[n]) for n in names]

    def converted_path(self, uid: str) -> str:
        """Where the +Y-up GLB copy of a Z-up ``mesh_dir`` object lives: ``<converted_dir>/<hash of mesh_dir>/
        <uid>.glb`` (the hash keeps two folders with the same object names apart)."""
        if self.converted_dir is None:
            raise ValueError("ObjectSources.converted_dir is needed for a Z-up mesh_dir (the rotated copies)")
        tag = hashlib.sha1(str(Path(os.path.expanduser(self.mesh_dir)).resolve()).encode()).hexdigest()[:10]
        return os.path.join(os.path.expanduser(self.converted_dir), tag, f"{uid_filename(uid)}.glb")

    def _y_up_objects(self, objs: list[tuple[str, str]], convert: bool) -> list[tuple[str, str]]:
        """Swap each source path for its +Y-up copy, writing copies that are missing or older than their source.

        A source that cannot be loaded keeps its own path, so the renderer records the real reason in
        ``skipped.jsonl``.
        """
        from tqdm.auto import tqdm

        from datamodules.mesh_io import BadMeshError, write_y_up_copy

        stale = {u for u, p in objs if convert and _stale(self.converted_path(u), p)}
        bar = tqdm(total=len(stale), desc=f"{self.up_axis}-up -> +Y-up copies", unit="obj", disable=not stale)
        out = []
        for uid, src in objs:
            dst = self.converted_path(uid)
            if uid in stale:
                try:
                    write_y_up_copy(src, dst, self.up_axis)
                except BadMeshError as e:
                    log.warning("cannot rotate %s (%s): %s", uid, src, e)
                    dst = src
                bar.update()
            out.append((uid, dst))
        bar.close()
        return out

    def requested_uids(self) -> list[str]:
        """Objaverse uids from toy set, uids_file and LVIS categories, de-duplicated in order (no file reads
        beyond the lists themselves)."""
        uids: list[str] = []
        if self.toy_objects:
            from datamodules.toy import toy_uid

            uids += [toy_uid(i) for i in range(self.toy_objects)]
        if self.uids_file:
            uids += read_name_list(self.uids_file, "data.init_args.uids_file")
        if self.lvis_categories:
            uids += self._lvis_uids()
        return list(dict.fromkeys(uids))

    def _lvis_uids(self) -> list[str]:
        lvis_file = os.path.join(self.objaverse_root, "hf-objaverse-v1", "lvis-annotations.json.gz")
        if not os.path.exists(lvis_file) and not self.download:
            raise FileNotFoundError(
                f"data.init_args.lvis_categories needs {lvis_file}; set data.init_args.download=true or fetch it: "
                f"python -c \"import objaverse; objaverse._VERSIONED_PATH='{os.path.dirname(lvis_file)}'; "
                "objaverse.load_lvis_annotations()\"")
        with objaverse_root(self.objaverse_root) as ov:
            lvis = ov.load_lvis_annotations()
        unknown = [c for c in self.lvis_categories if c not in lvis]
        if unknown:
            raise KeyError(f"data.init_args.lvis_categories: unknown categories {unknown[:5]} "
                           f"(see {lvis_file} for the names)")
        return [u for c in self.lvis_categories for u in lvis[c]]

    def objects(self, resolve_paths: bool) -> list[tuple[str, str | None]]:
        """[(uid, mesh path)] for every requested object, limited to ``max_objects``. Without ``resolve_paths``
        the objaverse uids have path None (nothing is read or generated); with it, the toy set is generated and
        missing objects are downloaded (``download``) or reported. A Z-up ``mesh_dir``'s objects come with the paths of
        their +Y-up copies, which ``resolve_paths`` writes."""
        objs: list[tuple[str, str | None]] = [(u, None) for u in self.requested_uids()]
        if self.mesh_dir:
            local = self.mesh_dir_objects()
            objs += local if self.up_axis == "y" else self._y_up_objects(local, convert=resolve_paths)
        objs = objs[: self.max_objects] if self.max_objects else objs
        need = [u for u, p in objs if p is None]
        if not resolve_paths or not need:
            return objs
        if self.toy_objects:
            from datamodules.toy import generate_toy_objects

            generate_toy_objects(self.objaverse_root, self.toy_objects)
        local = self._objaverse_paths(need)
        return [(u, p if p is not None else local[u]) for u, p in objs]

    def _objaverse_paths(self, need: list[str]) -> dict[str, str]:
        """uid -> local file in the objaverse cache, downloading the missing ones when ``download`` is set."""
        vroot = os.path.join(self.objaverse_root, "hf-objaverse-v1")
        paths_file = os.path.join(vroot, "object-paths.json.gz")
        if not os.path.exists(paths_file) and not self.download:
            raise FileNotFoundError(
                f"{paths_file} is missing: data.init_args.objaverse_root={self.objaverse_root!r} is not an objaverse "
                "cache. Point objaverse_root at one, or set data.init_args.download=true to fetch the index.")
        with objaverse_root(self.objaverse_root) as ov:
            if os.path.exists(paths_file):
                with gzip.open(paths_file, "rb") as f:
                    paths = json.load(f)
            else:
                paths = ov._load_object_paths()  # download: true fetches the index
            unknown = [u for u in need if u not in paths]
            if unknown:
                raise KeyError(f"{len(unknown)} uids are not in {paths_file}, e.g. {unknown[:5]}")
            local = {u: os.path.join(vroot, paths[u]) for u in need}
            missing = [u for u in need if not os.path.exists(local[u])]
            if missing and not self.download:
                raise FileNotFoundError(
                    f"{len(missing)} of {len(need)} objects are not in the objaverse cache {vroot}, e.g. "
                    f"{missing[:5]}. Fetch them with data.init_args.download=true (objaverse.load_objects), or: "
                    f"python -c \"import objaverse; objaverse._VERSIONED_PATH='{vroot}'; "
                    "objaverse.load_objects(UIDS, download_processes=8)\"")
            if missing:
                local.update(ov.load_objects(missing, download_processes=self.download_processes))
        return local


def _stale(copy: str, src: str) -> bool:
    """The copy is missing or older than its source's files (the OBJ, its MTL and GSO's texture folder)."""
    if not os.path.exists(copy):
        return True
    deps = [Path(src), Path(src).with_suffix(".mtl"), *(Path(src).parent.parent / "materials" / "textures").glob("*")]
    newest = max((p.stat().st_mtime for p in deps if p.is_file()), default=0.0)
    return os.path.getmtime(copy) < newest


def split_objects(objects: list[tuple[str, str]], val_fraction: float, test_fraction: float
                  ) -> dict[str, list[tuple[str, str]]]:
    """Deterministic train/val/test split of [(uid, file)] by uid hash.

    Small sets (the toy set, tests) can hash into an empty val or test split: it then gets the train object with
    the smallest hash, so every split with a non-zero fraction is non-empty while train keeps at least one object.
    """
    def split_of(uid: str) -> str:
        f = uid_fraction(uid, "split")
        if f < val_fraction:
            return "val"
        return "test" if f < val_fraction + test_fraction else "train"

    splits: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "test": []}
    for obj in objects:
        splits[split_of(obj[0])].append(obj)
    by_hash = sorted(objects, key=lambda x: uid_fraction(x[0], "split"))
    for name, frac in (("val", val_fraction), ("test", test_fraction)):
        if frac > 0 and not splits[name] and len(splits["train"]) > 1:
            moved = next(x for x in by_hash if x in splits["train"])
            splits["train"].remove(moved)
            splits[name].append(moved)
    return splits
