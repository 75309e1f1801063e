"""Layers of experiment data (defaults < experiment < ``--set``), merged with where each key was set.

A message about a bad value must name where that value came from: a file
line, or the ``--set`` (or a sweep's point) that put it there. So the merge
keeps, for every key path, the layer that last set it, and the overrides
become a layer of their own.

Mappings merge key by key, anything else is replaced; ``--set`` values
merge among themselves the same way, in order. One exception keeps a
workload coherent: a layer that names ``workload.trace`` drops the lower
layers' ``generator`` and ``params``, and one that names
``workload.generator`` drops their ``trace``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import yaml

from sim.config import ConfigError
from sim.yaml_io import KeyPath, load_value


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """``a.b.c=value`` to (('a', 'b', 'c'), value); the value is parsed as YAML (``[a,b]`` is a list)."""
    key, sep, raw = text.partition("=")
    parts = tuple(p.strip() for p in key.split("."))
    if not sep or not all(parts):
        raise ConfigError(f"--set {text}: expected KEY=VALUE with a dotted KEY, e.g. engine.replicas=4")
    try:
        value = load_value(raw, f"--set {text}", parts) if raw.strip() else ""
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"--set {text:.200}: cannot parse the value as YAML: {problem}") from None
    except RecursionError:
        raise ConfigError(f"--set {text:.200}: the value is nested too deeply") from None
    return parts, value


@dataclass
class Layered:
    """Merged experiment data and, per key path, where it was last set and in which layer."""

    data: dict[str, Any]
    origins: dict[KeyPath, str]
    ranks: dict[KeyPath, int] = dataclasses.field(default_factory=dict)  # layer index, lowest first

    def origin(self, path: KeyPath) -> str | None:
        for n in range(len(path), -1, -1):  # down to (), the experiment itself
            if path[:n] in self.origins:
                return self.origins[path[:n]]
        return None

    def rank(self, path: KeyPath) -> int:
        """The layer that set ``path`` itself, or -1 for a key left at its default.

        Only the path itself counts: every key a layer sets, however deep, is
        in ``ranks``, so an enclosing mapping (an experiment's ``engine:``, a
        ``--set engine={...}``) does not stand in for keys it left alone.
        """
        return self.ranks.get(path, -1)

    def latest(self, paths: Sequence[KeyPath]) -> KeyPath:
        """Of keys that together make a value wrong, the one set in the highest
        layer (a ``--set`` over a file line), the first on a tie."""
        return max(paths, key=self.rank)


def prune_workload(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Drop the base workload's source that the top layer replaces (see module docstring)."""
    bw, tw = base.get("workload"), top.get("workload")
    if not (isinstance(bw, dict) and isinstance(tw, dict)):
        return base
    bw = dict(bw)
    if "trace" in tw:
        bw.pop("generator", None)
        bw.pop("params", None)
    if "generator" in tw:
        bw.pop("trace", None)
    return {**base, "workload": bw}


def _deep_merge(base: Any, top: Any) -> Any:
    if isinstance(base, dict) and isinstance(top, dict):
        out = dict(base)
        for k, v in top.items():
            out[k] = _deep_merge(base[k], v) if k in base else v
        return out
    return top


def _replaced(base: Any, top: dict[str, Any], path: KeyPath) -> Iterator[KeyPath]:
    """The paths at which ``top`` replaces ``base`` whole rather than merging into it."""
    for k, v in top.items():
        here = path + (k,)
        if isinstance(base, dict) and k in base and isinstance(base[k], dict) and isinstance(v, dict):
            yield from _replaced(base[k], v, here)
        else:
            yield here


def merge_layers(layers: Iterable[tuple[dict[str, Any], dict[KeyPath, str]]]) -> Layered:
    """Merges the layers, each key path blamed on the layer that last set its value.

    A layer that replaces a value with a mapping it made on the way to a
    deeper key (``--set engine.replicas.x=1`` over ``replicas: 2``) owns the
    mapping too, though it has no origin of its own, so a complaint about the
    mapping names that layer and not the line it replaced.
    """
    data: dict[str, Any] = {}
    origins: dict[KeyPath, str] = {}
    ranks: dict[KeyPath, int] = {}
    for rank, (top, top_origins) in enumerate(layers):
        base = prune_workload(data, top)
        for path in _replaced(base, top, ()):
            owner = top_origins.get(path) or next((o for p, o in top_origins.items() if p[: len(path)] == path), None)
            if owner is not None:
                origins[path] = owner
                ranks[path] = rank
        data = _deep_merge(base, top)
        origins.update(top_origins)
        ranks.update(dict.fromkeys(top_origins, rank))
    return Layered(data, origins, ranks)


def override_layer(overrides: Sequence[str], labels: Mapping[str, str]) -> tuple[dict[str, Any], dict[KeyPath, str]]:
    """The overrides as one layer; each key's origin is its label in ``labels``, else ``--set TEXT``."""
    data: dict[str, Any] = {}
    origins: dict[KeyPath, str] = {}
    for text in overrides:
        parts, value = parse_override(text)
        top: Any = value
        for p in reversed(parts):
            top = {p: top}
        label = labels.get(text, f"--set {text}")
        # A mapping this override makes on its way to its key, over an earlier
        # value that is not one, is this override's (as `merge_layers` owns it between layers).
        node: Any = data
        for i, key in enumerate(parts[:-1]):
            node = node.get(key) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                if node is not None:
                    origins[parts[: i + 1]] = label
                break
        # Each override merges into those before it as a layer over the file does:
        # mappings key by key, and a trace (generator) drops the earlier generator (trace).
        data = _deep_merge(prune_workload(data, top), top)
        origins[parts] = label
        for sub in _subpaths(value):
            origins[parts + sub] = label
    return data, {path: o for path, o in origins.items() if has_path(data, path)}


def has_path(data: Any, path: KeyPath) -> bool:
    for key in path:
        if isinstance(data, dict) and key in data:
            data = data[key]
        elif isinstance(data, list) and isinstance(key, int) and 0 <= key < len(data):
            data = data[key]
        else:
            return False
    return True


def _subpaths(value: Any) -> list[KeyPath]:
    if isinstance(value, dict):
        return [(k,) + rest for k, v in value.items() for rest in [()] + _subpaths(v)]
    if isinstance(value, list):
        return [(i,) + rest for i, v in enumerate(value) for rest in [()] + _subpaths(v)]
    return []
