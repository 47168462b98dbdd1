"""Stage 2 (DistillStage): LoRA-only training, L_3D gradient path, frozen decoder, checkpoints, errors."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch

from gsv3d_pl.models import GS_DECODER_PRESETS, SV3D, VAE, CLIPImageEmbedder, DINOEncoder, GSDecoder
from gsv3d_pl.models.frozen import fingerprint
from gsv3d_pl.stages.decoder_stage import DecoderStage
from gsv3d_pl.stages.distill_stage import DistillStage
from tests.synthetic import SyntheticDataModule, collate, synthetic_sample

DEC_KW = dict(dim=32, head_channels=16, upsample=2, dino_dim=64)


def encoders():
    """Tiny frozen encoders drawn from a fixed seed (the same ones in both stages, as seed_everything gives)."""
    torch.manual_seed(123)
    return VAE("tiny"), DINOEncoder("tiny", image_size=56)


@pytest.fixture(scope="module")
def decoder_ckpt(tmp_path_factory):
    """A stage-1 checkpoint after 2 training steps on synthetic data."""
    root = tmp_path_factory.mktemp("decoder")
    vae, dino = encoders()
    torch.manual_seed(0)
    stage = DecoderStage(vae=vae, dino=dino, decoder=GSDecoder.from_preset("tiny", **DEC_KW), heldout_eval=False, warmup_steps=1)
    trainer = pl.Trainer(max_steps=2, default_root_dir=str(root), accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[pl.callbacks.ModelCheckpoint(dirpath=str(root / "checkpoints"), save_last=True)])
    trainer.fit(stage, SyntheticDataModule(num_train=2, batch_size=2))
    return str(root / "checkpoints" / "last.ckpt")


def make_distill(ckpt: str, cfg_dropout: float = 0.0, **kw) -> DistillStage:
    vae, dino = encoders()
    torch.manual_seed(1)
    sv3d = SV3D("tiny", cfg_dropout=cfg_dropout)
    clip = CLIPImageEmbedder("tiny")
    kw = {"lora_rank": 4, "val_sample_steps": 2, "warmup_steps": 1, **kw}
    return DistillStage(vae=vae, dino=dino, clip=clip, sv3d=sv3d, decoder_ckpt=ckpt, **kw)


def save_stage1_checkpoint(path, decoder: GSDecoder, dino=True) -> str:
    """A DecoderStage checkpoint as Lightning writes it (state_dict + the stage's hand-off record), no training."""
    vae, d = encoders()
    stage = DecoderStage(vae=vae, dino=d if dino else None, decoder=decoder, heldout_eval=False)
    ck = {"state_dict": stage.state_dict()}
    stage.on_save_checkpoint(ck)
    torch.save(ck, path)
    return str(path)


def lora_params(stage):
    return {n: p for n, p in stage.named_parameters() if "lora_" in n}


def test_only_lora_trains_and_decoder_is_loaded(decoder_ckpt):
    stage = make_distill(decoder_ckpt)
    trainable = {n for n, p in stage.named_parameters() if p.requires_grad}
    assert trainable and trainable == set(lora_params(stage))
    assert stage.num_lora_params == sum(p.numel() for p in lora_params(stage).values())
    ck = torch.load(decoder_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for k, v in stage.decoder.state_dict().items():
        assert torch.equal(v, ck[f"decoder.{k}"])


def test_l3d_alone_reaches_the_lora_parameters(decoder_ckpt):
    stage = make_distill(decoder_ckpt, sigma_3d_max=None)
    b = collate([synthetic_sample(i) for i in range(2)])
    loss, terms = stage.distill_losses(b, generator=torch.Generator().manual_seed(0), use_2d=False)
    assert "l3d" in terms and loss.requires_grad
    loss.backward()
    grads = {n: p.grad for n, p in lora_params(stage).items()}
    nonzero = [n for n, g in grads.items() if g is not None and g.abs().sum() > 0]
    # peft's init has lora_B = 0, so every lora_B (and no lora_A) gets a gradient at step 0
    lora_b = [n for n in grads if "lora_B" in n]
    assert set(lora_b) <= set(nonzero), f"{len(set(lora_b) - set(nonzero))} lora_B tensors got no L_3D gradient"
    assert all(p.grad is None for n, p in stage.decoder.named_parameters())


def test_sigma_threshold_masks_l3d(decoder_ckpt):
    stage = make_distill(decoder_ckpt, sigma_3d_max=1e-6)  # every sampled σ is above: no L_3D at all
    b = collate([synthetic_sample(0)])
    _, terms = stage.distill_losses(b, generator=torch.Generator().manual_seed(0))
    assert float(terms["l3d_fraction"]) == 0.0 and "l3d" not in terms


def test_fit_keeps_decoder_bit_identical_and_saves_only_lora(decoder_ckpt, tmp_path):
    stage = make_distill(decoder_ckpt)
    dec_before = {k: v.clone() for k, v in stage.decoder.state_dict().items()}
    lora_before = {k: v.detach().clone() for k, v in lora_params(stage).items()}
    dm = SyntheticDataModule(num_train=4, num_val=1, num_test=1, batch_size=2)
    trainer = pl.Trainer(max_steps=3, default_root_dir=str(tmp_path), accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         val_check_interval=3, check_val_every_n_epoch=None,
                         callbacks=[pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "checkpoints"), save_last=True)])
    trainer.fit(stage, dm)
    for k, v in stage.decoder.state_dict().items():
        assert torch.equal(v, dec_before[k]), k
    assert any(not torch.equal(p, lora_before[n]) for n, p in lora_params(stage).items())
    assert "val/psnr" in trainer.callback_metrics
    ck = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    keys = set(ck["state_dict"])
    assert keys == {k for k in lora_params(stage)}, sorted(keys - set(lora_params(stage)))[:5]
    assert ck["optimizer_states"] and ck["gsv3d"]["stage"] == "distill"
    # the adapter export loads back into a fresh UNet (prefix=None, as diffusers needs)
    adapter = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    assert adapter.exists()
    fresh = make_distill(decoder_ckpt)
    fresh.load_state_dict(ck["state_dict"], strict=True)
    for n, p in lora_params(fresh).items():
        assert torch.equal(p, lora_params(stage)[n])


