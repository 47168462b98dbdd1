"""3D consistency of a generated orbit, with no ground truth: "3D consistency (ours, no GT)".

SV3D generates the 21 orbit frames of an object; the frozen GS decoder reads N of them (``input_indices``) and
returns Gaussians. If the orbit is 3D-consistent, one 3D scene explains all its frames, so those Gaussians rendered
at the cameras of the other 21 − N frames reproduce what SV3D generated there; if the frames contradict each other,
the frames the decoder did not read disagree with its renders. For each object b and each orbit frame k it did not
read (:func:`consistency_frames`, sorted)::

    consistency_psnr[b, f] = PSNR(render(G_b, c2w_b[k_f], K_b[k_f]), VAE.decode(lat[b, k_f]))
    consistency_ssim[b, f] = SSIM(same pair)

per image (3 x H x W, data range 1; :func:`~gsv3d_pl.stages.heldout.per_image_psnr` / ``per_image_ssim``), averaged
over all (object, frame) images as the PSNR against GT is. ``lat`` is the orbit as the evaluation uses it (after the
input frame's replacement), G_b what the decoder made of frames ``input_indices[b]`` of it.

What it measures and what not: agreement between the generated frames and one 3D explanation of some of them, with
the decoder as the judge. It reads no ground truth, so it says nothing about fidelity to the object (a blurry but
self-consistent orbit can score high: read it beside the PSNR against GT), and a weak decoder lowers it for every
orbit alike. With the decoder fixed (distilled vs undistilled SV3D in one evaluation), its difference is the
orbit's.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from gsv3d_pl.metrics.columns import CONSISTENCY_KEYS
from gsv3d_pl.orbit import NUM_FRAMES
from gsv3d_pl.stages.common import gather_views, novel_view_indices
from gsv3d_pl.stages.heldout import per_image_psnr, per_image_ssim

__all__ = ["CONSISTENCY_KEYS", "consistency_frames", "consistency_scores", "orbit_consistency"]

def consistency_frames(input_indices: Tensor, num_frames: int = NUM_FRAMES) -> Tensor:
    """The orbit frames the decoder did not read: input_indices [B, N] (orbit frames, < num_frames) -> [B, F] sorted,
    F = num_frames − N."""
    if (input_indices >= num_frames).any() or (input_indices < 0).any():
        raise ValueError(f"consistency_frames: input_indices must be orbit frames in [0, {num_frames}), got "
                         f"{input_indices.tolist()}")
    return novel_view_indices(input_indices, num_frames)


def consistency_scores(rendered: Tensor, generated: Tensor) -> dict[str, Tensor]:
    """Per-image PSNR (dB) and SSIM of the renders against the generated frames.

    Args:
        rendered: [B, F, 3, H, W] the decoder's Gaussians rendered at the frames' cameras, in [0, 1].
        generated: [B, F, 3, H, W] the generated frames (decoded), in [0, 1].
    Returns:
        {"consistency_psnr": [B, F], "consistency_ssim": [B, F]} (float32, on ``rendered``'s device).
    """
    if rendered.shape != generated.shape or rendered.dim() != 5:
        raise ValueError(f"consistency_scores: rendered {tuple(rendered.shape)} and generated "
                         f"{tuple(generated.shape)} must both be [B, F, 3, H, W]")
    B, F = rendered.shape[:2]
    r, g = rendered.flatten(0, 1), generated.to(rendered.device).flatten(0, 1)  # [B*F, 3, H, W]
    return {"consistency_psnr": per_image_psnr(r, g).reshape(B, F).float(),
            "consistency_ssim": per_image_ssim(r, g).reshape(B, F).float()}


def orbit_consistency(latents: Tensor, input_indices: Tensor, rendered: Tensor,
                      decode: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """The 3D-consistency scores of generated orbits (module docstring).

    Args:
        latents: [B, 21, C, h, w] the generated orbit's scaled latents (as the decoder read them).
        input_indices: [B, N] the frames the decoder read.
        rendered: [B, F, 3, H, W] its Gaussians rendered at the cameras of ``consistency_frames(input_indices)``,
            in that order.
        decode: scaled latents [M, C, h, w] -> images [M, 3, H, W] in [0, 1] (``VAE.decode``).
    Returns:
        {"consistency_psnr": [B, F], "consistency_ssim": [B, F]}.
    """
    frames = consistency_frames(input_indices.to(latents.device), latents.shape[1])  # [B, F]
    if rendered.shape[:2] != frames.shape:
        raise ValueError(f"orbit_consistency: rendered has {tuple(rendered.shape[:2])} (B, F) views, the orbit's "
                         f"unread frames are {tuple(frames.shape)}")
    z = gather_views(latents, frames)  # [B, F, C, h, w]
    generated = decode(z.flatten(0, 1).float()).float()  # [B*F, 3, H, W]
    return consistency_scores(rendered, generated.reshape(*frames.shape, *generated.shape[1:]))
