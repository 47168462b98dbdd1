"""The ``gsv3d`` command.

``gsv3d fit|validate|test|predict --config A.yaml [--config B.yaml] [--trainer.x=...]`` is LightningCLI.
Tool commands (``gsv3d <tool> ...``) are dispatched before LightningCLI; each lives in
``gsv3d_pl/tools/<tool>.py`` and exposes ``main(argv) -> int``.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help). Modules are imported only when their command runs.
TOOLS: dict[str, tuple[str, str]] = {
    "data": ("gsv3d_pl.tools.data", "dataset tools: `gsv3d data prepare --config CFG` renders the cache"),
}


def build_cli(args=None, run: bool = True, **kwargs):
    """The project's LightningCLI. ``args``/``run`` as in LightningCLI (tests use ``run=False``)."""
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    kwargs.setdefault("save_config_kwargs", {"overwrite": True})  # a requeued SLURM job rewrites config.yaml
    parser_kwargs = kwargs.pop("parser_kwargs", {})
    parser_kwargs.setdefault("parser_mode", "omegaconf")
    if run:
        parser_kwargs = {"default_env": False, **parser_kwargs}
    return LightningCLI(
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOLS:
        return importlib.import_module(TOOLS[argv[0]][0]).main(argv[1:]) or 0
    if not argv or argv[0] in ("-h", "--help"):
        _print_tools()
        if not argv:
            argv = ["--help"]
    build_cli(args=argv)
    return 0
