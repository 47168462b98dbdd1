"""``gsv3d weights [--config A.yaml [--config B.yaml ...]] [--key=value ...]``: every external weight file, where
it is looked for, and whether it is there.

``gsv3d weights convert-sv3d SRC.safetensors OUT/ [--variant sv3d_p|sv3d_u]`` converts Stability's official SGM
SV3D checkpoint into the diffusers UNet folder ``model.init_args.sv3d.init_args.unet_path`` reads (exit 2 if SRC
is not one; see :mod:`gsv3d_pl.models.sv3d_convert`).

With configs, they are parsed exactly as ``gsv3d fit`` parses them (:func:`gsv3d_pl.config.parse_config`: later
files win, lists are replaced, keys and types checked) and *nothing is instantiated*: every ``class_path`` of the
parsed config (model, its sub-models, data, ``trainer.callbacks``, ...) is imported, and a class with a
``weight_specs(init_args, key_prefix)`` method is asked for its files. Exit status 1 if any file is missing, 2 if
the config does not parse. Without ``--config``, every such class of the project is listed with its default
arguments.

``--fetch`` (with ``--config`` only) downloads each MISSING file that has a download recipe
(:class:`~gsv3d_pl.weights.HubFile`: into the Hugging Face hub cache; :class:`~gsv3d_pl.weights.UrlFile`: into
its exact path under ``$TORCH_HOME/hub/checkpoints``), i.e. where runs look, then checks and prints the table
again: exit 0 if nothing is missing any more, 1 otherwise. A file whose path the config sets, or one without a
recipe (a run's own checkpoint), is not fetched; a failed download is reported by name and the others go on.
Nothing else in the project ever downloads.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterator
from typing import Any

from gsv3d_pl.config import ConfigError, config_args, parse_config
from gsv3d_pl.weights import WeightSpec

__all__ = ["main", "convert_sv3d_main", "collect_specs", "fetch_missing", "find_class_nodes", "import_class",
           "known_components"]

# Modules holding the classes listed without --config.
KNOWN_MODULES = ("gsv3d_pl.models", "gsv3d_pl.stages", "callbacks.metrics", "datamodules")


def find_class_nodes(node: Any, key: str = "") -> list[tuple[str, str, dict]]:
    """All ``(config key, class_path, init_args)`` in a config tree (plain dicts and lists), depth first."""
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


def import_class(class_path: str) -> Any:
    """The object ``class_path`` names; a re-export (``gsv3d_pl.DecoderStage``) is the same class object as its
    definition (``gsv3d_pl.stages.decoder_stage.DecoderStage``)."""
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module or "gsv3d_pl"), name)


def _specs_of(cls: Any, init_args: dict, key_prefix: str) -> list[WeightSpec]:
    fn = getattr(cls, "weight_specs", None)
    return list(fn(init_args, key_prefix)) if callable(fn) else []


def collect_specs(cfg: dict) -> tuple[list[tuple[str, WeightSpec]], list[str]]:
    """([(component class path, spec)], [import problems]) for a parsed config (as a dict)."""
    rows, problems = [], []
    for key, class_path, init_args in find_class_nodes(cfg):
        try:
            cls = import_class(class_path)
        except (ImportError, AttributeError) as e:
            problems.append(f"{key}: cannot import {class_path!r} ({e})")
            continue
        rows += [(class_path, spec) for spec in _specs_of(cls, init_args, key)]
    return rows, problems


def known_components(problems: list[str]) -> Iterator[tuple[str, type]]:
    """(class path, class) of every class in :data:`KNOWN_MODULES` with a ``weight_specs`` method, once each."""
    seen: set[type] = set()
    for mod in KNOWN_MODULES:
        try:
            module = importlib.import_module(mod)
        except ImportError as e:
            problems.append(f"cannot import {mod} ({e})")
            continue
        names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
        for name in names:
            obj = getattr(module, name, None)  # lazy packages (gsv3d_pl.stages) import on attribute access
            if isinstance(obj, type) and callable(getattr(obj, "weight_specs", None)) and obj not in seen:
                seen.add(obj)
                yield f"{obj.__module__}.{obj.__qualname__}", obj


def _print_table(rows: list[tuple[str, WeightSpec]]) -> None:
    header = ("component", "config key", "expected path(s)", "source", "status")
    table = [(c, s.config_key, " | ".join(str(p) for p in s.paths()), s.source or "-", s.status()) for c, s in rows]
    widths = [max([len(h)] + [len(r[i]) for r in table]) for i, h in enumerate(header)]
    widths = [min(w, 90) for w in widths]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in table:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)))


def fetch_missing(rows: list[tuple[str, WeightSpec]]) -> list[str]:
    """Download every MISSING spec of ``rows`` that has a recipe and no config-set path (each recipe once).

    Returns:
        the names of the files whose download failed (each failure is printed to stderr, without a traceback).
    """
    print("\nFetching what is missing (--fetch):")
    done: set = set()
    failed: list[str] = []
    for _, spec in rows:
        if spec.status() != "MISSING":
            continue
        if spec.fetch is None:  # a run's own output (stage 1's checkpoint), a licence-gated file
            print(f"  {spec.name}: no download recipe, not fetched; get it: {spec.source or '-'}")
            continue
        if spec.explicit:
            print(f"  {spec.name}: set by the config: not fetched ({spec.config_key}={spec.explicit}); "
                  f"get it: {spec.source or '-'}")
            continue
        if spec.fetch in done:
            continue
        done.add(spec.fetch)
        print(f"  fetching {spec.name}: {spec.fetch.describe()}", flush=True)
        try:
            spec.fetch.fetch()
        except Exception as e:  # network, HTTP, disk: per file, so the others still come
            failed.append(spec.name)
            print(f"gsv3d weights: could not fetch {spec.name} ({spec.fetch.describe()}): "
                  f"{type(e).__name__}: {e}", file=sys.stderr)
    return failed


def convert_sv3d_main(argv: list[str]) -> int:
    """``gsv3d weights convert-sv3d SRC OUT [--variant]``: 0 when written, 2 when SRC is refused."""
    ap = argparse.ArgumentParser(
        prog="gsv3d weights convert-sv3d",
        description="Convert Stability's SGM sv3d_p/sv3d_u.safetensors (HF stabilityai/sv3d) into a diffusers "
                    "SV3DUNet folder (config.json + diffusion_pytorch_model.safetensors).")
    ap.add_argument("src", help="sv3d_p.safetensors or sv3d_u.safetensors")
    ap.add_argument("out", help="output folder (replaced atomically if it exists)")
    ap.add_argument("--variant", choices=("sv3d_p", "sv3d_u"), default=None,
                    help="default: from the file (label_emb input width 1280 = sv3d_p, 256 = sv3d_u)")
    args = ap.parse_args(argv)
    from gsv3d_pl.models.sv3d_convert import SV3DCheckpointError, convert_sv3d_checkpoint  # torch: import late

    try:
        res = convert_sv3d_checkpoint(args.src, args.out, variant=args.variant)
    except SV3DCheckpointError as e:
        print(f"gsv3d weights convert-sv3d: {e}", file=sys.stderr)
        return 2
    ignored = ", ".join(f"{k} ({n})" for k, n in sorted(res.ignored.items())) or "none"
    print(f"Wrote {res.out_dir}/config.json and {res.out_dir}/diffusion_pytorch_model.safetensors: "
          f"{res.variant or 'custom'} UNet, {res.num_tensors} tensors, {res.num_params:,} parameters "
          f"({'/'.join(res.dtypes)}). Ignored non-UNet keys: {ignored}.")
    print(f"Use it with --model.init_args.sv3d.init_args.unet_path={res.out_dir}")
    return 0


def main(argv: list[str]) -> int:
    if argv and argv[0] == "convert-sv3d":  # a subcommand; everything else is the --config listing below
        return convert_sv3d_main(argv[1:])
    ap = argparse.ArgumentParser(prog="gsv3d weights", description=__doc__.split("\n\n")[0],
                                 epilog="Other --key=value arguments override the configs, as in `gsv3d fit`.")
    ap.add_argument("--config", "-c", action="append", default=[], help="LightningCLI YAML (repeatable)")
    ap.add_argument("--fetch", action="store_true",
                    help="download the MISSING files that have a known source into the place runs look "
                         "(network needed; runs themselves never download); needs --config")
    args, overrides = ap.parse_known_args(argv)
    if args.fetch and not args.config:
        ap.error("--fetch needs --config (it downloads what that config is missing)")
    problems: list[str] = []
    if args.config:
        try:
            # As `gsv3d test`: its keys are fit's (ckpt_path) plus verbose, so a config.yaml saved by any run parses.
            cfg = parse_config(config_args(args.config, overrides), subcommand="test")
        except ConfigError as e:
            print(f"gsv3d weights: cannot read --config {' '.join(args.config)}: {e}", file=sys.stderr)
            return 2
        rows, problems = collect_specs(cfg.as_dict())
        if not rows:
            print(f"No external weight files are needed by {', '.join(args.config)} (tiny/smoke presets).")
    else:
        if overrides:
            ap.error(f"unrecognised arguments: {' '.join(overrides)} (overrides need --config)")
        # No config key exists without a config: each spec is keyed by its class name instead.
        rows = [(path, spec) for path, cls in sorted(known_components(problems), key=lambda pc: pc[0])
                for spec in _specs_of(cls, {}, cls.__name__)]
        print("Every weight file a component can need (default arguments; pass --config to check a run):")
    if rows:
        _print_table(rows)
    for p in problems:
        print(f"warning: {p}")
    missing = [s for _, s in rows if s.status() == "MISSING"]
    if args.fetch and missing:
        failed = fetch_missing(rows)
        rows, _ = collect_specs(cfg.as_dict())  # again: hub-cache paths are resolved when a spec is made
        print("\nAfter fetching:")
        _print_table(rows)
        missing = [s for _, s in rows if s.status() == "MISSING"]
        if failed:
            print(f"{len(failed)} download(s) failed: {', '.join(failed)}")
    if args.config and missing:
        print(f"\n{len(missing)} file(s) MISSING. Put them at the path shown (or set the config key), "
              "nothing is downloaded at run time.")
        if not args.fetch and any(s.fetch is not None and not s.explicit for s in missing):
            print("`gsv3d weights --config ... --fetch` downloads the ones with a known source (network needed).")
        return 1
    return 0
