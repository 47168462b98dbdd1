"""``gsv3d data prepare --config CFG [--config CFG2] [--KEY=VALUE ...]``.

The configs are parsed exactly as ``gsv3d fit`` parses them (:func:`gsv3d_pl.config.parse_config`; overrides such
as ``--data.init_args.resolution=128`` may name any key and are type-checked), then only the ``data`` section is
built (the model is not instantiated, so missing model weights do not matter here), ``prepare_data()`` runs, and
the command ends by printing ``rendered=<n> skipped=<m> repaired=<r> cache=<path>`` (``repaired``: cache entries
that did not read back, rendered again or, for latents, removed so that the next run encodes them again).
``gsv3d_pl`` does not import ``datamodules``: the class is reached only through the config's ``class_path``.

Exit status 2 when the config does not parse or the datamodule rejects its arguments; the message names the
config files and the key.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from gsv3d_pl.config import ConfigError, config_args, instantiate_section, parse_config

__all__ = ["main", "build_datamodule"]


def build_datamodule(configs: Sequence[str], overrides: Sequence[str] = ()) -> Any:
    """The LightningDataModule of a LightningCLI config (parsed and type-checked as ``gsv3d fit`` does).

    Raises:
        ConfigError: the config does not parse (jsonargparse's message, naming the key).
    """
    # As `gsv3d test`: its keys are fit's (ckpt_path) plus verbose, so a config.yaml saved by any run parses.
    cfg = parse_config(config_args(configs, overrides), subcommand="test")
    return instantiate_section(cfg, "data")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="gsv3d data", description="dataset tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare", help="render every object of the config's datamodule into its cache",
                          epilog="Other --KEY=VALUE arguments override the configs, as in `gsv3d fit` "
                                 "(e.g. --data.init_args.resolution=128).")
    prep.add_argument("--config", action="append", required=True, help="LightningCLI YAML (repeatable, later wins)")
    args, overrides = ap.parse_known_args(argv)
    where = f"--config {' '.join(args.config)}"
    try:
        dm = build_datamodule(args.config, overrides)
    except ConfigError as e:
        print(f"gsv3d data: cannot read {where}: {e}", file=sys.stderr)
        return 2
    except (TypeError, ValueError) as e:  # the datamodule's own argument checks (they name data.init_args.KEY)
        print(f"gsv3d data: {where}: {e}", file=sys.stderr)
        return 2
    dm.prepare_data()
    stats = getattr(dm, "prepare_stats", {}) or {}
    cache = stats.get("cache", getattr(dm, "cache_path", None))
    if "cached" in stats:
        print(f"cached={stats['cached']}", file=sys.stderr)
    print(f"rendered={stats.get('rendered', 0)} skipped={stats.get('skipped', 0)} "
          f"repaired={stats.get('repaired', 0)} cache={cache}")
    return 0
