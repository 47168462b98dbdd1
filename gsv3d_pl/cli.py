"""The ``gsv3d`` command.

``gsv3d fit|validate|test|predict --config A.yaml [--config B.yaml] [--trainer.x=...]`` is LightningCLI.
Tool commands (``gsv3d <tool> ...``) are dispatched before LightningCLI; each lives in
``gsv3d_pl/tools/<tool>.py`` and exposes ``main(argv) -> int``. ``gsv3d predict`` with ``--image`` or
``--prompt`` is the image -> 3D tool; without them it is LightningCLI's predict.
"""

from __future__ import annotations

import importlib
import os
import shutil
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


class RunConfigError(Exception):
    """A config or ``--ckpt_path`` that cannot start a run: ``gsv3d`` prints its one line and exits 2."""


def root_cause_message(e: BaseException) -> str:
    """The constructor's own message under jsonargparse's wrapping (which repeats the whole config)."""
    while e.__cause__ is not None and isinstance(e.__cause__, (ValueError, TypeError, FileNotFoundError)):
        e = e.__cause__
    text = str(e).strip()
    if text.startswith("Does not validate against any of the Union subtypes"):
        # jsonargparse lists each subtype's error; the first one is the class's own
        lines = [ln.strip()[2:] for ln in text.splitlines() if ln.strip().startswith("- ")]
        text = lines[0] if lines else text.splitlines()[0]
    return text if not isinstance(e, TypeError) else f"{text} (a constructor argument of the wrong name or type)"


def _checkpoint_dirs(cfg) -> list[str]:
    """The ModelCheckpoint folders of a parsed config (after :func:`reroot_run_paths`)."""
    dirs = []
    for cb in cfg.trainer.get("callbacks") or []:
        init = getattr(cb, "init_args", None)
        if str(getattr(cb, "class_path", "")).endswith("ModelCheckpoint") and init is not None:
            dirs.append(str(init.get("dirpath") or "checkpoints"))
    return dirs


def prepare_run(cfg, subcommand: str, clean: bool = True) -> None:
    """Before anything is built: clean killed checkpoint writes, and check or resolve ``--ckpt_path``.

    ``last`` becomes the newest checkpoint of the run's checkpoint folders that loads (a warning for each that
    does not), or None with one line saying the run starts from scratch. Any other path must load.
    """
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from gsv3d_pl.checkpoints import CheckpointReadError, check_checkpoint, clean_orphan_temp_files, resolve_resume

    dirs = _checkpoint_dirs(cfg)
    if clean and subcommand == "fit" and rank_zero_only.rank == 0:  # from RANK / SLURM_PROCID / LOCAL_RANK
        root = cfg.trainer.get("default_root_dir")
        for f in clean_orphan_temp_files(dirs + ([str(root)] if root else [])):
            print(f"gsv3d: removed {f}, left by an interrupted checkpoint write", file=sys.stderr)
    ckpt = cfg.get("ckpt_path")
    if ckpt in (None, "best", "hpc", "registry") or (isinstance(ckpt, str) and ckpt.startswith("registry:")):
        return
    if ckpt == "last" and not dirs:
        return  # no ModelCheckpoint in the config: Lightning's default callback and its own `last`
    if ckpt == "last":
        path, warnings = resolve_resume(dirs)
        for w in warnings:
            print(f"gsv3d: warning: {w}", file=sys.stderr)
        if path is None:
            where = ", ".join(dirs) or "(no ModelCheckpoint folder in the config)"
            print(f"gsv3d {subcommand}: --ckpt_path last: no checkpoint that loads in {where}: starting from scratch",
                  file=sys.stderr)
        cfg["ckpt_path"] = path
        return
    try:
        check_checkpoint(ckpt, option="--ckpt_path")
    except (CheckpointReadError, FileNotFoundError) as e:
        raise ValueError(str(e)) from None


