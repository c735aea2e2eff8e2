"""Algorithm registry: one file per algorithm, registered by name with :func:`register`."""

from __future__ import annotations

import importlib
import pkgutil

from bpfree.algorithms.base import Algorithm

_ALGORITHMS: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    _ALGORITHMS[cls.name] = cls
    return cls


def _import_all() -> None:
    # Every sibling module registers itself on import; adding an algorithm = adding a file.
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


def algorithm_names() -> list[str]:
    if not _ALGORITHMS:
        _import_all()
    return sorted(_ALGORITHMS)


def get_algorithm(name: str) -> type[Algorithm]:
    if not _ALGORITHMS:
        _import_all()
    return _ALGORITHMS[name]
