"""``gsv3d weights [--config A.yaml [--config B.yaml ...]]``: every external weight file, where it is looked
for, and whether it is there.

With configs, the YAML files are merged like LightningCLI does (later files win, lists are replaced) and
walked *without instantiating anything*: every ``class_path`` found (model, its sub-models, data,
``trainer.callbacks``) has its module imported, so that its ``gsv3d_pl.weights.register`` hook runs, and
the hook is called with the node's ``init_args``. Exit status 1 if any file is missing.
Without ``--config``, every registered component is listed with its default arguments.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import yaml

from gsv3d_pl.weights import REGISTRY, WeightSpec

__all__ = ["main", "collect_specs", "load_configs", "find_class_nodes"]

# Modules whose import registers weight specs (for the listing without --config).
KNOWN_MODULES = ("gsv3d_pl.models", "gsv3d_pl.metrics.image", "callbacks.metrics", "datamodules")


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_configs(paths: list[str]) -> dict:
    """The merged YAML of ``paths`` (later wins; lists replaced), with clear errors for bad files."""
    cfg: dict = {}
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"gsv3d weights: config {p!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"gsv3d weights: config {p!r} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"gsv3d weights: config {p!r} must be a mapping at the top level")
        cfg = _deep_merge(cfg, data)
    return cfg


def find_class_nodes(node, key: str = "") -> list[tuple[str, str, dict]]:
    """All ``(config key, class_path, init_args)`` in a config tree, depth first."""
    out = []
    if isinstance(node, dict):
        if isinstance(node.get("class_path"), str):
            out.append((key, node["class_path"], node.get("init_args") or {}))
        for k, v in node.items():
            out += find_class_nodes(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += find_class_nodes(v, f"{key}[{i}]")
    return out


def _registry_fn(class_path: str):
    """The registered spec function of ``class_path`` (importing its module), or None; also matches a
    class re-exported under another path (e.g. ``gsv3d_pl.models.VAE`` vs ``gsv3d_pl.models.encoders.VAE``)."""
    module, _, name = class_path.rpartition(".")
    if not module:
        module, name = "gsv3d_pl", class_path  # LightningCLI short names such as "DecoderStage"
    obj = getattr(importlib.import_module(module), name, None)
    if class_path in REGISTRY:
        return REGISTRY[class_path]
    if obj is not None:
        full = f"{obj.__module__}.{getattr(obj, '__qualname__', name)}"
        if full in REGISTRY:
            return REGISTRY[full]
        for key, fn in REGISTRY.items():
            kmod, _, kname = key.rpartition(".")
            try:
                if getattr(importlib.import_module(kmod), kname, None) is obj:
                    return fn
            except ImportError:
                continue
    return None


def collect_specs(cfg: dict) -> tuple[list[tuple[str, WeightSpec]], list[str]]:
    """([(component class path, spec)], [import problems]) for a merged config dict."""
    rows, problems = [], []
    for key, class_path, init_args in find_class_nodes(cfg):
        try:
            fn = _registry_fn(class_path)
        except (ImportError, AttributeError) as e:
            problems.append(f"{key}: cannot import {class_path!r} ({e})")
            continue
        if fn is None:
            continue
        for spec in fn(init_args):
            if not spec.config_key.startswith(("model", "data", "trainer")):
                spec.config_key = f"{key}.init_args.{spec.config_key}"  # hooks give keys relative to their node
            rows.append((class_path, spec))
    return rows, problems


def _print_table(rows: list[tuple[str, WeightSpec]]) -> None:
    header = ("component", "config key", "expected path(s)", "source", "status")
    table = [(c, s.config_key, " | ".join(str(p) for p in s.paths()), s.source or "-", s.status()) for c, s in rows]
    widths = [max([len(h)] + [len(r[i]) for r in table]) for i, h in enumerate(header)]
    widths = [min(w, 90) for w in widths]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in table:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="gsv3d weights", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", "-c", action="append", default=[], help="LightningCLI YAML (repeatable)")
    args = ap.parse_args(argv)
    problems: list[str] = []
    if args.config:
        rows, problems = collect_specs(load_configs(args.config))
        if not rows:
            print(f"No external weight files are needed by {', '.join(args.config)} (tiny/smoke presets).")
    else:
        for mod in KNOWN_MODULES:
            try:
                importlib.import_module(mod)
            except ImportError as e:
                problems.append(f"cannot import {mod} ({e})")
        rows = [(cp, spec) for cp, fn in sorted(REGISTRY.items()) for spec in fn({})]
        print("Every registered weight file (default arguments; pass --config to check a run):")
    if rows:
        _print_table(rows)
    for p in problems:
        print(f"warning: {p}")
    missing = [s for _, s in rows if s.status() == "MISSING"]
    if args.config and missing:
        print(f"\n{len(missing)} file(s) MISSING. Put them at the path shown (or set the config key), "
              "nothing is downloaded at run time.")
        return 1
    return 0