def test_resume_checkpoint_requires_the_same_base_unet(decoder_ckpt, tmp_path):
    stage = make_distill(decoder_ckpt)
    ck = {"state_dict": stage.state_dict()}
    stage.on_save_checkpoint(ck)
    other = make_distill(decoder_ckpt)
    with torch.no_grad():
        next(p for n, p in other.sv3d.unet.named_parameters() if "lora_" not in n).add_(1.0)
    other._unet_base_fp = fingerprint(other.sv3d.unet)
    with pytest.raises(ValueError, match="base UNet"):
        other.on_load_checkpoint(ck)


def test_missing_or_mismatched_decoder_checkpoint_fails_at_start(decoder_ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="model.init_args.decoder_ckpt"):
        make_distill(str(tmp_path / "nope.ckpt"))
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        make_distill(str(bad))
    vae, dino = encoders()
    # weights that do not fit the architecture the checkpoint records
    ck = torch.load(decoder_ckpt, map_location="cpu", weights_only=True)
    ck["gsv3d"]["decoder"]["init_args"]["dim"] = 48
    torch.save(ck, tmp_path / "tampered.ckpt")
    with pytest.raises(ValueError, match="do not fit the decoder it records"):
        make_distill(str(tmp_path / "tampered.ckpt"))
    # a checkpoint from before the hand-off record
    del ck["gsv3d"]["decoder"]
    torch.save(ck, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match="does not record its decoder"):
        make_distill(str(tmp_path / "old.ckpt"))
    with pytest.raises(ValueError, match="another VAE"):  # other latents than the decoder was trained on
        DistillStage(vae=VAE("tiny", scaling_factor=1.0), dino=dino, clip=CLIPImageEmbedder("tiny"), sv3d=SV3D("tiny"),
                     decoder_ckpt=decoder_ckpt)
    with pytest.raises(ValueError, match="dino_dim=64"):  # 'w/o DINO' in stage 2 needs a stage 1 without DINO too
        DistillStage(vae=vae, dino=None, clip=CLIPImageEmbedder("tiny"), sv3d=SV3D("tiny"), decoder_ckpt=decoder_ckpt)


