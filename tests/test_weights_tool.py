"""`gsv3d weights`: configs parsed as `gsv3d fit` parses them, weight specs found through class_path, the
status table, exit codes, and hub-cache look-ups that follow refs/main."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gsv3d_pl import weights as weights_mod
from gsv3d_pl.hub import hub_path, hub_snapshot
from gsv3d_pl.tools import weights as tool

ROOT = Path(__file__).resolve().parents[1]

# The fit parser needs a model and a datamodule; Lightning's boring ones need no files.
BASE = textwrap.dedent("""
    model:
      class_path: lightning.pytorch.demos.boring_classes.BoringModel
    data:
      class_path: lightning.pytorch.demos.boring_classes.BoringDataModule
""")
PRETRAINED = BASE + textwrap.dedent("""
    trainer:
      callbacks:
        - class_path: callbacks.metrics.GeometryMetrics
        - class_path: callbacks.metrics.AppearanceMetrics
          init_args:
            mode: pretrained
            lpips_backbone_path: {lpips}
""")


def test_pretrained_metrics_config_reports_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    lpips = tmp_path / "alex.pth"
    lpips.write_bytes(b"x")
    cfg = tmp_path / "a.yaml"
    cfg.write_text(PRETRAINED.format(lpips=lpips))
    assert tool.main(["--config", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert "trainer.callbacks[1].init_args.lpips_backbone_path" in out
    assert "trainer.callbacks[1].init_args.inception_path" in out
    lines = {line.split()[1]: line for line in out.splitlines() if "callbacks.metrics.AppearanceMetrics" in line}
    assert lines["trainer.callbacks[1].init_args.lpips_backbone_path"].rstrip().endswith("found")
    assert lines["trainer.callbacks[1].init_args.inception_path"].rstrip().endswith("MISSING")
    assert "2 file(s) MISSING" in out


def test_later_config_wins_and_smoke_needs_nothing(tmp_path, capsys):
    a = tmp_path / "a.yaml"
    a.write_text(PRETRAINED.format(lpips="/nonexistent"))
    b = tmp_path / "b.yaml"
    b.write_text("trainer:\n  callbacks:\n    - class_path: callbacks.metrics.AppearanceMetrics\n"
                 "      init_args: {mode: smoke}\n")
    assert tool.main(["--config", str(a), "--config", str(b)]) == 0  # lists are replaced, as in LightningCLI
    assert "No external weight files" in capsys.readouterr().out


def test_listing_without_config_and_bad_input(tmp_path, capsys):
    assert tool.main([]) == 0
    out = capsys.readouterr().out
    assert "alexnet-owt-7be5be79.pth" in out and "weights-inception-2015-12-05-6726825d.pth" in out
    assert "AppearanceMetrics.init_args.inception_path" in out  # keyed by class name without a config
    # Bad configs are the fit parser's errors, naming the file and the key; exit status 2.
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: nowhere.Missing\n")
    assert tool.main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "nowhere.Missing" in err and 'key "model"' in err
    assert tool.main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad.write_text("- a\n- b\n")
    assert tool.main(["--config", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err
    typo = tmp_path / "typo.yaml"
    typo.write_text(BASE + "trainer:\n  max_stepz: 3\n")
    assert tool.main(["--config", str(typo)]) == 2
    assert "max_stepz" in capsys.readouterr().err


def test_find_class_nodes_keys():
    cfg = {"model": {"class_path": "A", "init_args": {"vae": {"class_path": "B", "init_args": {"path": "p"}}}},
           "trainer": {"callbacks": [{"class_path": "C"}]}}
    assert tool.find_class_nodes(cfg) == [("model", "A", {"vae": {"class_path": "B", "init_args": {"path": "p"}}}),
                                          ("model.init_args.vae", "B", {"path": "p"}),
                                          ("trainer.callbacks[0]", "C", {})]


def test_aliased_class_path_and_overrides(tmp_path, monkeypatch, capsys):
    """`gsv3d_pl.DecoderStage` (a re-export) reaches DecoderStage.weight_specs; --key=value overrides apply."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert tool.import_class("gsv3d_pl.DecoderStage") is tool.import_class("gsv3d_pl.stages.decoder_stage.DecoderStage")
    tiny = str(ROOT / "configs" / "decoder" / "tiny.yaml")
    saved = tmp_path / "saved.yaml"  # the keys a run's saved config.yaml adds (`gsv3d fit` / `gsv3d test`)
    saved.write_text("ckpt_path: null\nverbose: true\n")
    assert tool.main(["--config", tiny, "--config", str(saved)]) == 0
    assert "No external weight files" in capsys.readouterr().out
    assert tool.main(["--config", tiny, "--model.init_args.lambda_lpips=0.5"]) == 1
    out = capsys.readouterr().out
    assert "model.init_args.lambda_lpips" in out and "alexnet-owt-7be5be79.pth" in out


