"""Image metrics: PSNR/SSIM against scikit-image, the smoke path end to end, offline weight handling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim

from gsv3d_pl.metrics.image import (
    INCEPTION_FILE,
    LPIPS_ALEX_FILE,
    _load_lpips_net,
    build_image_metrics,
    fid_kid,
    image_metric_weight_specs,
)
from gsv3d_pl.weights import MissingWeightsError


@pytest.fixture(scope="module")
def smoke():
    return build_image_metrics("smoke")


def _pair(n=3, h=48, w=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(n, 3, h, w, generator=g)
    pred = (gt + 0.1 * torch.randn(n, 3, h, w, generator=g)).clamp(0, 1)
    return pred, gt


def test_psnr_ssim_match_scikit_image(smoke):
    pred, gt = _pair()
    s = smoke.per_image(pred, gt)
    for i in range(pred.shape[0]):
        p, g = pred[i].permute(1, 2, 0).double().numpy(), gt[i].permute(1, 2, 0).double().numpy()
        assert s["psnr"][i].item() == pytest.approx(sk_psnr(g, p, data_range=1.0), abs=1e-3)
        # torchmetrics' SSIM = skimage's with the Gaussian window of Wang et al. (σ 1.5, 11 taps, sample cov)
        ref = sk_ssim(g, p, data_range=1.0, channel_axis=2, gaussian_weights=True, sigma=1.5,
                      use_sample_covariance=False)
        assert s["ssim"][i].item() == pytest.approx(ref, abs=2e-3)


def test_per_image_is_per_image_not_pooled(smoke):
    pred, gt = _pair(n=2)
    pred[1] = gt[1]  # a perfect image must not make the other one perfect
    s = smoke.per_image(pred, gt)
    assert torch.isinf(s["psnr"][1]) or s["psnr"][1] > 80
    assert s["lpips"][1].abs() < 1e-6 and s["lpips"][0] > 0
    assert ((s["clip_iqa"] > 0) & (s["clip_iqa"] < 1)).all()
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        smoke.per_image(pred[:, :2], gt[:, :2])


def test_fid_kid_on_features():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(60, 8, generator=g)
    b = torch.randn(60, 8, generator=g) + 2.0
    fid_same, kid_same, _ = fid_kid(a, a, kid_subset_size=1000, kid_subsets=10)
    fid_diff, kid_diff, _ = fid_kid(a, b, kid_subset_size=1000, kid_subsets=10)  # subset capped to 60
    assert abs(fid_same) < 1e-3 and fid_diff == pytest.approx(8 * 4.0, rel=0.35)  # ||Δμ||² = 8·2²
    assert kid_diff > 10 * abs(kid_same)
    assert fid_kid(a, b, kid_subsets=10) == fid_kid(a, b, kid_subsets=10)  # fixed seed: reproducible
    assert np.isnan(fid_kid(a[:1], b[:1])[0])


def test_smoke_features_are_deterministic(smoke):
    pred, _ = _pair(n=2)
    other = build_image_metrics("smoke")
    torch.testing.assert_close(smoke.features(pred), other.features(pred))
    torch.testing.assert_close(smoke.per_image(pred, pred.flip(0))["lpips"], other.per_image(pred, pred.flip(0))["lpips"])


def test_missing_metric_weights_listed_before_construction(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(MissingWeightsError) as e:
        build_image_metrics("pretrained")
    msg = str(e.value)
    for needle in (LPIPS_ALEX_FILE, INCEPTION_FILE, "open_clip_pytorch_model.bin", "lpips_backbone_path",
                   "inception_path", "clip_iqa_path", str(tmp_path / "torch" / "hub" / "checkpoints")):
        assert needle in msg
    assert len(e.value.specs) == 3
    # explicit paths replace the caches
    specs = image_metric_weight_specs("pretrained", lpips_backbone_path=str(tmp_path / "a.pth"))
    assert specs[0].paths() == [tmp_path / "a.pth"]
    assert image_metric_weight_specs("smoke") == []
    with pytest.raises(ValueError, match="mode"):
        image_metric_weight_specs("pretrianed")


def test_lpips_backbone_loads_from_explicit_file(tmp_path):
    import torchvision

    torch.manual_seed(3)
    sd = torchvision.models.alexnet(weights=None).state_dict()
    path = tmp_path / LPIPS_ALEX_FILE
    torch.save(sd, path)
    net = _load_lpips_net(path)
    torch.testing.assert_close(getattr(net.net.slice1, "0").weight, sd["features.0.weight"])
    torch.testing.assert_close(getattr(net.net.slice5, "10").bias, sd["features.10.bias"])
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="AlexNet"):
        _load_lpips_net(tmp_path / "bad.pth")
