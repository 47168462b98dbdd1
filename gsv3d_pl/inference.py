"""Single image -> 3D Gaussians: input validation and preprocessing, the SV3D -> GS-decoder pipeline, and
atomic output folders.

Preprocessing follows the training renders: the object is cut out (the image's alpha, or the foreground
estimated from a plain background colour), recentred, rescaled so that its larger side spans
``foreground_ratio`` of the frame, composited on the background colour and resized to the model's
resolution. The default ratio is the image-plane size of a sphere of diameter 1 (the unit box every
training object is normalised into) seen by the orbit camera (radius 2, FoV 33.8°): 0.85.

The pipeline (:class:`ImageTo3D`): CLIP embedding + VAE conditioning latent of the image -> SV3D samples
the 21-frame orbit latents (frame 20 = the input view) -> N of them, with their orbit cameras and the
DINO tokens of the image, go through the GS decoder -> Gaussians. Outputs are written to a temporary
folder next to the target, renamed into place only when complete (:func:`atomic_output_dir`).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ImageInputError",
    "MIN_IMAGE_SIZE",
    "IMAGE_SUFFIXES",
    "default_foreground_ratio",
    "load_image",
    "estimate_foreground",
    "preprocess_image",
    "list_images",
    "atomic_output_dir",
    "NUM_ORBIT_FRAMES",
    "orbit_input_indices",
    "Prediction",
    "ImageTo3D",
    "write_prediction",
    "text_to_image",
]

MIN_IMAGE_SIZE = 64
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


class ImageInputError(ValueError):
    """An input image that cannot be used. The message names the file and what to do about it."""


def default_foreground_ratio(radius: float = 2.0, fov_deg: float = 33.8, object_diameter: float = 1.0) -> float:
    """Fraction of the frame spanned by a sphere of ``object_diameter`` at the orbit centre.

    A sphere of radius r at distance d subtends a disc of image-plane radius tan(asin(r/d)); the frame's
    half-width is tan(fov/2). With the project defaults this is 0.85.
    """
    r = object_diameter / 2
    if r >= radius:
        raise ValueError(f"object (diameter {object_diameter}) does not fit in front of a camera at radius {radius}")
    return min(1.0, math.tan(math.asin(r / radius)) / math.tan(math.radians(fov_deg) / 2))


# ----------------------------------------------------------------------------------------------------------
# Loading and validation
# ----------------------------------------------------------------------------------------------------------

def _pil_to_float(img, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """PIL image of any mode -> (rgb [H, W, 3] float32 in [0, 1], alpha [H, W] float32 or None)."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit greyscale (PNG loads as I;16 or I): scale by the 16-bit range, not 8-bit.
        grey = np.asarray(img).astype(np.float32) / 65535.0
        grey = np.clip(grey, 0.0, 1.0)
        return np.repeat(grey[..., None], 3, axis=-1), None
    if mode == "F":
        grey = np.asarray(img).astype(np.float32)
        if not np.isfinite(grey).all():
            raise ImageInputError(f"{name}: the float image holds NaN/inf pixels; save it as an 8/16-bit PNG")
        grey = np.clip(grey / 255.0 if grey.max() > 1.0 else grey, 0.0, 1.0)
        return np.repeat(grey[..., None], 3, axis=-1), None
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info) \
        or (mode in ("RGB", "L") and "transparency" in img.info)
    if has_alpha:
        arr = np.asarray(img.convert("RGBA")).astype(np.float32) / 255.0  # [H, W, 4]
        rgb, alpha = arr[..., :3], arr[..., 3]
        if alpha.min() >= 1.0:  # an alpha channel that hides nothing: treat as RGB
            alpha = None
        return np.ascontiguousarray(rgb), alpha
    if mode != "RGB":
        img = img.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV
    return np.asarray(img).astype(np.float32) / 255.0, None


