"""Input images for image -> 3D: loading and validation, foreground (alpha or a plain background), framing.

Preprocessing follows the training renders: the object is cut out (the image's alpha, or the foreground
estimated from a plain background colour), recentred, rescaled so that its larger side spans
``foreground_ratio`` of the frame, composited on the background colour and resized to the model's
resolution. The default ratio is the image-plane size of a sphere of diameter 1 (the unit box every
training object is normalised into) seen by the orbit camera (:data:`~gsv3d_pl.orbit.DEFAULT_RADIUS`,
:data:`~gsv3d_pl.orbit.FOV_DEG`): 0.85. Every unusable image raises :class:`ImageInputError` naming the file.

The cost is bounded by the output size, not the input's (a small file can declare a huge image):

- the header is checked before anything is decoded: more than :data:`MAX_IMAGE_PIXELS` pixels (or Pillow's
  own decompression-bomb limit, if lower) or an aspect ratio over :data:`MAX_ASPECT_RATIO` is refused;
- an image whose long side exceeds ``max(WORKING_SIZE, 2 * size)`` is decoded reduced (JPEG: ``draft`` at
  1/2..1/8 scale; then ``Image.reduce``) before anything becomes float; when the object is small in it, a
  second pass crops the object's region from the full image at >= 2x the output resolution, so the cut-out
  keeps its detail. Smaller images take the direct path (their output is unchanged).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gsv3d_pl.orbit import DEFAULT_RADIUS, FOV_DEG

__all__ = [
    "ImageInputError",
    "MIN_IMAGE_SIZE",
    "MAX_IMAGE_PIXELS",
    "MAX_ASPECT_RATIO",
    "WORKING_SIZE",
    "IMAGE_SUFFIXES",
    "default_foreground_ratio",
    "open_image",
    "load_image",
    "list_images",
    "estimate_foreground",
    "preprocess_image",
]

MIN_IMAGE_SIZE = 64
# 80 MP (e.g. 10000 x 8000) decodes to at most 320 MB of uint8 RGBA; a 10000 x 10000 image is refused.
MAX_IMAGE_PIXELS = 80_000_000
# An object photo is close to square; 20:1 still admits a long thin object. A 20000 x 64 strip is refused.
MAX_ASPECT_RATIO = 20.0
# Long side of the float working copy (at least 2x the output size): 2048 px keeps the cut-out at full
# quality for a 576 px output while bounding the float arrays to a few hundred MB.
WORKING_SIZE = 2048
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
_DOWNSCALE_HINT = "downscale it (e.g. to 2048 px on the long side) and try again"


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

def _pixel_limit() -> int:
    from PIL import Image

    pil = Image.MAX_IMAGE_PIXELS  # None: the user turned Pillow's guard off; ours stays
    return MAX_IMAGE_PIXELS if pil is None else min(MAX_IMAGE_PIXELS, int(pil))


def _check_size(w: int, h: int, name: str, min_size: int) -> None:
    """Refusals that need only the header's size; nothing has been decoded yet."""
    if w == 0 or h == 0:
        raise ImageInputError(f"{name}: the image has zero size ({w}x{h})")
    limit = _pixel_limit()
    if w * h > limit:
        raise ImageInputError(f"{name}: the image is {w}x{h} px ({w * h / 1e6:.1f} MP); at most "
                              f"{limit / 1e6:.1f} MP is accepted (a guard against decompression bombs): "
                              f"{_DOWNSCALE_HINT}")
    if min(w, h) < min_size:
        raise ImageInputError(f"{name}: the image is {w}x{h} px; at least {min_size} px on each side is needed")
    if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise ImageInputError(f"{name}: the image is {w}x{h} px, an aspect ratio of {max(w, h) / min(w, h):.0f}:1; "
                              f"at most {MAX_ASPECT_RATIO:.0f}:1 is accepted: crop it around the object")


def open_image(source, name: str | None = None, min_size: int = MIN_IMAGE_SIZE):
    """Open an image lazily and check its header's size; nothing is decoded.

    Refused with an :class:`ImageInputError` naming the file: a missing, empty or unreadable file; more than
    :data:`MAX_IMAGE_PIXELS` pixels (or Pillow's ``Image.MAX_IMAGE_PIXELS``, if lower: its
    decompression-bomb warning and error become this refusal); a side under ``min_size``; an aspect ratio
    over :data:`MAX_ASPECT_RATIO`.

    Args:
        source: a path, or a ``PIL.Image.Image``.
        name: how to call it in messages (default: the path).
    Returns:
        the ``PIL.Image.Image`` (lazily loaded when opened from a path).
    """
    from PIL import Image, UnidentifiedImageError

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
            with warnings.catch_warnings():
                # Pillow only warns between its limit and twice that: make the warning a refusal too.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(path)
        except UnidentifiedImageError:
            raise ImageInputError(f"{name}: not an image (PIL cannot read this format); give a PNG/JPEG/WebP file") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageInputError(f"{name}: refused as a possible decompression bomb ({e}): {_DOWNSCALE_HINT}") from None
        except OSError as e:
            raise ImageInputError(f"{name}: cannot open the image ({e})") from None
    _check_size(*img.size, name, min_size)
    return img