def test_lora_checkpoint_is_tied_to_its_decoder(decoder_ckpt, tmp_path):
    """A distill checkpoint refuses a stage-1 checkpoint whose decoder changed since (stage 1 resumed, retrained)."""
    stage = make_distill(decoder_ckpt)
    ck = {"state_dict": stage.state_dict()}
    stage.on_save_checkpoint(ck)
    assert ck["gsv3d"]["decoder"]["class_path"].endswith("GSDecoder")
    torch.manual_seed(7)
    retrained = save_stage1_checkpoint(tmp_path / "retrained.ckpt", GSDecoder.from_preset("tiny", **DEC_KW))
    with pytest.raises(ValueError, match="another decoder"):
        make_distill(retrained).on_load_checkpoint(ck)
    make_distill(decoder_ckpt).on_load_checkpoint(ck)  # the same decoder: fine


class PartlyFrozenDecoder(GSDecoder):
    """A decoder that freezes a part of itself (as one would a pretrained backbone it loads)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.patch_embed.requires_grad_(False)


def test_frozen_decoder_parameters_come_from_the_rebuilt_decoder(tmp_path):
    """A decoder's own frozen parameters are not in the stage-1 checkpoint; the hand-off still rebuilds it."""
    torch.manual_seed(0)
    dec = PartlyFrozenDecoder(**{**GS_DECODER_PRESETS["tiny"], **DEC_KW})
    path = save_stage1_checkpoint(tmp_path / "partly_frozen.ckpt", dec)
    saved = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert "decoder.patch_embed.weight" not in saved and "decoder.head.weight" in saved
    from gsv3d_pl.stages.handoff import load_decoder

    with pytest.raises(ValueError, match="decoder_classes"):  # a class outside gsv3d_pl is built only when listed
        load_decoder(path)
    rebuilt, _ = load_decoder(path, trusted=[f"{PartlyFrozenDecoder.__module__}.PartlyFrozenDecoder"])
    assert type(rebuilt) is PartlyFrozenDecoder
    torch.testing.assert_close(rebuilt.head.weight, dec.head.weight)


def test_distill_builds_the_decoder_of_the_checkpoint(tmp_path):
    """The hand-off goes through the checkpoint: another width (and no DINO) is built with no config edit."""
    torch.manual_seed(0)
    wide = GSDecoder.from_preset("tiny", **{**DEC_KW, "dim": 48, "num_heads": 3})
    stage = make_distill(save_stage1_checkpoint(tmp_path / "wide.ckpt", wide))
    assert isinstance(stage.decoder, GSDecoder) and stage.decoder.dim == 48 and stage.decoder.config["num_heads"] == 3
    for k, v in stage.decoder.state_dict().items():
        assert torch.equal(v, wide.state_dict()[k]), k
    b = collate([synthetic_sample(0)])
    loss, terms = stage.distill_losses(b, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and "l3d" in terms

    no_dino = GSDecoder.from_preset("tiny", **{**DEC_KW, "dino_dim": None})
    path = save_stage1_checkpoint(tmp_path / "nodino.ckpt", no_dino, dino=False)
    vae, _ = encoders()
    s2 = DistillStage(vae=vae, dino=None, clip=CLIPImageEmbedder("tiny"), sv3d=SV3D("tiny"), decoder_ckpt=path)
    assert s2.decoder.dino_dim is None and s2.decoder.dino_proj is None


def test_l_distill_decreases(decoder_ckpt, tmp_path):
    """Over a short run, L_distill on fixed data with a fixed σ/noise draw goes down."""
    stage = make_distill(decoder_ckpt, lr=3e-3, lora_rank=8)
    dm = SyntheticDataModule(num_train=2, num_val=1, num_test=1, batch_size=2)
    dm.setup()
    b = collate(dm.ds["train"].items)

    def fixed_loss():
        stage.eval()
        with torch.no_grad():
            vals = [float(stage.distill_losses(b, generator=torch.Generator().manual_seed(s))[0]) for s in range(4)]
        stage.train()
        return sum(vals) / len(vals)

    before = fixed_loss()
    trainer = pl.Trainer(max_steps=12, default_root_dir=str(tmp_path), accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         enable_checkpointing=False)
    trainer.fit(stage, dm)
    after = fixed_loss()
    print(f"L_distill on fixed σ/noise: {before:.4f} -> {after:.4f}")
    assert after < before
    assert os.path.isdir(tmp_path / "lora")


def test_end_to_end_evaluation_scores_lora_on_and_off_against_copying_the_input(decoder_ckpt, tmp_path):
    import json

    from gsv3d_pl.stages.e2e import copy_input_scores
    from gsv3d_pl.stages.heldout import per_image_psnr

    dm = SyntheticDataModule(num_train=2, num_val=1, num_test=2, batch_size=2)
    dm.setup("test")
    stage = make_distill(decoder_ckpt, heldout_max_objects=2)
    stage._root_dir = lambda: str(tmp_path)  # no trainer: write beside the test
    res = stage.run_e2e_eval(dm)
    assert json.loads((tmp_path / "heldout_e2e.json").read_text())["psnr"] == pytest.approx(res["psnr"])
    for k in ("psnr", "ssim", "baseline_psnr", "copy_input_psnr", "undistilled_psnr", "num_objects"):
        assert k in res
    assert res["num_objects"] == 2
    # The LoRA starts at zero (B = 0): with and without it the pipeline is the same.
    assert res["psnr"] == pytest.approx(res["undistilled_psnr"], abs=1e-4)
    # copy_input_psnr is the input image scored as each novel view.
    batch = next(iter(dm.test_dataloader()))
    Q = batch["target_images"].shape[1]
    keep = [q for q in range(Q) if q not in batch["input_indices"][0].tolist()]
    want = per_image_psnr(batch["cond_image"][:1].expand(len(keep), -1, -1, -1), batch["target_images"][0, keep])
    got, _, _ = copy_input_scores(dm.test_dataloader(), max_objects=1)
    assert torch.allclose(got, want)
    # A trained (non-zero) LoRA changes the distilled score only; the undistilled run is the base UNet's.
    with torch.no_grad():
        for n, p in stage.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 3.0)
    from gsv3d_pl.stages.e2e import adapters_disabled

    res2 = stage.run_e2e_eval(dm)
    assert res2["undistilled_psnr"] == pytest.approx(res["undistilled_psnr"], abs=1e-4)
    on = stage.generate_orbit(batch)
    with adapters_disabled(stage.sv3d.unet):
        off = stage.generate_orbit(batch)
    assert (on - off).abs().mean() > 1e-2  # the switch really removes the LoRA
    assert any(p.requires_grad for n, p in stage.named_parameters() if "lora_" in n)  # adapters back on


