"""Image metrics of the paper's table, built offline: PSNR, SSIM, LPIPS, FID, KID, CLIP-IQA.

:func:`build_image_metrics` returns an :class:`ImageMetrics` module in one of two modes that share
every line of evaluation code and differ only in the feature extractors' weights:

- ``"pretrained"``: the published networks, read from local files resolved through
  :mod:`gsv3d_pl.weights` *before* anything is constructed (a missing file raises
  :class:`~gsv3d_pl.weights.MissingWeightsError` listing every missing file, never a download):
  LPIPS's AlexNet backbone (torchvision ``alexnet-owt-7be5be79.pth``; the LPIPS linear heads ship in
  the torchmetrics wheel), the FID Inception (``weights-inception-2015-12-05-6726825d.pth``, shared by
  FID and KID) and OpenAI's CLIP RN50 for CLIP-IQA (open_clip format).
- ``"smoke"``: the same metric code with small, seeded, random-init feature extractors. Numbers are
  only a pipeline check and are labelled "smoke" everywhere they are written.

Conventions (those of 3D-generation papers): images [N, 3, H, W] in [0, 1]; PSNR is computed per image
(``dim=(1, 2, 3)``, ``data_range=1``) then averaged; SSIM with ``data_range=1``; LPIPS AlexNet with
``normalize=True`` (images under 32 px, tiny configs only, are upsampled bilinearly for LPIPS: AlexNet's
pooling needs 32 px); FID/KID over all rendered vs all GT views; KID's ``subset_size`` is
``min(kid_subset_size, #real, #fake)`` so that small test sets work.

CLIP-IQA: torchmetrics' ``CLIPImageQualityAssessment`` only loads HF/piq CLIP checkpoints, so it is
implemented here on open_clip with the same definition (Wang et al. 2023, the antonym-prompt score):
``score = softmax(100 · [cos(f_img, f_"Good photo."), cos(f_img, f_"Bad photo.")])[0]``, images resized to
the model's input size (bicubic, antialiased) and normalised with CLIP's mean/std. The default model is
OpenAI CLIP RN50 as in the CLIP-IQA paper; unlike piq's variant the positional embedding is kept, so
absolute values can differ slightly from torchmetrics'.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from gsv3d_pl.hub import hub_path
from gsv3d_pl.weights import HubFile, MissingWeightsError, UrlFile, WeightSpec, torch_hub_dir

__all__ = [
    "MODES",
    "LPIPS_ALEX_FILE",
    "INCEPTION_FILE",
    "image_metric_weight_specs",
    "build_image_metrics",
    "ImageMetrics",
    "CLIPIQA",
    "SmokeFeatureNet",
    "fid_kid",
]

MODES = ("pretrained", "smoke")
LPIPS_ALEX_FILE = "alexnet-owt-7be5be79.pth"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
CLIP_IQA_HF_REPO = "timm/resnet50_clip.openai"
LPIPS_MIN_SIZE = 32
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def image_metric_weight_specs(
    mode: str = "pretrained",
    lpips_backbone_path: str | None = None,
    inception_path: str | None = None,
    clip_iqa_path: str | None = None,
    key_prefix: str = "",
) -> list[WeightSpec]:
    """The external files the image metrics need in ``mode`` (none in ``"smoke"``).

    ``key_prefix`` is prepended to the config keys (e.g. ``"trainer.callbacks[0].init_args."``).
    """
    if mode not in MODES:
        raise ValueError(f"image metrics: mode must be one of {MODES}, got {mode!r}")
    if mode == "smoke":
        return []
    hub = torch_hub_dir() / "checkpoints"
    return [
        WeightSpec(
            name="LPIPS AlexNet backbone (torchvision ImageNet weights)",
            config_key=key_prefix + "lpips_backbone_path",
            candidates=[hub / LPIPS_ALEX_FILE],
            source=f"https://download.pytorch.org/models/{LPIPS_ALEX_FILE}",
            explicit=lpips_backbone_path,
            fetch=UrlFile(f"https://download.pytorch.org/models/{LPIPS_ALEX_FILE}", hub / LPIPS_ALEX_FILE),
        ),
        WeightSpec(
            name="FID/KID Inception-v3 (torch-fidelity port of the TF FID network)",
            config_key=key_prefix + "inception_path",
            candidates=[hub / INCEPTION_FILE],
            source="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE,
            explicit=inception_path,
            fetch=UrlFile("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE,
                          hub / INCEPTION_FILE),
        ),
        WeightSpec(
            name="CLIP-IQA CLIP RN50 (OpenAI weights, open_clip format)",
            config_key=key_prefix + "clip_iqa_path",
            candidates=[hub_path(CLIP_IQA_HF_REPO, "open_clip_pytorch_model.bin")],  # the refs/main snapshot
            source=f"huggingface-cli download {CLIP_IQA_HF_REPO} open_clip_pytorch_model.bin",
            explicit=clip_iqa_path,
            fetch=HubFile(CLIP_IQA_HF_REPO, "open_clip_pytorch_model.bin"),
        ),
    ]


class SmokeFeatureNet(nn.Module):
    """Small seeded random-init CNN standing in for Inception in "smoke" mode.

    ``forward(images [N, 3, H, W] in [0, 1]) -> [N, num_features]`` (global-average-pooled features).
    """

    def __init__(self, num_features: int = 64, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.num_features = num_features
        chans = [3, 16, 32, num_features]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(chans[:-1], chans[1:]))
        for conv in self.convs:  # explicit seeded init: the features must not depend on the global RNG
            nn.init.normal_(conv.weight, std=(2.0 / (conv.in_channels * 9)) ** 0.5, generator=g)
            nn.init.zeros_(conv.bias)
        from gsv3d_pl.models.frozen import freeze  # here: importing gsv3d_pl.models costs seconds

        freeze(self)  # convs only, so eval() changes nothing but the flag

    def forward(self, x: Tensor) -> Tensor:
        x = 2 * x - 1
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i < len(self.convs) - 1:
                x = F.relu(x)
        return x.mean(dim=(2, 3))  # [N, num_features]


class _InceptionFeatures(nn.Module):
    """torchmetrics' FID Inception (2048-d pool features) taking float images in [0, 1]."""

    def __init__(self, weights_path: str):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(weights_path)
        )
        self.num_features = 2048

    def forward(self, x: Tensor) -> Tensor:
        # The TF-FID network takes uint8-range values (it rescales (x - 128) / 128 itself).
        return self.net((x.clamp(0, 1) * 255).round().to(torch.uint8)).reshape(x.shape[0], -1).float()


