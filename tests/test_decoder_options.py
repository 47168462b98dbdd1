"""Stage 1's training switches for the miniature: the alpha term, supervising non-input views only, and the EMA of
the decoder's weights (evaluated, handed to stage 2, resumed)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from gsv3d_pl.stages.ema import WeightEMA
from gsv3d_pl.stages.handoff import load_decoder
from gsv3d_pl.stages.losses import L3DWeights, view_losses
from tests.synthetic import SyntheticDataModule
from tests.test_decoder_stage import batch_of, make_stage

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_alpha_term_is_the_mask_mse_and_enters_l3d():
    B, V, H = 2, 3, 8
    rgb = torch.rand(B, V, 3, H, H)
    alpha, gt_alpha = torch.rand(B, V, 1, H, H), (torch.rand(B, V, 1, H, H) > 0.5).float()
    depth = torch.rand(B, V, 1, H, H)
    off = view_losses(rgb, alpha, depth, rgb, gt_alpha, depth, L3DWeights(lambda_depth=0.0))
    on = view_losses(rgb, alpha, depth, rgb, gt_alpha, depth, L3DWeights(lambda_depth=0.0, lambda_alpha=0.5))
    assert "alpha" not in off and torch.allclose(off["l3d"], torch.zeros(B))
    want = (alpha - gt_alpha).square().mean(dim=(1, 2, 3, 4))
    assert torch.allclose(on["alpha"], want) and torch.allclose(on["l3d"], 0.5 * want)
    with pytest.raises(ValueError, match="lambda_alpha"):
        L3DWeights(lambda_alpha=-1.0)


def test_non_input_supervision_never_picks_an_input_view():
    stage = make_stage(views_per_step=5, supervise_input_views=False)
    batch = batch_of(2)
    for _ in range(20):
        sub = stage.supervised_views(batch)  # [B, 5]
        assert sub.shape == (2, 5)
        for b in range(2):
            assert not set(sub[b].tolist()) & set(batch["input_indices"][b].tolist())
            assert len(set(sub[b].tolist())) == 5
    all_novel = make_stage(views_per_step=None, supervise_input_views=False).supervised_views(batch)
    Q, N = batch["target_images"].shape[1], batch["input_indices"].shape[1]
    assert all_novel.shape == (2, Q - N)
    assert make_stage(views_per_step=None).supervised_views(batch) is None  # all Q (the paper)


def test_ema_update_is_the_moving_average():
    net = torch.nn.Linear(3, 2)
    ema = WeightEMA(net, 0.9)
    start = net.weight.detach().clone()
    for _ in range(200):  # past the warm-up, the decay is 0.9
        ema.update(net)
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    assert torch.allclose(ema.module.weight, start + 0.1, atol=1e-6)
    assert not any(p.requires_grad for p in ema.module.parameters())
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(net, 1.0)


def _fit(root, max_steps, ckpt_path=None, **kw):
    dm = SyntheticDataModule(num_train=2, num_val=1, num_test=1, batch_size=1)
    stage = make_stage(heldout_eval=False, warmup_steps=1, lr=1e-2, **kw)
    trainer = pl.Trainer(max_steps=max_steps, default_root_dir=str(root), accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[pl.callbacks.ModelCheckpoint(
                             dirpath=str(root / "checkpoints"), save_last=True, every_n_train_steps=1)])
    trainer.fit(stage, dm, ckpt_path=ckpt_path)
    return stage


def test_ema_is_evaluated_handed_off_and_resumed(tmp_path):
    stage = _fit(tmp_path, 3, ema_decay=0.5)
    live, avg = stage.decoder.state_dict(), stage.decoder_ema.module.state_dict()
    assert any(not torch.equal(live[k], avg[k]) for k in live)  # the average differs from the live weights
    # Evaluation uses the average; training the live weights.
    batch = batch_of(1)
    stage.eval()
    g_eval = stage.predict_gaussians(batch)
    with torch.no_grad():
        g_avg = stage.decoder_ema.module(stage.input_latents(batch), batch["input_c2w"], batch["input_K"],
                                         stage.dino_tokens(batch))
    assert torch.allclose(g_eval.means, g_avg.means)
    # Stage 2 and predict get the average.
    dec, _ = load_decoder(tmp_path / "checkpoints" / "last.ckpt")
    for k, v in dec.state_dict().items():
        assert torch.equal(v, avg[k]), k
    # A resumed run continues the same average.
    resumed = _fit(tmp_path, 3, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"), ema_decay=0.5)
    for k, v in resumed.decoder_ema.module.state_dict().items():
        assert torch.equal(v, avg[k]), k
    assert int(resumed.decoder_ema.num_updates) == 3
    # An EMA run cannot resume a checkpoint that has none.
    plain = tmp_path / "plain"
    _fit(plain, 1)
    with pytest.raises(ValueError, match="no EMA weights"):
        _fit(plain, 2, ckpt_path=str(plain / "checkpoints" / "last.ckpt"), ema_decay=0.5)


def _gaussians_on_gt(batch: dict, f: int):
    """Pixel-aligned means on each input view's GT surface (cell-averaged depth), opacities = GT coverage."""
    import torch.nn.functional as F

    from gsv3d_pl.cameras import pixel_rays
    from gsv3d_pl.stages.common import gather_views

    idx = batch["input_indices"]
    d, a = gather_views(batch["target_depths"], idx).float(), gather_views(batch["target_alphas"], idx).float()
    B, N, _, H, W = d.shape
    K = batch["input_K"].float().clone()
    K[..., :2, :] /= f
    o, dirs, z_per_t = pixel_rays(batch["input_c2w"].float(), K, W // f, H // f)  # [B, N, H/f, W/f, 3|1]
    cov = F.avg_pool2d(a.flatten(0, 1), f)
    z = (F.avg_pool2d((a * d).flatten(0, 1), f) / cov.clamp_min(1e-6)).reshape(B, N, H // f, W // f, 1)
    return (o + z / z_per_t * dirs).reshape(B, -1, 3), cov.reshape(B, -1), d, a


@pytest.mark.parametrize("f", [1, 2])
def test_splat_geometry_is_zero_on_the_gt_surface_and_grows_off_it(f):
    from gsv3d_pl.stages.splat_geometry import splat_geometry_terms

    batch = batch_of(2)
    means, cov, d, a = _gaussians_on_gt(batch, f)
    c2w = batch["input_c2w"].float()
    assert (cov > 0.5).any() and (cov < 0.5).any()  # the toy views have both foreground and background
    exact = splat_geometry_terms(means, cov, c2w, d, a)
    assert torch.allclose(exact["splat_depth"], torch.zeros(2), atol=1e-8)
    assert torch.allclose(exact["splat_opacity"], torch.zeros(2))
    # Pushing every Gaussian 0.1 along its own camera's axis adds 0.1 to its planar depth: the MSE is 0.01.
    fwd = c2w[..., :3, 2].repeat_interleave(means.shape[1] // c2w.shape[1], dim=1)  # [B, G, 3]
    moved = splat_geometry_terms(means + 0.1 * fwd, torch.zeros_like(cov), c2w, d, a)
    assert torch.allclose(moved["splat_depth"], torch.full((2,), 0.01), atol=1e-5)
    assert torch.allclose(moved["splat_opacity"], cov.square().mean(1))
    with pytest.raises(ValueError, match="pixel-aligned"):
        splat_geometry_terms(means[:, :-1], cov[:, :-1], c2w, d, a)


def test_splat_geometry_switch_adds_its_terms_to_the_loss():
    batch = batch_of(2)
    off, on = make_stage(views_per_step=3), make_stage(views_per_step=3, lambda_splat_depth=1.0,
                                                       lambda_splat_opacity=2.0)
    torch.manual_seed(1)
    loss_off = off.training_step(batch, 0)
    torch.manual_seed(1)  # the same supervised views
    loss_on = on.training_step(batch, 0)
    from gsv3d_pl.stages.common import gather_views
    from gsv3d_pl.stages.splat_geometry import splat_geometry_terms

    idx = batch["input_indices"]
    with torch.no_grad():
        g = on.predict_gaussians(batch)
    geo = splat_geometry_terms(g.means, g.opacities, batch["input_c2w"].float(),
                               gather_views(batch["target_depths"].float(), idx),
                               gather_views(batch["target_alphas"].float(), idx))
    want = (geo["splat_depth"] + 2.0 * geo["splat_opacity"]).mean()
    assert float(want) > 0
    assert torch.allclose(loss_on.detach() - loss_off.detach(), want, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="lambda_splat_depth"):
        make_stage(lambda_splat_depth=-1.0)


def test_input_latent_noise_spares_exactly_the_conditioning_view():
    from gsv3d_pl.orbit import INPUT_FRAME

    stage = make_stage(input_latent_noise=0.5)
    B, N = 64, 4
    lat = torch.randn(B, N, 4, 3, 3)
    idx = torch.stack([torch.randperm(21)[:N].sort().values for _ in range(B)])  # some objects lack frame 20
    idx[0] = torch.tensor([4, 9, 15, INPUT_FRAME])
    out = stage.corrupt_input_latents(lat, idx, generator=torch.Generator().manual_seed(0))
    same = (out == lat).flatten(2).all(dim=2)  # [B, N]
    assert same.sum(dim=1).eq(1).all(), "exactly one view per object stays exact"
    has = idx == INPUT_FRAME
    assert (same[has.any(dim=1)] == has[has.any(dim=1)]).all(), "frame 20 is the exact one when it is an input"
    spread = (out - lat)[~same].std()
    assert 0.15 < float(spread) < 0.45  # std U(0, 0.5): E[σ²] = 0.5²/3 -> ~0.29
    with pytest.raises(ValueError, match="input_latent_noise"):
        make_stage(input_latent_noise=-1.0)


def test_input_latent_noise_reaches_the_training_step_only():
    stage = make_stage(input_latent_noise=1.0)
    batch = batch_of(2)
    seen = []
    real = stage.decoder.forward
    stage.decoder.forward = lambda lat, *a, **k: (seen.append(lat.clone()), real(lat, *a, **k))[1]
    stage.training_step(batch, 0)
    clean = stage.input_latents(batch)
    assert not torch.allclose(seen[-1], clean), "training reads corrupted latents"
    stage.eval()
    stage.predict_gaussians(batch)
    assert torch.equal(seen[-1], clean), "evaluation reads the clean latents"
