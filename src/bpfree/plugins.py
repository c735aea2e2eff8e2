"""Algorithms, model families and datasets from other installed packages, through entry points.

A package declares, in its ``pyproject.toml``::

    [project.entry-points."bpfree.algorithms"]
    my_algo = "my_package.my_algo"            # a module that registers on import, or
    my_algo2 = "my_package.algos:MyAlgorithm" # an Algorithm subclass (registered under its ``name``)

    [project.entry-points."bpfree.models"]
    my_net = "my_package.models"              # calls bpfree.models.register_model on import

    [project.entry-points."bpfree.datasets"]
    my_data = "my_package.data"               # uses @bpfree.data.register_dataset on import

Each group is loaded once per process, the first time its registry is looked up, so plugins
reach every place a name is resolved: the CLI, suite worker processes, submitit jobs and
notebooks. A plugin that fails to import is reported once (a warning naming the entry point and
the error) and leaves the built-in entries working.
"""

from __future__ import annotations

import logging
import warnings
from importlib import metadata
from typing import Any

GROUPS = ("bpfree.algorithms", "bpfree.models", "bpfree.datasets")
log = logging.getLogger(__name__)

_loaded: set[str] = set()
_errors: dict[str, str] = {}


def _entry_points(group: str) -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=group), key=lambda ep: ep.name)


def load_plugins(group: str) -> list[str]:
    """Import every entry point of ``group`` (once per process); returns the names loaded now."""
    if group not in GROUPS:
        raise ValueError(f"plugin group {group!r}: expected one of {', '.join(GROUPS)}")
    if group in _loaded:
        return []
    _loaded.add(group)  # before importing: a plugin that looks up its own registry must not recurse
    loaded = []
    for ep in _entry_points(group):
        try:
            _register(group, ep.load())
        except Exception as exc:  # a broken third-party package must not take the built-ins down
            message = f"bpfree plugin {ep.name!r} ({ep.value}, group {group}) failed to load: {type(exc).__name__}: {exc}"
            _errors[f"{group}:{ep.name}"] = message
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            continue
        log.info("loaded plugin %s = %s (%s)", ep.name, ep.value, group)
        loaded.append(ep.name)
    return loaded


def _register(group: str, obj: Any) -> None:
    """A module registers itself on import; an Algorithm class is registered here if it has not."""
    if group != "bpfree.algorithms" or not isinstance(obj, type):
        return
    from bpfree.algorithms import ALGORITHMS, register
    from bpfree.algorithms.base import Algorithm

    if issubclass(obj, Algorithm) and (obj.name not in ALGORITHMS or ALGORITHMS.get(obj.name) is not obj):
        register(obj)  # a different class under a taken name is refused: reported as this plugin's failure


def plugin_errors() -> list[str]:
    """One line per plugin that failed to load in this process."""
    return list(_errors.values())
