"""Stage 2's recipe keys: DRaFT-K through the sampler, L_3D's own σ, min-SNR-γ, its probability, the KL anchor,
and the gradient diagnostics."""

from __future__ import annotations

import contextlib
import csv
import json

import lightning.pytorch as pl
import pytest
import torch

from gsv3d_pl.stages.distill_diagnostics import sigma_bucket, summarize
from gsv3d_pl.stages.distill_terms import min_snr_weight
from tests.synthetic import SyntheticDataModule, collate, synthetic_sample
from tests.test_distill_stage import decoder_ckpt as _decoder_ckpt_fixture
from tests.test_distill_stage import lora_params, make_distill

decoder_ckpt = _decoder_ckpt_fixture  # the module-scoped stage-1 checkpoint fixture, shared


def batch():
    torch.manual_seed(0)
    return collate([synthetic_sample(i) for i in range(2)])


def grad_calls(stage):
    """Record, for every UNet forward, whether autograd was on."""
    calls = []
    stage.sv3d.unet.register_forward_pre_hook(lambda m, a: calls.append(torch.is_grad_enabled()))
    return calls


@pytest.mark.parametrize("S,K", [(3, 2), (4, 1)])
def test_draft_gradients_reach_the_lora_and_stop_at_the_truncation(decoder_ckpt, S, K):
    stage = make_distill(decoder_ckpt, l3d_mode="sampler", sampler_steps=S, sampler_grad_steps=K, lambda_2d=0.0)
    with torch.no_grad():  # LoRA B starts at zero: give it a value so every path carries signal
        for n, p in lora_params(stage).items():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    stage.train()
    calls = grad_calls(stage)
    loss, terms = stage.distill_losses(batch(), generator=torch.Generator().manual_seed(0), use_2d=False)
    # the S sampler steps only: without L_2D in the loss, its one-step prediction (logged only) is skipped
    assert calls == [False] * (S - K) + [True] * K, calls
    loss.backward()
    grads = [p.grad for p in lora_params(stage).values()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert float(terms["l3d"]) > 0


def test_the_sampler_trains_on_exactly_the_evaluations_orbit(decoder_ckpt):
    """DRaFT's forward is the sampler's: with autograd on for the last K steps the orbit is the same numbers."""
    stage = make_distill(decoder_ckpt)
    c = stage.conditioning(batch())
    args = (c["clip_emb"], c["cond_latent"], c["polars"], c["azimuths"], c["cond_aug"])
    a = stage.sv3d.sample(*args, num_steps=4, generator=torch.Generator().manual_seed(5), progress=False)
    trace = []
    b = stage.sv3d.sample(*args, num_steps=4, generator=torch.Generator().manual_seed(5), progress=False,
                          grad_last=2, trace=trace)
    assert not a.requires_grad and b.requires_grad
    torch.testing.assert_close(a, b.detach())
    assert len(trace) == 2 and not trace[0][0].requires_grad  # the state entering the truncation is a constant


def test_kl_anchor_is_zero_at_init_and_pulls_back_afterwards(decoder_ckpt):
    stage = make_distill(decoder_ckpt, l3d_mode="sampler", sampler_steps=3, sampler_grad_steps=2, lambda_2d=0.0,
                         lambda_3d=1e-9, lambda_kl=1.0)
    stage.train()
    _, terms = stage.distill_losses(batch(), generator=torch.Generator().manual_seed(0), use_2d=False)
    assert float(terms["kl"]) == 0.0  # peft's LoRA starts as the identity (B = 0)
    with torch.no_grad():
        for n, p in lora_params(stage).items():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    parts = {}
    loss, terms = stage.distill_losses(batch(), generator=torch.Generator().manual_seed(0), use_2d=False, parts=parts)
    assert float(terms["kl"]) > 0
    parts["kl"].backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in lora_params(stage).values())


def test_l3d_probability_zero_skips_l3d_and_one_always_applies_it(decoder_ckpt):
    b = batch()
    stage = make_distill(decoder_ckpt, l3d_prob=0.0)
    stage.train()
    _, terms = stage.distill_losses(b, generator=torch.Generator().manual_seed(0))
    assert "l3d" not in terms and float(terms["l3d_fraction"]) == 0.0
    stage = make_distill(decoder_ckpt, l3d_prob=1.0)
    stage.train()
    _, terms = stage.distill_losses(b, generator=torch.Generator().manual_seed(0))
    assert "l3d" in terms