# ---- stage-2 fidelity options: CFG-dropped samples, decoder checkpointing, L_2D weighting ----------------------
def lora_grads(stage) -> dict[str, torch.Tensor]:
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in lora_params(stage).items()}


def test_cfg_dropped_samples_give_no_l3d_and_no_lora_gradient(decoder_ckpt):
    b = collate([synthetic_sample(i) for i in range(2)])
    dropped = torch.zeros(2)
    # Masked (the default): every sample's conditioning dropped -> L_3D is 0 and reaches no LoRA weight.
    stage = make_distill(decoder_ckpt)
    assert stage.mask_l3d_cfg_dropped
    loss, terms = stage.distill_losses(b, generator=torch.Generator().manual_seed(0), use_2d=False, keep=dropped)
    assert float(terms["l3d_fraction"]) == 0.0 and float(terms["cfg_dropped"]) == 1.0 and "l3d" not in terms
    assert float(loss) == 0.0 and not loss.requires_grad  # no graph: no LoRA gradient from L_3D
    # Unmasked, the same batch and draw: L_3D > 0 and its gradient reaches the LoRA (so the mask above matters): every
    # self-attention lora_B (the cross-attention ones read the zeroed CLIP embedding, so they get none).
    stage = make_distill(decoder_ckpt, mask_l3d_cfg_dropped=False)
    loss, terms = stage.distill_losses(b, generator=torch.Generator().manual_seed(0), use_2d=False, keep=dropped)
    assert float(terms["l3d"]) > 0 and loss.requires_grad
    loss.backward()
    self_attn = {n: g for n, g in lora_grads(stage).items() if "lora_B" in n and ".attn1." in n}
    assert self_attn and all(g.abs().sum() > 0 for g in self_attn.values())


def test_the_cfg_mask_l3d_uses_is_the_one_that_dropped_the_conditioning(decoder_ckpt):
    """With sv3d.cfg_dropout drawing the mask (training mode), the samples L_3D leaves out are exactly those the UNet
    saw without their CLIP embedding."""
    b = collate([synthetic_sample(i) for i in range(4)])
    stage = make_distill(decoder_ckpt, cfg_dropout=0.5).train()
    seen = {}
    hook = stage.sv3d.unet.register_forward_pre_hook(lambda m, a, kw: seen.update(ehs=a[2].detach()), with_kwargs=True)
    for seed in range(20):  # a draw with some dropped and some kept samples
        loss, terms = stage.distill_losses(b, generator=torch.Generator().manual_seed(seed), use_2d=False)
        if 0 < float(terms["cfg_dropped"]) < 1:
            break
    hook.remove()
    assert 0 < float(terms["cfg_dropped"]) < 1, "no mixed draw in 20 seeds"
    B = 4
    unet_dropped = (seen["ehs"].reshape(B, -1).abs().amax(dim=1) == 0).float()  # [B]
    assert float(terms["cfg_dropped"]) == pytest.approx(float(unet_dropped.mean()))
    assert float(terms["l3d_fraction"]) == pytest.approx(1 - float(unet_dropped.mean()))
    assert "l3d" in terms and loss.requires_grad


