"""The 3D reconstruction loss L_3D shared by both stages, with chunked rendering.

``L_3D = λ_rgb · MSE(rgb) + λ_depth · MSE(depth) [+ λ_alpha · MSE(alpha) + λ_lpips · LPIPS(rgb)]``, each MSE averaged over
pixels and views (the paper averages over the P·Q renders). Which pixels the depth term covers is the
``depth_loss_on`` switch:

- ``"all"`` (default, the paper's "averaged over all pixels"): every pixel. The rendered depth is the
  *accumulated* depth ``alpha · ED`` (gsplat's "D" mode; ED = expected depth, what the rasterizer
  returns), compared with the ground-truth depth, which is 0 where there is no surface. On background
  pixels this pushes the predicted coverage to zero; on opaque pixels it is the ED error. Comparing the
  *normalised* ED on background instead would pull faint Gaussians' depth to 0, a meaningless target.
- ``"foreground"``: only pixels whose ground-truth alpha is > 0.5, comparing ED with the GT depth and
  averaging over those pixels (per view; views without foreground contribute 0). Background pixels then get
  no depth gradient, so LGM and DiffSplat pair it with an alpha term (``lambda_alpha``: MSE of the rendered
  alpha against the GT mask), which is what keeps the background empty.

Memory: rendering Q views at once keeps every view's rasterizer intermediates alive until backward.
:func:`render_loss` renders ``chunk`` views at a time; when gradients are needed it back-propagates
each chunk's loss to the Gaussian parameters right away (``torch.autograd.grad``), accumulates those
gradients, and returns a surrogate whose gradient w.r.t. the network equals the full loss's gradient
(``<params, accumulated_grad>``). Peak memory is then that of one chunk, for any Q.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from gsv3d_pl.render import render

__all__ = ["L3DWeights", "render_views", "render_loss", "view_losses", "NonFiniteLossError", "check_finite"]

DEPTH_MODES = ("all", "foreground")


class NonFiniteLossError(RuntimeError):
    """A loss term (or a gradient) became NaN/inf; raised before the optimizer step so no weight is touched."""


def check_finite(terms: dict[str, Tensor], step: int, where: str = "loss") -> None:
    """Raise :class:`NonFiniteLossError` naming the step and every non-finite term of ``terms``."""
    bad = {k: float(v.detach().float().sum()) for k, v in terms.items() if not torch.isfinite(v.detach()).all()}
    if bad:
        desc = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise NonFiniteLossError(
            f"Non-finite {where} at global step {step}: {desc}. The run is stopped before the optimizer step, so "
            "the weights are unchanged; the last good checkpoint (checkpoints/last.ckpt) is kept. Lower the lr, "
            "check the data of this batch, or raise gradient clipping (trainer.gradient_clip_val)."
        )


@dataclass
class L3DWeights:
    """Weights and switches of L_3D (see the module docstring)."""

    lambda_rgb: float = 1.0
    lambda_depth: float = 1.0
    lambda_lpips: float = 0.0
    depth_loss_on: str = "all"
    lambda_alpha: float = 0.0  # MSE of the rendered alpha against the GT mask (LGM, DiffSplat); 0 = off (paper)

    def __post_init__(self):
        if self.depth_loss_on not in DEPTH_MODES:
            raise ValueError(f"model.init_args.depth_loss_on must be one of {DEPTH_MODES}, got {self.depth_loss_on!r}")
        for k in ("lambda_rgb", "lambda_depth", "lambda_lpips", "lambda_alpha"):
            if getattr(self, k) < 0:
                raise ValueError(f"model.init_args.{k} must be >= 0, got {getattr(self, k)}")


def _gaussian_params(g) -> list[Tensor]:
    return [g.means, g.quats, g.scales, g.opacities, g.colors]


def render_views(gaussians, c2w: Tensor, K: Tensor, width: int, height: int, background: float | Tensor = 1.0,
                 backend: str = "auto", chunk: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`gsv3d_pl.render.render` with the stages' positional order (``chunk`` = views per call).

    Returns rgb [B, V, 3, H, W], alpha [B, V, 1, H, W], depth [B, V, 1, H, W] for Gaussians [B] at c2w
    [B, V, 4, 4] and K [B, V, 3, 3].
    """
    return tuple(render(gaussians, c2w, K, width, height, background, backend, chunk_views=chunk))