def test_l3d_own_sigma_and_min_snr_change_l3d_only(decoder_ckpt):
    b = batch()
    base = make_distill(decoder_ckpt)
    _, t0 = base.distill_losses(b, generator=torch.Generator().manual_seed(0))
    own = make_distill(decoder_ckpt, l3d_p_mean=-3.0, l3d_p_std=0.0)  # σ = e^-3 for L_3D: D close to z_gt
    parts = {}
    _, t1 = own.distill_losses(b, generator=torch.Generator().manual_seed(0), parts=parts)
    torch.testing.assert_close(t0["l2d"], t1["l2d"])  # L_2D's draw is untouched
    assert float(t1["l3d"]) != float(t0["l3d"])
    assert parts["sigma_3d"] == pytest.approx(torch.tensor(-3.0).exp().item(), rel=1e-4)
    assert torch.allclose(min_snr_weight(torch.tensor([0.5, 1.0, 4.0]), 1.0), torch.tensor([1.0, 1.0, 1 / 16]))


@pytest.mark.parametrize("kw,key", [({"l3d_mode": "draft"}, "l3d_mode"), ({"l3d_prob": 1.5}, "l3d_prob"),
                                    ({"sampler_steps": 3, "sampler_grad_steps": 4}, "sampler_grad_steps"),
                                    ({"l3d_p_mean": 0.0}, "l3d_p_mean"), ({"lambda_2d": -1.0}, "lambda_2d"),
                                    ({"l3d_min_snr_gamma": 0.0}, "l3d_min_snr_gamma"),
                                    ({"lora_sigma_max": 2.5}, "lora_sigma_max"),  # one_step: no sampler to gate
                                    ({"l3d_log": True, "render_chunk_views": 2}, "l3d_log"),
                                    ({"l3d_mode": "sampler", "lambda_2d": 0.0, "lora_sigma_max": -1.0}, "sigma_max")])
def test_bad_recipe_keys_name_the_key(decoder_ckpt, kw, key):
    with pytest.raises(ValueError, match=key):
        make_distill(decoder_ckpt, **kw)


def test_gradient_diagnostics_are_logged_and_plotted(decoder_ckpt, tmp_path):
    stage = make_distill(decoder_ckpt, diagnostics_every=1, heldout_e2e=False)
    dm = SyntheticDataModule(num_train=4, num_val=1, num_test=1, batch_size=2)
    trainer = pl.Trainer(max_steps=2, default_root_dir=str(tmp_path), accelerator="cpu", log_every_n_steps=1,
                         logger=pl.loggers.CSVLogger(str(tmp_path), name="csv"), enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(stage, dm)
    rows = list(csv.DictReader(open(tmp_path / "csv" / "version_0" / "metrics.csv")))
    got = [r for r in rows if r.get("diag/grad_l3d")]
    assert len(got) == 2
    for r in got:
        assert float(r["diag/grad_l2d"]) > 0 and float(r["diag/grad_l3d"]) > 0
        assert float(r["diag/grad_ratio_3d_2d"]) == pytest.approx(float(r["diag/grad_l3d"]) / float(r["diag/grad_l2d"]),
                                                                  rel=1e-4)
    rec = json.load(open(tmp_path / "distill_diagnostics.json"))
    assert len(rec["rows"]) == 2 and rec["buckets"]["l2d"]
    assert (tmp_path / "distill_diagnostics.png").stat().st_size > 1000


def test_sigma_buckets_and_summary():
    assert [sigma_bucket(s) for s in (0.01, 0.5, 3.0, 50.0)] == ["0-0.1", "0.1-1", "1-10", ">10"]
    rows = [{"step": 0, "sigma_2d": 0.5, "sigma_3d": 0.5, "grad_l2d": 2.0, "grad_l3d": 0.2, "grad_kl": 0.0,
             "grad_ratio_3d_2d": 0.1},
            {"step": 1, "sigma_2d": 5.0, "sigma_3d": 0.05, "grad_l2d": 4.0, "grad_l3d": 0.4, "grad_kl": 0.0,
             "grad_ratio_3d_2d": 0.1}]
    s = summarize(rows)
    assert s["buckets"]["l2d"] == {"0.1-1": {"median": 2.0, "n": 1}, "1-10": {"median": 4.0, "n": 1}}
    assert s["buckets"]["l3d"]["0-0.1"]["median"] == 0.4 and s["grad_ratio_3d_2d_median"] == pytest.approx(0.1)


def test_paired_t_interval_and_the_study_row():
    from gsv3d_pl.sweep.paired import paired_t_interval
    from gsv3d_pl.tools.distill_study import summarize_recipe

    m, lo, hi = paired_t_interval([0.5, 0.6, 0.7])  # sd 0.1: half-width 4.303 · 0.1 / √3
    assert m == pytest.approx(0.6) and hi - m == pytest.approx(4.303 * 0.1 / 3 ** 0.5, rel=1e-4) and lo > 0
    assert paired_t_interval([0.2]) == (0.2, 0.2, 0.2)
    runs = [{"psnr": 16.0 + g, "undistilled_psnr": 16.0, "consistency_psnr": 14.0, "undistilled_consistency_psnr": 14.1,
             "wall_s": 60.0 * (i + 1), "grad_ratio": 0.1} for i, g in enumerate((0.5, 0.6, 0.7))]
    row = summarize_recipe(runs)
    assert row["psnr"]["gain"] == pytest.approx(0.6) and row["psnr"]["lo"] > 0
    assert row["consistency"]["gain"] == pytest.approx(-0.1) and row["wall_s"] == 120.0


def draft_stage_with_lora(ckpt, **kw):
    """A DRaFT-2-of-3 stage without L_2D whose LoRA B is set (fixed per tensor), so the adapter changes the output."""
    s = make_distill(ckpt, l3d_mode="sampler", sampler_steps=3, sampler_grad_steps=2, lambda_2d=0.0, **kw)
    with torch.no_grad():
        for n, p in lora_params(s).items():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.05)
    return s


