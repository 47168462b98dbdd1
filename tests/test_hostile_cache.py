"""A cache that repairs itself: entries that do not read back are found and rendered (or encoded) again, read errors
name the file and the command, uids never leave objects/, two prepares share the work, huge meshes are refused
from their header."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import trimesh

import datamodules.claims as claims
import datamodules.mesh_io as mesh_io
import datamodules.render_cache as render_cache
from datamodules import ObjaverseDataModule
from datamodules.claims import claim_path, release, try_claim
from datamodules.latent_cache import check_latent_file, latent_file
from datamodules.mesh_io import BadMeshError, load_mesh
from datamodules.render_cache import cache_read_error, check_object_file, object_file, read_cached_object
from datamodules.sources import uid_filename

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPAIR = "gsv3d data prepare --config"


def _dm(tmp_path, n=4, **kw) -> ObjaverseDataModule:
    args = dict(resolution=16, num_extra_views=0, cache_dir=str(tmp_path / "cache"), toy_objects=n, num_workers=0,
                batch_size=1, val_fraction=0.0, test_fraction=0.0)
    return ObjaverseDataModule(**{**args, **kw})


def _encode(calls):
    """A fake VAE that records how many views it encodes (21 per object)."""
    def encode(x):  # [B, 3, 16, 16] -> [B, 4, 2, 2]
        calls.append(len(x))
        return torch.nn.functional.avg_pool2d(torch.cat([x, x[:, :1]], 1), 8)
    return encode


def _with_latents(tmp_path, n=4):
    """A prepared toy cache with every object's latents encoded; returns (dm, encoder calls)."""
    dm = _dm(tmp_path, n)
    dm.prepare_data()
    dm.setup()
    calls: list[int] = []
    dm.set_latent_encoder(_encode(calls), key="fakevae")
    dm._ensure_latents()
    assert sum(calls) == 21 * n
    return dm, calls


def _truncate(path) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


def _config(tmp_path, n=4) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
model:
  class_path: lightning.pytorch.demos.boring_classes.BoringModel  # parsed, never built
data:
  class_path: datamodules.ObjaverseDataModule
  init_args:
    toy_objects: {n}
    resolution: 16
    num_extra_views: 0
    cache_dir: {tmp_path / 'cache'}