def test_paper_scale_distill_config_lists_every_model_file(tmp_path, monkeypatch, capsys, fake_hf_cache):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    snap = fake_hf_cache.add("chenguolin/sv3d-diffusers", {"unet/config.json": "{}", "vae/config.json": "{}"})
    assert tool.main(["--config", str(ROOT / "configs" / "distill" / "objaverse.yaml")]) == 1
    rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines() if line.startswith("gsv3d_pl.")}
    for key in ("vae", "clip", "dino"):
        assert rows[f"model.init_args.{key}.init_args.path"]
    unet = rows["model.init_args.sv3d.init_args.unet_path"]
    assert str(snap / "unet") in unet and unet.rstrip().endswith("found")
    assert "runs/decoder_objaverse/checkpoints/last.ckpt" in rows["model.init_args.decoder_ckpt"]  # stage 1's output


def test_hub_path_follows_refs_main(fake_hf_cache):
    repo = "org/model"
    old = fake_hf_cache.add(repo, {"unet/config.json": "{}", "model.safetensors": "old"}, commit="0" * 40)
    new = fake_hf_cache.add(repo, {"unet/config.json": "{}", "model.safetensors": "new"}, commit="f" * 40)
    assert sorted(p.name for p in (fake_hf_cache.root / "models--org--model" / "snapshots").iterdir()) == [
        old.name, new.name]  # the lexicographically first snapshot is the stale one
    assert hub_snapshot(repo) == new
    assert hub_path(repo, "model.safetensors").read_text() == "new"
    assert hub_path(repo, "unet") == new / "unet" and hub_path(repo) == new
    (fake_hf_cache.root / "models--org--model" / "refs" / "main").write_text(old.name)
    assert hub_path(repo, "model.safetensors").read_text() == "old"


def test_hub_path_without_snapshot_is_a_placeholder(fake_hf_cache):
    fake_hf_cache.add("org/no-main", {"a.bin": "x"}, main=False)  # a snapshot, but no refs/main names it
    for repo in ("org/no-main", "org/absent"):
        assert hub_snapshot(repo) is None
        p = hub_path(repo, "a.bin")
        assert not p.exists() and p.parent.name == "<revision>"
        assert p.parent.parent == fake_hf_cache.root / f"models--{repo.replace('/', '--')}" / "snapshots"


# ----------------------------------------------------------------------------- --fetch (downloads mocked)

DECODER = str(ROOT / "configs" / "decoder" / "objaverse.yaml")
DISTILL = str(ROOT / "configs" / "distill" / "objaverse.yaml")
ALEX_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")


class FakeDownloads:
    """Stands in for the three download functions where gsv3d_pl.weights looks them up; records every call and,
    unless told to fail, writes what the real one would (hub files into the fake cache, URLs into ``dst``)."""

    def __init__(self, cache, monkeypatch):
        self.cache, self.calls, self.fail = cache, [], set()
        monkeypatch.setattr(weights_mod, "hf_hub_download", self.hf_hub_download)
        monkeypatch.setattr(weights_mod, "snapshot_download", self.snapshot_download)
        monkeypatch.setattr(weights_mod, "download_url_to_file", self.download_url_to_file)

    def _check(self, what):
        if what in self.fail:
            raise ConnectionError(f"network unreachable ({what})")

    def hf_hub_download(self, repo_id, filename, subfolder=None, cache_dir=None):
        self.calls.append(("hf_hub_download", repo_id, filename, subfolder))
        assert Path(cache_dir) == self.cache.root
        self._check(repo_id)
        self.cache.add(repo_id, {f"{subfolder}/{filename}" if subfolder else filename: "w"})
        return "unused"

    def snapshot_download(self, repo_id, allow_patterns=None, cache_dir=None):
        self.calls.append(("snapshot_download", repo_id, tuple(allow_patterns)))
        assert Path(cache_dir) == self.cache.root
        self._check(repo_id)
        files = {}
        for pattern in allow_patterns:  # a glob stands for the folder's config and weights
            names = ["config.json", "diffusion_pytorch_model.safetensors"] if pattern.endswith("*") else [""]
            files.update({pattern.rstrip("*") + n: "w" for n in names})
        self.cache.add(repo_id, files)
        return "unused"

    def download_url_to_file(self, url, dst, progress=True):
        self.calls.append(("download_url_to_file", url, Path(dst).parent, Path(dst).name))
        self._check(url)
        Path(dst).write_bytes(b"w")


@pytest.fixture
def downloads(tmp_path, monkeypatch, fake_hf_cache):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return FakeDownloads(fake_hf_cache, monkeypatch)


