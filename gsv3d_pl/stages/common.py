"""What both stages share: the rule for what a checkpoint holds, AdamW + warmup/cosine, NaN guards,
bf16 autocast on GPU, latent gathering, novel-view selection and the DINO/decoder consistency check."""

from __future__ import annotations

import contextlib
import logging
import math
import zlib
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from gsv3d_pl.batch import check_batch
from gsv3d_pl.models.frozen import is_frozen
from gsv3d_pl.stages.losses import NonFiniteLossError, check_finite

__all__ = ["StageBase", "warmup_cosine", "gather_views", "novel_view_indices", "sample_view_subset", "check_dino",
           "check_vae_factor", "check_data_compat", "orbit_latents", "sv3d_conditioning", "sample_orbit",
           "object_noise"]

log = logging.getLogger(__name__)


def check_vae_factor(vae: nn.Module, decoder: nn.Module, decoder_source: str) -> None:
    """A decoder that places rays at ``vae_factor`` image pixels per latent pixel must get that VAE's latents."""
    # an attribute, else the recorded config (getattr would reach diffusers' deprecated config-attribute lookup)
    want = vars(decoder).get("vae_factor", dict(getattr(decoder, "config", None) or {}).get("vae_factor"))
    have = getattr(vae, "downsample", None)
    if want is not None and have is not None and int(want) != int(have):
        raise ValueError(f"the decoder ({decoder_source}) has vae_factor={want} but the VAE downsamples by {have} "
                         "(model.init_args.vae): its rays and intrinsics would not match the latents")


def check_data_compat(model: nn.Module, datamodule) -> None:
    """Facts of the data section the model section must agree with, checked before anything renders.

    Duck-typed (``gsv3d_pl`` never imports ``datamodules``): the datamodule's ``resolution`` must be a multiple of
    the VAE's downsampling times the decoder's patch size, so every latent splits into whole tokens.
    """
    res = getattr(datamodule, "resolution", None)
    vae = getattr(model, "vae", None)
    factor = getattr(vae, "downsample", None)
    if res is None or factor is None:
        return
    decoder = getattr(model, "decoder", None)
    patch = int(vars(decoder).get("patch_size", 1) or 1) if decoder is not None else 1
    need = int(factor) * patch
    if int(res) % need:
        what = f"the VAE's downsampling ({factor})" + (f" x the decoder's patch_size ({patch})" if patch > 1 else "")
        raise ValueError(f"data.init_args.resolution={res} is not a multiple of {need} = {what} "
                         f"(model.init_args.vae): use e.g. {max(need, int(res) // need * need)} or "
                         f"{(int(res) // need + 1) * need}")


def check_dino(dino: nn.Module | None, decoder: nn.Module, decoder_source: str) -> None:
    """The decoder cross-attends to DINO tokens iff it has ``dino_dim``: the encoder and the decoder must agree.

    ``decoder_source`` names where the decoder comes from in messages (a config key or a checkpoint).
    """
    dino_dim = getattr(decoder, "dino_dim", None)
    if dino is None and dino_dim is not None:
        raise ValueError(f"model.init_args.dino is null but the decoder ({decoder_source}) has dino_dim={dino_dim} "
                         "(cross-attention to DINO tokens): set model.init_args.dino, or use a decoder with "
                         "dino_dim: null (the 'w/o DINO' ablation)")
    if dino is not None and dino_dim is None:
        raise ValueError(f"the decoder ({decoder_source}) has dino_dim: null (no cross-attention) but "
                         "model.init_args.dino is set: set model.init_args.dino: null")
    if dino is not None and getattr(dino, "embed_dim", dino_dim) != dino_dim:
        raise ValueError(f"DINO embed_dim {dino.embed_dim} != the decoder's dino_dim {dino_dim} ({decoder_source})")


# ---- SV3D's inputs (both stages that train SV3D: distill and sv3d) ------------------------------------------
@torch.no_grad()
def orbit_latents(vae: nn.Module, batch: dict) -> Tensor:
    """z0: scaled latents of the 21 orbit frames (target views 0..20), [B, 21, C, h, w]; the datamodule's cached
    ``target_latents`` when present, else encoded here."""
    from gsv3d_pl.orbit import NUM_FRAMES

    if "target_latents" in batch:
        return batch["target_latents"][:, :NUM_FRAMES].float()
    imgs = batch["target_images"][:, :NUM_FRAMES].float()  # [B, 21, 3, H, W]
    lat = vae.encode(imgs.flatten(0, 1))  # [B*21, C, h, w]
    return lat.reshape(*imgs.shape[:2], *lat.shape[1:]).float()


@torch.no_grad()
def sv3d_conditioning(vae: nn.Module, clip: nn.Module, batch: dict, cond_aug: Tensor) -> dict[str, Tensor]:
    """SV3D's conditioning of the input view (``cond_image`` [B, 3, H, W], orbit frame INPUT_FRAME).

    cond_aug: [B] noise-augmentation std of the conditioning image (also fed to the UNet).
    Returns clip_emb [B, 1, D], cond_latent [B, C, h, w] (unscaled), cond_aug [B], polars / azimuths [B, 21].
    """
    img = batch["cond_image"].float()
    return {
        "clip_emb": clip(img).float(),
        "cond_latent": vae.encode_cond(img, cond_aug).float(),
        "cond_aug": cond_aug,
        "polars": batch["orbit_polars_rad"].float(),
        "azimuths": batch["orbit_azimuths_rad"].float(),
    }


