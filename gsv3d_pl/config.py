"""The one config reader: every tool reads configs with the same LightningCLI/jsonargparse parser as ``fit``.

``gsv3d fit --config a.yaml --config b.yaml --model.init_args.x=1`` and the tools (``weights``, ``data``,
``predict``, ``sweep``) therefore agree on everything: later files win, lists are replaced, ``class_path`` /
``init_args`` are resolved and type-checked, omegaconf interpolation works, and a run's own saved
``config.yaml`` (which has the subcommand's keys, e.g. ``ckpt_path``) is accepted.

    cfg = parse_config(["--config", "configs/decoder/tiny.yaml", "--trainer.max_steps=5"])
    cfg.model.class_path, cfg.model.init_args.lr, cfg.trainer.default_root_dir
    dm = instantiate_section(cfg, "data")          # only the datamodule; the model is not built
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

__all__ = ["parse_config", "config_args", "instantiate_section", "ConfigError"]


class ConfigError(ValueError):
    """A config that does not parse; the message is jsonargparse's (it names the key)."""


def config_args(configs: Sequence[str], overrides: Sequence[str] = ()) -> list[str]:
    """``--config A --config B`` followed by ``overrides`` (``--key=value`` strings)."""
    return [a for c in configs for a in ("--config", str(c))] + [str(o) for o in overrides]


def parse_config(args: Sequence[str], subcommand: str = "fit") -> Any:
    """Parse ``gsv3d <subcommand>`` arguments into that subcommand's config Namespace, without building anything.

    Args:
        args: what follows the subcommand on the command line, e.g. ``["--config", "a.yaml", "--seed_everything=1"]``.
        subcommand: "fit" | "validate" | "test" | "predict" (the keys each accepts differ only slightly).

    Returns:
        jsonargparse Namespace with ``trainer``, ``model``, ``data``, ``seed_everything`` (and ``ckpt_path``),
        run paths already resolved against ``trainer.default_root_dir`` as ``gsv3d fit`` does.

    Raises:
        ConfigError: the config does not parse (unknown key, wrong type, missing file); jsonargparse's message.
    """
    from gsv3d_pl.cli import ParsedConfig, build_cli

    try:
        with warnings.catch_warnings():
            # LightningCLI warns that `args` differ from sys.argv (they are meant to, here).
            warnings.simplefilter("ignore", UserWarning)
            build_cli(args=[subcommand, *map(str, args)], run=True, parse_only=True,
                      parser_kwargs={"exit_on_error": False})
    except ParsedConfig as done:
        return done.config[subcommand]
    except Exception as e:  # jsonargparse raises ArgumentError (or TypeError/ValueError from YAML)
        raise ConfigError(str(e)) from e
    raise RuntimeError("LightningCLI returned without instantiating classes")  # pragma: no cover


def instantiate_section(cfg: Any, key: str, base_class: type | None = None) -> Any:
    """Build only ``cfg[key]`` (a ``class_path``/``init_args`` node, nested classes included) with jsonargparse.

    ``base_class`` defaults to LightningModule for "model" and LightningDataModule for "data".
    """
    from jsonargparse import ArgumentParser, Namespace
    from lightning.pytorch import LightningDataModule, LightningModule

    if base_class is None:
        base_class = {"model": LightningModule, "data": LightningDataModule}.get(key)
        if base_class is None:
            raise ValueError(f"instantiate_section: give base_class for section {key!r}")
    node = cfg.get(key) if hasattr(cfg, "get") else None
    if node is None:
        raise ConfigError(f"the config has no {key!r} section ({key}: {{class_path: ..., init_args: ...}})")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(base_class, key, required=True)
    sub = parser.parse_object({key: node.as_dict() if isinstance(node, Namespace) else node})
    try:
        return parser.instantiate_classes(sub)[key]
    except ValueError as e:
        # jsonargparse wraps a constructor's own error (e.g. MissingWeightsError, a bad init_arg) in a union-type
        # error that repeats the whole config: raise the constructor's, whose message names the key.
        raise (e.__cause__ or e) from None
