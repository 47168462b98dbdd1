"""Input images for image -> 3D: loading and validation, foreground (alpha or a plain background), framing.

Preprocessing follows the training renders: the object is cut out (the image's alpha, or the foreground
estimated from a plain background colour), recentred, rescaled so that its larger side spans
``foreground_ratio`` of the frame, composited on the background colour and resized to the model's
resolution. The default ratio is the image-plane size of a sphere of diameter 1 (the unit box every
training object is normalised into) seen by the orbit camera (:data:`~gsv3d_pl.orbit.DEFAULT_RADIUS`,
:data:`~gsv3d_pl.orbit.FOV_DEG`): 0.85. Every unusable image raises :class:`ImageInputError` naming the file.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gsv3d_pl.orbit import DEFAULT_RADIUS, FOV_DEG

__all__ = [
    "ImageInputError",
    "MIN_IMAGE_SIZE",
    "IMAGE_SUFFIXES",
    "default_foreground_ratio",
    "load_image",
    "list_images",
    "estimate_foreground",
    "preprocess_image",
]

MIN_IMAGE_SIZE = 64
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


class ImageInputError(ValueError):
    """An input image that cannot be used. The message names the file and what to do about it."""


def default_foreground_ratio(radius: float = DEFAULT_RADIUS, fov_deg: float = FOV_DEG,
                             object_diameter: float = 1.0) -> float:
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

