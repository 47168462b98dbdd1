"""`gsv3d app` without its optional extra: a clear message naming the extra, exit status 2, before any model loads."""

from __future__ import annotations

import sys

from gsv3d_pl.tools import app


def test_app_without_gradio_names_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    built = []
    monkeypatch.setattr(app, "build_runner", lambda args: built.append(args))
    rc = app.main(["--config", str(tmp_path / "missing.yaml")])
    assert rc == 2 and not built  # the model is never built
    assert ".[app]" in capsys.readouterr().err