#: Hyper-parameters a checkpoint may not set: which classes are trusted comes from the user's own config only.
UNTRUSTED_HPARAMS = ("decoder_classes",)


def _qualified(class_path: str) -> str:
    """``gsv3d_pl.DecoderStage`` -> ``gsv3d_pl.stages.decoder_stage.DecoderStage`` (the config's own class)."""
    module, _, name = str(class_path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return str(class_path)
    return f"{cls.__module__}.{cls.__qualname__}"


def checkpoint_hparams(cfg) -> dict:
    """The model section a ``--ckpt_path`` checkpoint's ``hyper_parameters`` set (LightningCLI merges them into the
    config), minus what a file may not decide: the model class must be the config's, and the trust list stays
    the user's. Empty when there is nothing to merge."""
    from gsv3d_pl.checkpoints import read_checkpoint

    path = cfg.get("ckpt_path")
    if not path or not Path(path).is_file():
        return {}
    hparams = dict(read_checkpoint(path, "--ckpt_path", mmap=True).get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    for k in UNTRUSTED_HPARAMS:
        hparams.pop(k, None)
    cls = hparams.pop("_class_path", None)
    model = cfg.get("model")
    want = getattr(model, "class_path", None) if model is not None else None
    if cls is not None and want is not None and cls not in (want, _qualified(want)):
        raise ValueError(f"--ckpt_path {path}: a checkpoint of {cls}, but the config builds {want}; give the "
                         "matching config, or a checkpoint of this stage")
    if not hparams:
        return {}
    return {"class_path": cls, "dict_kwargs": hparams} if cls is not None else hparams


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

        def _parse_ckpt_path(self) -> None:
            # Lightning reads --ckpt_path here (for its hyper-parameters), before anything else: check it first.
            sub = self.config.get("subcommand")
            if sub:
                reroot_run_paths(self.config[sub].trainer)
                try:
                    prepare_run(self.config[sub], sub, clean=not parse_only)
                    hparams = checkpoint_hparams(self.config[sub])
                except ValueError as e:
                    raise RunConfigError(str(e)) from None
                if hparams:  # as Lightning's own step: the checkpoint's hyper-parameters update the model section
                    self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)

        def before_instantiate_classes(self) -> None:
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            reroot_run_paths(cfg.trainer)

        def instantiate_classes(self) -> None:
            if parse_only:
                raise ParsedConfig(self.config)
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            root = os.path.abspath(cfg.trainer.get("default_root_dir") or os.getcwd())
            existed = os.path.exists(root)
            try:
                super().instantiate_classes()
                from gsv3d_pl.stages.common import check_data_compat

                check_data_compat(self.model, self.datamodule)
            except (ValueError, TypeError, FileNotFoundError) as e:
                if not existed and os.path.isdir(root):  # a run that never started leaves no folder behind
                    shutil.rmtree(root, ignore_errors=True)
                if os.environ.get("GSV3D_TRACEBACK"):
                    raise
                raise RunConfigError(root_cause_message(e)) from None

        def instantiate_trainer(self, **kwargs):
            from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

            from gsv3d_pl.checkpoints import AtomicCheckpointIO

            trainer = super().instantiate_trainer(**kwargs)
            # Every checkpoint lands atomically beside its target (Lightning's own write copies through $TMPDIR).
            if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
                trainer.strategy.checkpoint_io = AtomicCheckpointIO()
            return trainer

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
    try:
        build_cli(args=None if args == sys.argv[1:] else args)
    except RunConfigError as e:
        sub = next((a for a in args if not a.startswith("-")), "")
        configs = [a.split("=", 1)[-1] if a.startswith("--config=") else b
                   for a, b in zip(args, args[1:] + [""]) if a.startswith("--config")]
        where = f" --config {' '.join(configs)}" if configs else ""
        print(f"gsv3d {sub}:{where}: {e}", file=sys.stderr)
        return 2
    return 0
