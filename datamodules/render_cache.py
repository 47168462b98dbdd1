"""The render cache: every object rendered once into Q views, one ``.npz`` per object, and read back per sample.

Layout (``<cache_dir>/<tag>/``, where the tag hashes every setting that changes the pixels, so changing one
starts a new cache instead of mixing renders):

    manifest.json                    the settings behind the tag
    objects/<name[:2]>/<name>.npz    one file per object (written atomically): PNG-encoded RGBA views (straight
                                     alpha) and 16-bit PNG depth, c2w [Q,4,4], K [Q,3,3], orbit angles [21],
                                     normalisation (centre [3], scale), mesh path. ``name`` is the uid, or its
                                     escaped form when it could leave ``objects/`` (:func:`~datamodules.sources.
                                     uid_filename`)
    skipped.jsonl                    {"uid", "path", "reason", "transient"} per bad object (never retried unless
                                     asked; transient render errors are)
    claims/<name>.claim              held while one process renders the object (:mod:`datamodules.claims`)
    read_errors.jsonl                {"uid", "path", "error"} per failed read in training; the next prepare
                                     decodes these entries in full and re-renders the ones that fail (it
                                     moves the file aside first, to read_errors.jsonl.<random>.taken)
    latents/...                      optional VAE latents (:mod:`datamodules.latent_cache`)

The Q views are the 21-frame SV3D orbit (:mod:`gsv3d_pl.orbit`), then ``num_extra_views`` random cameras seeded by
the uid.

An entry that does not read back (a truncated or damaged file: a copy cut short, a full disk) is found by
:func:`check_object_file`, which reads the zip index only (thousands of files check in seconds), and is rendered
again by :func:`render_into_cache`.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import logging
import os
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.claims import claim_owner, release, try_claim
from datamodules.sources import uid_filename, uid_fraction, uid_seed
from gsv3d_pl.cameras import orbit_cameras, random_cameras
from gsv3d_pl.io import atomic_path, write_json_atomic
from gsv3d_pl.orbit import INPUT_FRAME, NUM_FRAMES

log = logging.getLogger(__name__)

__all__ = ["CACHE_FORMAT", "RENDER_ERROR", "REPAIR_HINT", "render_settings", "cache_folder", "object_file",
           "object_cameras", "render_object_to_cache", "read_cached_object", "check_object_file", "cache_read_error",
           "write_manifest", "read_skipped", "render_into_cache"]

CACHE_FORMAT = 1
RENDER_ERROR = "render error"  # prefix of skip reasons that are not the object's fault (retried next time)
REPAIR_HINT = "gsv3d data prepare --config <your config>"
# The arrays of one object file, as np.savez names them in the zip.
_NPZ_MEMBERS = ("rgba_png", "rgba_off", "depth_png", "depth_off", "depth_unit", "c2w", "K", "orbit_polars_rad",
                "orbit_azimuths_rad", "norm_center", "norm_scale", "elevation_deg", "mesh_path")
_READ_ERRORS = "read_errors.jsonl"


def render_settings(resolution: int, num_extra_views: int, elevation_deg: float | None,
                    elevation_range_deg: Sequence[float], extra_elevation_range_deg: Sequence[float], radius: float,
                    fov_deg: float, supersample: int, max_faces: int | None, max_texture_size: int,
                    min_view_pixels: int) -> dict[str, Any]:
    """Every setting that changes the cached pixels (JSON-serialisable; its hash names the cache folder)."""
    from datamodules.mesh_render import MeshRenderer

    cfg = {
        "format": CACHE_FORMAT, "resolution": int(resolution), "num_extra_views": int(num_extra_views),
        "elevation_deg": elevation_deg, "elevation_range_deg": list(elevation_range_deg),
        "extra_elevation_range_deg": list(extra_elevation_range_deg), "radius": float(radius),
        "fov_deg": float(fov_deg), "supersample": int(supersample), "max_faces": max_faces,
        "max_texture_size": int(max_texture_size), "min_view_pixels": int(min_view_pixels),
        # 16-bit depth quantisation step: covers depths up to radius + 2 with ~5e-5 world-unit steps
        "depth_unit": (float(radius) + 2.0) / 65535.0,
    }
    cfg["renderer"] = MeshRenderer(int(resolution), supersample=supersample, max_faces=max_faces,
                                   max_texture_size=max_texture_size).settings()
    return cfg


def cache_folder(cache_dir: str, settings: dict) -> str:
    """``<cache_dir>/r<res>_q<Q>_<hash of settings>``."""
    tag = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(cache_dir, f"r{settings['resolution']}_q{NUM_FRAMES + settings['num_extra_views']}_{tag}")


def object_file(cache_path: str, uid: str) -> str:
    """``<cache_path>/objects/<name[:2]>/<name>.npz`` with ``name = uid_filename(uid)``: never outside objects/."""
    name = uid_filename(uid)
    return os.path.join(cache_path, "objects", name[:2], f"{name}.npz")


def _encode_pngs(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[Q, H, W(, C)] uint8/uint16 -> concatenated PNG bytes [total] uint8 and offsets [Q+1] int64."""
    from PIL import Image

    blobs = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG", compress_level=1)  # uint16 -> "I;16"
        blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    return np.concatenate(blobs), offsets