def _decode(img, name: str, downscale: float = 1.0, fresh: bool = False):
    """Decode an image from :func:`open_image`, EXIF-oriented. ``fresh`` (just opened from a path, not yet
    decoded): a JPEG is decoded up to ``downscale`` times smaller by ``draft`` (1/2, 1/4 or 1/8, at no extra
    cost) and the orientation is applied in place; other formats decode at full size."""
    from PIL import ImageOps

    try:
        img.seek(0)
        if fresh and downscale >= 2 and img.format in ("JPEG", "MPO"):  # MPO: phones' multi-picture JPEG
            w, h = img.size
            img.draft(img.mode, (math.ceil(w / downscale), math.ceil(h / downscale)))
        img.load()  # decode now: truncated/corrupt data fails here, not later
        if _exif_rotated(img):
            if fresh:  # our own image: in place, no second full-size copy
                ImageOps.exif_transpose(img, in_place=True)
            else:  # a caller's image is left untouched
                img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageInputError(f"{name}: the image is corrupt or truncated ({e}); re-export it") from None
    return img


def _exif_rotated(img) -> bool:
    try:
        return img.getexif().get(0x0112, 1) not in (1, None)
    except Exception:  # unreadable EXIF: exif_transpose would ignore it too
        return False


def _has_alpha(img) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or ("transparency" in img.info
                                                                and img.mode in ("P", "RGB", "L"))


