"""YAML with line numbers, and the checks of sweep-file values that cite them (``file:line`` in every error).

:func:`load_yaml_with_lines` returns dicts and lists that remember the source line of each entry, so a check
anywhere in :mod:`gsv3d_pl.sweep.spec` can say *where* a value is, not just *what* is wrong with it.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

import yaml

__all__ = ["SweepError", "Mapping", "Sequence", "load_yaml_with_lines", "where", "check_keys", "as_path_list",
           "check_overrides", "positive_int", "MANAGED_KEYS"]


class SweepError(ValueError):
    """A sweep file or sweep folder is invalid; the message names the file and line."""


class Mapping(dict):
    """A dict that remembers the 1-based line of each key (``.lines``) and of itself (``.line``)."""

    line: int = 0
    lines: dict[str, int]


class Sequence(list):
    """A list that remembers the 1-based line of each item (``.lines``) and of itself (``.line``)."""

    line: int = 0
    lines: list[int]


class _LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings/sequences carry the source line of every entry (from the node marks)."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> Mapping:
    loader.flatten_mapping(node)
    out = Mapping()
    out.line, out.lines = node.start_mark.line + 1, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in out:
            raise SweepError(f"{loader.name}:{key_node.start_mark.line + 1}: duplicate key {key!r}")
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = key_node.start_mark.line + 1
    return out


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> Sequence:
    out = Sequence(loader.construct_object(child, deep=True) for child in node.value)
    out.line, out.lines = node.start_mark.line + 1, [child.start_mark.line + 1 for child in node.value]
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def load_yaml_with_lines(path: Path) -> Any:
    """``path`` parsed with :class:`Mapping` / :class:`Sequence` containers; invalid YAML -> :class:`SweepError`."""
    text = path.read_text()
    loader = _LineLoader(text)
    loader.name = str(path)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML: {e}") from e
    finally:
        loader.dispose()


# Keys the sweep owns: each task sets them itself, so a sweep file must not.
MANAGED_KEYS = {
    "seed_everything": "use the sweep's `seeds:` list",
    "trainer.default_root_dir": "each task gets the stable folder <out>/<run>/seed<k> (a chained sweep: "
                                "<out>/<run>/seed<k>/<stage>)",
    "trainer.devices": "set `slurm.gpus_per_node` (it is also --ntasks-per-node)",
    "trainer.num_nodes": "set `slurm.nodes`",
    "ckpt_path": "fit must not pass a checkpoint: SLURMEnvironment resumes from hpc_ckpt_*.ckpt",
    "config": "use `base:` and the runs' `overlays:`",
}
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_+][A-Za-z0-9_+]*)*$")


def where(path: Path, mapping: Any, key: str | int | None = None) -> str:
    """``file:line`` of ``mapping[key]`` (of ``mapping`` itself without ``key``); ``file`` when no line is known."""
    line = 0
    if isinstance(mapping, Mapping):
        line = mapping.lines.get(key, mapping.line) if key is not None else mapping.line
    elif isinstance(mapping, Sequence):
        line = mapping.lines[key] if isinstance(key, int) and key < len(mapping.lines) else mapping.line
    return f"{path}:{line}" if line else str(path)


def check_keys(path: Path, mapping: Any, allowed: set[str], what: str) -> None:
    """``mapping`` is a mapping whose keys are all in ``allowed`` (an unknown key is named with a suggestion)."""
    if not isinstance(mapping, dict):
        raise SweepError(f"{where(path, mapping)}: {what} must be a mapping, got {type(mapping).__name__}")
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SweepError(
                f"{where(path, mapping, key)}: unknown key {key!r} in {what}{hint}; "
                f"allowed: {', '.join(sorted(allowed))}"
            )


def as_path_list(path: Path, parent: Any, key: str, value: Any, root: Path, what: str | None = None
                 ) -> tuple[Path, ...]:
    """One path or a list of paths of existing config files, resolved against ``root`` (the current directory)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise SweepError(f"{where(path, parent, key)}: `{what or key}` must be a path or a list of paths")
    out = []
    for i, item in enumerate(items):
        p = Path(os.path.expanduser(item))
        p = p if p.is_absolute() else root / p
        if not p.is_file():
            at = where(path, items, i) if isinstance(items, Sequence) else where(path, parent, key)
            raise SweepError(f"{at}: config file {item!r} not found (looked at {p}; relative paths are "
                             f"relative to the current directory {root})")
        out.append(p.resolve())
    return tuple(out)


def check_overrides(path: Path, parent: Any, key: str, value: Any, what: str | None = None
                    ) -> tuple[dict[str, Any], dict[str, int]]:
    """A mapping of dotted config keys to values (none of the :data:`MANAGED_KEYS`) and the line of each key."""
    if value is None:
        return {}, {}
    if not isinstance(value, dict):
        raise SweepError(f"{where(path, parent, key)}: `{what or key}` must be a mapping of dotted config keys to "
                         f"values, e.g. {{trainer.max_steps: 100}}")
    lines = {}
    for k in value:
        at = where(path, value, k)
        if not isinstance(k, str) or not _KEY_RE.match(k):
            raise SweepError(f"{at}: override key {k!r} is not a dotted config key like model.init_args.lambda_rgb")
        if k in MANAGED_KEYS:
            raise SweepError(f"{at}: `{k}` is set by the sweep itself: {MANAGED_KEYS[k]}")
        lines[k] = value.lines.get(k, 0) if isinstance(value, Mapping) else 0
    return dict(value), lines


def positive_int(path: Path, parent: Any, key: str, value: Any, minimum: int = 1) -> int:
    """``value`` is an integer >= ``minimum`` (booleans are not integers here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SweepError(f"{where(path, parent, key)}: `{key}` must be an integer >= {minimum}, got {value!r}")
    return value