def test_decoder_gradient_checkpointing_gives_the_same_loss_and_gradients(decoder_ckpt, monkeypatch):
    import gsv3d_pl.models.gs_decoder as gs_decoder

    calls = []
    real = gs_decoder.checkpoint
    monkeypatch.setattr(gs_decoder, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    b = collate([synthetic_sample(i) for i in range(2)])
    out = {}
    for on in (False, True):
        stage = make_distill(decoder_ckpt, decoder_gradient_checkpointing=on)
        assert not stage.decoder.training  # frozen: eval mode, yet checkpointed while L_3D backpropagates
        with torch.no_grad():  # a non-zero LoRA, so lora_A gets gradients too
            g = torch.Generator().manual_seed(5)
            for _, p in sorted(lora_params(stage).items()):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        calls.clear()
        loss, _ = stage.distill_losses(b, generator=torch.Generator().manual_seed(0), use_2d=False)
        loss.backward()
        out[on] = (float(loss), lora_grads(stage), len(calls))
    assert out[False][2] == 0 and out[True][2] == len(stage.decoder.blocks)  # every block recomputed, only when on
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-6)
    assert any(g.abs().sum() > 0 for n, g in out[True][1].items() if "lora_A" in n)
    for n, g in out[False][1].items():
        torch.testing.assert_close(out[True][1][n], g, rtol=1e-5, atol=1e-7, msg=n)
    with torch.no_grad():  # evaluation builds no graph: nothing to checkpoint
        calls.clear()
        stage.distill_losses(b, generator=torch.Generator().manual_seed(0))
        assert not calls


def test_l2d_weighting_none_and_edm_differ_by_the_edm_weight(decoder_ckpt):
    from gsv3d_pl.models.sv3d import EDMPreconditioner

    b = collate([synthetic_sample(0)])  # one object: one σ, so the ratio is exactly λ(σ)
    l2d = {}
    for w in ("none", "edm"):
        stage = make_distill(decoder_ckpt, l2d_weighting=w, lambda_3d=0.0)
        loss, terms = stage.distill_losses(b, generator=torch.Generator().manual_seed(3))
        l2d[w] = float(terms["l2d"])
        assert float(loss) == pytest.approx(l2d[w])
    sigma = EDMPreconditioner(0.7, 1.6).sample_sigma(1, generator=torch.Generator().manual_seed(3))  # the same draw
    want = float((sigma**2 + 1) / sigma**2)
    assert l2d["edm"] / l2d["none"] == pytest.approx(want, rel=1e-5) and abs(want - 1) > 1e-3
    with pytest.raises(ValueError, match="l2d_weighting"):
        make_distill(decoder_ckpt, l2d_weighting="karras")


def test_every_distill_config_writes_the_fidelity_keys():
    """Each option's default is written in every stage-2 config (configs/README.md explains them); the paper config
    uses the paper's unweighted L_2D."""
    import yaml

    root = os.path.join(os.path.dirname(__file__), "..", "configs", "distill")
    keys = ("l2d_weighting", "mask_l3d_cfg_dropped", "decoder_gradient_checkpointing", "test_variants")
    for name in sorted(n for n in os.listdir(root) if n.endswith(".yaml")):  # recipes/ holds overlays, not configs
        args = yaml.safe_load(open(os.path.join(root, name)))["model"]["init_args"]
        assert all(k in args for k in keys), (name, [k for k in keys if k not in args])
        assert args["test_variants"] == ["undistilled", "distilled"], name
    paper = yaml.safe_load(open(os.path.join(root, "objaverse.yaml")))["model"]["init_args"]
    assert paper["l2d_weighting"] == "none" and paper["mask_l3d_cfg_dropped"] is True
    assert paper["decoder_gradient_checkpointing"] is True
