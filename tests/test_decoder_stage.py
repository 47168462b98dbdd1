"""Stage 1 (DecoderStage): losses, chunked rendering, checkpoint contents, NaN guard, evaluation, configs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from gsv3d_pl.batch import check_batch, check_novel_views
from gsv3d_pl.models import VAE, DINOEncoder, GSDecoder
from gsv3d_pl.stages.common import gather_views, novel_view_indices, warmup_cosine
from gsv3d_pl.stages.decoder_stage import DecoderStage
from gsv3d_pl.stages.heldout import per_image_psnr
from gsv3d_pl.stages.losses import L3DWeights, NonFiniteLossError, render_loss, view_losses
from tests.synthetic import SyntheticDataModule, collate, synthetic_sample

ROOT = Path(__file__).resolve().parents[1]


def make_stage(dino: bool = True, **kw) -> DecoderStage:
    torch.manual_seed(0)
    dec = GSDecoder.from_preset("tiny", dim=32, head_channels=16, upsample=2, dino_dim=64 if dino else None)
    return DecoderStage(vae=VAE("tiny"), dino=DINOEncoder("tiny", image_size=56) if dino else None, decoder=dec, **kw)


def batch_of(n: int = 1, train: bool = True, **kw) -> dict:
    return collate([synthetic_sample(i, train=train, **kw) for i in range(n)])


def test_helpers():
    idx = torch.tensor([[0, 3], [5, 1]])
    nov = novel_view_indices(idx, 6)
    assert nov.tolist() == [[1, 2, 4, 5], [0, 2, 3, 4]]
    x = torch.arange(12).reshape(2, 6)
    assert gather_views(x, idx).tolist() == [[0, 3], [11, 7]]
    with pytest.raises(ValueError):
        novel_view_indices(torch.tensor([[0, 0], [1, 2]]), 4)
    lrs = [warmup_cosine(s, 10, 110, 0.1) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_depth_loss_modes():
    B, V, H, W = 1, 1, 4, 4
    gt_alpha = torch.zeros(B, V, 1, H, W)
    gt_alpha[..., :2, :] = 1.0  # top half is foreground
    gt_depth = 2.0 * gt_alpha
    rgb = torch.ones(B, V, 3, H, W)
    alpha = torch.full((B, V, 1, H, W), 0.5)
    depth = torch.full((B, V, 1, H, W), 2.0)  # right depth everywhere, half coverage
    fg = view_losses(rgb, alpha, depth, rgb, gt_alpha, gt_depth, L3DWeights(depth_loss_on="foreground"))
    assert float(fg["depth"]) == 0.0  # ED is exact on the foreground; background ignored
    al = view_losses(rgb, alpha, depth, rgb, gt_alpha, gt_depth, L3DWeights(depth_loss_on="all"))
    # all pixels: accumulated depth alpha*ED = 1 vs GT 2 (fg) / 0 (bg): error 1 everywhere
    assert float(al["depth"]) == pytest.approx(1.0)
    w = L3DWeights(lambda_rgb=0.0, lambda_depth=0.5)
    t = view_losses(rgb * 0.5, alpha, depth, rgb, gt_alpha, gt_depth, w)
    assert float(t["l3d"]) == pytest.approx(0.5 * float(t["depth"]))
    with pytest.raises(ValueError, match="depth_loss_on"):
        L3DWeights(depth_loss_on="masked")


@pytest.mark.parametrize("mode", ["all", "foreground"])
def test_chunked_rendering_gives_the_same_loss_and_gradients(mode):
    stage = make_stage()
    b = batch_of(2, num_extra_views=2)
    w = L3DWeights(1.0, 0.7, 0.0, mode)
    args = (b["target_c2w"], b["target_K"], b["target_images"], b["target_alphas"], b["target_depths"], w)
    results = []
    for chunk in (None, 5):
        stage.zero_grad()
        loss, terms = render_loss(stage.predict_gaussians(b), *args, chunk=chunk, backend="auto")
        loss.backward()
        grads = {n: p.grad.clone() for n, p in stage.decoder.named_parameters() if p.grad is not None}
        results.append((float(loss), terms, grads))
    (l1, t1, g1), (l2, t2, g2) = results
    assert l1 == pytest.approx(l2, rel=1e-5)
    for k in t1:
        torch.testing.assert_close(t1[k], t2[k], rtol=1e-5, atol=1e-7)
    assert g1.keys() == g2.keys() and len(g1) > 10
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=1e-8, msg=n)


def test_log_objects_gives_each_object_the_gradient_of_its_log_loss():
    """``log_objects``: the value is L_3D's, the gradient that of mean_b log l3d_b (each object's own gradient
    divided by its loss), checked against the objects rendered one at a time."""
    stage = make_stage()
    b = batch_of(2, num_extra_views=2)
    b["target_images"][1] = 1.0 - b["target_images"][1]  # object 1 much harder than object 0
    w = L3DWeights(1.0, 0.7, 0.0, "all")
    tg = [b[k] for k in ("target_c2w", "target_K", "target_images", "target_alphas", "target_depths")]

    def grads_of(loss):
        stage.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in stage.decoder.named_parameters() if p.grad is not None}

    plain, t_plain = render_loss(stage.predict_gaussians(b), *tg, w)
    logl, t_log = render_loss(stage.predict_gaussians(b), *tg, w, log_objects=True)
    assert float(logl) == pytest.approx(float(plain), rel=1e-6)  # the logged value is unchanged
    g_log = grads_of(logl)
    g = stage.predict_gaussians(b)
    per = t_plain["l3d"]  # [2]
    ref = sum(render_loss(g[i:i + 1], *[t[i:i + 1] for t in tg], w)[0] / per[i]
              for i in range(2)) / 2
    g_ref = grads_of(ref)
    assert float(per.max() / per.min()) > 1.5  # the objects differ, so the weighting is visible
    for n in g_ref:
        torch.testing.assert_close(g_log[n], g_ref[n], rtol=1e-3, atol=1e-7, msg=n)
    with pytest.raises(ValueError, match="log_objects"):
        render_loss(stage.predict_gaussians(b), *tg, w, chunk=2, log_objects=True)


def test_training_step_uses_cached_latents_and_trains():
    stage = make_stage()
    b = batch_of(2)
    lat_direct = stage.input_latents(b)  # encoded by the VAE
    b["target_latents"] = stage.vae.encode(b["target_images"].flatten(0, 1)).reshape(2, -1, 4, 4, 4)
    torch.testing.assert_close(stage.input_latents(b), lat_direct)  # cache path gives the same latents
    b["target_latents"] = b["target_latents"] + 1.0  # the cache is really used
    assert not torch.allclose(stage.input_latents(b), lat_direct)


def test_state_dict_excludes_frozen_modules_and_loads_strictly():
    stage = make_stage()
    sd = stage.state_dict()
    assert sd and all(k.startswith("decoder.") for k in sd)
    fresh = make_stage()
    with torch.no_grad():
        for p in fresh.decoder.parameters():
            p.add_(1.0)
    fresh.load_state_dict(sd, strict=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k])
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict({k: v for k, v in sd.items() if "blocks.0" not in k}, strict=True)


def test_dino_settings_must_agree():
    dec = GSDecoder.from_preset("tiny", dim=32, head_channels=16, dino_dim=64)
    with pytest.raises(ValueError, match="dino_dim"):
        DecoderStage(vae=VAE("tiny"), dino=None, decoder=dec)
    dec2 = GSDecoder.from_preset("tiny", dim=32, head_channels=16, dino_dim=None)
    with pytest.raises(ValueError, match="dino"):
        DecoderStage(vae=VAE("tiny"), dino=DINOEncoder("tiny", image_size=56), decoder=dec2)
    assert DecoderStage(vae=VAE("tiny"), dino=None, decoder=dec2).dino is None  # the w/o DINO ablation builds


def test_checkpoint_rule_trainable_parameters_and_their_modules_buffers():
    """One rule: trainable parameters + persistent buffers of modules that train; frozen modules' never."""
    stage = make_stage()
    stage.decoder.register_buffer("stats", torch.arange(3.0))  # a buffer the trained decoder declares
    stage.vae.register_buffer("frozen_stats", torch.ones(2))  # a frozen encoder's buffer comes from the config
    stage.decoder.register_buffer("scratch", torch.ones(2), persistent=False)
    sd = stage.state_dict()
    assert "decoder.stats" in sd and "vae.frozen_stats" not in sd and "decoder.scratch" not in sd
    assert set(sd) == {f"decoder.{n}" for n, _ in stage.decoder.named_parameters()} | {"decoder.stats"}
    sd = {k: v.clone() for k, v in sd.items()}  # state_dict() shares storage with the live tensors
    stage.decoder.stats.zero_()
    stage.load_state_dict(sd, strict=True)
    assert stage.decoder.stats.tolist() == [0.0, 1.0, 2.0]