def _decode_png(data: np.ndarray, offsets: np.ndarray, i: int) -> np.ndarray:
    from PIL import Image

    img = Image.open(io.BytesIO(data[offsets[i]: offsets[i + 1]].tobytes()))
    return np.asarray(img)


# ----------------------------------------------------------------------------------------------------------------
# rendering one object into the cache (runs in the main process or in a spawn worker)
# ----------------------------------------------------------------------------------------------------------------

_RENDERERS: dict = {}


def _renderer(resolution: int, supersample: int, max_faces: int | None):
    from datamodules.mesh_render import MeshRenderer

    key = (resolution, supersample, max_faces)
    if key not in _RENDERERS:
        _RENDERERS[key] = MeshRenderer(resolution, supersample=supersample, max_faces=max_faces)
    return _RENDERERS[key]


def object_cameras(uid: str, cfg: dict):
    """The Q cameras of one object: the 21-frame orbit, then ``num_extra_views`` random views (uid-seeded).

    Returns (orbit Cameras, c2w [Q, 4, 4], K [Q, 3, 3], elevation in degrees).
    """
    res = cfg["resolution"]
    if cfg["elevation_deg"] is None:
        lo, hi = cfg["elevation_range_deg"]
        elev = lo + (hi - lo) * uid_fraction(uid, "elevation")
    else:
        elev = float(cfg["elevation_deg"])
    orbit = orbit_cameras(NUM_FRAMES, elev, cfg["radius"], cfg["fov_deg"], res, res)
    c2w, K = orbit.c2w, orbit.K  # [21, 4, 4], [21, 3, 3]
    if cfg["num_extra_views"] > 0:
        g = torch.Generator().manual_seed(uid_seed(uid))
        extra = random_cameras(cfg["num_extra_views"], tuple(cfg["extra_elevation_range_deg"]),
                               (cfg["radius"], cfg["radius"]), cfg["fov_deg"], res, res, generator=g)
        c2w, K = torch.cat([c2w, extra.c2w]), torch.cat([K, extra.K])
    return orbit, c2w, K, elev


def render_object_to_cache(uid: str, mesh_path: str, out_path: str, cfg: dict) -> tuple[str, str | None]:
    """Render the Q views of one object and write ``out_path`` atomically.

    Returns (uid, None) on success or (uid, reason) for a bad object (nothing written). Never raises for bad
    content; GL/driver failures do raise (they are not the object's fault).
    """
    from datamodules.mesh_render import BadMeshError, load_mesh

    r = _renderer(cfg["resolution"], cfg["supersample"], cfg["max_faces"])
    try:
        mesh = load_mesh(mesh_path, max_faces=cfg["max_faces"], max_texture_size=cfg["max_texture_size"])
    except BadMeshError as e:
        return uid, str(e)
    orbit, c2w, K, elev = object_cameras(uid, cfg)
    rgba, depth = r.render_raw(mesh, c2w, K)  # [Q, H, W, 4] premultiplied uint8, [Q, H, W] float32
    covered = (rgba[..., 3] >= 128).reshape(len(rgba), -1).sum(1)  # [Q]
    if (covered < cfg["min_view_pixels"]).any():
        bad = np.nonzero(covered < cfg["min_view_pixels"])[0].tolist()
        return uid, f"blank render (views {bad[:5]} cover < {cfg['min_view_pixels']} px)"
    if not np.isfinite(depth).all():
        return uid, "non-finite depth"
    # Straight alpha so the PNGs are viewable and any background can be composited at load time.
    a = rgba[..., 3:].astype(np.float32)
    straight = np.where(a > 0, rgba[..., :3].astype(np.float32) * 255.0 / np.maximum(a, 1.0), 0.0)
    rgba_straight = np.concatenate([np.clip(np.round(straight), 0, 255).astype(np.uint8), rgba[..., 3:]], -1)
    unit = cfg["depth_unit"]
    if depth.max() / unit > 65535:
        return uid, f"depth {depth.max():.2f} exceeds the 16-bit depth range"
    depth_q = np.round(depth / unit).astype(np.uint16)  # [Q, H, W]
    rgba_png, rgba_off = _encode_pngs(rgba_straight)
    depth_png, depth_off = _encode_pngs(depth_q)
    with atomic_path(out_path) as tmp, open(tmp, "wb") as f:
        np.savez(
            f, rgba_png=rgba_png, rgba_off=rgba_off, depth_png=depth_png, depth_off=depth_off,
            depth_unit=np.float64(unit), c2w=c2w.numpy().astype(np.float32), K=K.numpy().astype(np.float32),
            orbit_polars_rad=orbit.polars_rad.numpy().astype(np.float32),
            orbit_azimuths_rad=orbit.azimuths_rad.numpy().astype(np.float32),
            norm_center=mesh.norm_center.astype(np.float64), norm_scale=np.float64(mesh.norm_scale),
            elevation_deg=np.float64(elev), mesh_path=np.array(os.path.abspath(mesh_path)),
        )
    return uid, None