def object_noise(uids: Sequence[str], seed: int, shape: Sequence[int]) -> Tensor:
    """Unit-variance noise [len(uids), *shape] (CPU, float32), row b from its own generator seeded by (``seed``,
    crc32 of ``uids[b]``).

    An object's noise then depends on the seed and its uid only: not on the batch size, its place in the batch, the
    DDP rank or the device (CPU generators draw the same numbers everywhere; Python's ``hash`` of a str is salted
    per process, crc32 is not). torch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so the pair
    is hashed into 32 bits: the crc32 of the uid, started from the seed. Two objects may share a stream (a 32-bit
    collision: about 1% for 10 000 objects); harmless, as their conditioning differs.
    """
    rows = []
    for uid in uids:
        g = torch.Generator().manual_seed(zlib.crc32(str(uid).encode("utf-8"), int(seed) & 0xFFFFFFFF))
        rows.append(torch.randn(tuple(shape), generator=g))
    return torch.stack(rows)


@torch.no_grad()
def sample_orbit(sv3d: nn.Module, c: dict[str, Tensor], num_steps: int, seed: int,
                 uids: Sequence[str] | None = None) -> Tensor:
    """SV3D's sampler on conditioning ``c`` (:func:`sv3d_conditioning`): [B, 21, C, h, w].

    ``uids`` (one per object, e.g. the batch's ``uid``): each object starts from :func:`object_noise` of (``seed``,
    its uid), so its orbit is the same in any batch. Without: one generator seeded by ``seed`` draws the whole
    batch's noise (an object's noise then depends on its batch).
    """
    if uids is None:
        g = torch.Generator(device=c["cond_latent"].device).manual_seed(seed)
        return sv3d.sample(c["clip_emb"], c["cond_latent"], c["polars"], c["azimuths"], c["cond_aug"],
                           num_steps=num_steps, generator=g, progress=False).float()
    B, F = c["azimuths"].shape
    if len(uids) != B:
        raise ValueError(f"sample_orbit: {len(uids)} uids for a batch of {B} objects")
    shape = (F, sv3d.unet.config.out_channels, *c["cond_latent"].shape[-2:])  # [F, C, h, w]
    latents = object_noise(uids, seed, shape).to(c["cond_latent"].device)  # [B, F, C, h, w]
    return sv3d.sample(c["clip_emb"], c["cond_latent"], c["polars"], c["azimuths"], c["cond_aug"],
                       num_steps=num_steps, latents=latents, progress=False).float()


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """lr multiplier: linear warmup 1/w..1 over ``warmup_steps``, then cosine from 1 to ``min_lr_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def gather_views(x: Tensor, idx: Tensor) -> Tensor:
    """``x[b, idx[b]]`` for every b: x [B, Q, ...], idx [B, N] long -> [B, N, ...]."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], idx.to(x.device)]


def sample_view_subset(batch_size: int, num_views: int, k: int | None, device=None) -> Tensor | None:
    """k distinct random view indices per object, [B, k] sorted; None when k is None or >= num_views (all views)."""
    if k is None or k >= num_views:
        return None
    if k < 1:
        raise ValueError(f"model.init_args.views_per_step must be >= 1 or null, got {k}")
    return torch.rand(batch_size, num_views, device=device).argsort(dim=1)[:, :k].sort(dim=1).values


def novel_view_indices(input_indices: Tensor, num_views: int) -> Tensor:
    """Indices of the views that are not inputs: input_indices [B, N] -> [B, V], V = Q - N (sorted).

    Every row must hold N distinct indices in [0, Q) (as every datamodule yields), so every row has the
    same number of novel views.
    """
    B = input_indices.shape[0]
    is_input = torch.zeros(B, num_views, dtype=torch.bool, device=input_indices.device)  # [B, Q]
    is_input[torch.arange(B, device=input_indices.device)[:, None], input_indices] = True
    counts = (~is_input).sum(dim=1)
    if (counts != counts[0]).any():
        raise ValueError(f"input_indices rows must hold distinct view indices; got {input_indices.tolist()}")
    order = torch.argsort(is_input.to(torch.int8), dim=1, stable=True)  # novel (0) first, in index order
    return order[:, : int(counts[0])]


