"""``gsv3d app``: the image -> 3D web app (gradio) on a distill config + checkpoint.

    gsv3d app --config configs/distill/tiny.yaml --ckpt_path runs/distill_tiny/checkpoints/last.ckpt \\
        [--host 127.0.0.1] [--port 7860] [--outputs DIR] [--no-mesh] \\
        [--auth-file users.txt | --auth USER:PASS] [--max-file-size 10mb] [--queue-size 8]

The model is built once, as ``gsv3d predict`` builds it (same ``--config``/``--ckpt_path``/``--device``/
``--dtype``/``--offload``); each upload then runs preprocessing -> SV3D -> GS decoder -> outputs and shows the
preprocessed input, the orbit, the turntable, the mesh and the Gaussians in 3D viewers, with downloads. Page
and options: docs/app.md.

For others to use: the server listens on 127.0.0.1 unless ``--host`` says otherwise and never opens a public
share link; ``--auth``/``--auth-file`` require a login, ``--max-file-size`` caps an upload (the server refuses
a larger one with 413), ``--queue-size`` caps the waiting requests, and uploads and results in gradio's cache
are deleted an hour after they were made.

Exit status: 0 after the server stops; 2 usage / config / weights errors.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["main", "build_parser", "build_runner", "ServeSettings", "serve_settings", "parse_file_size",
           "read_auth"]

_UNITS = {"b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gsv3d app", description="Web app: image -> 3D Gaussians (gradio).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", action="append", required=True,
                   help="a distill config (as for gsv3d predict); repeat to overlay files")
    p.add_argument("--ckpt_path", default=None,
                   help="DistillStage checkpoint (LoRA weights); omitted = SV3D without LoRA")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--auth", action="append", default=None, metavar="USER:PASS",
                   help="require a login (repeat for more users); visible to other users of this machine in "
                        "the process list: prefer --auth-file")
    p.add_argument("--auth-file", default=None, metavar="PATH",
                   help="require a login: a file of USER:PASS lines (blank lines and # comments skipped)")
    p.add_argument("--max-file-size", default="10mb",
                   help="largest upload: bytes, or a number with b/kb/mb/gb (1 mb = 1024 kb); larger ones are "
                        "refused by the server")
    p.add_argument("--keep-results", type=float, default=3600, metavar="SECONDS",
                   help="delete this app's result folders older than this at each request "
                        "(a negative value keeps them all)")
    p.add_argument("--queue-size", type=int, default=8,
                   help="most requests waiting at once (they run one at a time); more are turned away")
    p.add_argument("--outputs", default=None,
                   help="folder for the results, one <image>-<id>/ per request (default: a temporary folder)")
    p.add_argument("--num_steps", type=int, default=None, help="default of the sampling-steps slider "
                                                                 "(default: the model's, 50)")
    p.add_argument("--input_views", default=None, help="comma-separated orbit frames for the decoder")
    p.add_argument("--resolution", type=int, default=None, help="model resolution (default: the config's data)")
    p.add_argument("--foreground_ratio", type=float, default=None, help="object size / frame size (default 0.85)")
    p.add_argument("--turntable_frames", type=int, default=60)
    p.add_argument("--fps", type=int, default=24)
    p.add_argument("--video_format", choices=("mp4", "gif"), default="mp4")
    p.add_argument("--render_size", type=int, default=None, help="turntable/render size (default: the resolution)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="weight dtype, as gsv3d predict --dtype (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--offload", action="store_true", help="model CPU offload on CUDA, as gsv3d predict --offload")
    p.add_argument("--no-mesh", dest="mesh", action="store_false",
                   help="do not offer the mesh.glb export (the page then shows only the Gaussians in 3D)")
    from gsv3d_pl.tools.export_mesh import add_export_flags

    add_export_flags(p.add_argument_group("mesh export (the .glb; flags of gsv3d export-mesh)"), prefix="mesh-")
    return p


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)


def parse_file_size(text: str) -> int:
    """``"10mb"`` -> bytes (units b, kb, mb, gb, any case, powers of 1024; a bare number is bytes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in ("", *_UNITS) or float(m.group(1)) <= 0:
        raise ValueError(f"--max-file-size {text!r}: give a positive size such as 10mb, 500kb or 1048576 "
                         "(bytes)")
    return int(float(m.group(1)) * _UNITS.get(unit, 1))


def _user_pass(text: str, where: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user.strip() or not password:
        raise ValueError(f"{where}: expected USER:PASS with a non-empty user and password")
    return user.strip(), password


def read_auth(pairs: list[str] | None, file: str | None) -> list[tuple[str, str]] | None:
    """The logins of ``--auth USER:PASS`` (repeatable) and ``--auth-file PATH`` (USER:PASS lines, blank lines
    and ``#`` comments skipped), or None when neither is given. Messages never echo a password."""
    users = [_user_pass(a, "--auth") for a in pairs or []]
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise ValueError(f"--auth-file {file}: no such file (USER:PASS lines)")
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                users.append(_user_pass(line.rstrip("\r\n"), f"--auth-file {file}, line {i}"))
        if not users:
            raise ValueError(f"--auth-file {file}: holds no USER:PASS line")
    return users or None


@dataclass(frozen=True)
class ServeSettings:
    """How the server runs (checked before the model loads)."""

    auth: list[tuple[str, str]] | None
    max_file_size: int  # bytes
    queue_size: int
    delete_cache: tuple[int, int] = (600, 3600)  # every 10 min, delete cached uploads/results older than 1 h


def serve_settings(args) -> ServeSettings:
    """The :class:`ServeSettings` of parsed ``args``; ValueError names the flag."""
    if args.queue_size < 1:
        raise ValueError(f"--queue-size must be >= 1, got {args.queue_size}")
    return ServeSettings(read_auth(args.auth, args.auth_file), parse_file_size(args.max_file_size),
                         args.queue_size)


def build_runner(args):
    """The :class:`~gsv3d_pl.app.AppRunner` of parsed ``args``: the model as ``gsv3d predict`` loads it.

    Raises ValueError / FileNotFoundError / MissingWeightsError with ``gsv3d predict``'s messages.
    """
    from gsv3d_pl.app import AppRunner
    from gsv3d_pl.inference import ImageTo3D
    from gsv3d_pl.orbit import DEFAULT_RADIUS, FOV_DEG
    from gsv3d_pl.tools.predict import (
        _device_and_dtype,
        input_views_of,
        load_checkpoint,
        load_stage,
        mesh_settings_of,
    )

    if args.turntable_frames < 1:
        raise ValueError(f"--turntable_frames must be >= 1, got {args.turntable_frames}")
    mesh = mesh_settings_of(args)
    device, dtype, msg = _device_and_dtype(args)
    if msg:
        raise ValueError(msg)
    kw = {}
    if (views := input_views_of(args)) is not None:
        kw["input_indices"] = views
    stage, settings = load_stage(args.config)
    if getattr(stage, "sv3d", None) is None:
        raise ValueError(f"--config {' '.join(args.config)} builds a {type(stage).__name__} without SV3D: the app "
                         "needs a distill config (e.g. configs/distill/tiny.yaml)")
    if args.ckpt_path:
        load_checkpoint(stage, args.ckpt_path)
    else:
        print("note: no --ckpt_path: SV3D runs without distilled LoRA weights", file=sys.stderr)
    offload = args.offload and device.type == "cuda"
    stage = (stage if offload else stage.to(device)).eval()
    resolution = int(args.resolution or settings.get("resolution") or 0)
    if resolution <= 0:
        raise ValueError("the config has no data.init_args.resolution; pass --resolution")
    kw.update(radius=float(settings.get("radius", DEFAULT_RADIUS)), fov_deg=float(settings.get("fov_deg", FOV_DEG)))
    # The decoder's frames, chosen as gsv3d predict chooses them.
    if "input_indices" not in kw and getattr(stage, "num_input_views", None) is None:
        if settings.get("eval_input_indices"):
            kw["input_indices"] = list(settings["eval_input_indices"])
        elif settings.get("num_input_views"):
            kw["num_input_views"] = int(settings["num_input_views"])
    pipe = ImageTo3D.from_stage(stage, num_steps=args.num_steps, dtype=dtype, device=device, offload=offload, **kw)
    outputs = args.outputs or tempfile.mkdtemp(prefix="gsv3d-app-")
    return AppRunner(pipe, resolution, outputs, keep_results_s=None if args.keep_results < 0 else args.keep_results,
                     foreground_ratio=args.foreground_ratio,
                     turntable_frames=args.turntable_frames, fps=args.fps, render_size=args.render_size,
                     video_format=args.video_format, mesh=mesh, backend=getattr(stage, "render_backend", "auto"),
                     num_steps=args.num_steps)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from gsv3d_pl.weights import MissingWeightsError

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry or version check: works offline
    try:  # before the model loads: fail in a second
        import gradio as gr
    except ImportError:
        _err("gsv3d app needs gradio, an optional extra: pip install -e '.[app]' (or `make install`, which adds it)")
        return 2
    try:
        serve = serve_settings(args)
    except ValueError as e:
        _err(str(e))
        return 2
    if args.host not in LOOPBACK and serve.auth is None:
        print(f"warning: --host {args.host} without --auth/--auth-file: anyone who can reach port {args.port} can "
              "use the app (docs/app.md, 'Running it for others')", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        runner = build_runner(args)
    except (MissingWeightsError, FileNotFoundError, ValueError) as e:
        _err(str(e))
        return 2

    from gsv3d_pl.app import build_demo

    print(f"model loaded in {time.perf_counter() - t0:.1f}s on {runner.pipe.device}; results go to "
          f"{runner.outputs}", file=sys.stderr, flush=True)
    demo = build_demo(runner, delete_cache=serve.delete_cache)
    # System fonts: the default theme would fetch Google fonts, and the app must work offline.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    demo.queue(default_concurrency_limit=1, max_size=serve.queue_size).launch(
        server_name=args.host, server_port=args.port, share=False, theme=theme, allowed_paths=[str(runner.outputs)],
        show_error=True, quiet=False, auth=serve.auth, max_file_size=serve.max_file_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