# A job's outcome (besides the skip reason): rendered, repaired (rendered over a corrupt entry), done (another
# process rendered it meanwhile), busy (another process holds its claim: come back later).
_RENDERED, _REPAIRED, _DONE, _BUSY = "rendered", "repaired", "done", "busy"


def _stat(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _render_job(args) -> tuple[str, str | None, str]:
    """Render one object under its claim. ``seen`` is the stat of the entry when the caller found it missing (None)
    or corrupt: an entry that has changed since and reads back was written by another run, and is kept."""
    uid, path, out, cfg, claims_dir, seen = args
    name = os.path.basename(out)[: -len(".npz")]
    if not try_claim(claims_dir, name):
        return uid, None, _BUSY
    try:
        now = _stat(out)
        if now is not None and now != seen and check_object_file(out) is None:
            return uid, None, _DONE
        try:
            uid, reason = render_object_to_cache(uid, path, out, cfg)
        except Exception as e:  # a driver hiccup on one object must not kill a 10^5-object prepare
            reason = f"{RENDER_ERROR} ({type(e).__name__}: {str(e)[:200]})"
        if reason is not None and now is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(out)  # a corrupt entry that could not be rendered again must not be read in training
        return uid, reason, _REPAIRED if now is not None else _RENDERED
    finally:
        release(claims_dir, name)


def read_cached_object(path: str, background: Sequence[float] = (1.0, 1.0, 1.0)) -> dict:
    """Decode one cached object file.

    Returns numpy arrays: images [Q, H, W, 3] float32 on ``background``, alphas [Q, H, W] float32, depths [Q, H, W]
    float32, c2w [Q, 4, 4], K [Q, 3, 3], orbit_polars_rad [21], orbit_azimuths_rad [21], norm_center [3],
    norm_scale (float), mesh_path (str).
    """
    with np.load(path, allow_pickle=False) as z:
        d = {k: z[k] for k in z.files}
    Q = len(d["c2w"])
    rgba = np.stack([_decode_png(d["rgba_png"], d["rgba_off"], i) for i in range(Q)])  # [Q, H, W, 4] uint8
    depth = np.stack([_decode_png(d["depth_png"], d["depth_off"], i) for i in range(Q)])  # [Q, H, W] uint16
    alpha = rgba[..., 3].astype(np.float32) / 255.0
    bg = np.asarray(background, dtype=np.float32).reshape(-1)
    rgb = rgba[..., :3].astype(np.float32) / 255.0 * alpha[..., None] + (1.0 - alpha[..., None]) * bg
    return {
        "images": rgb, "alphas": alpha, "depths": depth.astype(np.float32) * np.float32(d["depth_unit"]),
        "c2w": d["c2w"], "K": d["K"], "orbit_polars_rad": d["orbit_polars_rad"],
        "orbit_azimuths_rad": d["orbit_azimuths_rad"], "norm_center": d["norm_center"],
        "norm_scale": float(d["norm_scale"]), "mesh_path": str(d["mesh_path"]),
    }


def check_object_file(path: str, full: bool = False) -> str | None:
    """Why one cached object file does not read back, or None when it does.

    Reads the zip index (np.savez's central directory, at the end of the file: a truncated file has none) and
    checks that every array is listed and lies inside the file. ``full`` also decodes every view.
    """
    try:
        size = os.path.getsize(path)
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
        names = {m.filename for m in members}
        missing = [k for k in _NPZ_MEMBERS if f"{k}.npy" not in names]
        if missing:
            return f"no {', '.join(missing)} in it"
        if any(m.header_offset + m.compress_size > size for m in members):
            return "truncated"
        if full:
            read_cached_object(path)
    except Exception as e:  # zipfile.BadZipFile, OSError, PIL's errors in a full check, ...
        return f"{type(e).__name__}: {e}"
    return None


def cache_read_error(path: str, uid: str, err: BaseException) -> RuntimeError:
    """The error for a cached object that fails to read in training or encoding: it names the file and the command
    that repairs it, and records the entry in ``read_errors.jsonl`` so that this command re-renders it even when
    the damage is inside the file (the quick check reads the index only)."""
    cache_path = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(path))))  # objects/<xx>/<name>
    with contextlib.suppress(OSError):  # a read-only cache still gets the message
        with open(os.path.join(cache_path, _READ_ERRORS), "a") as f:
            f.write(json.dumps({"uid": uid, "path": path, "error": f"{type(err).__name__}: {str(err)[:200]}"}) + "\n")
    return RuntimeError(f"cannot read the cached renders of {uid} in {path} ({type(err).__name__}: {err}). Repair the "
                        f"cache with `{REPAIR_HINT}`: it renders this object again.")


