"""Toy-object generator: deterministic GLBs in the objaverse cache layout, readable by the objaverse package."""

from __future__ import annotations

import gzip
import hashlib
import json

import trimesh

from datamodules.sources import objaverse_root
from datamodules.toy import TOY_FAMILIES, generate_toy_objects, toy_uid


def test_layout_and_objaverse_api(tmp_path):
    uids = generate_toy_objects(tmp_path, num_objects=len(TOY_FAMILIES) + 2)
    assert len(set(uids)) == len(uids) and all(len(u) == 32 for u in uids)
    assert uids[0] == toy_uid(0)
    vroot = tmp_path / "hf-objaverse-v1"
    with gzip.open(vroot / "object-paths.json.gz", "rt") as f:
        paths = json.load(f)
    assert set(paths) == set(uids) and all(p.startswith("glbs/000-toy/") for p in paths.values())
    with objaverse_root(tmp_path) as ov:  # the real objaverse code path, offline
        got = ov.load_objects(uids[:3])
        lvis = ov.load_lvis_annotations()
    assert set(got) == set(uids[:3])
    assert sorted(lvis) == sorted(f"toy_{f}" for f in TOY_FAMILIES)
    # visuals: textured, vertex-coloured and multi-node objects are all present
    kinds, multi = set(), 0
    for u in uids:
        s = trimesh.load(vroot / paths[u], force="scene")
        multi += len(s.graph.nodes_geometry) > 1
        for g in s.geometry.values():
            kinds.add(g.visual.kind if g.visual.kind else "flat")
            if getattr(g.visual, "material", None) is not None and g.visual.material.baseColorTexture is not None:
                kinds.add("texture")
    assert {"texture", "vertex"} <= kinds and multi >= 5


def test_deterministic(tmp_path):
    a = generate_toy_objects(tmp_path / "a", num_objects=6)
    b = generate_toy_objects(tmp_path / "b", num_objects=6)
    assert a == b
    for u in a:
        fa = (tmp_path / "a" / "hf-objaverse-v1" / "glbs" / "000-toy" / f"{u}.glb").read_bytes()
        fb = (tmp_path / "b" / "hf-objaverse-v1" / "glbs" / "000-toy" / f"{u}.glb").read_bytes()
        assert hashlib.md5(fa).digest() == hashlib.md5(fb).digest()
