"""Stage 2's loss terms, one function each (threestudio style: a term is a function plus a ``lambda_X`` key).

The paper states ``L_distill = L_2D + λ_3D · L_3D`` and nothing more: not the noise levels of the prediction L_3D
renders, nor a weighting, nor whether L_3D sees a one-step prediction at all. These are the design axes
``DistillStage`` exposes (``configs/README.md`` lists the keys and the paper-literal setting):

- :func:`one_step_prediction`: D(z_gt + σ·n; σ), the denoiser's one-step guess of the clean orbit at a training σ
  (the paper-literal L_3D input, as DiffSplat's rendering loss), optionally at a σ distribution of its own;
- :func:`sampler_orbit`: an orbit sampled from noise with the LoRA on, differentiable through the last K of its S
  Euler steps only (DRaFT-K, Clark et al. 2023): what the end-to-end evaluation scores, instead of a one-step
  guess at a random σ;
- :func:`min_snr_weight`: DiffSplat's min(SNR, γ) weight of a term whose input is a one-step prediction;
- :func:`kl_anchor`: the squared distance between the LoRA's and the base model's guided predictions on the
  sampler's own states (the KL between the two models' per-step Gaussian transitions, up to a σ factor;
  Carve3D regularises its reward fine-tuning with such a KL).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["one_step_prediction", "sampler_orbit", "min_snr_weight", "kl_anchor", "L3D_MODES"]

# "one_step": L_3D renders the denoiser's one-step prediction at a training σ (the paper's wording);
# "sampler": L_3D renders an orbit sampled from noise, backpropagated through its last K steps (DRaFT-K).
L3D_MODES: tuple[str, ...] = ("one_step", "sampler")


def min_snr_weight(sigma: Tensor, gamma: float) -> Tensor:
    """min(SNR(σ), γ) with SNR = 1/σ² (σ_data = 1, SV3D's EDM): [B] -> [B]. γ = 1 keeps the weight 1 up to σ = 1 and
    lets it fall as 1/σ² above, where the one-step prediction is a blurry mean whose render says little."""
    return torch.clamp(1.0 / sigma.float().clamp_min(1e-12) ** 2, max=float(gamma))


def one_step_prediction(sv3d: nn.Module, z_gt: Tensor, c: dict, keep: Tensor, sigma: Tensor,
                        generator: torch.Generator | None = None) -> Tensor:
    """D(z_gt + σ·n; σ) with the batch's conditioning ``c`` (zeroed where ``keep`` [B] is 0): z_gt [B, F, C, h, w],
    sigma [B] -> D [B, F, C, h, w] (with a graph to the LoRA)."""
    B = z_gt.shape[0]
    gdev = generator.device if generator is not None else z_gt.device
    noise = torch.randn(z_gt.shape, generator=generator, device=gdev, dtype=torch.float32).to(z_gt.device)
    x = z_gt.float() + sigma.view(B, 1, 1, 1, 1) * noise  # [B, F, C, h, w]
    k = keep.to(z_gt.device).float()
    return sv3d.denoise(x, sigma, c["clip_emb"] * k.view(B, 1, 1).to(c["clip_emb"].dtype),
                        c["cond_latent"] * k.view(B, 1, 1, 1).to(c["cond_latent"].dtype), c["polars"],
                        c["azimuths"], c["cond_aug"]).float()


def sampler_orbit(sv3d: nn.Module, c: dict, num_steps: int, grad_steps: int,
                  generator: torch.Generator | None = None, trace: list | None = None) -> tuple[Tensor, Tensor]:
    """An orbit sampled with SV3D's own sampler (Euler EDM, triangle CFG), differentiable through its last
    ``grad_steps`` steps: -> (latents [B, F, C, h, w], σ [] of the first differentiated step)."""
    # Under no_grad (validation's logged losses) nothing is differentiated: the sampler must not switch autograd on.
    grad_last = grad_steps if torch.is_grad_enabled() else 0
    lat = sv3d.sample(c["clip_emb"], c["cond_latent"], c["polars"], c["azimuths"], c["cond_aug"],
                      num_steps=num_steps, generator=generator, progress=False, grad_last=grad_last, trace=trace)
    sched = sv3d.make_scheduler()
    sched.set_timesteps(num_steps, device="cpu")
    sigma_first = sched.sigmas[len(sched.timesteps) - grad_steps].float()
    return lat.float(), sigma_first


def kl_anchor(sv3d: nn.Module, c: dict, trace: list) -> Tensor:
    """mean over the traced steps of ||D_LoRA − D_base||² (the base = SV3D with the adapters off, no graph).

    ``trace``: :meth:`SV3D.sample`'s record of its differentiated steps, [(x, σ, D_LoRA)]."""
    from gsv3d_pl.stages.e2e import adapters_disabled

    if not trace:
        return torch.zeros((), device=c["cond_latent"].device)
    B, F = c["azimuths"].shape
    guide = sv3d.guidance(c["clip_emb"], c["cond_latent"], c["polars"], c["azimuths"], c["cond_aug"], B, F,
                          sv3d.min_cfg, sv3d.max_cfg)
    total = 0.0
    for x, sigma, D in trace:
        with torch.no_grad(), adapters_disabled(sv3d.unet):
            D_base = sv3d.guided_denoise(x, sigma, guide)
        total = total + ((D.float() - D_base.float()) ** 2).mean()
    return total / len(trace)