def _uid_of(line: bytes) -> str | None:
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return json.loads(line)["uid"]
    return None


def _take_read_errors(cache_path: str) -> dict[str, bytes]:
    """Move ``read_errors.jsonl`` aside (reads that fail from now on go to a new file), and read it together with any
    moved aside by a prepare that did not finish; returns {file moved aside: its complete lines}."""
    path = os.path.join(cache_path, _READ_ERRORS)
    with contextlib.suppress(OSError):  # none, or a read-only cache
        os.rename(path, f"{path}.{os.urandom(8).hex()}.taken")
    taken = {}
    for p in glob.glob(glob.escape(path) + ".*.taken"):
        with contextlib.suppress(FileNotFoundError):
            data = Path(p).read_bytes()
            taken[p] = data[: data.rfind(b"\n") + 1]
    return taken


def _put_back_read_errors(cache_path: str, taken: dict[str, bytes], handled: set[str]) -> None:
    """Remove the files :func:`_take_read_errors` moved aside; their lines about uids not in ``handled``, and lines
    appended after they were read (by a training run that opened the file before it moved), go back."""
    for p, data in taken.items():
        try:
            now = Path(p).read_bytes()
        except FileNotFoundError:
            continue  # another prepare finished with it
        keep = b"".join(ln for ln in data.splitlines(keepends=True) if _uid_of(ln) not in handled) + now[len(data):]
        if keep:
            with open(os.path.join(cache_path, _READ_ERRORS), "ab") as f:
                f.write(keep if keep.endswith(b"\n") else keep + b"\n")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)

# ----------------------------------------------------------------------------------------------------------------
# the whole cache: manifest, skipped objects, rendering every missing object
# ----------------------------------------------------------------------------------------------------------------

def write_manifest(cache_path: str, settings: dict) -> None:
    """Record the settings behind the cache folder; refuse a folder that records other settings."""
    path = os.path.join(cache_path, "manifest.json")
    if os.path.exists(path):
        old = json.loads(Path(path).read_text())
        if old.get("settings") != settings:
            raise RuntimeError(f"{path} records other render settings than this config; delete {cache_path}")
        return
    write_json_atomic(path, {"settings": settings, "num_orbit": NUM_FRAMES, "input_frame": INPUT_FRAME},
                      sort_keys=True)


def read_skipped(cache_path: str) -> dict[str, str]:
    """uid -> reason of every bad object in ``skipped.jsonl`` (transient render errors excluded: they are retried)."""
    path = os.path.join(cache_path, "skipped.jsonl")
    out = {}
    if os.path.exists(path):
        for line in Path(path).read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rec = json.loads(line)
                if not rec.get("transient"):
                    out[rec["uid"]] = rec["reason"]
    return out


