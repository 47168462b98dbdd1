"""Text -> input image for text -> 3D: a local diffusers text-to-image pipeline, never downloaded."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch

from gsv3d_pl.weights import MissingWeightsError, WeightSpec

__all__ = ["T2I_KEY", "t2i_pipeline_spec", "text_to_image"]

T2I_KEY = "--t2i_pipeline"


def t2i_pipeline_spec(pipeline_dir: str | os.PathLike) -> WeightSpec:
    """The :class:`~gsv3d_pl.weights.WeightSpec` of a text-to-image pipeline folder (found when it holds
    ``model_index.json``, see :func:`text_to_image`)."""
    return WeightSpec(
        name="text-to-image diffusers pipeline (for --prompt)",
        config_key=T2I_KEY,
        explicit=Path(pipeline_dir).expanduser(),
        source="a diffusers text-to-image pipeline folder (model_index.json + components), e.g. "
               "`huggingface-cli download stabilityai/stable-diffusion-2-1-base --local-dir DIR` on a machine with "
               "network access, or any `DiffusionPipeline.save_pretrained(DIR)`",
    )


def text_to_image(prompt: str, pipeline_dir: str | os.PathLike, num_steps: int = 30, guidance_scale: float = 7.5,
                  size: int | None = None, negative_prompt: str | None = None, seed: int = 0,
                  device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Generate an image from text with a local diffusers text-to-image pipeline (nothing is downloaded).

    Args:
        prompt: the text; ask for a single object on a plain white background so that the foreground can
            be estimated (:func:`~gsv3d_pl.inference.preprocess.estimate_foreground`).
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
    folder = Path(pipeline_dir).expanduser()
    if not (folder / "model_index.json").is_file():
        raise MissingWeightsError(t2i_pipeline_spec(folder))
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