class CLIPIQA(nn.Module):
    """CLIP-IQA on an open_clip model: the antonym-prompt quality score in (0, 1).

    ``forward(images [N, 3, H, W] in [0, 1]) -> [N]`` = softmax(t · cos(img, [positive, negative]))[positive],
    t = exp(model.logit_scale) (= 100 for OpenAI CLIP, as in CLIP-IQA).
    """

    def __init__(self, model: nn.Module, tokenizer, prompts: tuple[str, str] = ("Good photo.", "Bad photo.")):
        super().__init__()
        from gsv3d_pl.models.frozen import freeze  # here: importing gsv3d_pl.models costs seconds

        self.model = freeze(model)
        size = getattr(model.visual, "image_size", 224)
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        with torch.no_grad():
            anchors = F.normalize(self.model.encode_text(tokenizer(list(prompts))).float(), dim=-1)  # [2, D]
        self.register_buffer("anchors", anchors, persistent=False)
        # CLIP's own temperature: exp(logit_scale) = 100 for OpenAI CLIP (CLIP-IQA's constant) and 1/0.07 for
        # a random-init smoke model, whose scores would otherwise saturate at 0 or 1.
        scale = getattr(model, "logit_scale", None)
        self.temperature = float(scale.exp()) if isinstance(scale, torch.Tensor) else 100.0

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = F.interpolate(images.float(), size=self.image_size, mode="bicubic", antialias=True, align_corners=False)
        x = (x.clamp(0, 1) - self.mean) / self.std
        f = F.normalize(self.model.encode_image(x).float(), dim=-1)  # [N, D]
        return (self.temperature * f @ self.anchors.T).softmax(dim=-1)[:, 0]  # [N]


