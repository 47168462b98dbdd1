"""``gsv3d predict``: one image (or a folder, or a text prompt) -> 3D Gaussians.

    gsv3d predict --config configs/distill/tiny.yaml --ckpt_path runs/distill_tiny/checkpoints/last.ckpt \\
        --image object.png [--elevation 10] [--out outputs/object]
    gsv3d predict --config CFG --ckpt_path C --image folder/            # one output folder per image
    gsv3d predict --config CFG --ckpt_path C --prompt "a red teapot" --t2i_pipeline /path/to/sd-pipeline

Each output folder holds gaussians.ply, turntable.mp4 (.gif without ffmpeg), views.png (the 21 SV3D frames),
renders.png + depth.png (the Gaussians at those cameras) and input.png; with ``--mesh`` also mesh.glb, a textured
mesh (``--mesh-faces``, ``--mesh-texture-size``, ...: the flags of ``gsv3d export-mesh``, docs/export.md). Folders are written atomically:
a failure leaves nothing behind. Input images are validated before the model is built, so bad input fails
in a second.

Memory: ``--dtype fp16`` (the CUDA default) halves the weights; ``--offload`` keeps the modules on the CPU
between their steps (README "Memory").

Exit status: 0 all done; 1 some input failed (each is named on stderr); 2 usage / config / weights errors.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

__all__ = ["main", "build_parser", "load_stage", "load_checkpoint"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gsv3d predict",
        description="Image (or text) -> 3D Gaussians with SV3D (+LoRA) and the GS decoder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", action="append", required=True,
                   help="a distill config (SV3D + VAE + CLIP + DINO + decoder); repeat to overlay files")
    p.add_argument("--ckpt_path", default=None,
                   help="DistillStage checkpoint (LoRA weights); omitted = SV3D without LoRA")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="an image file or a folder of images (RGBA, or RGB on a plain background)")
    src.add_argument("--prompt", help="text -> image with --t2i_pipeline, then image -> 3D")
    p.add_argument("--t2i_pipeline", default=None, help="local diffusers text-to-image pipeline folder (for --prompt)")
    p.add_argument("--t2i_steps", type=int, default=30)
    p.add_argument("--t2i_guidance", type=float, default=7.5)
    p.add_argument("--t2i_size", type=int, default=None, help="generated image size (default: the pipeline's)")
    p.add_argument("--prompt_suffix", default=", a single object centered on a plain white background",
                   help="appended to --prompt so the object can be cut out from its background")
    p.add_argument("--negative_prompt", default="cluttered background, multiple objects, cropped")
    p.add_argument("--out", default=None,
                   help="output folder (default outputs/<image stem>; for a folder input, one subfolder per image)")
    p.add_argument("--elevation", type=float, default=10.0, help="elevation of the input view, degrees")
    p.add_argument("--num_steps", type=int, default=None, help="SV3D sampling steps (default: the model's, 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--input_views", default=None,
                   help="comma-separated orbit frames for the decoder, e.g. 4,9,15,20 (default: N evenly spaced)")
    p.add_argument("--resolution", type=int, default=None, help="model resolution (default: the config's data)")
    p.add_argument("--foreground_ratio", type=float, default=None,
                   help="object size / frame size after recentring (default 0.85, as in the training renders)")
    p.add_argument("--alpha_mode", choices=("auto", "alpha", "border", "none"), default="auto",
                   help="auto: alpha channel, else a plain background's colour; none: use the whole image")
    p.add_argument("--turntable_frames", type=int, default=60)
    p.add_argument("--fps", type=int, default=24)
    p.add_argument("--video_format", choices=("mp4", "gif"), default="mp4")
    p.add_argument("--render_size", type=int, default=None, help="turntable/render size (default: the resolution)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="weights of the SV3D UNet, VAE, CLIP and DINO (the GS decoder stays fp32). "
                        "Default: fp16 on CUDA, fp32 on CPU; fp16 is refused on CPU (slow or unsupported there), "
                        "bf16 works on both")
    p.add_argument("--offload", action="store_true",
                   help="model CPU offload: keep every big module on the CPU and move each to the GPU only while "
                        "it runs (CLIP + VAE encode, SV3D sampling, VAE decode, DINO + decoder); lowers the peak "
                        "GPU memory to the largest single step (README 'Memory'). A no-op on CPU")
    p.add_argument("--mesh", action="store_true",
                   help="also write mesh.glb, a textured mesh of the Gaussians (gsv3d export-mesh; docs/export.md)")
    from gsv3d_pl.tools.export_mesh import add_export_flags

    add_export_flags(p.add_argument_group("mesh export (with --mesh)"), prefix="mesh-")
    p.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)


def _device_and_dtype(args):
    """(device, weight dtype, error message or None) from --device / --dtype."""
    import torch

    from gsv3d_pl.inference.pipeline import DTYPES

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except (RuntimeError, ValueError):
            return None, None, f"--device {args.device!r}: not a device (auto | cpu | cuda | cuda:N)"
    if device.type == "cuda" and not torch.cuda.is_available():
        return None, None, f"--device {args.device}: CUDA is not available here (use --device cpu)"
    name = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    if name == "fp16" and device.type == "cpu":
        return None, None, ("--dtype fp16 is not supported on CPU (fp16 kernels there are slow or missing); "
                            "use --dtype bf16 or fp32 on CPU, or fp16 on a CUDA device")
    return device, DTYPES[name], None


def mesh_settings_of(args):
    """The checked ``--mesh-*`` export settings, or None without ``--mesh``; ValueError names the flag."""
    if not args.mesh:
        return None
    from gsv3d_pl.tools.export_mesh import settings_from_args

    settings = settings_from_args(args, prefix="mesh-")
    try:
        settings.check()
    except ValueError as e:
        raise ValueError(str(e).replace("--", "--mesh-", 1)) from None
    return settings


def input_views_of(args) -> list[int] | None:
    """``--input_views "0,5,10,15"`` as a list of orbit frames (None when not given); ValueError if malformed."""
    if not args.input_views:
        return None
    try:
        return [int(v) for v in args.input_views.split(",")]
    except ValueError:
        raise ValueError(f"--input_views must be comma-separated integers, got {args.input_views!r}") from None


def _slug(text: str, max_len: int = 48) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()
    return s[:max_len] or "prompt"


def load_stage(configs: list[str]):
    """Build the LightningModule of ``configs`` and read the data settings inference must match.

    The configs are parsed as ``gsv3d fit`` parses them (:func:`gsv3d_pl.config.parse_config`, so a run's own
    saved ``config.yaml`` works too); only the ``model`` section is built, after seeding with the config's
    ``seed_everything`` as ``gsv3d fit`` does. The datamodule is not built: its settings are read from
    ``data.init_args``.

    Returns:
        (stage, settings): settings holds, where the config has them, ``resolution``, ``radius``, ``fov_deg``,
        ``num_input_views`` and ``eval_input_indices`` (default: :func:`gsv3d_pl.orbit.input_frames`, the
        datamodule's rule).
    Raises:
        FileNotFoundError: a config file does not exist. ConfigError (a ValueError): it does not parse.
    """
    from lightning.pytorch import seed_everything

    from gsv3d_pl.config import ConfigError, config_args, instantiate_section, parse_config
    from gsv3d_pl.orbit import input_frames

    for c in configs:
        if not Path(c).is_file():
            raise FileNotFoundError(f"--config {c}: no such file")
    try:
        # As `gsv3d test`: its keys are fit's (ckpt_path) plus verbose, so a config.yaml saved by any run parses.
        cfg = parse_config(config_args(configs), subcommand="test")
    except ConfigError as e:
        raise ConfigError(f"--config {' '.join(map(str, configs))}: {e}") from None
    seed = cfg.get("seed_everything")
    if isinstance(seed, int) and not isinstance(seed, bool):
        seed_everything(seed, workers=True, verbose=False)
    stage = instantiate_section(cfg, "model")
    init = (cfg.get("data") or {}).get("init_args") or {}
    settings = {k: init.get(k) for k in ("resolution", "num_input_views", "eval_input_indices", "radius", "fov_deg")
                if init.get(k) is not None}
    if "eval_input_indices" not in settings and "num_input_views" in settings:
        settings["eval_input_indices"] = input_frames(int(settings["num_input_views"]))
    return stage, settings


def load_checkpoint(stage, ckpt_path: str) -> dict:
    """Load a DistillStage checkpoint (the LoRA weights) into ``stage``; clear errors for the wrong file."""
    from gsv3d_pl.checkpoints import read_checkpoint

    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such file (a DistillStage .ckpt, e.g. "
                                "runs/distill_tiny/checkpoints/last.ckpt)")
    ckpt = read_checkpoint(path, "--ckpt_path", expected="a stage-2 (DistillStage) checkpoint")
    meta = ckpt.get("gsv3d", {}) if isinstance(ckpt.get("gsv3d"), dict) else {}
    if meta.get("stage") == "decoder":
        raise ValueError(f"--ckpt_path {ckpt_path} is a stage-1 (decoder) checkpoint; predict takes a stage-2 "
                         "(distill) checkpoint. The decoder itself comes from the distill config's "
                         "model.init_args.decoder_ckpt; omit --ckpt_path to run SV3D without LoRA.")
    if hasattr(stage, "on_load_checkpoint"):
        stage.on_load_checkpoint(ckpt)  # e.g. LoRA trained on another base UNet
    try:
        stage.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        raise ValueError(f"--ckpt_path {ckpt_path} does not match the model built from --config: {e}") from None
    return meta


def _image_jobs(args) -> tuple[list[tuple[Path, Path]], Path | None]:
    """[(image, output folder)] for --image, and the output root that a folder input creates."""
    from gsv3d_pl.inference import list_images

    src = Path(args.image)
    if src.is_dir():
        images = list_images(src)
        if not images:
            raise FileNotFoundError(f"--image {src}: the folder holds no images ({', '.join(_suffixes())})")
        root = Path(args.out) if args.out else Path("outputs") / src.name
        stems = [p.stem for p in images]
        # Two files with one stem (a.png, a.jpg) would share an output folder: keep the suffix then.
        return [(p, root / (p.stem if stems.count(p.stem) == 1 else p.name)) for p in images], root
    return [(src, Path(args.out) if args.out else Path("outputs") / src.stem)], None


def _suffixes() -> tuple[str, ...]:
    from gsv3d_pl.inference import IMAGE_SUFFIXES

    return IMAGE_SUFFIXES


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from gsv3d_pl.inference import ImageInputError, preprocess_image

    if args.prompt is not None and not args.t2i_pipeline:
        _err("--prompt needs --t2i_pipeline <local diffusers text-to-image folder>")
        return 2
    if args.turntable_frames < 1:
        _err(f"--turntable_frames must be >= 1, got {args.turntable_frames}")
        return 2
    try:
        mesh_settings = mesh_settings_of(args)
        input_views = input_views_of(args)
    except ValueError as e:
        _err(str(e))
        return 2
    device, dtype, msg = _device_and_dtype(args)
    if msg:
        _err(msg)
        return 2

    # 1. Cheap checks first: bad images, an existing output folder or missing weights fail before the model loads.
    jobs: list[tuple[Path, Path]] = []
    root = None
    if args.image is not None:
        try:
            jobs, root = _image_jobs(args)
        except FileNotFoundError as e:
            _err(str(e))
            return 2
        if not Path(args.image).exists():
            _err(f"--image {args.image}: no such file or folder")
            return 1
    else:
        from gsv3d_pl.inference import t2i_pipeline_spec
        from gsv3d_pl.weights import MissingWeightsError

        if not (Path(args.t2i_pipeline).expanduser() / "model_index.json").is_file():
            _err(str(MissingWeightsError(t2i_pipeline_spec(args.t2i_pipeline))))
            return 2
        out = Path(args.out) if args.out else Path("outputs") / _slug(args.prompt)
        jobs = [(Path(f"<prompt: {args.prompt}>"), out)]
    if not args.overwrite:
        existing = [str(o) for _, o in jobs if o.exists()]
        if existing:
            _err(f"output folder(s) exist: {', '.join(existing[:5])}; pass --overwrite or choose another --out")
            return 2

    failures: list[str] = []
    failed: set[Path] = set()
    if args.image is not None:
        # Validate every image before the (slow) model build, at a small size: the checks (file, mode, size,
        # foreground) do not depend on the model's resolution.
        for img_path, _ in jobs:
            try:
                preprocess_image(img_path, 64, args.foreground_ratio, alpha_mode=args.alpha_mode)
            except ImageInputError as e:
                failures.append(str(e))
                failed.add(img_path)
                _err(str(e))
        if len(failed) == len(jobs):
            return 1
    jobs = [(p, o) for p, o in jobs if p not in failed]
    root_existed = root is not None and root.exists()

    # 2. The model.
    from gsv3d_pl.inference import ImageTo3D, text_to_image, write_prediction
    from gsv3d_pl.orbit import DEFAULT_RADIUS, FOV_DEG
    from gsv3d_pl.weights import MissingWeightsError

    t0 = time.perf_counter()
    try:
        stage, settings = load_stage(args.config)
        if getattr(stage, "sv3d", None) is None:
            _err(f"--config {' '.join(args.config)} builds a {type(stage).__name__} without SV3D: predict needs a "
                 "distill config (e.g. configs/distill/tiny.yaml), which holds SV3D, the encoders and the "
                 "stage-1 decoder (model.init_args.decoder_ckpt)")
            return 2
        if args.ckpt_path:
            load_checkpoint(stage, args.ckpt_path)
        else:
            print("note: no --ckpt_path: SV3D runs without distilled LoRA weights", file=sys.stderr)
    except MissingWeightsError as e:
        _err(str(e))
        return 2
    except (FileNotFoundError, ValueError) as e:
        _err(str(e))
        return 2
    # With --offload everything stays on the CPU; the pipeline moves each module over while it runs.
    stage = (stage if args.offload and device.type == "cuda" else stage.to(device)).eval()
    resolution = int(args.resolution or settings.get("resolution") or 0)
    if resolution <= 0:
        _err("the config has no data.init_args.resolution; pass --resolution")
        return 2
    kw = {"radius": float(settings.get("radius", DEFAULT_RADIUS)), "fov_deg": float(settings.get("fov_deg", FOV_DEG))}
    if input_views is not None:
        kw["input_indices"] = input_views
    elif getattr(stage, "num_input_views", None) is None and settings.get("eval_input_indices"):
        kw["input_indices"] = list(settings["eval_input_indices"])  # the frames the decoder was validated on
    elif getattr(stage, "num_input_views", None) is None and settings.get("num_input_views"):
        kw["num_input_views"] = int(settings["num_input_views"])
    try:
        pipe = ImageTo3D.from_stage(stage, num_steps=args.num_steps, dtype=dtype, device=device,
                                    offload=args.offload and device.type == "cuda", **kw)
    except ValueError as e:
        _err(str(e))
        return 2
    if not args.quiet:
        print(f"model loaded in {time.perf_counter() - t0:.1f}s on {device} ({args.dtype or str(dtype).removeprefix('torch.')} weights"
              f"{', CPU offload' if pipe.offload else ''}); resolution {resolution}, "
              f"decoder frames {pipe.input_indices}", file=sys.stderr)
        if args.offload and device.type != "cuda":
            print("note: --offload does nothing on CPU", file=sys.stderr)

    # 3. Text -> image.
    preprocessed: dict[Path, tuple] = {}
    if args.prompt is not None:
        try:
            pil = text_to_image(args.prompt + (args.prompt_suffix or ""), args.t2i_pipeline, args.t2i_steps,
                                args.t2i_guidance, args.t2i_size, args.negative_prompt, args.seed, device)
        except MissingWeightsError as e:
            _err(str(e))
            return 2
        name = jobs[0][0]
        try:
            image, alpha = preprocess_image(pil, resolution, args.foreground_ratio, alpha_mode=args.alpha_mode,
                                            name=str(name))
        except ImageInputError as e:
            if args.alpha_mode != "auto":
                _err(str(e))
                return 1
            # A generated image may not have a plain background; use it whole rather than fail.
            print(f"warning: {e}\nwarning: using the whole generated image as the object (--alpha_mode none)",
                  file=sys.stderr)
            image, alpha = preprocess_image(pil, resolution, args.foreground_ratio, alpha_mode="none",
                                            name=str(name))
        preprocessed[name] = (image, alpha)

    # 4. Image -> 3D, one atomic output folder each.
    from tqdm.auto import tqdm

    for img_path, out_dir in tqdm(jobs, desc="images", disable=args.quiet or len(jobs) < 2):
        try:
            if img_path in preprocessed:  # the generated image
                image, alpha = preprocessed.pop(img_path)
            else:
                image, alpha = preprocess_image(img_path, resolution, args.foreground_ratio, alpha_mode=args.alpha_mode)
            t1 = time.perf_counter()
            pred = pipe(image, alpha, elevation_deg=args.elevation, seed=args.seed, progress=not args.quiet)
            files = write_prediction(pred, out_dir, args.turntable_frames, args.fps, args.render_size,
                                     args.video_format, background=pipe.background, overwrite=args.overwrite,
                                     backend=getattr(stage, "render_backend", "auto"), mesh=mesh_settings)
        except ImageInputError as e:
            failures.append(str(e))
            _err(str(e))
            continue
        if not args.quiet:
            print(f"{img_path} -> {out_dir}/ ({pred.gaussians.num_gaussians:,} Gaussians, "
                  f"{time.perf_counter() - t1:.1f}s): {', '.join(p.name for p in files.values())}", file=sys.stderr)
    if root is not None and not root_existed and root.is_dir() and not any(root.iterdir()):
        root.rmdir()  # a folder run where every image failed leaves nothing
    if failures:
        _err(f"{len(failures)} input(s) failed (see above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