def test_first_batch_is_checked_against_the_batch_keys():
    stage = make_stage()
    b = batch_of(1)
    stage.on_train_batch_start(b, 0)  # a good batch passes
    del b["input_K"]
    with pytest.raises(KeyError, match=r"missing key\(s\) \['input_K'\]"):
        stage.on_train_batch_start(b, 0)
    stage.on_train_batch_start(b, 1)  # only the first batch of a loop is checked


def test_vae_factor_must_match_the_vae():
    dec = GSDecoder.from_preset("tiny", dim=32, head_channels=16, dino_dim=None, vae_factor=4)
    with pytest.raises(ValueError, match="vae_factor=4 but the VAE downsamples by 8"):
        DecoderStage(vae=VAE("tiny"), dino=None, decoder=dec)


def test_decoder_must_record_its_init_args():
    """Stage 2 rebuilds the decoder from the checkpoint, so a decoder without a config is refused at start."""

    class Bare(torch.nn.Module):
        dino_dim = None

        def forward(self, latents, c2w, K, dino_tokens=None):  # pragma: no cover - never called
            raise AssertionError

    with pytest.raises(TypeError, match="register_to_config"):
        DecoderStage(vae=VAE("tiny"), dino=None, decoder=Bare())


def test_eval_step_returns_the_novel_view_result():
    stage = make_stage()
    b = batch_of(2, train=False, num_extra_views=2)
    check_batch(b)
    out = stage.evaluate_novel_views(b)
    assert check_novel_views(out) == {"B": 2, "V": 21, "N": 2, "H": 32, "W": 32}
    B, N, Q, H = 2, 2, 23, 32
    V = Q - N
    shapes = {"pred_images": (B, V, 3, H, H), "gt_images": (B, V, 3, H, H), "pred_alphas": (B, V, 1, H, H),
              "pred_depths": (B, V, 1, H, H), "gt_alphas": (B, V, 1, H, H), "gt_depths": (B, V, 1, H, H),
              "eval_c2w": (B, V, 4, 4), "eval_K": (B, V, 3, 3), "input_images": (B, N, 3, H, H)}
    for k, s in shapes.items():
        assert tuple(out[k].shape) == s, k
    assert tuple(out["gaussians"].batch_shape) == (B,)
    # the evaluated views are exactly the non-input ones, in order
    for bi in range(B):
        inputs = set(b["input_indices"][bi].tolist())
        assert out["novel_indices"][bi].tolist() == [q for q in range(Q) if q not in inputs]
        torch.testing.assert_close(out["gt_images"][bi], b["target_images"][bi, out["novel_indices"][bi]])


