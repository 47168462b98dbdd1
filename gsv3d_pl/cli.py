"""The ``gsv3d`` command.

``gsv3d fit|validate|test|predict --config A.yaml [--config B.yaml] [--trainer.x=...]`` is LightningCLI.
Tool commands (``gsv3d <tool> ...``) are dispatched before LightningCLI; each lives in
``gsv3d_pl/tools/<tool>.py`` and exposes ``main(argv) -> int``. ``gsv3d predict`` with ``--image`` or
``--prompt`` is the image -> 3D tool; without them it is LightningCLI's predict.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

# name -> (module, one-line help). Modules are imported only when their command runs.
TOOLS: dict[str, tuple[str, str]] = {
    "data": ("gsv3d_pl.tools.data", "dataset tools: `gsv3d data prepare --config CFG` renders the cache"),
    "weights": ("gsv3d_pl.tools.weights", "list every external weight file a config needs and whether it is there"),
    "sweep": ("gsv3d_pl.tools.sweep", "expand a sweep file into SLURM array jobs: --dry-run | --submit | --local"),
    "predict": ("gsv3d_pl.tools.predict", "--image PATH|DIR or --prompt TEXT -> 3D Gaussians: .ply, turntable, views"),
    "report": ("gsv3d_pl.tools.report", "gather a sweep's metrics.json files into the paper's ablation table"),
    "export-mesh": ("gsv3d_pl.tools.export_mesh", "3DGS .ply -> textured mesh (.glb/.obj): iso-surface, UV atlas, baked texture"),
    "app": ("gsv3d_pl.tools.app", "web app (gradio): upload an image -> orbit, turntable, 3D viewers, downloads"),
}


def _reroot(value, root: str):
    """A relative path is taken relative to ``root`` (trainer.default_root_dir); absolute paths stay."""
    if value is None or root is None:
        return value
    p, r = Path(str(value)), Path(str(root))
    # Absolute paths, and paths a config already derived from the root (`${....default_root_dir}/x`), stay.
    if p.is_absolute() or p == r or r in p.parents:
        return value
    return str(r / p)


def reroot_run_paths(trainer_cfg) -> None:
    """Make checkpoint and logger folders follow ``trainer.default_root_dir``.

    In the configs, ``ModelCheckpoint.dirpath`` and each logger's ``save_dir`` are written relative
    (``checkpoints``, ``.``): they are resolved here against the final ``default_root_dir``, so
    ``--trainer.default_root_dir runs/X`` (a sweep task, a user's run) moves the whole run folder.
    """
    root = trainer_cfg.get("default_root_dir")
    if root is None:
        return
    loggers = trainer_cfg.get("logger")
    for item in loggers if isinstance(loggers, list) else [loggers]:
        init = getattr(item, "init_args", None)
        if init is not None and "save_dir" in init:
            init.save_dir = _reroot(init.save_dir, root)
    for cb in trainer_cfg.get("callbacks") or []:
        init = getattr(cb, "init_args", None)
        if init is not None and str(getattr(cb, "class_path", "")).endswith("ModelCheckpoint"):
            init.dirpath = _reroot(init.dirpath if init.get("dirpath") is not None else "checkpoints", root)


class ParsedConfig(Exception):
    """Raised by ``build_cli(parse_only=True)`` once the config is parsed; ``.config`` holds it."""

    def __init__(self, config) -> None:
        super().__init__("parsed")
        self.config = config


def build_cli(args=None, run: bool = True, parse_only: bool = False, **kwargs):
    """The project's LightningCLI. ``args``/``run`` as in LightningCLI (tests use ``run=False``; then
    ``args`` has no subcommand). ``parse_only`` stops after parsing, before the seed is set or anything is
    built, by raising :class:`ParsedConfig` (``gsv3d_pl.config.parse_config`` is the way to use it)."""
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    class GSV3DCLI(LightningCLI):
        def _set_seed(self) -> None:
            if not parse_only:  # a config reader must not reseed the caller's global RNG
                super()._set_seed()

        def before_instantiate_classes(self) -> None:
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            reroot_run_paths(cfg.trainer)

        def instantiate_classes(self) -> None:
            if parse_only:
                raise ParsedConfig(self.config)
            super().instantiate_classes()

    kwargs.setdefault("save_config_kwargs", {"overwrite": True})  # a requeued SLURM job rewrites config.yaml
    parser_kwargs = kwargs.pop("parser_kwargs", {})
    parser_kwargs.setdefault("parser_mode", "omegaconf")
    if run:
        parser_kwargs = {"default_env": False, **parser_kwargs}
    return GSV3DCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs=parser_kwargs,
        args=args,
        run=run,
        auto_configure_optimizers=False,
        **kwargs,
    )


def _print_tools() -> None:
    print("GSV3D-PL. Training and evaluation: gsv3d {fit,validate,test,predict} --config CFG.yaml")
    print("Tool commands:")
    for name, (_, help_) in TOOLS.items():
        print(f"  gsv3d {name:<8} {help_}")
    print()


def _is_predict_tool(args: list[str]) -> bool:
    return any(a.split("=")[0] in ("--image", "--prompt") for a in args)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in TOOLS and (args[0] != "predict" or _is_predict_tool(args[1:])):
        return importlib.import_module(TOOLS[args[0]][0]).main(args[1:]) or 0
    if not args or args[0] in ("-h", "--help"):
        _print_tools()
        args = args or ["--help"]
    # LightningCLI warns when given args that merely repeat sys.argv; pass None then.
    build_cli(args=None if args == sys.argv[1:] else args)
    return 0