class ImageMetrics(nn.Module):
    """Feature extractors + per-image metrics. Holds no accumulated state (the callbacks do, per object).

    Attributes:
        mode: "pretrained" or "smoke".
        lpips_net: torchmetrics' LPIPS network (AlexNet backbone + LPIPS linear heads).
        fid_features: images [N, 3, H, W] in [0, 1] -> [N, d] (Inception pool3 or the smoke CNN).
        clip_iqa: :class:`CLIPIQA`.
    """

    def __init__(self, mode: str, lpips_net: nn.Module, fid_features: nn.Module, clip_iqa: CLIPIQA,
                 kid_subset_size: int = 1000, kid_subsets: int = 100):
        super().__init__()
        self.mode = mode
        self.lpips_net = lpips_net
        self.fid_features = fid_features
        self.clip_iqa = clip_iqa
        self.kid_subset_size = kid_subset_size
        self.kid_subsets = kid_subsets

    @torch.no_grad()
    def per_image(self, pred: Tensor, gt: Tensor, with_clip_iqa: bool = True) -> dict[str, Tensor]:
        """Per-image scores of ``pred`` vs ``gt`` (both [N, 3, H, W] in [0, 1]) -> dict of [N] tensors:
        "psnr" (dB), "ssim", "lpips", "clip_iqa" (of ``pred``; left out with ``with_clip_iqa=False``, e.g. for the
        model-free baselines, whose no-reference quality says nothing about a model)."""
        if pred.shape != gt.shape or pred.ndim != 4 or pred.shape[1] != 3:
            raise ValueError(f"image metrics: expected pred and gt [N, 3, H, W], got {tuple(pred.shape)}, "
                             f"{tuple(gt.shape)}")
        pred, gt = pred.float().clamp(0, 1), gt.float().clamp(0, 1)
        psnr = peak_signal_noise_ratio(pred, gt, data_range=1.0, dim=(1, 2, 3), reduction="none")
        ssim = structural_similarity_index_measure(pred, gt, data_range=1.0, reduction="none")
        if min(pred.shape[-2:]) < LPIPS_MIN_SIZE:  # AlexNet's pooling needs >= 32 px: upsample tiny renders
            size = [max(LPIPS_MIN_SIZE, s) for s in pred.shape[-2:]]
            pred_l, gt_l = (F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in (pred, gt))
        else:
            pred_l, gt_l = pred, gt
        lpips = self.lpips_net(pred_l, gt_l, normalize=True).reshape(-1)
        out = {"psnr": psnr.reshape(-1), "ssim": ssim.reshape(-1), "lpips": lpips}
        if with_clip_iqa:
            out["clip_iqa"] = self.clip_iqa(pred)
        return out

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """FID/KID features [N, d] (float32) of images [N, 3, H, W] in [0, 1]."""
        return self.fid_features(images.float().clamp(0, 1)).float()

    def fid_kid(self, real: Tensor, fake: Tensor) -> tuple[float, float, float]:
        """(FID, KID mean, KID std) of feature sets real [Nr, d] and fake [Nf, d]; see :func:`fid_kid`."""
        return fid_kid(real, fake, self.kid_subset_size, self.kid_subsets)


