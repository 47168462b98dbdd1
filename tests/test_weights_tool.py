"""`gsv3d weights`: config walking, status table, exit codes."""

from __future__ import annotations

import textwrap

import pytest

from gsv3d_pl.tools import weights as tool

PRETRAINED = textwrap.dedent("""
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
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: nowhere.Missing\n")
    assert tool.main(["--config", str(bad)]) == 0
    assert "cannot import 'nowhere.Missing'" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tool.main(["--config", str(tmp_path / "nope.yaml")])
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        tool.main(["--config", str(bad)])


def test_find_class_nodes_keys():
    cfg = {"model": {"class_path": "A", "init_args": {"vae": {"class_path": "B", "init_args": {"path": "p"}}}},
           "trainer": {"callbacks": [{"class_path": "C"}]}}
    assert tool.find_class_nodes(cfg) == [("model", "A", {"vae": {"class_path": "B", "init_args": {"path": "p"}}}),
                                          ("model.init_args.vae", "B", {"path": "p"}),
                                          ("trainer.callbacks[0]", "C", {})]