def test_lora_sigma_gate_applies_the_adapter_only_at_low_sigma(decoder_ckpt, tmp_path):
    """``lora_sigma_max``: the sampler runs the base model above it, the LoRA at and below it; DRaFT's gradient
    still reaches the LoRA through the gated steps, and the exported adapter records the gate."""
    def stage_with(gate):
        return draft_stage_with_lora(decoder_ckpt, lora_sigma_max=gate)

    def orbit(s, off=False):
        from gsv3d_pl.stages.e2e import adapters_disabled
        c = s.conditioning(batch())
        args = (c["clip_emb"], c["cond_latent"], c["polars"], c["azimuths"], c["cond_aug"])
        with torch.no_grad(), (adapters_disabled(s.sv3d.unet) if off else contextlib.nullcontext()):
            return s.sv3d.sample(*args, num_steps=3, generator=torch.Generator().manual_seed(3), progress=False)

    ungated, base = orbit(stage_with(None)), orbit(stage_with(None), off=True)
    torch.testing.assert_close(orbit(stage_with(1e4)), ungated)  # above σ_max: every step
    torch.testing.assert_close(orbit(stage_with(1e-4)), base)  # below σ_min: no step
    mid = stage_with(10.0)  # the 3-step Karras schedule: 700, ~3.4, 0.002
    gated = orbit(mid)
    assert (gated - ungated).abs().max() > 1e-4 and (gated - base).abs().max() > 1e-4
    mid.train()
    loss, _ = mid.distill_losses(batch(), generator=torch.Generator().manual_seed(0), use_2d=False)
    loss.backward()
    grads = [p.grad for p in lora_params(mid).values()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    out = mid.export_lora(tmp_path / "lora")
    assert json.load(open(f"{out}/gsv3d_lora.json")) == {"sigma_max": 10.0}


def test_l3d_log_changes_the_gradient_not_the_logged_loss(decoder_ckpt):
    out = []
    for log in (False, True):
        s = draft_stage_with_lora(decoder_ckpt, l3d_log=log)
        s.train()
        b = batch()
        b["target_images"][1] = 1.0 - b["target_images"][1]  # object 1 much harder: the weighting shows
        loss, terms = s.distill_losses(b, generator=torch.Generator().manual_seed(0), use_2d=False)
        loss.backward()
        out.append((float(loss), torch.cat([p.grad.flatten() for p in lora_params(s).values()])))
    (l0, g0), (l1, g1) = out
    assert l0 == pytest.approx(l1, rel=1e-5)
    assert torch.isfinite(g1).all() and g1.abs().sum() > 0
    cos = torch.nn.functional.cosine_similarity(g0, g1, dim=0)
    assert float(cos) < 0.999  # not merely a rescaled gradient: the objects are weighted apart
