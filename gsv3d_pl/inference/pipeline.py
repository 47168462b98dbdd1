"""The image -> 3D pipeline (:class:`ImageTo3D`): SV3D samples the orbit, the GS decoder lifts it to Gaussians.

CLIP embedding + VAE conditioning latent of the preprocessed image -> SV3D samples the 21-frame orbit latents
(frame 20 = the input view) -> the VAE decodes them for display -> N of them, with their orbit cameras and the
DINO tokens of the image, go through the GS decoder -> one set of Gaussians (:class:`Prediction`).

Memory (README "Memory"): ``dtype`` casts the UNet, VAE, CLIP and DINO weights (fp16/bf16 halve their
8.4 GiB in fp32 at paper scale); ``offload`` keeps those modules and the decoder on the CPU and moves each to the
GPU only while it runs (:func:`on_device`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from gsv3d_pl.orbit import DEFAULT_RADIUS, FOV_DEG, INPUT_FRAME, NUM_FRAMES, input_frames, orbit_angles

__all__ = ["Prediction", "ImageTo3D", "on_device", "DTYPES"]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _module_device(module) -> torch.device:
    """The device of a module's first parameter (else buffer); CPU for a module without tensors."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def on_device(module, device, enabled: bool = True):
    """Model offload: ``module`` on ``device`` inside the block, back where it was afterwards (also when the
    block raises), then ``torch.cuda.empty_cache()`` so the next module finds the memory free.

    A no-op when ``enabled`` is false, ``module`` is None, or it already is on ``device`` (e.g. on CPU).
    Yields the module.
    """
    device = torch.device(device)
    home = None if (not enabled or module is None) else _module_device(module)
    if home is None or home == device:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()


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
        input_indices: orbit frames fed to the decoder; default :func:`gsv3d_pl.orbit.input_frames` (num_input_views).
        num_input_views: N when ``input_indices`` is not given.
        radius, fov_deg: the orbit cameras (must match the decoder's training renders).
        background: background grey level of the training renders.
        cond_aug: noise augmentation of the conditioning latent (SV3D inference: 1e-5).
        num_steps: Euler-EDM steps (None = the SV3D model's default, 50).
        replace_input_frame: use the input image's own latent for frame 20 instead of the sampled one (the
            input view is known exactly; Stability's script overwrites that frame too).
        autocast: a zero-argument context-manager factory for mixed precision (e.g. a stage's ``autocast``): the
            decoder runs under it; SV3D sampling too when ``dtype`` is None.
        decode_chunk: frames per VAE decode call (bounds memory at 576²).
        dtype: None (weights as given) or the dtype to cast the SV3D UNet, VAE, CLIP and DINO weights to
            (torch.float16/bfloat16/float32). SV3D then samples in that dtype without autocast (autocast would
            keep a second, re-cast copy of the weights); the camera-angle embeddings, the sigmas and the latent
            arithmetic stay fp32 (:meth:`gsv3d_pl.models.SV3D.denoise`), the GS decoder stays fp32.
        device: where to run; default: the decoder's device.
        offload: keep the big modules on their current device (the CPU) and move each to ``device`` only while
            it runs (:func:`on_device`): CLIP + VAE encode -> SV3D -> VAE decode -> DINO + decoder.
    """

    def __init__(self, sv3d, vae, clip, decoder, dino=None, input_indices: list[int] | None = None,
                 num_input_views: int = 4, radius: float = DEFAULT_RADIUS, fov_deg: float = FOV_DEG, background: float = 1.0,
                 cond_aug: float = 1e-5, num_steps: int | None = None, replace_input_frame: bool = True,
                 autocast=None, decode_chunk: int = 4, dtype: torch.dtype | None = None, device=None,
                 offload: bool = False):
        if sv3d is None:
            raise ValueError("ImageTo3D needs an SV3D model (a distill config); a decoder-only config has none")
        self.sv3d, self.vae, self.clip, self.decoder, self.dino = sv3d, vae, clip, decoder, dino
        idx = list(input_indices) if input_indices is not None else input_frames(num_input_views)
        if not idx or len(set(idx)) != len(idx) or not all(0 <= i < NUM_FRAMES for i in idx):
            raise ValueError(f"input_indices must be distinct orbit frames in [0, {NUM_FRAMES - 1}], got {idx}")
        self.input_indices = idx
        self.radius, self.fov_deg, self.background = float(radius), float(fov_deg), float(background)
        self.cond_aug, self.num_steps = float(cond_aug), num_steps
        self.replace_input_frame = replace_input_frame
        self.autocast = autocast if autocast is not None else contextlib.nullcontext
        self.decode_chunk = max(1, int(decode_chunk))
        self.dtype, self.offload = dtype, bool(offload)
        self._device = torch.device(device) if device is not None else None
        if dtype is not None:
            self.cast_weights(dtype)

    def cast_weights(self, dtype: torch.dtype) -> None:
        """Cast the SV3D UNet (LoRA included), VAE, CLIP and DINO weights to ``dtype``.

        Only the wrapped networks are cast: the encoders' normalisation buffers and the GS decoder stay fp32.
        """
        self.sv3d.unet.to(dtype)
        for enc, attr in ((self.vae, "vae"), (self.clip, "visual"), (self.dino, "vit")):
            if enc is not None:
                getattr(enc, attr, enc).to(dtype)
        self.dtype = dtype

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
        """Where the pipeline runs (with ``offload`` the weights live elsewhere between the steps)."""
        return self._device if self._device is not None else _module_device(self.decoder)

    def _on(self, module):
        return on_device(module, self.device, self.offload)

    @torch.no_grad()
    def __call__(self, image: Tensor, alpha: Tensor | None = None, elevation_deg: float = 10.0, seed: int = 0,
                 num_steps: int | None = None, progress: bool = True) -> Prediction:
        """Run the pipeline on one preprocessed image.

        Args:
            image: [3, H, W] in [0, 1], object centred on the background
                (:func:`~gsv3d_pl.inference.preprocess.preprocess_image`); H = W = the model's resolution (a
                multiple of the VAE's ``downsample``, 8).
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
        f = int(self.vae.downsample)  # the VAE's spatial factor (8): latents are S/f on a side
        if image.shape[-2] != S or S % f:
            raise ValueError(f"image must be square with a side divisible by {f} (VAE latents), got {tuple(image.shape)}")
        dev = self.device
        img = image.to(dev, torch.float32)[None]  # [1, 3, H, W]
        g = torch.Generator(device=dev).manual_seed(int(seed))
        cond_aug = torch.full((1,), self.cond_aug, device=dev)  # [1]
        with self._on(self.clip):
            clip_emb = self.clip(img).float()  # [1, 1, D]
        with self._on(self.vae):
            cond_latent = self.vae.encode_cond(img, cond_aug, generator=g).float()  # [1, 4, h, w], unscaled
            input_latent = self.vae.encode(img).float() if self.replace_input_frame else None  # [1, 4, h, w]
        polars, azimuths = orbit_angles(1, NUM_FRAMES, float(elevation_deg), device=dev)  # [1, 21] each
        # With an explicit dtype the UNet already runs in it; autocast would only add a re-cast copy of it.
        sample_ctx = self.autocast if self.dtype is None else contextlib.nullcontext
        with self._on(self.sv3d), sample_ctx():
            lat = self.sv3d.sample(clip_emb, cond_latent, polars, azimuths, cond_aug,
                                   num_steps=num_steps or self.num_steps, generator=g, progress=progress)
        lat = lat.float()  # [1, 21, 4, h, w]
        if self.replace_input_frame:
            lat[:, INPUT_FRAME] = input_latent
        with self._on(self.vae):
            frames = torch.cat([self.vae.decode(c).float() for c in lat[0].split(self.decode_chunk)])  # [21, 3, H, W]
        frames = frames.clamp(0.0, 1.0)
        if self.replace_input_frame:
            frames[INPUT_FRAME] = img[0]
        cams = orbit_cameras(NUM_FRAMES, float(elevation_deg), self.radius, self.fov_deg, S, S).to(dev)
        idx = torch.tensor(self.input_indices, device=dev, dtype=torch.long)  # [N]
        with self._on(self.dino):
            dino = None if self.dino is None else self.dino(img).float()  # [1, T, C]
        with self._on(self.decoder), self.autocast():
            gs = self.decoder(lat[:, idx], cams.c2w[idx][None], cams.K[idx][None], dino)  # batch [1]
        gaussians = gs[0].to(torch.float32).detach()
        return Prediction(
            image=img[0].cpu(), alpha=(alpha if alpha is not None else torch.ones_like(img[0, :1])).float().cpu(),
            latents=lat[0].cpu(), frames=frames.cpu(), cameras=cams.to("cpu"), input_indices=idx.cpu(),
            gaussians=gaussians, elevation_deg=float(elevation_deg),
        )