""")
    return cfg


# ---- detection and repair ---------------------------------------------------------------------------------------

def test_prepare_repairs_truncated_npz_and_latent(tmp_path, capsys):
    from gsv3d_pl.tools.data import main

    dm, calls = _with_latents(tmp_path)
    uids = [u for u, _ in dm.splits["train"]]
    bad_npz, bad_lat = dm.object_file(uids[0]), latent_file(dm.latent_dir, uids[1])
    _truncate(bad_npz)
    _truncate(bad_lat)
    assert check_object_file(bad_npz) and check_latent_file(bad_lat)
    assert main(["prepare", "--config", str(_config(tmp_path))]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"rendered=1 skipped=0 repaired=2 cache={dm.cache_path}"
    assert check_object_file(bad_npz) is None and read_cached_object(bad_npz)["images"].shape == (21, 16, 16, 3)
    assert not os.path.exists(bad_lat)  # prepare builds no VAE: the next run encodes it
    # the next run encodes the removed latent file (the re-rendered object's views are the same: its latents stay) ...
    dm.set_latent_encoder(_encode(calls), key="fakevae")
    n = sum(calls)
    dm._ensure_latents()
    assert sum(calls) == n + 21 and check_latent_file(bad_lat) is None
    # ... and a second prepare finds nothing to repair
    assert main(["prepare", "--config", str(_config(tmp_path))]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("rendered=0 skipped=0 repaired=0 cache=")


def test_encoding_treats_a_corrupt_latent_as_missing(tmp_path):
    dm, calls = _with_latents(tmp_path)
    uid = dm.splits["train"][2][0]
    _truncate(latent_file(dm.latent_dir, uid))
    dm.set_latent_encoder(_encode(calls), key="fakevae")  # a new training run on the same cache
    n = sum(calls)
    ds = dm._dataset("train")
    assert sum(calls) == n + 21  # that object only, re-encoded
    i = [u for u, _ in ds.files].index(uid)
    assert ds[i]["target_latents"].shape == (21, 4, 2, 2)


def test_setup_renders_a_corrupt_entry_again(tmp_path):
    dm = _dm(tmp_path)
    dm.prepare_data()
    uid = dm.sources.requested_uids()[3]
    _truncate(dm.object_file(uid))
    dm2 = _dm(tmp_path)  # a training run that skips prepare_data
    dm2.setup()
    assert check_object_file(dm2.object_file(uid)) is None
    assert sorted(u for u, _ in dm2.splits["train"]) == sorted(dm.sources.requested_uids())
    assert dm2._dataset("train")[0]["target_images"].shape == (21, 3, 16, 16)


def test_read_errors_name_the_file_and_the_command(tmp_path):
    dm, calls = _with_latents(tmp_path)
    ds = dm._dataset("train")
    uid = ds.files[0][0]
    # a latent file cut short while training: today's "Failed to read all data for array" named no file
    lat = latent_file(dm.latent_dir, uid)
    _truncate(lat)
    with pytest.raises(RuntimeError) as e:
        ds[0]
    assert lat in str(e.value) and REPAIR in str(e.value)
    # a render entry cut short before the latents are encoded: today a bare zipfile.BadZipFile
    npz = dm.object_file(ds.files[1][0])
    _truncate(npz)
    dm.set_latent_encoder(_encode(calls), key="fakevae2")
    with pytest.raises(RuntimeError) as e:
        dm._ensure_latents()
    assert npz in str(e.value) and REPAIR in str(e.value)


def test_damage_inside_an_entry_is_repaired_after_a_failed_read(tmp_path):
    """The quick check reads the index only; a failed read in training makes the next prepare decode it in full."""
    dm = _dm(tmp_path)
    dm.prepare_data()
    dm.setup()
    ds = dm._dataset("train")
    uid, path = ds.files[1]
    data = bytearray(Path(path).read_bytes())
    mid = len(data) // 3
    data[mid: mid + 256] = bytes(range(256))  # inside the PNG bytes; the zip index at the end is intact
    Path(path).write_bytes(bytes(data))
    assert check_object_file(path) is None
    with pytest.raises(RuntimeError) as e:
        ds[1]
    assert path in str(e.value) and REPAIR in str(e.value)
    dm.prepare_data()
    assert dm.prepare_stats["repaired"] == 1 and dm.prepare_stats["rendered"] == 1
    assert read_cached_object(path)["images"].shape == (21, 16, 16, 3)
    dm.prepare_data()
    assert dm.prepare_stats["rendered"] == 0  # the read-error record was consumed


def test_read_errors_appended_during_a_prepare_are_kept(tmp_path, monkeypatch):
    """A training run that fails a read while a prepare runs keeps its record; records of objects this prepare did
    not check, and those moved aside by a prepare that crashed, are kept too."""
    dm = _dm(tmp_path)
    dm.prepare_data()
    dm.setup()
    (uid0, p0), (uid1, p1) = dm._dataset("train").files[:2]
    cache_read_error(p0, uid0, OSError("boom"))
    errors = Path(dm.cache_path) / "read_errors.jsonl"
    with open(errors, "a") as f:
        f.write(json.dumps({"uid": "elsewhere", "path": "x", "error": "e"}) + "\n")
    crashed = errors.with_name(errors.name + ".0123.taken")  # moved aside by a prepare that did not finish
    crashed.write_text(json.dumps({"uid": "orphan", "path": "y", "error": "e"}) + "\n")
    real, late = render_cache.check_object_file, []

    def check(path, full=False):
        if not late:  # a training run fails to read uid1 while this prepare checks the entries
            late.append(cache_read_error(p1, uid1, OSError("late")))
        return real(path, full)

    monkeypatch.setattr(render_cache, "check_object_file", check)
    dm.prepare_data()
    assert late and dm.prepare_stats["rendered"] == 0
    uids = lambda: sorted(json.loads(line)["uid"] for line in errors.read_text().splitlines())  # noqa: E731
    assert uids() == sorted([uid1, "elsewhere", "orphan"])  # uid0 was checked in full: its record is consumed
    assert not list(Path(dm.cache_path).glob("*.taken"))
    dm.prepare_data()
    assert uids() == ["elsewhere", "orphan"]


# ---- uids never leave objects/ ------------------------------------------------------------------------------------

def test_uid_filenames_stay_in_their_folder():
    plain = ["0123abcdef0123abcdef0123abcdef01", "a__b", "Android_Figure_Chrome", "A-b_c.d", "x" * 200]
    assert [uid_filename(u) for u in plain] == plain  # existing caches keep their paths
    hostile = ["..x", ".", "..", ".hidden", "../../etc/passwd", "a/b", "a\\b", "", " x", "a b", "a%2Fb", "椅子",
               "x" * 201, "x" * 300 + "/", "nul\0"]
    names = [uid_filename(u) for u in hostile]
    assert len(set(names)) == len(hostile) and not set(names) & set(plain)
    for u, n in zip(hostile, names):
        assert "%" in n and n == uid_filename(u) and len(n) <= 200
        assert not n.startswith(".") and not {"/", "\\", "\0"} & set(n)
        f = os.path.normpath(object_file("/c", u))
        assert os.path.dirname(os.path.dirname(f)) == "/c/objects" and f.endswith(".npz"), (u, f)
        assert os.path.dirname(os.path.dirname(latent_file("/c/latents/k", u))) == "/c/latents/k"


def test_a_dot_dot_mesh_file_stays_in_objects(tmp_path):
    meshes = tmp_path / "meshes"
    meshes.mkdir()
    for name in ("..x.glb", "box.glb"):
        (meshes / name).write_bytes(trimesh.creation.box().export(file_type="glb"))
    dm = ObjaverseDataModule(resolution=16, num_extra_views=0, cache_dir=str(tmp_path / "cache"),
                             mesh_dir=str(meshes), num_workers=0)
    dm.prepare_data()
    assert dm.prepare_stats["rendered"] == 2
    found = sorted(str(p.relative_to(dm.cache_path)) for p in Path(dm.cache_path).rglob("*.npz"))
    assert found == ["objects/%2/%2E.x.npz", "objects/bo/box.npz"]
    assert not list(Path(dm.cache_path).glob("*.npz")) and not list((tmp_path / "cache").glob("*.npz"))
    dm.setup()
    assert sorted(u for s in dm.splits.values() for u, _ in s) == ["..x", "box"]


# ---- two prepares on one cache ------------------------------------------------------------------------------------

def test_claims_break_only_for_dead_or_stale_owners(tmp_path):
    d = str(tmp_path / "claims")
    assert try_claim(d, "a") and not try_claim(d, "a")  # held by a live process (this one)
    release(d, "a")
    assert try_claim(d, "a")
    release(d, "a")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    rec = {"host": socket.gethostname(), "pid": dead.pid, "start": None, "time": 0}
    Path(claim_path(d, "b")).write_text(json.dumps(rec))
    assert try_claim(d, "b")  # its owner is gone
    Path(claim_path(d, "c")).write_text(json.dumps({**rec, "host": "elsewhere", "pid": 1}))
    assert not try_claim(d, "c")  # another host: only the age tells
    os.utime(claim_path(d, "c"), (0, 0))
    assert try_claim(d, "c")


class _Crash(BaseException):
    """The process dies here."""


class _CrashAfterCreate:
    """``os`` for datamodules.claims, where the process dies right after a file appears at a path."""

    def __getattr__(self, name):
        return getattr(os, name)

    def open(self, path, flags, *a):
        os.close(os.open(path, flags, *a))
        raise _Crash

    def link(self, src, dst):
        os.link(src, dst)
        raise _Crash


def test_a_claim_is_never_left_empty(tmp_path, monkeypatch):
    """A claim appears with its record in it; an empty one (older versions, or one cut short) is stale in a minute,
    not CLAIM_STALE_S."""
    d = str(tmp_path / "claims")
    monkeypatch.setattr(claims, "os", _CrashAfterCreate())
    with pytest.raises(_Crash):
        try_claim(d, "a")
    monkeypatch.undo()
    rec = json.loads(Path(claim_path(d, "a")).read_text())  # whoever finds it can tell whether its owner is alive
    assert rec["pid"] == os.getpid() and rec["host"] == socket.gethostname()
    for text in ("", "{\"host\": "):
        Path(claim_path(d, "b")).write_text(text)
        assert not try_claim(d, "b")  # maybe being written
        t = time.time() - claims.EMPTY_STALE_S - 60
        os.utime(claim_path(d, "b"), (t, t))
        assert claims.EMPTY_STALE_S + 60 < claims.CLAIM_STALE_S and try_claim(d, "b")
        release(d, "b")


def test_a_live_owner_on_this_host_keeps_its_claim_however_old(tmp_path):
    d = str(tmp_path / "claims")
    assert try_claim(d, "a")
    os.utime(claim_path(d, "a"), (0, 0))  # a render that has taken longer than CLAIM_STALE_S
    assert not try_claim(d, "a")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        rec = {"host": socket.gethostname(), "pid": other.pid, "start": claims._start_time(other.pid), "time": 0}
        Path(claim_path(d, "b")).write_text(json.dumps(rec))
        os.utime(claim_path(d, "b"), (0, 0))
        assert not try_claim(d, "b")
    finally:
        other.kill()
        other.wait()
    assert try_claim(d, "b")  # its owner is gone now


@pytest.mark.parametrize("reclaimed", [False, True])
def test_breaking_a_stale_claim_never_removes_a_fresh_one(tmp_path, monkeypatch, reclaimed):
    """Another process breaks the stale claim and claims the object after this one judged the claim stale: the fresh
    claim stays (put back, or left alone when a third process claimed the free path meanwhile) and this process
    does not claim the object."""
    d = str(tmp_path / "claims")
    os.makedirs(d)
    path = claim_path(d, "a")
    Path(path).write_text(json.dumps({"host": "elsewhere", "pid": 1, "time": 0}))
    os.utime(path, (0, 0))  # stale: an owner on another host, long ago
    fresh = {"host": "elsewhere", "pid": 2, "time": time.time()}
    third = {"host": "elsewhere", "pid": 3, "time": time.time()}
    real = {f: getattr(os, f) for f in ("rename", "unlink", "link")}
    raced = []

    def put(rec):
        Path(path + ".new").write_text(json.dumps(rec))
        real["rename"](path + ".new", path)

    def racing(f):
        def call(src, dst=None, **kw):
            if f != "link" and src == path and not raced:  # about to break the stale claim
                raced.append(f)
                real["unlink"](path)  # ... which another process breaks first
                put(fresh)  # ... and claims the object
            if f == "link" and dst == path and src.endswith(".broken") and reclaimed:  # about to put it back
                put(third)
            return real[f](src, **kw) if dst is None else real[f](src, dst, **kw)
        return call

    for f in real:
        monkeypatch.setattr(os, f, racing(f))
    assert not try_claim(d, "a")
    monkeypatch.undo()
    assert raced and json.loads(Path(path).read_text()) == (third if reclaimed else fresh)
    assert os.listdir(d) == ["a.claim"]


_PREPARE = r'''
import os, sys, time
import datamodules.render_cache as rc
from gsv3d_pl.tools.data import main

log, meet, cfg = sys.argv[1:]
real = rc.render_object_to_cache

def counted(uid, path, out, settings):
    with open(log, "a") as f:
        f.write(f"{uid} {os.getpid()}\n")
    if not os.path.exists(os.path.join(meet, str(os.getpid()))):
        # the first render of each process waits for the other's: both are rendering at once
        open(os.path.join(meet, str(os.getpid())), "w").close()
        t = time.time()
        while len(os.listdir(meet)) < 2 and time.time() - t < 120:
            time.sleep(0.05)
    time.sleep(0.2)
    return real(uid, path, out, settings)

rc.render_object_to_cache = counted
sys.exit(main(["prepare", "--config", cfg]))
'''


@pytest.mark.slow  # two fresh interpreters importing lightning at once: ~20-90 s on 2 busy cores
def test_two_concurrent_prepares_render_each_object_once(tmp_path):
    n = 8
    script, log, meet = tmp_path / "prep.py", tmp_path / "renders.log", tmp_path / "meet"
    script.write_text(_PREPARE)
    meet.mkdir()
    from datamodules.toy import generate_toy_objects

    uids = generate_toy_objects(tmp_path / "cache" / "toy_objaverse", n)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(script), str(log), str(meet), str(_config(tmp_path, n))]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    renders = [line.split() for line in log.read_text().splitlines()]
    assert sorted(u for u, _ in renders) == sorted(uids)  # every object exactly once
    assert len({pid for _, pid in renders}) == 2  # and both processes rendered some
    lasts = [out.strip().splitlines()[-1] for out, _ in outs]
    assert sum(int(last.split()[0].removeprefix("rendered=")) for last in lasts) == n
    for _, err in outs:
        assert f"cached={n}" in err  # each one waited for the other's objects
    dm = _dm(tmp_path, n)
    assert all(check_object_file(dm.object_file(u)) is None for u in uids)
    assert not os.listdir(os.path.join(dm.cache_path, "claims"))


# ---- huge meshes refused from the header ----------------------------------------------------------------------------

def _glb_claiming(path, faces: int) -> None:
    """A real box GLB whose JSON says its index accessor has ``3 * faces`` entries (the body stays small)."""
    glb = trimesh.creation.box().export(file_type="glb")
    (json_len,) = struct.unpack("<I", glb[12:16])
    doc = json.loads(glb[20: 20 + json_len])
    for prim in doc["meshes"][0]["primitives"]:
        doc["accessors"][prim["indices"]]["count"] = 3 * faces
    js = json.dumps(doc).encode()
    js += b" " * (-len(js) % 4)
    rest = glb[20 + json_len:]
    body = struct.pack("<II", len(js), 0x4E4F534A) + js + rest
    Path(path).write_bytes(b"glTF" + struct.pack("<II", 2, 12 + len(body)) + body)


def _ply_claiming(path, faces: int) -> None:
    Path(path).write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 3\nproperty float x\n"
                           b"property float y\nproperty float z\nelement face " + str(faces).encode()
                           + b"\nproperty list uchar int vertex_indices\nend_header\n" + bytes(36)
                           + struct.pack("<Biii", 3, 0, 1, 2))


def test_max_faces_is_checked_before_the_parse(tmp_path, monkeypatch):
    _glb_claiming(tmp_path / "big.glb", 2_000_000)
    _ply_claiming(tmp_path / "big.ply", 2_000_000)
    (tmp_path / "big.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n" + "f 1 2 3\n" * 1500)
    (tmp_path / "small.glb").write_bytes(trimesh.creation.box().export(file_type="glb"))
    real, parsed = trimesh.load, []

    def load(path, *a, **k):
        parsed.append(os.path.basename(os.fspath(path)))
        return real(path, *a, **k)

    monkeypatch.setattr(trimesh, "load", load)
    for name in ("big.glb", "big.ply", "big.obj"):
        with pytest.raises(BadMeshError, match=r"too many faces .*max_faces=1000"):
            load_mesh(tmp_path / name, max_faces=1000)
    assert parsed == []  # refused from the header: trimesh never parsed them
    assert load_mesh(tmp_path / "small.glb", max_faces=12).num_faces == 12  # at the limit: loads
    assert parsed == ["small.glb"]
    with pytest.raises(BadMeshError, match="too many faces"):
        load_mesh(tmp_path / "small.glb", max_faces=11)
    assert mesh_io.face_count_lower_bound(tmp_path / "big.glb") == 2_000_000