@contextlib.contextmanager
def _runner(workers: int, num_jobs: int) -> Iterator[Callable]:
    """A map over render jobs: in this process, or in ``workers`` spawned processes."""
    if workers > 0 and num_jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the parent may hold a GL context, which must never be shared with a child.
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            yield lambda jobs: ex.map(_render_job, jobs, chunksize=4)
    else:
        yield lambda jobs: map(_render_job, jobs)


def render_into_cache(objects: list[tuple[str, str]], cache_path: str, settings: dict, workers: int = 0,
                      retry_skipped: bool = False, poll_s: float = 0.5) -> dict[str, Any]:
    """Render every object of [(uid, mesh path)] that is not cached (or whose entry does not read back) and is not a
    known bad object. Resumable, and safe to run twice at once on one cache: each object is rendered under a claim
    (:mod:`datamodules.claims`), so two runs share the work, and each waits at the end for the objects the other
    one is rendering.

    Args:
        workers: processes (spawned) rendering in parallel; 0 renders in this process.
        retry_skipped: re-attempt objects listed in ``skipped.jsonl``.
        poll_s: how often to look again at objects another run is rendering.

    Returns:
        ``{"rendered": newly rendered, "repaired": corrupt entries rendered again (counted in rendered too),
        "skipped": bad objects among ``objects``, "cached": objects ready in the cache, "cache": cache_path}``.

    Raises:
        RuntimeError: the first 5 objects all failed with render errors (GL, disk): a systematic failure.
    """
    from tqdm.auto import tqdm

    os.makedirs(cache_path, exist_ok=True)
    write_manifest(cache_path, settings)
    skipped = {} if retry_skipped else read_skipped(cache_path)
    taken = _take_read_errors(cache_path)
    suspects = {u for data in taken.values() for u in map(_uid_of, data.splitlines()) if u is not None}
    claims_dir = os.path.join(cache_path, "claims")
    jobs = []
    for u, p in objects:
        out = object_file(cache_path, u)
        seen = _stat(out)
        if u in skipped:
            continue
        if seen is not None:
            why = check_object_file(out, full=u in suspects)
            if why is None:
                continue
            log.warning("cached object %s does not read back (%s): rendering it again", out, why)
        jobs.append((u, p, out, settings, claims_dir, seen))
    counts = {_RENDERED: 0, _REPAIRED: 0}
    errors: list[str] = []
    skip_log = os.path.join(cache_path, "skipped.jsonl")
    paths = dict(objects)

    def record(uid: str, reason: str | None, outcome: str) -> None:
        if outcome == _DONE:
            return
        if reason is None:
            counts[_RENDERED] += 1
            counts[_REPAIRED] += outcome == _REPAIRED
            return
        skipped[uid] = reason
        transient = reason.startswith(RENDER_ERROR)
        with open(skip_log, "a") as f:  # one short line per append: safe enough, read back tolerantly
            f.write(json.dumps({"uid": uid, "path": paths.get(uid), "reason": reason, "transient": transient})
                    + "\n")
        if transient:
            errors.append(reason)
        if len(errors) >= 5 and counts[_RENDERED] == 0:  # systematic failure (GL, disk): stop instead of skipping all
            raise RuntimeError(f"rendering fails for every object, e.g. {errors[0]}; see {skip_log}")

    bar = tqdm(total=len(jobs), desc=f"render {os.path.basename(cache_path)}", unit="obj", disable=not jobs)
    pending, told = jobs, False
    with _runner(workers, len(jobs)) as run:
        while pending:
            busy = []
            for job, (uid, reason, outcome) in zip(pending, run(pending)):
                if outcome == _BUSY:
                    busy.append(job)
                    continue
                record(uid, reason, outcome)
                bar.update()
            if busy and not told:
                name = os.path.basename(busy[0][2])[: -len(".npz")]
                log.warning("%d objects are being rendered by another `data prepare` on this cache (e.g. %s, by "
                            "%s): waiting for them", len(busy), busy[0][0], claim_owner(claims_dir, name))
                told = True
            if busy:
                time.sleep(poll_s)
            pending = busy
    bar.close()
    requested = {u for u, _ in objects}
    _put_back_read_errors(cache_path, taken, requested)  # every listed entry of these objects was checked in full
    ready = {u for u in requested if os.path.exists(object_file(cache_path, u))}
    bad = {**read_skipped(cache_path), **skipped}  # another run's skips included
    return {
        "rendered": counts[_RENDERED],
        "repaired": counts[_REPAIRED],
        "skipped": sum(1 for u in requested if u in bad and u not in ready),
        "cached": len(ready),
        "cache": cache_path,
    }