def _trainer(root, max_steps, **kw) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps, default_root_dir=str(root), accelerator="cpu", devices=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[pl.callbacks.ModelCheckpoint(dirpath=str(root / "checkpoints"), save_last=True,
                                                every_n_train_steps=1, save_top_k=-1)],
        **kw,
    )


def test_nan_loss_stops_with_step_and_term_and_keeps_last_good_checkpoint(tmp_path):
    # batch_size 1, fixed order: the third training step (global step 2) sees the NaN sample
    dm = SyntheticDataModule(num_train=4, num_val=1, num_test=1, batch_size=1, nan_at=2)
    stage = make_stage(heldout_eval=False, warmup_steps=1)
    trainer = _trainer(tmp_path, 10, limit_val_batches=0)
    with pytest.raises(NonFiniteLossError) as exc:
        trainer.fit(stage, dm)
    msg = str(exc.value)
    assert "global step 2" in msg and "rgb=nan" in msg
    ck = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ck["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values())


def test_fit_validates_and_writes_heldout_eval(tmp_path):
    from callbacks.visuals import ValidationImages

    dm = SyntheticDataModule(num_train=4, num_val=2, num_test=2, batch_size=2)
    stage = make_stage(warmup_steps=2, lr=3e-3)
    vis = ValidationImages(num_objects=2, max_views=4)
    trainer = pl.Trainer(max_steps=6, default_root_dir=str(tmp_path), accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         enable_checkpointing=False, val_check_interval=3, check_val_every_n_epoch=None,
                         callbacks=[vis])
    trainer.fit(stage, dm)
    assert dm.encoder_key == stage.vae.weights_key()  # the latent cache was requested
    assert "val/psnr" in trainer.callback_metrics
    pngs = sorted(p for p in os.listdir(tmp_path / "images") if p.endswith(".png"))
    assert pngs == ["val_step0000003.png", "val_step0000006.png"]
    # end of fit: a turntable and the .ply of the first validation object
    from gsv3d_pl.gaussians import Gaussians

    videos = list((tmp_path / "images").glob("turntable_val0.*"))
    assert len(videos) == 1 and videos[0].stat().st_size > 0
    g = Gaussians.load_ply(tmp_path / "images" / "val0.ply")
    assert g.num_gaussians > 0 and g.num_gaussians % stage.decoder.upsample**2 == 0
    assert torch.isfinite(g.means).all()
    res = json.loads((tmp_path / "heldout_eval.json").read_text())
    assert {"psnr", "ssim", "baseline_psnr", "num_objects"} <= res.keys()
    assert res["num_objects"] == 2 and res["num_views"] == 2 * (23 - 2)
    # the baseline is the per-pixel mean of every training target view, scored on the test novel views
    mean = torch.stack([x["target_images"] for x in dm.ds["train"].items]).mean(dim=(0, 1))  # [3, H, W]
    gts = torch.cat([b["target_images"][0, novel_view_indices(b["input_indices"], 23)[0]]
                     for b in [collate([x]) for x in dm.ds["test"].items]])
    expect = per_image_psnr(mean.expand_as(gts), gts).mean()
    assert res["baseline_psnr"] == pytest.approx(float(expect), abs=1e-3)
    # nearest input view: for each novel view, the input view whose camera axis is nearest, by brute force
    near = []
    for x in dm.ds["test"].items:
        nov = novel_view_indices(x["input_indices"][None], 23)[0]
        fwd = x["target_c2w"][:, :3, 2]  # [Q, 3]
        for q in nov.tolist():
            best = max(x["input_indices"].tolist(), key=lambda i: float(fwd[i] @ fwd[q]))
            near.append(per_image_psnr(x["target_images"][best][None], x["target_images"][q][None]))
    assert res["nearest_input_psnr"] == pytest.approx(float(torch.cat(near).mean()), abs=1e-3)
    assert res["gain_over_nearest_input_db"] == pytest.approx(res["psnr"] - res["nearest_input_psnr"])
    assert 0 < res["nearest_input_ssim"] <= 1
    assert math.isfinite(res["psnr"]) and 0 < res["ssim"] <= 1


# ---------------------------------------------------------------------------------------------- configs / CLI


def _cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "gsv3d_pl", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, **kw)