def _reduce(img, factor: int):
    """``img`` reduced by an integer box filter, a band of rows at a time: the mode conversion ``reduce``
    needs (premultiplied RGBA for transparency, I for 16 bit, RGB for the rest; :func:`_pil_to_float` reads
    them as it reads the original) never copies the whole image."""
    from PIL import Image

    if factor <= 1:
        return img
    mode = img.mode
    if _has_alpha(img):
        mode = "RGBA"
    elif mode.startswith("I;16"):
        mode = "I"
    elif mode not in ("I", "F", "RGB", "L"):
        mode = "RGB"
    w, h = img.size
    out = Image.new(mode, (math.ceil(w / factor), math.ceil(h / factor)))
    rows = factor * max(1, (1 << 22) // (w * factor))  # ~4 MP a band, a multiple of the factor
    for y in range(0, h, rows):
        band = img.crop((0, y, w, min(h, y + rows)))
        out.paste((band if band.mode == mode else band.convert(mode)).reduce(factor), (0, y // factor))
    return out


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
    if _has_alpha(img):
        arr = np.asarray(img.convert("RGBA")).astype(np.float32) / 255.0  # [H, W, 4]
        rgb, alpha = arr[..., :3], arr[..., 3]
        if alpha.min() >= 1.0:  # an alpha channel that hides nothing: treat as RGB
            alpha = None
        return np.ascontiguousarray(rgb), alpha
    if mode != "RGB":
        img = img.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV
    return np.asarray(img).astype(np.float32) / 255.0, None


def load_image(source, name: str | None = None, min_size: int = MIN_IMAGE_SIZE, max_side: int | None = None
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """Open and validate an image; every failure is an :class:`ImageInputError` naming the file.

    Handles EXIF orientation, palette / greyscale / 16-bit / CMYK modes (converted, not rejected) and
    multi-frame files (first frame). The size checks of :func:`open_image` run before decoding.

    Args:
        source: a path, or a ``PIL.Image.Image``.
        name: how to call it in messages (default: the path).
        min_size: smallest accepted side in pixels.
        max_side: decode reduced (an integer factor) so that the long side is at most this (None: full size).
    Returns:
        rgb [H, W, 3] float32 in [0, 1]; alpha [H, W] float32 in [0, 1], or None when the image has no
        (non-trivial) transparency.
    """
    name = name or (str(source) if not hasattr(source, "mode") else "<image>")
    img = open_image(source, name, min_size)
    img = _decode(img, name, max(img.size) / max_side if max_side else 1.0, fresh=not hasattr(source, "mode"))
    if max_side:
        img = _reduce(img, math.ceil(max(img.size) / max_side))
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


def _cut_out(img, name: str, alpha_mode: str, strict: bool = True) -> tuple[np.ndarray, np.ndarray, str]:
    """(rgb [H, W, 3], alpha [H, W], how the alpha was found: "alpha" | "border" | "none") of a decoded image.
    ``strict=False``: an "alpha" cut-out whose region is all opaque keeps alpha 1 (a crop of a larger image)."""
    rgb, alpha = _pil_to_float(img, name)  # [H, W, 3], [H, W] | None
    if alpha_mode == "alpha" and alpha is None:
        if strict:
            raise ImageInputError(f"{name}: an RGBA image with transparency is needed (alpha_mode='alpha')")
        alpha = np.ones(rgb.shape[:2], np.float32)
    if alpha_mode == "none":
        return rgb, np.ones(rgb.shape[:2], np.float32), "none"
    if alpha_mode == "border" or alpha is None:
        return (*estimate_foreground(rgb, name), "border")
    return rgb, alpha, "alpha"


def _bbox(alpha: np.ndarray, name: str) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the opaque (alpha > 0.5) pixels; an empty alpha is an error."""
    ys, xs = np.nonzero(alpha > 0.5)
    if ys.size == 0:
        raise ImageInputError(f"{name}: the alpha channel is empty (fully transparent); nothing to reconstruct")
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def _bounded_cut_out(img, source, name: str, size: int, ratio: float, alpha_mode: str, bound: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The cut-out of an image larger than ``bound``, on a working copy of bounded size.

    Pass 1 decodes the whole image reduced to a long side <= ``bound`` and finds the object (every refusal
    about the content happens here). When the object's crop there is under 2x the output size, pass 2 takes
    its region (the crop square, plus a margin for the border estimate) from the full image, reduced to
    >= 2x the output: the cut-out keeps the detail of a small object in a large image.
    """
    long = max(img.size)
    fresh = not hasattr(source, "mode")  # opened here from a path, not decoded yet
    full = _decode(img, name, long / bound, fresh)
    small = _reduce(full, math.ceil(max(full.size) / bound))
    if fresh and max(full.size) < long:
        full = None  # a JPEG decoded reduced by draft: pass 2 decodes the file again, at its own scale
    rgb, alpha, how = _cut_out(small, name, alpha_mode)
    y0, y1, x0, x1 = _bbox(alpha, name)
    n = max(y1 - y0, x1 - x0) / ratio  # crop side, working px
    scale = long / max(small.size)  # full-size px per working px
    if n >= 2 * size or scale <= 1:
        return rgb, alpha
    sh, sw = alpha.shape
    half = n / 2 + 0.05 * n + 2  # margin: the crop square, a border ring, and pass 1's rounding
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    frac = (max(0.0, (cx - half) / sw), max(0.0, (cy - half) / sh), min(1.0, (cx + half) / sw),
            min(1.0, (cy + half) / sh))  # the region, as fractions of the image
    del small
    factor = max(1, int(n * scale // (2 * size)))  # full-size px per pass-2 px, keeping >= 2x the output
    if full is None:
        full = _decode(open_image(source, name), name, factor, fresh=True)
    fw, fh = full.size
    box = (math.floor(frac[0] * fw), math.floor(frac[1] * fh), math.ceil(frac[2] * fw), math.ceil(frac[3] * fh))
    region = _reduce(full.crop(box), max(1, int(factor * max(fw, fh) / long)))  # the rest of the factor
    try:
        return _cut_out(region, name, how, strict=False)[:2]
    except ImageInputError:  # e.g. the ring around the object is less plain than the whole border: keep pass 1
        return rgb, alpha


def preprocess_image(source, size: int = 576, foreground_ratio: float | None = None, background: float = 1.0,
                     alpha_mode: str = "auto", name: str | None = None) -> tuple[Tensor, Tensor]:
    """Load, validate, cut out, recentre, rescale, composite and resize one input image.

    Memory and time are bounded by ``size``, not by the input (module docstring): huge or oddly shaped
    images are refused from their header, large ones are decoded reduced.

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
    img = open_image(source, name)
    bound = max(WORKING_SIZE, 2 * size)
    if max(img.size) <= bound:
        rgb, alpha, _ = _cut_out(_decode(img, name, fresh=not hasattr(source, "mode")), name, alpha_mode)  # [H, W, 3], [H, W]
    else:
        rgb, alpha = _bounded_cut_out(img, source, name, size, ratio, alpha_mode, bound)
    y0, y1, x0, x1 = _bbox(alpha, name)
    side = max(y1 - y0, x1 - x0) / ratio  # crop side in working pixels
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2

    # Premultiplied RGBA, so resampling does not bleed the hidden colours of transparent pixels.
    rgba = torch.from_numpy(np.concatenate([rgb * alpha[..., None], alpha[..., None]], -1)).permute(2, 0, 1)  # [4,H,W]
    del rgb, alpha
    if side > 2 * bound:  # a small foreground_ratio: shrink the working copy first so the canvas stays bounded
        f = 2 * bound / side
        rgba = F.interpolate(rgba[None], scale_factor=f, mode="bilinear", antialias=True, align_corners=False)[0]
        side, cy, cx = side * f, cy * f, cx * f
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
