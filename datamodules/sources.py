"""Where the objects come from, and which split each belongs to.

Sources (any combination): the generated toy set (``toy_objects``), a uid list file, LVIS categories
(``objaverse.load_lvis_annotations()``), and a plain folder of mesh files (``mesh_dir``). Uids resolve through the
``objaverse`` cache layout ``<objaverse_root>/hf-objaverse-v1/{object-paths.json.gz, glbs/...}``; the package's
``_VERSIONED_PATH`` is redirected at call time (:func:`objaverse_root`), so a bare objaverse cache works offline.

Splits hash the uid (:func:`uid_fraction`), so an object keeps its split on every machine and as the set grows.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MESH_EXTS", "ObjectSources", "objaverse_root", "split_objects", "uid_fraction", "uid_seed"]

MESH_EXTS = (".glb", ".gltf", ".obj", ".ply", ".stl", ".off")


def uid_fraction(uid: str, salt: str = "") -> float:
    """Deterministic pseudo-uniform number in [0, 1) from a uid (stable across machines and Python runs)."""
    h = hashlib.sha1(f"{salt}{uid}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def uid_seed(uid: str) -> int:
    """A 56-bit RNG seed from a uid (the object's random extra cameras)."""
    return int.from_bytes(hashlib.sha1(uid.encode()).digest()[:7], "big")


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
    """The requested objects of a datamodule; field meanings as in ``ObjaverseDataModule``'s arguments.

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

    def mesh_dir_objects(self) -> list[tuple[str, str]]:
        """[(uid, path)] of every mesh file under ``mesh_dir``; uid = relative path without extension."""
        root = Path(os.path.expanduser(self.mesh_dir))
        if not root.is_dir():
            raise FileNotFoundError(f"data.init_args.mesh_dir={self.mesh_dir!r} is not a folder")
        out = []
        for p in sorted(root.rglob("*")):
            if p.suffix.lower() in MESH_EXTS and p.is_file():
                uid = str(p.relative_to(root).with_suffix("")).replace(os.sep, "__")
                out.append((uid, str(p)))
        if not out:
            raise FileNotFoundError(f"data.init_args.mesh_dir={self.mesh_dir!r} holds no {'/'.join(MESH_EXTS)} files")
        return out

    def requested_uids(self) -> list[str]:
        """Objaverse uids from toy set, uids_file and LVIS categories, de-duplicated in order (no file reads
        beyond the lists themselves)."""
        uids: list[str] = []
        if self.toy_objects:
            from datamodules.toy import toy_uid

            uids += [toy_uid(i) for i in range(self.toy_objects)]
        if self.uids_file:
            path = os.path.expanduser(self.uids_file)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"data.init_args.uids_file={self.uids_file!r} does not exist")
            text = Path(path).read_text()
            if text.lstrip().startswith("["):
                uids += [str(u) for u in json.loads(text)]
            else:
                uids += [ln.split("#")[0].strip() for ln in text.splitlines() if ln.split("#")[0].strip()]
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
        missing objects are downloaded (``download``) or reported."""
        objs: list[tuple[str, str | None]] = [(u, None) for u in self.requested_uids()]
        if self.mesh_dir:
            objs += self.mesh_dir_objects()
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