@pytest.mark.parametrize("cfg", ["decoder/objaverse.yaml", "distill/objaverse.yaml", "decoder/tiny.yaml",
                                 "distill/tiny.yaml"])
def test_configs_print(cfg):
    res = _cli(["fit", "--config", f"configs/{cfg}", "--print_config"], timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    printed = yaml.safe_load(res.stdout)
    assert printed["model"]["class_path"] in ("gsv3d_pl.DecoderStage", "gsv3d_pl.DistillStage")


def test_paper_scale_models_build_on_meta_device():
    from gsv3d_pl.models import UNET_PRESETS, SV3DUNet

    cfg = yaml.safe_load((ROOT / "configs/decoder/objaverse.yaml").read_text())
    dec_args = cfg["model"]["init_args"]["decoder"]["init_args"]
    with torch.device("meta"):
        dec = GSDecoder(**dec_args)
        unet = SV3DUNet(**UNET_PRESETS["pretrained"])
    n_dec = sum(p.numel() for p in dec.parameters())
    n_unet = sum(p.numel() for p in unet.parameters())
    print(f"paper-scale GS decoder: {n_dec / 1e6:.1f}M parameters; SV3D UNet: {n_unet / 1e9:.2f}B")
    assert 50e6 < n_dec < 300e6
    assert 1.3e9 < n_unet < 1.7e9
    assert dec_args["dino_dim"] == 384  # vit_small_patch14_dinov2


@pytest.mark.parametrize("cfg", ["decoder/objaverse.yaml", "distill/objaverse.yaml"])
def test_paper_scale_run_without_weights_stops_fast(cfg, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf"),
           "TORCH_HOME": str(tmp_path / "torch"), "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "gsv3d_pl", "fit", "--config", f"configs/{cfg}",
                          "--trainer.default_root_dir", str(tmp_path / "run")], cwd=ROOT, capture_output=True,
                         text=True, env=env, timeout=300)
    elapsed = time.time() - t0
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "Missing pretrained weights" in out and "config key: model.init_args." in out, out[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()
    print(f"{cfg}: stopped after {elapsed:.1f} s")


@pytest.mark.slow
def test_cli_fit_tiny_end_to_end(tmp_path):
    """`gsv3d fit --config configs/decoder/tiny.yaml` on a small toy set: checkpoint, metrics CSV, grids, JSON."""
    run = tmp_path / "run"
    res = _cli(["fit", "--config", "configs/decoder/tiny.yaml", "--trainer.default_root_dir", str(run),
                "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
                "--data.init_args.toy_objects", "10", "--data.init_args.cache_dir", str(tmp_path / "cache")],
               timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert list((run / "images").glob("val_step*.png"))
    assert list(run.glob("csv/version_*/metrics.csv"))
    res_json = json.loads((run / "heldout_eval.json").read_text())
    assert res_json["num_objects"] >= 1 and "[held-out eval]" in res.stdout