class StageBase(pl.LightningModule):
    """Shared machinery. Subclasses implement ``trainable_parameters()``.

    **What a checkpoint holds** (one rule for both stages): the trainable parameters (LoRA included) plus the
    persistent buffers of every sub-module that trains. Frozen sub-modules (the encoders, stage 2's decoder
    and base UNet) are left out: their weights come from the config or from ``decoder_ckpt``, and loading a
    checkpoint keeps their current weights. Loading is strict for everything that is saved.
    """

    def __init__(self, lr: float, weight_decay: float, betas: tuple[float, float], warmup_steps: int,
                 min_lr_ratio: float, background: float, render_chunk_views: int | None, render_backend: str):
        super().__init__()
        if lr <= 0:
            raise ValueError(f"model.init_args.lr must be > 0, got {lr}")
        self.lr, self.weight_decay, self.betas = float(lr), float(weight_decay), tuple(betas)
        self.warmup_steps, self.min_lr_ratio = int(warmup_steps), float(min_lr_ratio)
        self.background = float(background)
        self.render_chunk_views = render_chunk_views
        self.render_backend = render_backend

    def setup(self, stage: str) -> None:
        # Ask the datamodule (duck-typed: gsv3d_pl never imports datamodules) to cache frozen-VAE latents.
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.use_latent_cache and dm is not None and hasattr(dm, "set_latent_encoder"):
            dm.set_latent_encoder(self._encode_for_cache, self.vae.weights_key())

    @torch.no_grad()
    def _encode_for_cache(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [0, 1] -> scaled latents [B, 4, h, w] (CPU, fp32) for the datamodule's cache.
        Subclasses hold ``self.vae`` and ``self.use_latent_cache``."""
        return self.vae.encode(images.to(self.device, torch.float32)).float().cpu()

    # ---- what a checkpoint holds ----------------------------------------------------------------------
    def saved_keys(self) -> set[str]:
        """State-dict keys a checkpoint holds: trainable parameters + buffers of the sub-modules that train."""
        keys = {n for n, p in self.named_parameters() if p.requires_grad}
        training = {name for name, child in self.named_children() if not is_frozen(child)}
        params = dict(self.named_parameters())
        for k in super().state_dict(keep_vars=True):
            if k not in params and k.split(".", 1)[0] in training:
                keys.add(k)  # a persistent buffer of a module that trains
        return keys

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        full = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        keep = self.saved_keys()
        for k in [k for k in full if k.startswith(prefix) and k[len(prefix):] not in keep]:
            del full[k]
        return full

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Strict for everything that is saved; frozen modules keep their current (config-built) weights."""
        keep = self.saved_keys()
        merged = dict(state_dict)
        for k, v in super().state_dict(keep_vars=True).items():
            if k not in keep and k not in merged:
                merged[k] = v.detach()
        return super().load_state_dict(merged, strict=strict, assign=assign)

    def train(self, mode: bool = True):
        super().train(mode)
        for child in self.children():  # frozen modules stay in eval mode (dropout/BN off) during training
            if is_frozen(child):
                child.eval()
        return self

    # ---- the batch -------------------------------------------------------------------------------------
    #: Keys of :data:`gsv3d_pl.batch.BATCH_KEYS` the stage reads; the first batch of each loop is checked against
    #: them, so a datamodule with a missing key or a wrong shape fails with the key's name, not deep in a loss.
    batch_keys: tuple[str, ...] = ()

    def _check_first_batch(self, batch: dict, batch_idx: int) -> None:
        if batch_idx == 0:
            check_batch(batch, required=self.batch_keys)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._check_first_batch(batch, batch_idx)

    def on_validation_batch_start(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_first_batch(batch, batch_idx)

    def on_test_batch_start(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_first_batch(batch, batch_idx)

    # ---- optimisation ---------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        raise NotImplementedError

    def configure_optimizers(self):
        named = [(n, p) for n, p in self.trainable_parameters() if p.requires_grad]
        if not named:
            raise RuntimeError(f"{type(self).__name__}: no trainable parameters")
        # No decay on biases, norms, embeddings' 1-D scales (standard AdamW practice).
        decay = [p for n, p in named if p.ndim >= 2]
        no_decay = [p for n, p in named if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr, betas=self.betas,
        )
        total = self._total_steps()
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, self.warmup_steps, total, self.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def _total_steps(self) -> int:
        try:
            total = int(self.trainer.estimated_stepping_batches)
        except Exception:  # no trainer attached (unit tests)
            total = 0
        if total <= 0 or total > 10**9:  # infinite runs: cosine over a nominal horizon
            total = max(self.warmup_steps * 10, 10_000)
        return total

    # ---- guards -----------------------------------------------------------------------------------------
    def _check_loss(self, terms: dict[str, Tensor]) -> None:
        check_finite(terms, int(self.global_step), "loss")

    def on_before_optimizer_step(self, optimizer) -> None:
        bad = [n for n, p in self.trainable_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad:
            raise NonFiniteLossError(
                f"Non-finite gradient at global step {self.global_step} in {len(bad)} parameter(s), e.g. "
                f"{bad[:3]}; stopped before the optimizer step (weights unchanged, last good checkpoint kept)."
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        bad = [k for k, v in checkpoint.get("state_dict", {}).items()
               if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise NonFiniteLossError(f"Refusing to save a checkpoint with non-finite weights: {bad[:5]}")

    def autocast(self):
        """bf16 autocast on CUDA only (CPU trains in fp32; the rasterizer casts to fp32 itself)."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _root_dir(self) -> str:
        return self.trainer.default_root_dir if self._trainer is not None else "."