def load_image(source, name: str | None = None, min_size: int = MIN_IMAGE_SIZE
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """Open and validate an image; every failure is an :class:`ImageInputError` naming the file.

    Handles EXIF orientation, palette / greyscale / 16-bit / CMYK modes (converted, not rejected) and
    multi-frame files (first frame).

    Args:
        source: a path, or a ``PIL.Image.Image``.
        name: how to call it in messages (default: the path).
        min_size: smallest accepted side in pixels.
    Returns:
        rgb [H, W, 3] float32 in [0, 1]; alpha [H, W] float32 in [0, 1], or None when the image has no
        (non-trivial) transparency.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, Image.Image):
        img, name = source, name or "<image>"
    else:
        path = Path(source)
        name = name or str(path)
        if not path.exists():
            raise ImageInputError(f"{name}: no such file")
        if not path.is_file():
            raise ImageInputError(f"{name}: not a file")
        if path.stat().st_size == 0:
            raise ImageInputError(f"{name}: the file is empty (0 bytes); it is not an image")
        try:
            img = Image.open(path)
        except UnidentifiedImageError:
            raise ImageInputError(f"{name}: not an image (PIL cannot read this format); give a PNG/JPEG/WebP file") from None
        except Image.DecompressionBombError as e:
            raise ImageInputError(f"{name}: image too large ({e}); downscale it first") from None
        except OSError as e:
            raise ImageInputError(f"{name}: cannot open the image ({e})") from None
    try:
        img.seek(0)
        img.load()  # decode now: truncated/corrupt data fails here, not later
        img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageInputError(f"{name}: the image is corrupt or truncated ({e}); re-export it") from None
    w, h = img.size
    if w == 0 or h == 0:
        raise ImageInputError(f"{name}: the image has zero size ({w}x{h})")
    if min(w, h) < min_size:
        raise ImageInputError(f"{name}: the image is {w}x{h} px; at least {min_size} px on each side is needed")
    return _pil_to_float(img, name)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files directly in ``folder`` (by suffix, sorted); hidden files are skipped."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


# ----------------------------------------------------------------------------------------------------------
# Foreground and framing
# ----------------------------------------------------------------------------------------------------------

def estimate_foreground(rgb: np.ndarray, name: str = "<image>", border: int = 2, plain_fraction: float = 0.9,
                        tol_low: float = 0.04, tol_high: float = 0.12) -> tuple[np.ndarray, np.ndarray]:
    """Foreground of an RGB image on a plain background, from the border colour.

    The background colour is the median of a ``border``-pixel frame; it counts as plain when at least
    ``plain_fraction`` of the frame is within ``tol_high`` of it (so an object may touch the border).
    Background = the pixels within ``tol_high`` of that colour *connected to the border*, so object parts
    of the background colour (a white logo on a white-background product shot) stay foreground. On the
    object's rim, alpha and colour come from a two-colour model (pixel = a·object + (1 − a)·background,
    object colour from the nearest interior pixel), so anti-aliased edges composite cleanly on another
    background; elsewhere in the background region alpha ramps from 0 to 1 between ``tol_low`` and
    ``tol_high`` of colour distance (JPEG noise stays 0).

    Args:
        rgb: [H, W, 3] float in [0, 1].
    Returns:
        (foreground colours [H, W, 3], alpha [H, W]), float32.
    Raises:
        ImageInputError: the border is not one colour, or nothing differs from it.
    """
    from scipy import ndimage

    h, w, _ = rgb.shape
    b = max(1, min(border, h // 4, w // 4))
    ring = np.concatenate([rgb[:b].reshape(-1, 3), rgb[-b:].reshape(-1, 3),
                           rgb[b:-b, :b].reshape(-1, 3), rgb[b:-b, -b:].reshape(-1, 3)])  # [R, 3]
    bg = np.median(ring, axis=0)  # [3]
    frac = float((np.linalg.norm(ring - bg, axis=-1) < tol_high).mean())
    if frac < plain_fraction:
        raise ImageInputError(
            f"{name}: the image has no alpha channel and its background is not a plain colour (only {frac:.0%} "
            f"of the border matches one colour); an RGBA image is needed: cut the object out (e.g. with rembg) "
            f"and save it as a PNG with transparency"
        )
    dist = np.linalg.norm(rgb - bg, axis=-1)  # [H, W]
    close = dist < tol_high
    labels, _ = ndimage.label(close)  # 4-connectivity: a 1-px diagonal gap does not leak into the object
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    background = np.isin(labels, edge[edge > 0])  # [H, W]
    if float((~background).mean()) < 1e-4:
        raise ImageInputError(f"{name}: no object found: the whole image is the background colour")
    # Edge pixels are mixes c = a·f + (1 − a)·bg of the object colour f and the background: take f from the
    # nearest interior pixel and solve for a by projecting onto the bg -> f segment. Elsewhere in the
    # background region alpha ramps with the colour distance (JPEG noise stays 0).
    alpha = np.where(background, np.clip((dist - tol_low) / (tol_high - tol_low), 0.0, 1.0), 1.0)  # [H, W]
    core = ndimage.binary_erosion(~background, iterations=2)  # [H, W] surely-opaque interior
    ok = np.zeros_like(background)
    if core.any():
        _, (iy, ix) = ndimage.distance_transform_edt(~core, return_indices=True)
        f = rgb[iy, ix]  # [H, W, 3] colour of the nearest interior pixel
        fb, cb = f - bg, rgb - bg
        denom = (fb * fb).sum(-1)  # [H, W]
        proj = np.clip((cb * fb).sum(-1) / np.maximum(denom, 1e-6), 0.0, 1.0)
        ok = ~core & (alpha > 0) & (denom > tol_high**2)  # rim pixels whose object colour differs from bg
        alpha = np.where(ok, proj, alpha)
    alpha = alpha.astype(np.float32)  # [H, W]
    a = alpha[..., None]
    soft = (a > 1e-3) & (a < 1.0)
    fg = np.where(soft, (rgb - (1.0 - a) * bg) / np.maximum(a, 1e-3), rgb)  # un-mix the background out
    if core.any():
        fg = np.where(ok[..., None], f, fg)  # the two-colour model's object colour
    return np.clip(fg, 0.0, 1.0).astype(np.float32), alpha


def preprocess_image(source, size: int = 576, foreground_ratio: float | None = None, background: float = 1.0,
                     alpha_mode: str = "auto", name: str | None = None) -> tuple[Tensor, Tensor]:
    """Load, validate, cut out, recentre, rescale, composite and resize one input image.

    Args:
        source: path or ``PIL.Image.Image``.
        size: output side S in pixels (the model's resolution).
        foreground_ratio: fraction of the frame the object's larger bbox side spans (default
            :func:`default_foreground_ratio`, 0.85).
        background: grey level of the background (the project default is white, 1.0).
        alpha_mode: "auto" (alpha channel if it has one, else the plain-background estimate, else an error),
            "alpha" (require an alpha channel), "border" (always estimate from the border colour), or
            "none" (the whole image is the object: no cut-out, it is only framed).
        name: name used in error messages (default: the path).
    Returns:
        image [3, S, S] float32 in [0, 1] composited on ``background``; alpha [1, S, S] float32.
    """
    if alpha_mode not in ("auto", "alpha", "border", "none"):
        raise ValueError(f"alpha_mode must be auto|alpha|border|none, got {alpha_mode!r}")
    ratio = default_foreground_ratio() if foreground_ratio is None else float(foreground_ratio)
    if not 0.05 <= ratio <= 1.0:
        raise ValueError(f"foreground_ratio must be in [0.05, 1], got {ratio}")
    name = name or (str(source) if not hasattr(source, "mode") else "<image>")
    rgb, alpha = load_image(source, name)  # [H, W, 3], [H, W] | None
    if alpha_mode == "alpha" and alpha is None:
        raise ImageInputError(f"{name}: an RGBA image with transparency is needed (alpha_mode='alpha')")
    if alpha_mode == "none":
        alpha = np.ones(rgb.shape[:2], np.float32)
    elif alpha_mode == "border" or alpha is None:
        rgb, alpha = estimate_foreground(rgb, name)
    ys, xs = np.nonzero(alpha > 0.5)
    if ys.size == 0:
        raise ImageInputError(f"{name}: the alpha channel is empty (fully transparent); nothing to reconstruct")
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = max(y1 - y0, x1 - x0) / ratio  # crop side in source pixels
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2

    # Premultiplied RGBA, so resampling does not bleed the hidden colours of transparent pixels.
    rgba = torch.from_numpy(np.concatenate([rgb * alpha[..., None], alpha[..., None]], -1)).permute(2, 0, 1)  # [4,H,W]
    n = int(math.ceil(side))
    top, left = int(round(cy - n / 2)), int(round(cx - n / 2))
    canvas = torch.zeros(4, n, n)  # [4, n, n]: transparent outside the source image
    sy0, sx0 = max(0, top), max(0, left)
    sy1, sx1 = min(rgba.shape[1], top + n), min(rgba.shape[2], left + n)
    canvas[:, sy0 - top:sy1 - top, sx0 - left:sx1 - left] = rgba[:, sy0:sy1, sx0:sx1]
    if n != size:
        canvas = F.interpolate(canvas[None], size=(size, size), mode="bilinear", antialias=n > size,
                               align_corners=False)[0]  # [4, S, S]
    canvas = canvas.clamp(0.0, 1.0)
    a = canvas[3:]  # [1, S, S]
    image = (canvas[:3] + (1.0 - a) * float(background)).clamp(0.0, 1.0)  # [3, S, S]
    return image.contiguous(), a.contiguous()


# ----------------------------------------------------------------------------------------------------------
# Atomic output folders
# ----------------------------------------------------------------------------------------------------------

def _chmod_default(root: Path) -> None:
    """Give ``root`` and everything in it the permissions a plain mkdir/open would (0777/0666 minus umask)."""
    umask = os.umask(0)
    os.umask(umask)
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~umask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~umask)


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder next to ``out_dir``; on success it replaces ``out_dir``, on any error it is
    deleted, so a failed run leaves no partial folder (and an existing ``out_dir`` untouched).

    With ``overwrite=False`` an existing ``out_dir`` is an error (raised before anything is written).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass --overwrite or choose another --out")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        _chmod_default(tmp)  # mkdtemp/mkstemp create private (0700/0600) entries; results are ordinary files
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "x")  # move aside first: rename() cannot replace a non-empty folder
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            if old is not None:  # put the previous result back
                os.replace(old / "x", out_dir)
                shutil.rmtree(old, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------

NUM_ORBIT_FRAMES = 21


def orbit_input_indices(num_views: int, num_frames: int = NUM_ORBIT_FRAMES) -> list[int]:
    """N orbit frames spread evenly around the orbit, always including the input view (the last frame).

    Frames (F − 1 + round(k·F/N)) mod F for k = 0..N−1, sorted: the same rule as the datamodule's default
    evaluation frames, so inference feeds the decoder the frames it was validated on. N=4 of 21 ->
    [4, 9, 15, 20] (about 90° apart).
    """
    if not 1 <= num_views <= num_frames:
        raise ValueError(f"num_views must be in [1, {num_frames}], got {num_views}")
    idx = sorted({(num_frames - 1 + round(k * num_frames / num_views)) % num_frames for k in range(num_views)})
    if len(idx) != num_views:  # cannot happen for N <= F (steps of F/N >= 1), but keep the contract explicit
        raise AssertionError(f"orbit_input_indices({num_views}) produced duplicates: {idx}")
    return idx


@dataclass
class Prediction:
    """Everything :class:`ImageTo3D` produces for one image.

    Attributes:
        image: [3, H, W] the preprocessed input view R (composited on the background), in [0, 1].
        alpha: [1, H, W] its foreground mask.
        latents: [21, 4, h, w] scaled SV3D orbit latents (h = H/8); frame 20 is the input view.
        frames: [21, 3, H, W] the orbit decoded by the VAE, in [0, 1].
        cameras: the 21 orbit cameras (OpenCV c2w [21, 4, 4], K [21, 3, 3] at H x W).
        input_indices: [N] long, the orbit frames given to the GS decoder.
        gaussians: unbatched Gaussians, G = N·H'·W'.
        elevation_deg: the orbit's elevation.
    """

    image: Tensor
    alpha: Tensor
    latents: Tensor
    frames: Tensor
    cameras: object
    input_indices: Tensor
    gaussians: object
    elevation_deg: float


class ImageTo3D:
    """Image -> SV3D orbit latents -> GS decoder -> Gaussians (GSV3D's inference path).

    Args:
        sv3d: :class:`gsv3d_pl.models.SV3D` (LoRA already loaded if any).
        vae, clip, decoder, dino: the frozen VAE, CLIP image embedder, GS decoder and DINO encoder (None when
            the decoder has no cross-attention).
        input_indices: orbit frames fed to the decoder; default :func:`orbit_input_indices` (num_input_views).
        num_input_views: N when ``input_indices`` is not given.
        radius, fov_deg: the orbit cameras (must match the decoder's training renders).
        background: background grey level of the training renders.
        cond_aug: noise augmentation of the conditioning latent (SV3D inference: 1e-5).
        num_steps: Euler-EDM steps (None = the SV3D model's default, 50).
        replace_input_frame: use the input image's own latent for frame 20 instead of the sampled one (the
            input view is known exactly; Stability's script overwrites that frame too).
        autocast: a zero-argument context-manager factory for mixed precision (e.g. a stage's ``autocast``).
        decode_chunk: frames per VAE decode call (bounds memory at 576²).
    """

    def __init__(self, sv3d, vae, clip, decoder, dino=None, input_indices: list[int] | None = None,
                 num_input_views: int = 4, radius: float = 2.0, fov_deg: float = 33.8, background: float = 1.0,
                 cond_aug: float = 1e-5, num_steps: int | None = None, replace_input_frame: bool = True,
                 autocast=None, decode_chunk: int = 4):
        if sv3d is None:
            raise ValueError("ImageTo3D needs an SV3D model (a distill config); a decoder-only config has none")
        self.sv3d, self.vae, self.clip, self.decoder, self.dino = sv3d, vae, clip, decoder, dino
        idx = list(input_indices) if input_indices is not None else orbit_input_indices(num_input_views)
        if not idx or len(set(idx)) != len(idx) or not all(0 <= i < NUM_ORBIT_FRAMES for i in idx):
            raise ValueError(f"input_indices must be distinct orbit frames in [0, 20], got {idx}")
        self.input_indices = idx
        self.radius, self.fov_deg, self.background = float(radius), float(fov_deg), float(background)
        self.cond_aug, self.num_steps = float(cond_aug), num_steps
        self.replace_input_frame = replace_input_frame
        self.autocast = autocast if autocast is not None else contextlib.nullcontext
        self.decode_chunk = max(1, int(decode_chunk))

    @classmethod
    def from_stage(cls, stage, **kwargs) -> ImageTo3D:
        """Build from a :class:`gsv3d_pl.DistillStage` (its SV3D+LoRA, encoders, frozen decoder and settings).

        ``kwargs`` override the constructor arguments (e.g. ``input_indices``, ``radius``).
        """
        sv3d = getattr(stage, "sv3d", None)
        if sv3d is None:
            raise ValueError(
                f"{type(stage).__name__} has no SV3D model: image -> 3D needs a distill config "
                "(e.g. configs/distill/tiny.yaml, which holds SV3D, the VAE, CLIP, DINO and the stage-1 decoder)"
            )
        n = getattr(stage, "num_input_views", None)
        args = dict(sv3d=sv3d, vae=stage.vae, clip=stage.clip, decoder=stage.decoder, dino=getattr(stage, "dino", None),
                    background=getattr(stage, "background", 1.0), cond_aug=getattr(stage, "cond_aug", 1e-5),
                    autocast=getattr(stage, "autocast", None))
        if n is not None:
            args["num_input_views"] = int(n)
        args.update(kwargs)
        return cls(**args)

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    @torch.no_grad()
    def __call__(self, image: Tensor, alpha: Tensor | None = None, elevation_deg: float = 10.0, seed: int = 0,
                 num_steps: int | None = None, progress: bool = True) -> Prediction:
        """Run the pipeline on one preprocessed image.

        Args:
            image: [3, H, W] in [0, 1], object centred on the background (see :func:`preprocess_image`);
                H = W = the model's resolution (a multiple of 8).
            alpha: [1, H, W] foreground mask (kept in the result only).
            elevation_deg: camera elevation of the input view (SV3D polar = 90° − elevation).
            seed: sampling seed (the result is deterministic for a seed on a given device).
            num_steps: override the sampler's step count.
        Returns:
            :class:`Prediction`.
        """
        from gsv3d_pl.cameras import orbit_cameras

        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image must be [3, H, W], got {tuple(image.shape)}")
        S = image.shape[-1]
        if image.shape[-2] != S or S % 8:
            raise ValueError(f"image must be square with a side divisible by 8 (VAE latents), got {tuple(image.shape)}")
        dev = self.device
        img = image.to(dev, torch.float32)[None]  # [1, 3, H, W]
        g = torch.Generator(device=dev).manual_seed(int(seed))
        cond_aug = torch.full((1,), self.cond_aug, device=dev)  # [1]
        clip_emb = self.clip(img).float()  # [1, 1, D]
        cond_latent = self.vae.encode_cond(img, cond_aug, generator=g).float()  # [1, 4, h, w], unscaled
        polars, azimuths = self.sv3d.orbit_angles(1, NUM_ORBIT_FRAMES, float(elevation_deg), device=dev)  # [1, 21]
        with self.autocast():
            lat = self.sv3d.sample(clip_emb, cond_latent, polars, azimuths, cond_aug,
                                   num_steps=num_steps or self.num_steps, generator=g, progress=progress)
        lat = lat.float()  # [1, 21, 4, h, w]
        if self.replace_input_frame:
            lat[:, -1] = self.vae.encode(img).float()
        frames = torch.cat([self.vae.decode(c).float() for c in lat[0].split(self.decode_chunk)])  # [21, 3, H, W]
        frames = frames.clamp(0.0, 1.0)
        if self.replace_input_frame:
            frames[-1] = img[0]
        cams = orbit_cameras(NUM_ORBIT_FRAMES, float(elevation_deg), self.radius, self.fov_deg, S, S).to(dev)
        idx = torch.tensor(self.input_indices, device=dev, dtype=torch.long)  # [N]
        dino = None if self.dino is None else self.dino(img).float()  # [1, T, C]
        with self.autocast():
            gs = self.decoder(lat[:, idx], cams.c2w[idx][None], cams.K[idx][None], dino)  # batch [1]
        gaussians = gs[0].to(torch.float32).detach()
        return Prediction(
            image=img[0].cpu(), alpha=(alpha if alpha is not None else torch.ones_like(img[0, :1])).float().cpu(),
            latents=lat[0].cpu(), frames=frames.cpu(), cameras=cams.to("cpu"), input_indices=idx.cpu(),
            gaussians=gaussians, elevation_deg=float(elevation_deg),
        )


# ----------------------------------------------------------------------------------------------------------
# Writing results
# ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def write_prediction(pred: Prediction, out_dir: str | os.PathLike, turntable_frames: int = 60, fps: int = 24,
                     render_size: int | None = None, video_format: str = "mp4", background: float = 1.0,
                     overwrite: bool = True, backend: str = "auto") -> dict[str, Path]:
    """Write one prediction's files into ``out_dir``, atomically (all or nothing).

    Files:
        ``gaussians.ply`` (standard 3DGS layout), ``turntable.mp4`` (``.gif`` without ffmpeg or with
        ``video_format="gif"``; a 360° orbit at the input elevation, ``turntable_frames`` frames),
        ``views.png`` (the 21 SV3D frames decoded by the VAE, 7 per row, frame 20 = input last),
        ``renders.png`` / ``depth.png`` (the Gaussians rendered at the same 21 cameras: colour, and
        colourised depth: red near, blue far), ``input.png`` (the preprocessed input).
    Returns:
        name -> final path of each file.
    """
    from gsv3d_pl import viz
    from gsv3d_pl.cameras import orbit_cameras
    from gsv3d_pl.render import rasterize

    if video_format not in ("mp4", "gif"):
        raise ValueError(f"video_format must be mp4 or gif, got {video_format!r}")
    if turntable_frames < 1:
        raise ValueError(f"turntable_frames must be >= 1, got {turntable_frames}")
    S = int(render_size or pred.image.shape[-1])
    out_dir = Path(out_dir)
    gs = pred.gaussians
    dev = gs.means.device
    cams = orbit_cameras(NUM_ORBIT_FRAMES, pred.elevation_deg, float(pred.cameras.radii[0]),
                         _fov_deg(pred.cameras), S, S).to(dev)
    rgbs, alphas, depths = [], [], []
    for s in range(0, NUM_ORBIT_FRAMES, 7):
        vm, K = cams.viewmats[s:s + 7], cams.K[s:s + 7]
        bg = torch.full((vm.shape[0], 3), float(background), device=dev)
        rgb, alpha, depth = rasterize(gs.means, gs.quats, gs.scales, gs.opacities, gs.colors, vm, K, S, S,
                                      backgrounds=bg, backend=backend)  # [7, S, S, 3|1]
        rgbs.append(rgb.clamp(0, 1))
        alphas.append(alpha)
        depths.append(depth)
    rgb = torch.cat(rgbs).permute(0, 3, 1, 2).cpu()  # [21, 3, S, S]
    alpha = torch.cat(alphas).permute(0, 3, 1, 2).cpu()  # [21, 1, S, S]
    depth = torch.cat(depths).permute(0, 3, 1, 2).cpu()  # [21, 1, S, S]
    frames = viz.render_turntable(gs, turntable_frames, pred.elevation_deg, float(pred.cameras.radii[0]),
                                  _fov_deg(pred.cameras), S, background, backend=backend)  # [F, S, S, 3]

    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        gs.detach().to("cpu").save_ply(tmp / "gaussians.ply")
        viz.save_image(pred.image, tmp / "input.png")
        viz.save_image(viz.make_grid(pred.frames, nrow=7), tmp / "views.png")
        viz.save_image(viz.make_grid(rgb, nrow=7), tmp / "renders.png")
        viz.save_image(viz.make_grid(viz.colorize_depth(depth, alpha), nrow=7), tmp / "depth.png")
        video = viz.save_video(frames, tmp / f"turntable.{video_format}", fps=fps)
        names = ["gaussians.ply", "input.png", "views.png", "renders.png", "depth.png", video.name]
    return {Path(n).stem: out_dir / n for n in names}


def _fov_deg(cams) -> float:
    """Vertical FoV (degrees) of the first camera: 2·atan(H / (2 fy))."""
    return math.degrees(2 * math.atan(cams.height / (2 * float(cams.K[0, 1, 1]))))


# ----------------------------------------------------------------------------------------------------------
# Text -> image (for text -> 3D)
# ----------------------------------------------------------------------------------------------------------

T2I_KEY = "--t2i_pipeline"


def text_to_image(prompt: str, pipeline_dir: str | os.PathLike, num_steps: int = 30, guidance_scale: float = 7.5,
                  size: int | None = None, negative_prompt: str | None = None, seed: int = 0,
                  device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Generate an image from text with a local diffusers text-to-image pipeline (nothing is downloaded).

    Args:
        prompt: the text; ask for a single object on a plain white background so that the foreground can
            be estimated (:func:`estimate_foreground`).
        pipeline_dir: a folder written by ``DiffusionPipeline.save_pretrained`` (holds ``model_index.json``).
        num_steps, guidance_scale, negative_prompt: passed to the pipeline.
        size: output side in pixels (default: the pipeline's own default).
        seed: generator seed.
        device, dtype: where and in which precision to run (default fp16 on CUDA, fp32 otherwise).
    Returns:
        a ``PIL.Image.Image``.
    Raises:
        gsv3d_pl.weights.MissingWeightsError: ``pipeline_dir`` does not exist or holds no pipeline.
    """
    from gsv3d_pl.weights import MissingWeightsError, WeightSpec

    folder = Path(pipeline_dir).expanduser()
    spec = WeightSpec(
        name="text-to-image diffusers pipeline (for --prompt)",
        config_key=T2I_KEY,
        explicit=folder,
        source="a diffusers text-to-image pipeline folder (model_index.json + components), e.g. "
               "`huggingface-cli download stabilityai/stable-diffusion-2-1-base --local-dir DIR` on a machine with "
               "network access, or any `DiffusionPipeline.save_pretrained(DIR)`",
    )
    if not (folder / "model_index.json").is_file():
        raise MissingWeightsError(spec)
    from diffusers import DiffusionPipeline

    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    with warnings.catch_warnings():  # newer diffusers rename torch_dtype -> dtype; older ones only know torch_dtype
        warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
        pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype)
    pipe = pipe.to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(desc="text -> image")
    kwargs = dict(num_inference_steps=int(num_steps), guidance_scale=float(guidance_scale),
                  generator=torch.Generator(device=device).manual_seed(int(seed)))
    if negative_prompt:
        kwargs["negative_prompt"] = negative_prompt
    if size:
        kwargs["height"] = kwargs["width"] = int(size)
    out = pipe(prompt, **kwargs)
    images = getattr(out, "images", None)
    if not images:
        raise RuntimeError(f"the pipeline in {folder} returned no images (is it a text-to-image pipeline?)")
    img = images[0]
    if not hasattr(img, "mode"):  # numpy / tensor output types
        from PIL import Image

        img = Image.fromarray((np.clip(np.asarray(img), 0, 1) * 255 + 0.5).astype(np.uint8))
    return img
