"""ObjaverseDataModule: renders Q views per object once into a cache, then streams samples from disk.

The pieces, one module each: where the objects come from and their splits (:mod:`datamodules.sources`), the render
cache (:mod:`datamodules.render_cache`), the optional VAE-latent cache (:mod:`datamodules.latent_cache`). This
module holds the dataset that reads the cache and the LightningDataModule that ties them together.

Each sample is one object with all Q = 21 + ``num_extra_views`` views at H = W = ``resolution``, keyed as
:data:`gsv3d_pl.batch.BATCH_KEYS` (default collate adds the batch dim B); ``target_latents`` is present once a
latent encoder is set (:meth:`ObjaverseDataModule.set_latent_encoder`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from datamodules.latent_cache import encode_missing_latents, latent_key, read_latents, remove_corrupt_latents
from datamodules.render_cache import (
    REPAIR_HINT,
    cache_folder,
    cache_read_error,
    check_object_file,
    object_file,
    read_cached_object,
    render_into_cache,
    render_object_to_cache,
    render_settings,
)
from datamodules.sources import ObjectSources, objaverse_root, split_objects, uid_fraction
from gsv3d_pl.orbit import DEFAULT_RADIUS, FOV_DEG, INPUT_FRAME, NUM_FRAMES, input_frames

log = logging.getLogger(__name__)

# read_cached_object, render_object_to_cache, objaverse_root and uid_fraction live in the modules above; they
# stay importable from here for existing callers.
__all__ = ["ObjaverseDataModule", "ObjaverseViewsDataset", "read_cached_object", "render_object_to_cache",
           "objaverse_root", "uid_fraction"]


# ----------------------------------------------------------------------------------------------------------------
# dataset
# ----------------------------------------------------------------------------------------------------------------

class ObjaverseViewsDataset(Dataset):
    """Streams cached objects from disk; one item = one object with all Q views, keyed as
    :data:`gsv3d_pl.batch.BATCH_KEYS` without the batch dimension.

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
            rest = torch.randperm(NUM_FRAMES - 1)[: N - 1]  # frames 0..19: all but the input view
            idx = torch.cat([rest, torch.tensor([INPUT_FRAME])])
        else:
            idx = torch.randperm(NUM_FRAMES)[:N]
        return idx.sort().values  # [N]

    def __getitem__(self, i: int) -> dict:
        uid, path = self.files[i]
        try:
            d = read_cached_object(path, self.background)
        except Exception as e:
            raise cache_read_error(path, uid, e) from e
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
            sample["target_latents"] = read_latents(self.latent_dir, uid)  # [Q, 4, h, w]
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
        mesh_dir: a folder of meshes, read as ``mesh_layout`` says.
        mesh_layout: ``files``: every .glb/.gltf/.obj/... file under ``mesh_dir`` (uid = relative path without
            extension); ``gso``: Google Scanned Objects' ``<mesh_dir>/<object>/meshes/model.obj`` (uid = ``<object>``,
            texture in ``<object>/materials/textures/``).
        mesh_list: keep only these ``mesh_dir`` objects, in this order: a text file with one uid (GSO: object folder
            name) per line (``#`` comments) or a JSON list; a listed name that is not there is an error.
        mesh_up_axis: ``y`` or ``z``, the up axis of ``mesh_dir``'s files; null = the layout's (files: y, gso: z).
            Z-up objects are rotated once into +Y-up GLB copies under ``<cache_dir>/y_up/`` (renders and geometry
            metrics read those).
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
        radius, fov_deg: camera distance and field of view (default: :mod:`gsv3d_pl.orbit`'s, SV3D's FoV).
        val_fraction, test_fraction: split by uid hash.
        eval_input_indices: fixed input frames for val/test; default :func:`gsv3d_pl.orbit.input_frames` (N evenly
            spaced orbit frames including the input view).
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
        mesh_layout: str = "files",
        mesh_list: str | None = None,
        mesh_up_axis: str | None = None,
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
        radius: float = DEFAULT_RADIUS,
        fov_deg: float = FOV_DEG,
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
        if not 1 <= num_input_views <= NUM_FRAMES:
            raise ValueError(f"data.init_args.num_input_views must be in [1, {NUM_FRAMES}], got {num_input_views}")
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
        self.sources = ObjectSources(
            objaverse_root=os.path.expanduser(objaverse_root), mesh_dir=mesh_dir, uids_file=uids_file,
            lvis_categories=list(lvis_categories) if lvis_categories else None,
            toy_objects=int(toy_objects) if toy_objects else 0, max_objects=max_objects, download=download,
            download_processes=int(download_processes), mesh_layout=mesh_layout, mesh_list=mesh_list,
            mesh_up_axis=mesh_up_axis, converted_dir=os.path.join(self.cache_dir, "y_up"))
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
            eval_input_indices = input_frames(self.num_input_views)
        if len(eval_input_indices) != self.num_input_views or not all(0 <= i < NUM_FRAMES for i in eval_input_indices):
            raise ValueError(f"data.init_args.eval_input_indices must be {self.num_input_views} orbit frames in "
                             f"[0, {NUM_FRAMES - 1}], got {eval_input_indices}")
        self.eval_input_indices = list(eval_input_indices)
        self.render_workers = int(render_workers)
        self.retry_skipped = retry_skipped
        self.render_cfg = render_settings(
            self.resolution, self.num_extra_views, elevation_deg, elevation_range_deg, extra_elevation_range_deg,
            radius, fov_deg, supersample, max_faces, max_texture_size, min_view_pixels)
        if mesh_dir and self.sources.up_axis != "y":
            # Rotated objects render differently under the same uid: a cache of their own (Y-up caches keep their tag).
            self.render_cfg["mesh_up_axis"] = self.sources.up_axis
        self.cache_path = cache_folder(self.cache_dir, self.render_cfg)
        self.prepare_stats: dict = {}
        self._encoder: tuple | None = None
        self._latents_ready = False
        self.splits: dict[str, list[tuple[str, str]]] = {}

    # -- cache, splits, latents ---------------------------------------------------------------------------------
    def object_file(self, uid: str) -> str:
        return object_file(self.cache_path, uid)

    def prepare_data(self) -> None:
        """Render every requested object once into ``cache_path`` (resumable; bad objects go to skipped.jsonl;
        entries that do not read back are rendered again, latent files that do not are removed for re-encoding).

        Sets ``self.prepare_stats`` (see :func:`datamodules.render_cache.render_into_cache`; ``repaired`` also counts
        the removed latent files).
        """
        objs = self.sources.objects(resolve_paths=True)
        stats = render_into_cache(objs, self.cache_path, self.render_cfg, self.render_workers, self.retry_skipped)
        stats["repaired"] += len(remove_corrupt_latents(self.cache_path))
        self.prepare_stats = stats

    def setup(self, stage: str | None = None) -> None:
        """Deterministic train/val/test split by uid hash over the objects present in the cache.

        Every entry's index is checked first (as ``data prepare`` does); the main process (rank 0) renders the ones
        that do not read back again, the other ranks wait for it, and an entry that still fails is left out.
        """
        uids = [u for u, _ in self.sources.objects(resolve_paths=False)]
        present = [u for u in uids if os.path.exists(self.object_file(u))]
        bad = {u for u in present if check_object_file(self.object_file(u)) is not None}
        trainer = getattr(self, "trainer", None)
        if bad and (trainer is None or trainer.is_global_zero):
            log.warning("%d cached objects do not read back (e.g. %s): rendering them again", len(bad),
                        self.object_file(next(iter(bad))))
            try:
                objs = [(u, p) for u, p in self.sources.objects(resolve_paths=True) if u in bad]
            except (FileNotFoundError, KeyError) as e:  # sources gone since prepare: those entries are left out
                log.warning("cannot render them again: %s", e)
                objs = []
            render_into_cache(objs, self.cache_path, self.render_cfg, self.render_workers, self.retry_skipped)
        if trainer is not None and trainer.world_size > 1:
            trainer.strategy.barrier("gsv3d_cache_repair")  # every rank then sees the same entries
        still = {u for u in bad if not os.path.exists(self.object_file(u))
                 or check_object_file(self.object_file(u)) is not None}
        ready = [(u, self.object_file(u)) for u in present if u not in still]
        if still:
            log.warning("%d cached objects are left out: they could not be rendered again (see %s)", len(still),
                        os.path.join(self.cache_path, "skipped.jsonl"))
        if not ready:
            raise RuntimeError(f"no rendered objects in {self.cache_path}: run `{REPAIR_HINT}` "
                               "(or let the Trainer call prepare_data) first")
        self.splits = split_objects(ready, self.val_fraction, self.test_fraction)

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
        self._encoder = (encode_fn, latent_key(key, self.background), device, int(batch_size))
        self._latents_ready = False

    @property
    def latent_dir(self) -> str | None:
        return None if self._encoder is None else os.path.join(self.cache_path, "latents", self._encoder[1])

    def _ensure_latents(self) -> None:
        if self._encoder is None or self._latents_ready:
            return
        encode_fn, _, device, bs = self._encoder
        trainer = getattr(self, "trainer", None)
        if device is None and trainer is not None and trainer.lightning_module is not None:
            device = trainer.lightning_module.device
        if trainer is None or trainer.is_global_zero:
            files = [x for s in self.splits.values() for x in s]
            encode_missing_latents(files, self.latent_dir, encode_fn, torch.device(device or "cpu"), self.background,
                                   bs)
        if trainer is not None and trainer.world_size > 1:
            trainer.strategy.barrier("gsv3d_latents")
        self._latents_ready = True

    # -- loaders -------------------------------------------------------------------------------------------------
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
