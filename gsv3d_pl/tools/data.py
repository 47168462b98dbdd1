"""``gsv3d data prepare --config CFG [--config CFG2] [--data.init_args.KEY=VALUE ...]``.

Builds only the config's ``data`` section (its ``class_path`` + ``init_args``; the model is not instantiated, so
missing model weights do not matter here), runs ``prepare_data()`` and ends by printing
``rendered=<n> skipped=<m> cache=<path>``. ``gsv3d_pl`` does not import ``datamodules``: the class is reached only
through the config's ``class_path``.
"""

from __future__ import annotations

import argparse
import sys


def _data_section(configs: list[str], overrides: list[str]) -> dict:
    import yaml
    from omegaconf import OmegaConf

    merged = OmegaConf.create({})
    for path in configs:
        merged = OmegaConf.merge(merged, OmegaConf.load(path))  # later files win, lists replaced (as LightningCLI)
    data = OmegaConf.to_container(merged, resolve=True).get("data")
    if isinstance(data, str):  # `data: path/to/data.yaml`
        data = OmegaConf.to_container(OmegaConf.load(data), resolve=True)
    if not isinstance(data, dict) or "class_path" not in data:
        raise SystemExit(f"gsv3d data: no `data: {{class_path: ..., init_args: ...}}` section in {configs}")
    for ov in overrides:
        key, _, value = ov.lstrip("-").partition("=")
        parts = key.split(".")
        if parts[0] != "data" or len(parts) < 2:
            raise SystemExit(f"gsv3d data: only --data.* overrides are accepted here, got {ov!r}")
        node = data
        for p in parts[1:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value) if value else None
    return data


def build_datamodule(configs: list[str], overrides: list[str] | None = None):
    """Instantiate the LightningDataModule of a LightningCLI config (type-checked by jsonargparse)."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    data = _data_section(configs, overrides or [])
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data", required=True)
    cfg = parser.parse_object({"data": data})
    return parser.instantiate_classes(cfg).data


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="gsv3d data", description="dataset tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare", help="render every object of the config's datamodule into its cache")
    prep.add_argument("--config", action="append", required=True, help="LightningCLI YAML (repeatable, later wins)")
    args, rest = ap.parse_known_args(argv)
    bad = [r for r in rest if not r.startswith("--data.")]
    if bad:
        ap.error(f"unrecognised arguments: {' '.join(bad)} (only --data.KEY=VALUE overrides are accepted)")
    dm = build_datamodule(args.config, rest)
    dm.prepare_data()
    stats = getattr(dm, "prepare_stats", {}) or {}
    cache = stats.get("cache", getattr(dm, "cache_path", None))
    if "cached" in stats:
        print(f"cached={stats['cached']}", file=sys.stderr)
    print(f"rendered={stats.get('rendered', 0)} skipped={stats.get('skipped', 0)} cache={cache}")
    return 0