def view_losses(
    rgb: Tensor,
    alpha: Tensor,
    depth: Tensor,
    gt_rgb: Tensor,
    gt_alpha: Tensor,
    gt_depth: Tensor,
    weights: L3DWeights,
    lpips_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """Per-object loss terms, each [B] (means over the V views and their pixels).

    Args:
        rgb, gt_rgb: [B, V, 3, H, W] in [0, 1]; alpha, gt_alpha: [B, V, 1, H, W]; depth, gt_depth:
            [B, V, 1, H, W] planar depth in world units (GT 0 off-surface, prediction = expected depth).
        lpips_fn: images [M, 3, H, W] x2 in [0, 1] -> [M] distances; used when ``weights.lambda_lpips > 0``.
    Returns:
        {"rgb": [B], "depth": [B], ["alpha": [B]], ["lpips": [B]], "l3d": [B]} where l3d is the weighted sum.
    """
    terms: dict[str, Tensor] = {}
    terms["rgb"] = (rgb - gt_rgb).square().mean(dim=(1, 2, 3, 4))  # [B]
    if weights.depth_loss_on == "all":
        terms["depth"] = (alpha * depth - gt_depth).square().mean(dim=(1, 2, 3, 4))  # [B]
    else:
        mask = (gt_alpha > 0.5).to(depth.dtype)  # [B, V, 1, H, W]
        per_view = ((depth - gt_depth).square() * mask).sum(dim=(2, 3, 4)) / mask.sum(dim=(2, 3, 4)).clamp_min(1)
        terms["depth"] = per_view.mean(dim=1)  # [B]
    l3d = weights.lambda_rgb * terms["rgb"] + weights.lambda_depth * terms["depth"]
    if weights.lambda_alpha > 0:
        terms["alpha"] = (alpha - gt_alpha).square().mean(dim=(1, 2, 3, 4))  # [B]
        l3d = l3d + weights.lambda_alpha * terms["alpha"]
    if weights.lambda_lpips > 0:
        if lpips_fn is None:
            raise ValueError("lambda_lpips > 0 needs an LPIPS network (lpips_fn)")
        B, V = rgb.shape[:2]
        terms["lpips"] = lpips_fn(rgb.flatten(0, 1), gt_rgb.flatten(0, 1)).reshape(B, V).mean(dim=1)  # [B]
        l3d = l3d + weights.lambda_lpips * terms["lpips"]
    terms["l3d"] = l3d
    return terms


def render_loss(
    gaussians,
    c2w: Tensor,
    K: Tensor,
    gt_rgb: Tensor,
    gt_alpha: Tensor,
    gt_depth: Tensor,
    weights: L3DWeights,
    object_weights: Tensor | None = None,
    background: float | Tensor = 1.0,
    backend: str = "auto",
    chunk: int | None = None,
    lpips_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    log_objects: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L_3D of ``gaussians`` (batch [B]) against V ground-truth views, rendered ``chunk`` views at a time.

    Args:
        c2w, K: [B, V, 4, 4], [B, V, 3, 3] cameras of the ground-truth views (K at the GT size).
        gt_rgb [B, V, 3, H, W], gt_alpha [B, V, 1, H, W], gt_depth [B, V, 1, H, W].
        object_weights: [B] per-object weights of the batch mean (e.g. a σ mask), default all ones.
        log_objects: back-propagate ``mean_b(w_b · log l3d_b)`` instead (the PSNR's form): each object's gradient is
            divided by its own loss, so objects count by relative, not absolute, improvement. The returned value
            stays ``mean_b(w_b · l3d_b)``. Needs all views in one chunk (``chunk`` None or ≥ V).
    Returns:
        loss: scalar ``mean_b(object_weights · l3d)`` to back-propagate. With gradients enabled and
            several chunks it is a surrogate with the exact value and the exact gradient (module doc).
        terms: detached per-object terms {"rgb", "depth", ["lpips"], "l3d"}, each [B].
    """
    B, V = c2w.shape[:2]
    H, W = gt_rgb.shape[-2:]
    ow = torch.ones(B, device=c2w.device) if object_weights is None else object_weights.float()  # [B]
    chunk = V if not chunk or chunk >= V else int(chunk)
    if log_objects and chunk < V:
        raise ValueError(f"render_loss: log_objects needs each object's whole loss in one chunk (chunk {chunk} < {V} "
                         "views); set render_chunk_views to null")
    params = _gaussian_params(gaussians)
    needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
    split = needs_grad and chunk < V
    if split:
        # Cut the graph at the Gaussians: each chunk back-propagates to these leaves only.
        leaves = [p.detach().requires_grad_(True) for p in params]
        g_in = type(gaussians)(*leaves)
        acc = [torch.zeros_like(p) for p in leaves]
    else:
        g_in = gaussians
    sums: dict[str, Tensor] = {}
    total = torch.zeros((), device=c2w.device)
    for s in range(0, V, chunk):
        sl = slice(s, min(s + chunk, V))
        frac = (sl.stop - sl.start) / V  # per-object terms are means over views: weight chunks by size
        rgb, alpha, depth = render_views(g_in, c2w[:, sl], K[:, sl], W, H, background, backend, None)
        terms = view_losses(rgb, alpha, depth, gt_rgb[:, sl], gt_alpha[:, sl], gt_depth[:, sl], weights, lpips_fn)
        loss_c = (ow * terms["l3d"]).mean() * frac
        if log_objects:  # one chunk (checked above): the value of the loss, the gradient of its log per object
            log_c = (ow * terms["l3d"].clamp_min(1e-8).log()).mean()
            loss_c = log_c - log_c.detach() + loss_c.detach()
        if split:
            if loss_c.requires_grad:
                grads = torch.autograd.grad(loss_c, leaves, allow_unused=True)
                for a, g in zip(acc, grads):
                    if g is not None:
                        a.add_(g)
        else:
            total = total + loss_c
        for k, v in terms.items():
            sums[k] = sums.get(k, 0) + v.detach() * frac
        if split:
            total = total + loss_c.detach()
    if split:
        surrogate = sum((p * a).sum() for p, a in zip(params, acc))
        total = surrogate - surrogate.detach() + total  # value of the loss, gradient of the loss
    return total, sums
