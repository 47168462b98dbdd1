"""The image -> 3D web app behind ``gsv3d app`` (gradio): upload an image, get the orbit, turntable, mesh and
Gaussians.

:class:`AppRunner` holds a built :class:`~gsv3d_pl.inference.ImageTo3D` and turns one uploaded file into the
output folder ``gsv3d predict`` writes (:func:`~gsv3d_pl.inference.preprocess_image` ->
the pipeline -> :func:`~gsv3d_pl.inference.write_prediction`); :func:`build_demo` lays out the page. The
command (flags, model loading, ``launch``) is :mod:`gsv3d_pl.tools.app`; usage in docs/app.md.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["AppRunner", "AppResult", "build_demo", "ALPHA_MODES"]

ALPHA_MODES = ("auto", "alpha", "border", "none")  # as ``gsv3d predict --alpha_mode``


@dataclass
class AppResult:
    """One finished request: the output folder and its files (name -> path, as write_prediction returns)."""

    folder: Path
    files: dict[str, Path]
    num_gaussians: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def downloads(self) -> list[str]:
        order = ("gaussians", "mesh", "turntable", "views", "input", "renders", "depth")
        return [str(self.files[k]) for k in order if k in self.files]


class AppRunner:
    """Image file -> prediction folder, with the settings ``gsv3d predict`` takes from its flags.

    Args:
        pipe: a built :class:`~gsv3d_pl.inference.ImageTo3D`.
        resolution: the model's input resolution.
        outputs: folder that receives one ``<image stem>-<id>/`` per request.
        mesh: :class:`~gsv3d_pl.export.ExportSettings` for ``mesh.glb`` (None: no mesh export offered).
        keep_results_s: result folders of this app (``<stem>-<8 hex>/`` in ``outputs``) older than this many
            seconds are deleted at each request, so a served app does not fill the disk (None: keep all).
        The rest as the ``gsv3d predict`` flags of the same names.
    """

    def __init__(self, pipe, resolution: int, outputs: str | Path, *, foreground_ratio: float | None = None,
                 turntable_frames: int = 60, fps: int = 24, render_size: int | None = None,
                 video_format: str = "mp4", mesh=None, backend: str = "auto", num_steps: int | None = None,
                 keep_results_s: float | None = 3600):
        self.pipe, self.resolution = pipe, int(resolution)
        self.keep_results_s = keep_results_s
        self.outputs = Path(outputs)
        self.foreground_ratio = foreground_ratio
        self.turntable_frames, self.fps, self.render_size = turntable_frames, fps, render_size
        self.video_format, self.mesh, self.backend = video_format, mesh, backend
        self.default_steps = int(num_steps or pipe.num_steps or getattr(pipe.sv3d, "num_steps", 50))

    def preprocess(self, path: str | Path, alpha_mode: str = "auto"):
        """(image, alpha) of the upload; raises ImageInputError with ``gsv3d predict``'s message, the file named
        by its upload name."""
        from gsv3d_pl.inference import preprocess_image

        return preprocess_image(path, self.resolution, self.foreground_ratio, alpha_mode=alpha_mode,
                                name=Path(path).name)

    def run(self, path: str | Path, seed: int = 0, num_steps: int | None = None, elevation: float = 10.0,
            alpha_mode: str = "auto", mesh: bool = True) -> AppResult:
        import contextlib
        import io

        from gsv3d_pl.inference import write_prediction

        image, alpha = self.preprocess(path, alpha_mode)
        self.prune_results()
        t0 = time.perf_counter()
        pred = self.pipe(image, alpha, elevation_deg=float(elevation), seed=int(seed),
                         num_steps=int(num_steps) if num_steps else None, progress=False)
        folder = self.outputs / f"{Path(path).stem}-{uuid.uuid4().hex[:8]}"
        want_mesh = self.mesh if mesh else None
        warn = io.StringIO()
        with contextlib.redirect_stderr(warn):  # write_prediction reports a mesh-less result on stderr
            files = write_prediction(pred, folder, self.turntable_frames, self.fps, self.render_size,
                                     self.video_format, background=self.pipe.background, backend=self.backend,
                                     mesh=want_mesh)
        notes = [line.removeprefix("warning: ") for line in warn.getvalue().splitlines() if line.strip()]
        return AppResult(folder, files, int(pred.gaussians.num_gaussians), time.perf_counter() - t0, notes)


    def prune_results(self) -> list[Path]:
        """Delete this app's result folders older than ``keep_results_s``; returns them. Other files in
        ``outputs`` are never touched: only names this app makes (``<stem>-<8 hex>``)."""
        import re
        import shutil

        if self.keep_results_s is None or not self.outputs.is_dir():
            return []
        cutoff = time.time() - float(self.keep_results_s)
        old = [d for d in self.outputs.iterdir() if d.is_dir() and re.fullmatch(r".+-[0-9a-f]{8}", d.name)
               and d.stat().st_mtime < cutoff]
        for d in old:
            shutil.rmtree(d, ignore_errors=True)
        return old


_CSS = "#gsv3d-title {margin-bottom: 0}"


def build_demo(runner: AppRunner, title: str = "GSV3D: image -> 3D Gaussians",
               delete_cache: tuple[int, int] | None = (600, 3600)):
    """The page: inputs and options on the left; preprocessed input, orbit, turntable, 3D viewers and downloads
    on the right. A bad image raises ``gr.Error`` with ``gsv3d predict``'s message (huge or oddly shaped
    uploads included: the bounded path of ``preprocess_image``). ``delete_cache``: gradio's (every s seconds,
    delete this app's cached files older than a seconds), so uploads do not pile up."""
    import gradio as gr

    from gsv3d_pl.inference import IMAGE_SUFFIXES, ImageInputError

    def generate(file, seed, steps, elevation, alpha_mode, mesh, progress=gr.Progress()):
        if file is None:
            raise gr.Error("upload an image first (RGBA, or RGB on a plain background)")
        path = file if isinstance(file, str) else getattr(file, "name", str(file))
        progress(0.05, desc="preprocessing")
        try:
            progress(0.2, desc="SV3D orbit + GS decoder + outputs")  # a bad image fails before sampling
            res = runner.run(path, seed=seed, num_steps=steps, elevation=elevation, alpha_mode=alpha_mode,
                             mesh=mesh)
        except ImageInputError as e:
            raise gr.Error(str(e), title="Bad image") from None
        for note in res.notes:
            gr.Warning(note)
        f = res.files
        status = (f"**{res.num_gaussians:,} Gaussians** in {res.seconds:.1f}s; files in `{res.folder}`"
                  + ("" if "mesh" in f or not mesh else " (no mesh: see the warning)"))
        return (str(f["input"]), str(f["views"]), str(f["turntable"]), str(f["mesh"]) if "mesh" in f else None,
                str(f["gaussians"]), res.downloads(), status)

    with gr.Blocks(title="GSV3D", analytics_enabled=False, delete_cache=delete_cache) as demo:
        gr.Markdown(f"## {title}\nUpload an object image: RGBA, or RGB on a plain background. "
                    "The app runs `gsv3d predict` on it: SV3D samples a 21-view orbit, the GS decoder lifts it "
                    "to 3D Gaussians.", elem_id="gsv3d-title")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Input image", file_types=list(IMAGE_SUFFIXES), type="filepath",
                                 elem_id="upload")
                seed = gr.Number(0, label="Seed", precision=0, elem_id="seed")
                steps = gr.Slider(1, 100, value=runner.default_steps, step=1, label="SV3D sampling steps",
                                  elem_id="steps")
                elevation = gr.Slider(-10, 40, value=10, step=1, label="Input-view elevation (degrees)",
                                      elem_id="elevation")
                alpha_mode = gr.Dropdown(list(ALPHA_MODES), value="auto", label="Cut-out (alpha mode)",
                                         elem_id="alpha_mode")
                mesh = gr.Checkbox(runner.mesh is not None, label="Also export a textured mesh (.glb)",
                                   interactive=runner.mesh is not None, elem_id="mesh")
                run = gr.Button("Generate", variant="primary", elem_id="generate")
                status = gr.Markdown(elem_id="status")
            with gr.Column(scale=2):
                with gr.Row():
                    pre = gr.Image(label="Preprocessed input", type="filepath", interactive=False,
                                   height=320, elem_id="preprocessed")
                    if runner.video_format == "mp4":
                        turntable = gr.Video(label="Turntable", interactive=False, autoplay=True, loop=True,
                                             height=320, elem_id="turntable")
                    else:
                        turntable = gr.Image(label="Turntable", type="filepath", interactive=False,
                                             height=320, elem_id="turntable")
                views = gr.Image(label="SV3D orbit (21 views, the input last)", type="filepath",
                                 interactive=False, elem_id="views")
                with gr.Row():
                    glb = gr.Model3D(label="Textured mesh (.glb)", elem_id="viewer-mesh", height=360)
                    ply = gr.Model3D(label="3D Gaussians (.ply)", elem_id="viewer-gaussians", height=360)
                files = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="downloads")
        run.click(generate, [upload, seed, steps, elevation, alpha_mode, mesh],
                  [pre, views, turntable, glb, ply, files, status], concurrency_limit=1)
    return demo