def test_without_fetch_nothing_downloads(downloads, capsys):
    assert tool.main(["--config", DECODER]) == 1
    assert tool.main(["--config", DISTILL]) == 1
    assert downloads.calls == []
    assert "--fetch" in capsys.readouterr().out  # the hint
    with pytest.raises(SystemExit) as e:  # --fetch needs a config to know what is missing
        tool.main(["--fetch"])
    assert e.value.code == 2 and "--fetch needs --config" in capsys.readouterr().err
    assert downloads.calls == []


def test_fetch_downloads_exactly_the_missing_files(downloads, tmp_path, capsys):
    ckpts = tmp_path / "torch" / "hub" / "checkpoints"
    downloads.cache.add("timm/resnet50_clip.openai", {"open_clip_pytorch_model.bin": "x"})  # already there
    # lambda_lpips > 0 adds DecoderStage's own AlexNet spec: the same file as the metric's, fetched once.
    argv = ["--config", DECODER, "--model.init_args.lambda_lpips=0.5", "--fetch"]
    assert tool.main(argv) == 0
    assert sorted(downloads.calls) == sorted([
        ("download_url_to_file", ALEX_URL, ckpts, downloads.calls[0][3]),
        ("download_url_to_file", INCEPTION_URL, ckpts, downloads.calls[1][3]),
        ("snapshot_download", "stabilityai/sd-vae-ft-mse", ("config.json", "diffusion_pytorch_model.safetensors")),
        ("hf_hub_download", "timm/vit_small_patch14_dinov2.lvd142m", "model.safetensors", None),
    ])
    # URL files are written beside their place, then renamed into it.
    for call, name in zip(downloads.calls[:2], ("alexnet-owt-7be5be79.pth", "weights-inception-2015-12-05-6726825d.pth")):
        assert call[3] != name and call[3].startswith(f".tmp_{name}")
        assert (ckpts / name).read_bytes() == b"w"
    assert sorted(p.name for p in ckpts.iterdir()) == ["alexnet-owt-7be5be79.pth",
                                                       "weights-inception-2015-12-05-6726825d.pth"]
    out = capsys.readouterr().out
    before, after = out.split("After fetching:")
    assert "MISSING" in before and "MISSING" not in after
    statuses = [line.split()[-1] for line in after.splitlines() if line.startswith(("gsv3d_pl.", "callbacks."))]
    assert statuses and set(statuses) == {"found"}
    # Found now, so a second --fetch downloads nothing.
    downloads.calls.clear()
    assert tool.main(argv) == 0
    assert downloads.calls == []


def test_fetch_failure_names_the_file_and_continues(downloads, tmp_path, capsys):
    downloads.fail = {"timm/vit_small_patch14_dinov2.lvd142m", INCEPTION_URL}
    assert tool.main(["--config", DECODER, "--fetch"]) == 1
    assert len(downloads.calls) == 5  # every missing file was tried
    captured = capsys.readouterr()
    assert "could not fetch timm vit_small_patch14_dinov2 weights" in captured.err
    assert "could not fetch FID/KID Inception-v3" in captured.err and "ConnectionError" in captured.err
    assert "Traceback" not in captured.err + captured.out
    after = captured.out.split("After fetching:")[1]
    rows = {line.split()[1]: line.split()[-1] for line in after.splitlines()
            if line.startswith(("gsv3d_pl.", "callbacks."))}
    assert rows["model.init_args.dino.init_args.path"] == "MISSING"
    assert rows["model.init_args.vae.init_args.path"] == "found"
    assert "2 file(s) MISSING" in after and "2 download(s) failed" in after
    ckpts = tmp_path / "torch" / "hub" / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["alexnet-owt-7be5be79.pth"]  # no partial inception file left


def test_fetch_skips_config_paths_and_files_without_a_recipe(downloads, tmp_path, capsys):
    vae = tmp_path / "my_vae"
    assert tool.main(["--config", DISTILL, f"--model.init_args.vae.init_args.path={vae}", "--fetch"]) == 1
    requested = {c[1] for c in downloads.calls}
    assert "stabilityai/sd-vae-ft-mse" not in requested  # the config names its own VAE folder
    assert ("snapshot_download", "chenguolin/sv3d-diffusers", ("unet/*",)) in downloads.calls
    assert ("hf_hub_download", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "open_clip_pytorch_model.bin",
            None) in downloads.calls
    out = capsys.readouterr().out
    assert "set by the config: not fetched" in out and str(vae) in out
    assert "stage-1 DecoderStage checkpoint" in out and "no download recipe, not fetched" in out
    after = out.split("After fetching:")[1]
    rows = {line.split()[1]: line.split()[-1] for line in after.splitlines() if line.startswith("gsv3d_pl.")}
    assert rows["model.init_args.sv3d.init_args.unet_path"] == "found"
    assert rows["model.init_args.clip.init_args.path"] == "found"
    assert rows["model.init_args.vae.init_args.path"] == "MISSING"
    assert rows["model.init_args.decoder_ckpt"] == "MISSING"
    assert "2 file(s) MISSING" in after
