"""ObjaverseDataModule: renders Q views per object once into a cache, then streams samples from disk.

Sources (any combination): a uid list file, LVIS categories (``objaverse.load_lvis_annotations()``), a plain folder
of .glb/.gltf/.obj files (``mesh_dir``), or the generated toy set (``toy_objects``). Uids resolve through the
``objaverse`` cache layout ``<objaverse_root>/hf-objaverse-v1/{object-paths.json.gz, glbs/...}``; the package's
``_VERSIONED_PATH`` is redirected at call time, so a bare objaverse cache works offline.

Cache layout (``<cache_dir>/<tag>/``, where the tag hashes every setting that changes the pixels, so changing one
starts a new cache instead of mixing renders):

    manifest.json                    the settings behind the tag
    objects/<uid[:2]>/<uid>.npz      one file per object (written atomically): PNG-encoded RGBA views (straight
                                     alpha) and 16-bit PNG depth, c2w [Q,4,4], K [Q,3,3], orbit angles [21],
                                     normalisation (centre [3], scale), mesh path
    skipped.jsonl                    {"uid", "path", "reason"} per bad object (never retried unless asked)
    latents/<key>/<uid[:2]>/<uid>.npy  optional VAE latents [Q,4,h,w] float16, keyed by VAE hash and background

Each sample (default collate adds the batch dim B; H = W = ``resolution``, Q = 21 + ``num_extra_views``):

    "uid": str, "mesh_path": str
    "norm_center": [3], "norm_scale": []        normalised = (v - norm_center) * norm_scale for the vertices v of
                                                trimesh.load(mesh_path, force="mesh")
    "input_indices": [N] long                   indices into the Q views (orbit frames; random when training)
    "input_images": [N,3,H,W], "input_c2w": [N,4,4], "input_K": [N,3,3]
    "cond_image": [3,H,W]                       orbit frame 20, the input view R (azimuth 0)
    "target_images": [Q,3,H,W] in [0,1] on the background, "target_alphas": [Q,1,H,W] in [0,1]
    "target_depths": [Q,1,H,W]                  planar camera z in world units, 0 on background
    "target_c2w": [Q,4,4] (OpenCV), "target_K": [Q,3,3]
    "orbit_polars_rad": [21], "orbit_azimuths_rad": [21]
    "target_latents": [Q,4,H/8,W/8]             only once a latent encoder is set (:meth:`set_latent_encoder`)
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from gsv3d_pl.cameras import orbit_cameras, random_cameras

__all__ = ["ObjaverseDataModule", "ObjaverseViewsDataset", "render_object_to_cache", "read_cached_object",
           "uid_fraction", "NUM_ORBIT"]

NUM_ORBIT = 21
INPUT_FRAME = NUM_ORBIT - 1  # SV3D's last orbit frame is the input view
CACHE_FORMAT = 1
MESH_EXTS = (".glb", ".gltf", ".obj", ".ply", ".stl", ".off")


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------

def uid_fraction(uid: str, salt: str = "") -> float:
    """Deterministic pseudo-uniform number in [0, 1) from a uid (stable across machines and Python runs)."""
    h = hashlib.sha1(f"{salt}{uid}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def _uid_seed(uid: str) -> int:
    return int.from_bytes(hashlib.sha1(uid.encode()).digest()[:7], "big")


def _atomic_save_npz(path: str, **arrays) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _atomic_write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


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


@contextlib.contextmanager
def objaverse_root(root: str | os.PathLike):
    """Temporarily point the ``objaverse`` package at ``<root>/hf-objaverse-v1`` (it reads the global at call time)."""
    import objaverse

    old = objaverse._VERSIONED_PATH
    objaverse._VERSIONED_PATH = os.path.join(os.path.expanduser(os.fspath(root)), "hf-objaverse-v1")
    try:
        yield objaverse
    finally:
        objaverse._VERSIONED_PATH = old


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
    """The Q cameras of one object: the 21-frame orbit, then ``num_extra_views`` random views (uid-seeded)."""
    res = cfg["resolution"]
    if cfg["elevation_deg"] is None:
        lo, hi = cfg["elevation_range_deg"]
        elev = lo + (hi - lo) * uid_fraction(uid, "elevation")
    else:
        elev = float(cfg["elevation_deg"])
    orbit = orbit_cameras(NUM_ORBIT, elev, cfg["radius"], cfg["fov_deg"], res, res)
    c2w, K = orbit.c2w, orbit.K  # [21, 4, 4], [21, 3, 3]
    if cfg["num_extra_views"] > 0:
        g = torch.Generator().manual_seed(_uid_seed(uid))
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
    _atomic_save_npz(
        out_path, rgba_png=rgba_png, rgba_off=rgba_off, depth_png=depth_png, depth_off=depth_off,
        depth_unit=np.float64(unit), c2w=c2w.numpy().astype(np.float32), K=K.numpy().astype(np.float32),
        orbit_polars_rad=orbit.polars_rad.numpy().astype(np.float32),
        orbit_azimuths_rad=orbit.azimuths_rad.numpy().astype(np.float32),
        norm_center=mesh.norm_center.astype(np.float64), norm_scale=np.float64(mesh.norm_scale),
        elevation_deg=np.float64(elev), mesh_path=np.array(os.path.abspath(mesh_path)),
    )
    return uid, None


RENDER_ERROR = "render error"


def _render_job(args):
    uid, path, out, cfg = args
    try:
        return render_object_to_cache(uid, path, out, cfg)
    except Exception as e:  # a driver hiccup on one object must not kill a 10^5-object prepare
        return uid, f"{RENDER_ERROR} ({type(e).__name__}: {str(e)[:200]})"


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


# ----------------------------------------------------------------------------------------------------------------
# dataset
# ----------------------------------------------------------------------------------------------------------------

class ObjaverseViewsDataset(Dataset):
    """Streams cached objects from disk; one item = one object with all Q views (see the module docstring).

    Args:
        files: [(uid, npz path)].
        num_input_views: N.
        train: random N distinct orbit frames per item (torch's RNG, seeded per worker); else ``eval_indices``.
        eval_indices: the fixed input frames for evaluation.
        include_input_view: when training, always include orbit frame 20 (the conditioning view) among the N.
        background: RGB background the straight-alpha renders are composited on.
        latent_dir: folder with ``<uid[:2]>/<uid>.npy`` latents [Q, 4, h, w], or None.
    """

    def __init__(self, files: list[tuple[str, str]], num_input_views: int, train: bool, eval_indices: list[int],
                 include_input_view: bool = False, background: Sequence[float] = (1.0, 1.0, 1.0),
                 latent_dir: str | None = None):
        self.files = list(files)
        self.num_input_views = int(num_input_views)
        self.train = train
        self.eval_indices = torch.as_tensor(eval_indices, dtype=torch.long)
        self.include_input_view = include_input_view
        self.background = tuple(float(b) for b in background)
        self.latent_dir = latent_dir

    def __len__(self) -> int:
        return len(self.files)

    def _input_indices(self) -> torch.Tensor:
        N = self.num_input_views
        if not self.train:
            return self.eval_indices.clone()
        if self.include_input_view:
            rest = torch.randperm(NUM_ORBIT - 1)[: N - 1]
            idx = torch.cat([rest, torch.tensor([INPUT_FRAME])])
        else:
            idx = torch.randperm(NUM_ORBIT)[:N]
        return idx.sort().values  # [N]

    def __getitem__(self, i: int) -> dict:
        uid, path = self.files[i]
        try:
            d = read_cached_object(path, self.background)
        except Exception as e:
            raise RuntimeError(f"cannot read cached renders of {uid} at {path}: {e}. Delete the file and run "
                               "`gsv3d data prepare --config CFG` to render it again.") from e
        images = torch.from_numpy(d["images"]).permute(0, 3, 1, 2).contiguous()  # [Q, 3, H, W]
        alphas = torch.from_numpy(d["alphas"])[:, None]  # [Q, 1, H, W]
        depths = torch.from_numpy(d["depths"])[:, None]  # [Q, 1, H, W]
        c2w = torch.from_numpy(d["c2w"]).float()  # [Q, 4, 4]
        K = torch.from_numpy(d["K"]).float()  # [Q, 3, 3]
        idx = self._input_indices()  # [N]
        sample = {
            "uid": uid,
            "mesh_path": d["mesh_path"],
            "norm_center": torch.from_numpy(d["norm_center"]).float(),  # [3]
            "norm_scale": torch.tensor(d["norm_scale"], dtype=torch.float32),  # []
            "input_indices": idx,
            "input_images": images[idx],  # [N, 3, H, W]
            "input_c2w": c2w[idx],  # [N, 4, 4]
            "input_K": K[idx],  # [N, 3, 3]
            "cond_image": images[INPUT_FRAME].clone(),  # [3, H, W]
            "target_images": images,
            "target_alphas": alphas,
            "target_depths": depths,
            "target_c2w": c2w,
            "target_K": K,
            "orbit_polars_rad": torch.from_numpy(d["orbit_polars_rad"]).float(),  # [21]
            "orbit_azimuths_rad": torch.from_numpy(d["orbit_azimuths_rad"]).float(),  # [21]
        }
        if self.latent_dir is not None:
            lat = os.path.join(self.latent_dir, uid[:2], f"{uid}.npy")
            sample["target_latents"] = torch.from_numpy(np.load(lat).astype(np.float32))  # [Q, 4, h, w]
        return sample


# ----------------------------------------------------------------------------------------------------------------
# datamodule
# ----------------------------------------------------------------------------------------------------------------

class ObjaverseDataModule(LightningDataModule):
    """Objaverse (or any mesh folder) rendered into Q views per object, cached, and streamed.

    Args:
        num_input_views: N input views per object.
        resolution: render size (576 paper scale, 64-128 tiny).
        num_extra_views: random views added after the 21 orbit frames (Q = 21 + this).
        cache_dir: root of the render cache (a settings-tagged subfolder is used inside).
        objaverse_root: objaverse cache root (holds ``hf-objaverse-v1/``); default ``~/.objaverse``, or
            ``<cache_dir>/toy_objaverse`` when ``toy_objects`` is set.
        mesh_dir: a plain folder of .glb/.gltf/.obj files (uid = relative path without extension).
        uids_file: text file with one uid per line (``#`` comments) or a JSON list.
        lvis_categories: LVIS category names; their uids come from ``objaverse.load_lvis_annotations()``.
        toy_objects: generate this many procedural toy objects (into ``objaverse_root``) and use them.
        max_objects: keep at most this many requested objects (in source order).
        download: fetch missing uids with ``objaverse.load_objects``; False fails fast listing them.
        download_processes: processes for ``objaverse.load_objects``.
        batch_size, eval_batch_size, num_workers: DataLoader settings (eval_batch_size defaults to batch_size).
        background: grey level or RGB the views are composited on (load time, does not invalidate the cache).
        elevation_deg: fixed orbit elevation; None samples one per object (from its uid) in ``elevation_range_deg``.
        extra_elevation_range_deg: elevation range of the extra random views.
        radius, fov_deg: camera distance and field of view (SV3D: FoV 33.8°).
        val_fraction, test_fraction: split by uid hash.
        eval_input_indices: fixed input frames for val/test; default N evenly spaced orbit frames including 20.
        include_input_view: in training, always include frame 20 among the N random input views.
        supersample: anti-aliasing, s×s sub-samples per pixel (see :class:`datamodules.mesh_render.MeshRenderer`).
        max_faces, max_texture_size, min_view_pixels: bad-object thresholds / texture downscaling.
        render_workers: processes for ``prepare_data`` rendering (0 = in process).
        retry_skipped: re-attempt objects listed in ``skipped.jsonl``.
    """

    def __init__(
        self,
        num_input_views: int = 4,
        resolution: int = 64,
        num_extra_views: int = 4,
        cache_dir: str = "data/render_cache",
        objaverse_root: str | None = None,
        mesh_dir: str | None = None,
        uids_file: str | None = None,
        lvis_categories: list[str] | None = None,
        toy_objects: int | None = None,
        max_objects: int | None = None,
        download: bool = False,
        download_processes: int = 4,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        background: float | list[float] = 1.0,
        elevation_deg: float | None = None,
        elevation_range_deg: tuple[float, float] = (-5.0, 30.0),
        extra_elevation_range_deg: tuple[float, float] = (-10.0, 40.0),
        radius: float = 2.0,
        fov_deg: float = 33.8,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        eval_input_indices: list[int] | None = None,
        include_input_view: bool = False,
        supersample: int = 2,
        max_faces: int | None = 500_000,
        max_texture_size: int = 2048,
        min_view_pixels: int = 1,
        render_workers: int = 0,
        retry_skipped: bool = False,
    ):
        super().__init__()
        if not 1 <= num_input_views <= NUM_ORBIT:
            raise ValueError(f"data.init_args.num_input_views must be in [1, {NUM_ORBIT}], got {num_input_views}")
        if not 1 <= supersample <= 4:
            raise ValueError(f"data.init_args.supersample must be in 1..4 (sub-samples per pixel side; 1 = no "
                             f"anti-aliasing, 2 = the default 2×2), got {supersample}")
        if not (mesh_dir or uids_file or lvis_categories or toy_objects):
            raise ValueError("ObjaverseDataModule needs a source: set data.init_args.toy_objects, mesh_dir, "
                             "uids_file or lvis_categories")
        self.save_hyperparameters()
        self.num_input_views = int(num_input_views)
        self.resolution = int(resolution)
        self.num_extra_views = int(num_extra_views)
        self.cache_dir = os.path.expanduser(cache_dir)
        if objaverse_root is None:
            objaverse_root = os.path.join(self.cache_dir, "toy_objaverse") if toy_objects else "~/.objaverse"
        self.objaverse_root = os.path.expanduser(objaverse_root)
        self.mesh_dir = mesh_dir
        self.uids_file = uids_file
        self.lvis_categories = list(lvis_categories) if lvis_categories else None
        self.toy_objects = int(toy_objects) if toy_objects else 0
        self.max_objects = max_objects
        self.download = download
        self.download_processes = int(download_processes)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        bg = torch.as_tensor(background, dtype=torch.float32).reshape(-1)
        self.background = tuple((bg.expand(3) if bg.numel() == 1 else bg).tolist())
        if len(self.background) != 3:
            raise ValueError(f"data.init_args.background must be a float or 3 floats, got {background}")
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.include_input_view = include_input_view
        if eval_input_indices is None:
            N = self.num_input_views
            eval_input_indices = sorted({(INPUT_FRAME + round(k * NUM_ORBIT / N)) % NUM_ORBIT for k in range(N)})
        if len(eval_input_indices) != self.num_input_views or not all(0 <= i < NUM_ORBIT for i in eval_input_indices):
            raise ValueError(f"data.init_args.eval_input_indices must be {self.num_input_views} orbit frames in "
                             f"[0, {NUM_ORBIT - 1}], got {eval_input_indices}")
        self.eval_input_indices = list(eval_input_indices)
        self.render_workers = int(render_workers)
        self.retry_skipped = retry_skipped
        self.render_cfg = {
            "format": CACHE_FORMAT, "resolution": self.resolution, "num_extra_views": self.num_extra_views,
            "elevation_deg": elevation_deg, "elevation_range_deg": list(elevation_range_deg),
            "extra_elevation_range_deg": list(extra_elevation_range_deg), "radius": float(radius),
            "fov_deg": float(fov_deg), "supersample": int(supersample), "max_faces": max_faces,
            "max_texture_size": int(max_texture_size), "min_view_pixels": int(min_view_pixels),
            # 16-bit depth quantisation step: covers depths up to radius + 2 with ~5e-5 world-unit steps
            "depth_unit": (float(radius) + 2.0) / 65535.0,
        }
        from datamodules.mesh_render import MeshRenderer  # renderer settings belong to the cache key

        self.render_cfg["renderer"] = MeshRenderer(self.resolution, supersample=supersample, max_faces=max_faces,
                                                   max_texture_size=max_texture_size).settings()
        tag = hashlib.sha1(json.dumps(self.render_cfg, sort_keys=True).encode()).hexdigest()[:10]
        self.cache_path = os.path.join(self.cache_dir, f"r{self.resolution}_q{NUM_ORBIT + self.num_extra_views}_{tag}")
        self.prepare_stats: dict = {}
        self._encoder: tuple | None = None
        self._latents_ready = False
        self.splits: dict[str, list[tuple[str, str]]] = {}

    # -- sources -----------------------------------------------------------------------------------------------
    def _mesh_dir_objects(self) -> list[tuple[str, str]]:
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

    def _requested_uids(self) -> list[str]:
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
            for c in self.lvis_categories:
                uids += lvis[c]
        return list(dict.fromkeys(uids))

    def _objects(self, resolve_paths: bool) -> list[tuple[str, str | None]]:
        """[(uid, mesh path or None)] for every requested object, limited to ``max_objects``."""
        objs: list[tuple[str, str | None]] = [(u, None) for u in self._requested_uids()]
        if self.mesh_dir:
            objs += self._mesh_dir_objects()
        objs = objs[: self.max_objects] if self.max_objects else objs
        if not resolve_paths:
            return objs
        need = [u for u, p in objs if p is None]
        if not need:
            return objs
        if self.toy_objects:
            from datamodules.toy import generate_toy_objects

            generate_toy_objects(self.objaverse_root, self.toy_objects)
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
                got = ov.load_objects(missing, download_processes=self.download_processes)
                local.update(got)
        return [(u, p if p is not None else local[u]) for u, p in objs]

    # -- cache ---------------------------------------------------------------------------------------------------
    def object_file(self, uid: str) -> str:
        return os.path.join(self.cache_path, "objects", uid[:2], f"{uid}.npz")

    def _skipped(self) -> dict[str, str]:
        path = os.path.join(self.cache_path, "skipped.jsonl")
        out = {}
        if os.path.exists(path):
            for line in Path(path).read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    rec = json.loads(line)
                    if not rec.get("transient"):  # render errors (not the object's fault) are retried
                        out[rec["uid"]] = rec["reason"]
        return out

    def _write_manifest(self) -> None:
        path = os.path.join(self.cache_path, "manifest.json")
        if os.path.exists(path):
            old = json.loads(Path(path).read_text())
            if old.get("settings") != self.render_cfg:
                raise RuntimeError(f"{path} records other render settings than this config; delete {self.cache_path}")
            return
        _atomic_write_text(path, json.dumps({"settings": self.render_cfg, "num_orbit": NUM_ORBIT,
                                             "input_frame": INPUT_FRAME}, indent=2, sort_keys=True))

    def prepare_data(self) -> None:
        """Render every requested object once into ``cache_path`` (resumable; bad objects go to skipped.jsonl).

        Sets ``self.prepare_stats = {"rendered": newly rendered, "skipped": bad objects among the requested,
        "cached": objects ready in the cache, "cache": cache_path}``.
        """
        from tqdm.auto import tqdm

        objs = self._objects(resolve_paths=True)
        os.makedirs(self.cache_path, exist_ok=True)
        self._write_manifest()
        skipped = {} if self.retry_skipped else self._skipped()
        todo = [(u, p) for u, p in objs if u not in skipped and not os.path.exists(self.object_file(u))]
        jobs = [(u, p, self.object_file(u), self.render_cfg) for u, p in todo]
        rendered, new_skips, errors = 0, 0, []
        skip_log = os.path.join(self.cache_path, "skipped.jsonl")
        paths = dict(objs)

        def record(uid: str, reason: str | None) -> None:
            nonlocal rendered, new_skips
            if reason is None:
                rendered += 1
                return
            new_skips += 1
            skipped[uid] = reason
            transient = reason.startswith(RENDER_ERROR)
            with open(skip_log, "a") as f:  # one short line per append: safe enough, read back tolerantly
                f.write(json.dumps({"uid": uid, "path": paths.get(uid), "reason": reason, "transient": transient})
                        + "\n")
            errors.append(reason) if transient else None
            if len(errors) >= 5 and rendered == 0:  # systematic failure (GL, disk): stop instead of skipping all
                raise RuntimeError(f"rendering fails for every object, e.g. {errors[0]}; see {skip_log}")

        bar = tqdm(total=len(jobs), desc=f"render {os.path.basename(self.cache_path)}", unit="obj",
                   disable=not jobs)
        if self.render_workers > 0 and len(jobs) > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: the parent may hold a GL context, which must never be shared with a child.
            with ProcessPoolExecutor(self.render_workers, mp_context=mp.get_context("spawn")) as ex:
                for uid, reason in ex.map(_render_job, jobs, chunksize=4):
                    record(uid, reason)
                    bar.update()
        else:
            for job in jobs:
                record(*_render_job(job))
                bar.update()
        bar.close()
        requested = {u for u, _ in objs}
        self.prepare_stats = {
            "rendered": rendered,
            "skipped": sum(1 for u in requested if u in skipped),
            "cached": sum(1 for u in requested if os.path.exists(self.object_file(u))),
            "cache": self.cache_path,
        }

    # -- splits and loaders ------------------------------------------------------------------------------------
    def _split_of(self, uid: str) -> str:
        f = uid_fraction(uid, "split")
        if f < self.val_fraction:
            return "val"
        if f < self.val_fraction + self.test_fraction:
            return "test"
        return "train"

    def setup(self, stage: str | None = None) -> None:
        """Deterministic train/val/test split by uid hash over the objects present in the cache."""
        ready = [(u, self.object_file(u)) for u, _ in self._objects(resolve_paths=False)
                 if os.path.exists(self.object_file(u))]
        if not ready:
            raise RuntimeError(f"no rendered objects in {self.cache_path}: run `gsv3d data prepare --config CFG` "
                               "(or let the Trainer call prepare_data) first")
        splits: dict[str, list] = {"train": [], "val": [], "test": []}
        for u, p in ready:
            splits[self._split_of(u)].append((u, p))
        # Small sets (the toy set, tests) can hash into an empty split; fill it deterministically.
        by_hash = sorted(ready, key=lambda x: uid_fraction(x[0], "split"))
        for name, frac in (("val", self.val_fraction), ("test", self.test_fraction)):
            if frac > 0 and not splits[name] and len(splits["train"]) > 1:
                moved = next(x for x in by_hash if x in splits["train"])
                splits["train"].remove(moved)
                splits[name].append(moved)
        self.splits = splits

    def set_latent_encoder(self, encode_fn: Callable[[torch.Tensor], torch.Tensor], key: str,
                           device: torch.device | str | None = None, batch_size: int = 16) -> None:
        """Cache frozen-VAE latents of every view; samples then carry ``target_latents`` [Q, 4, h, w].

        Args:
            encode_fn: images [B, 3, H, W] in [0, 1] -> scaled latents [B, 4, H/8, W/8].
            key: hash of the VAE weights (cache key, together with the background colour).
            device: where the images are sent before ``encode_fn``; default the attached LightningModule's device.
            batch_size: views per encode call.
        The encoding runs once, in the main process (rank 0 under DDP), before the first dataloader is built.
        """
        bg_tag = hashlib.sha1(json.dumps(self.background).encode()).hexdigest()[:6]
        self._encoder = (encode_fn, f"{key}_bg{bg_tag}", device, int(batch_size))
        self._latents_ready = False

    @property
    def latent_dir(self) -> str | None:
        return None if self._encoder is None else os.path.join(self.cache_path, "latents", self._encoder[1])

    @torch.no_grad()
    def _ensure_latents(self) -> None:
        if self._encoder is None or self._latents_ready:
            return
        encode_fn, _, device, bs = self._encoder
        trainer = getattr(self, "trainer", None)
        if device is None and trainer is not None and trainer.lightning_module is not None:
            device = trainer.lightning_module.device
        device = torch.device(device or "cpu")
        if trainer is None or trainer.is_global_zero:
            from tqdm.auto import tqdm

            files = [x for s in self.splits.values() for x in s]
            todo = [(u, p) for u, p in files if not os.path.exists(os.path.join(self.latent_dir, u[:2], f"{u}.npy"))]
            for uid, path in tqdm(todo, desc="encode latents", unit="obj", disable=not todo):
                imgs = torch.from_numpy(read_cached_object(path, self.background)["images"]).permute(0, 3, 1, 2)
                lat = torch.cat([encode_fn(imgs[i:i + bs].to(device)).float().cpu()
                                 for i in range(0, len(imgs), bs)])  # [Q, 4, h, w]
                out = os.path.join(self.latent_dir, uid[:2], f"{uid}.npy")
                os.makedirs(os.path.dirname(out), exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=os.path.dirname(out), suffix=".tmp")
                with os.fdopen(fd, "wb") as f:
                    np.save(f, lat.numpy().astype(np.float16))
                os.replace(tmp, out)
        if trainer is not None and trainer.world_size > 1:
            trainer.strategy.barrier("gsv3d_latents")
        self._latents_ready = True

    def _dataset(self, split: str) -> ObjaverseViewsDataset:
        if not self.splits:
            self.setup()
        self._ensure_latents()
        return ObjaverseViewsDataset(self.splits[split], self.num_input_views, train=split == "train",
                                     eval_indices=self.eval_input_indices,
                                     include_input_view=self.include_input_view, background=self.background,
                                     latent_dir=self.latent_dir)

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        pin = torch.cuda.is_available() and (trainer is None or trainer.accelerator.__class__.__name__ == "CUDAAccelerator")
        return DataLoader(self._dataset(split), batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          pin_memory=pin, persistent_workers=self.num_workers > 0, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)
