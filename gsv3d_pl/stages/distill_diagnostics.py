"""What stage 2 trains on: the norm of each loss term's gradient on the LoRA parameters, by noise level.

Every ``diagnostics_every`` steps, :func:`term_grad_norms` differentiates each weighted term (λ_2D·L_2D,
λ_3D·L_3D, λ_KL·KL) separately with respect to the LoRA parameters. The stage logs the norms, their ratio and the
σ each term saw into ``metrics.csv`` (``diag/*``), and at the end of fit :func:`write_diagnostics` writes
``<run>/distill_diagnostics.json`` (medians per σ bucket) and ``distill_diagnostics.png``: the norms over steps
and per σ bucket. A ratio ‖∇L_3D‖/‖∇L_2D‖ far below 1 means stage 2 is mostly more L_2D fine-tuning.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from gsv3d_pl.io import write_json_atomic

__all__ = ["SIGMA_EDGES", "term_grad_norms", "sigma_bucket", "summarize", "write_diagnostics", "plot_diagnostics"]

# σ bucket edges (SV3D's EDM, σ_data = 1): fine detail / the σ ~ 1 mid-range / coarse / pure-noise layout.
SIGMA_EDGES: tuple[float, ...] = (0.1, 1.0, 10.0)
TERMS: tuple[str, ...] = ("l2d", "l3d", "kl")


def term_grad_norms(parts: dict[str, Tensor], params: Sequence[Tensor]) -> dict[str, float]:
    """{term: ‖∂term/∂params‖₂} for each graph-attached scalar of ``parts`` (terms without a graph: 0), keeping the
    graph for the training step's own backward."""
    out = {}
    for name, t in parts.items():
        if not (isinstance(t, Tensor) and t.requires_grad):
            out[name] = 0.0
            continue
        grads = torch.autograd.grad(t, list(params), retain_graph=True, allow_unused=True)
        out[name] = math.sqrt(sum(float(g.detach().float().pow(2).sum()) for g in grads if g is not None))
    return out


def sigma_bucket(sigma: float) -> str:
    """The label of σ's bucket, e.g. ``"0.1-1"`` (edges :data:`SIGMA_EDGES`)."""
    lo = 0.0
    for hi in SIGMA_EDGES:
        if sigma < hi:
            return f"{lo:g}-{hi:g}"
        lo = hi
    return f">{lo:g}"


def bucket_labels() -> list[str]:
    return [sigma_bucket(e * 0.5) for e in SIGMA_EDGES] + [sigma_bucket(SIGMA_EDGES[-1] * 2)]


def summarize(rows: list[dict]) -> dict:
    """Medians of each term's gradient norm per σ bucket (the σ that term saw) and of the 3D/2D ratio overall."""
    out: dict = {"num_rows": len(rows), "buckets": {}}
    for term in TERMS:
        key = "sigma_2d" if term == "l2d" else "sigma_3d"
        per: dict[str, list[float]] = {}
        for r in rows:
            if r.get(f"grad_{term}") is not None and r.get(key) is not None and r[f"grad_{term}"] > 0:
                per.setdefault(sigma_bucket(r[key]), []).append(r[f"grad_{term}"])
        out["buckets"][term] = {b: {"median": float(np.median(v)), "n": len(v)} for b, v in per.items()}
    ratios = [r["grad_ratio_3d_2d"] for r in rows if r.get("grad_ratio_3d_2d") is not None]
    out["grad_ratio_3d_2d_median"] = float(np.median(ratios)) if ratios else None
    return out


def plot_diagnostics(rows: list[dict], path: str | os.PathLike, size: tuple[int, int] = (900, 340)) -> str:
    """A two-panel PNG (no plotting library): left, log₁₀ of each term's gradient norm over the steps; right, the
    median per σ bucket. Colours: L_2D blue, L_3D orange, KL green."""
    from PIL import Image, ImageDraw

    from gsv3d_pl.io import atomic_path

    W, H = size
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    colors = {"l2d": (31, 119, 180), "l3d": (255, 127, 14), "kl": (44, 160, 44)}
    vals = [math.log10(r[f"grad_{t}"]) for r in rows for t in TERMS if (r.get(f"grad_{t}") or 0) > 0]
    lo, hi = (min(vals), max(vals)) if vals else (-1.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    pad, mid = 40, W // 2
    panels = ((pad, mid - pad // 2), (mid + pad // 2, W - 10))

    def y_of(v: float) -> float:
        return H - pad - (v - lo) / (hi - lo) * (H - 2 * pad)

    for x0, x1 in panels:
        d.rectangle([x0, pad // 2, x1, H - pad], outline=(0, 0, 0))
    d.text((panels[0][0], 4), "log10 |grad| on the LoRA vs step", fill=(0, 0, 0))
    d.text((panels[1][0], 4), "median log10 |grad| per sigma bucket", fill=(0, 0, 0))
    for v in (lo, hi):
        d.text((2, y_of(v) - 6), f"{v:.1f}", fill=(0, 0, 0))
    steps = [r["step"] for r in rows] or [0, 1]
    s0, s1 = min(steps), max(max(steps), min(steps) + 1)
    (ax0, ax1) = panels[0]
    for t in TERMS:
        pts = [(ax0 + (r["step"] - s0) / (s1 - s0) * (ax1 - ax0), y_of(math.log10(r[f"grad_{t}"])))
               for r in rows if (r.get(f"grad_{t}") or 0) > 0]
        if len(pts) > 1:
            d.line(pts, fill=colors[t], width=2)
        for p in pts:
            d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=colors[t])
    summ = summarize(rows)["buckets"]
    labels = bucket_labels()
    (bx0, bx1) = panels[1]
    slot = (bx1 - bx0) / len(labels)
    for i, lab in enumerate(labels):
        d.text((bx0 + i * slot + 4, H - pad + 4), f"s {lab}", fill=(0, 0, 0))
        for j, t in enumerate(TERMS):
            m = summ.get(t, {}).get(lab)
            if m is None:
                continue
            x = bx0 + i * slot + 8 + j * (slot - 16) / len(TERMS)
            d.rectangle([x, y_of(math.log10(m["median"])), x + (slot - 16) / len(TERMS) - 2, H - pad],
                        fill=colors[t])
    for j, t in enumerate(TERMS):
        d.text((panels[0][0] + 10 + 60 * j, H - 16), t, fill=colors[t])
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return os.fspath(path)


def write_diagnostics(rows: list[dict], run_dir: str | os.PathLike) -> dict:
    """``<run>/distill_diagnostics.json`` (rows + :func:`summarize`) and ``.png``; returns the summary."""
    summ = summarize(rows)
    write_json_atomic(os.path.join(run_dir, "distill_diagnostics.json"), {**summ, "rows": rows})
    if rows:
        plot_diagnostics(rows, os.path.join(run_dir, "distill_diagnostics.png"))
    return summ