class _Identity(nn.Module):
    """Lets torchmetrics' FID/KID consume precomputed features (their ``feature=`` accepts a module)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x


def fid_kid(real: Tensor, fake: Tensor, kid_subset_size: int = 1000, kid_subsets: int = 100,
            seed: int = 0) -> tuple[float, float, float]:
    """FID and KID (torchmetrics) between precomputed feature sets ``real`` [Nr, d] and ``fake`` [Nf, d].

    KID's subset size is ``min(kid_subset_size, Nr, Nf)``; its random subsets use a fixed ``seed`` so the
    result is reproducible. Fewer than 2 samples in a set gives NaN.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    n = min(real.shape[0], fake.shape[0])
    if n < 2:
        return float("nan"), float("nan"), float("nan")
    d = real.shape[1]
    real, fake = real.double().cpu(), fake.double().cpu()
    fid = FrechetInceptionDistance(feature=_Identity(d), sync_on_compute=False)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    with warnings.catch_warnings():  # "KID will save all extracted features": they are features already
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=_Identity(d), subsets=kid_subsets, subset_size=min(kid_subset_size, n),
                                      sync_on_compute=False)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return float(fid.compute()), float(kid_mean), float(kid_std)


def _smoke_clip():
    import open_clip
    from open_clip.model import CLIP

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIP(
            embed_dim=32,
            vision_cfg=dict(image_size=32, layers=1, width=64, patch_size=8, head_width=32),
            text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=1),
        )
    return model, open_clip.get_tokenizer("RN50-quickgelu")  # the bundled BPE vocabulary, no download


def _load_lpips_net(backbone_path: Path | None) -> nn.Module:
    """torchmetrics' LPIPS network with a random AlexNet, then ``backbone_path``'s torchvision weights."""
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # smoke mode keeps the random backbone: make it the same every run
        net = _NoTrainLpips(net="alex", pnet_rand=True)  # LPIPS linear heads load from the wheel
    if backbone_path is not None:
        from gsv3d_pl.checkpoints import read_checkpoint

        sd = read_checkpoint(backbone_path, "lpips_backbone_path", expected="a torchvision AlexNet state dict",
                             require_state_dict=False)
        target = {}
        for i in range(1, 6):
            for name, _ in getattr(net.net, f"slice{i}").named_parameters():
                target[f"slice{i}.{name}"] = sd.get(f"features.{name}")
        missing = [k for k, v in target.items() if v is None]
        if missing:
            raise ValueError(f"LPIPS backbone {backbone_path}: not a torchvision AlexNet state dict "
                             f"(missing features.* keys for {missing[:3]}...)")
        net.net.load_state_dict(target, strict=True)
    return net.eval()


def build_image_metrics(
    mode: str = "pretrained",
    lpips_backbone_path: str | None = None,
    inception_path: str | None = None,
    clip_iqa_path: str | None = None,
    clip_iqa_model: str = "RN50-quickgelu",
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    key_prefix: str = "",
) -> ImageMetrics:
    """Build the image metrics; in "pretrained" mode first check every weight file and raise
    :class:`MissingWeightsError` naming all missing ones (config key, where looked, where to get it)."""
    specs = image_metric_weight_specs(mode, lpips_backbone_path, inception_path, clip_iqa_path, key_prefix)
    missing = [s for s in specs if s.find() is None]
    if missing:
        raise MissingWeightsError(missing)
    if mode == "smoke":
        lpips_net = _load_lpips_net(None)
        feats: nn.Module = SmokeFeatureNet()
        clip_model, tokenizer = _smoke_clip()
    else:
        lpips_path, inc_path, clip_path = (s.find() for s in specs)
        lpips_net = _load_lpips_net(lpips_path)
        feats = _InceptionFeatures(str(inc_path))
        import open_clip

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: the file is local, never fetch
        clip_model = open_clip.create_model(clip_iqa_model, pretrained=str(clip_path))
        tokenizer = open_clip.get_tokenizer(clip_iqa_model)
    return ImageMetrics(mode, lpips_net, feats, CLIPIQA(clip_model, tokenizer), kid_subset_size, kid_subsets)
