"""Single image (or text prompt) -> 3D Gaussians, the library behind ``gsv3d predict``.

- :mod:`.preprocess`: load and validate an input image, cut the object out, recentre and resize it, at a
  cost bounded by the output size (huge or oddly shaped images are refused from their header).
- :mod:`.pipeline`: :class:`ImageTo3D`, SV3D's orbit -> the GS decoder -> :class:`Prediction`.
- :mod:`.outputs`: :func:`write_prediction` (.ply, turntable, views/renders/depth grids) into an atomic folder.
- :mod:`.prompt`: :func:`text_to_image` with a local diffusers pipeline, for text -> 3D.
"""

from gsv3d_pl.inference.outputs import atomic_output_dir, write_prediction
from gsv3d_pl.inference.pipeline import ImageTo3D, Prediction
from gsv3d_pl.inference.preprocess import (
    IMAGE_SUFFIXES,
    MAX_ASPECT_RATIO,
    MAX_IMAGE_PIXELS,
    MIN_IMAGE_SIZE,
    ImageInputError,
    default_foreground_ratio,
    estimate_foreground,
    list_images,
    load_image,
    open_image,
    preprocess_image,
)
from gsv3d_pl.inference.prompt import T2I_KEY, t2i_pipeline_spec, text_to_image

__all__ = [
    "ImageInputError",
    "MIN_IMAGE_SIZE",
    "MAX_IMAGE_PIXELS",
    "MAX_ASPECT_RATIO",
    "IMAGE_SUFFIXES",
    "default_foreground_ratio",
    "open_image",
    "load_image",
    "estimate_foreground",
    "preprocess_image",
    "list_images",
    "Prediction",
    "ImageTo3D",
    "atomic_output_dir",
    "write_prediction",
    "T2I_KEY",
    "t2i_pipeline_spec",
    "text_to_image",
]
