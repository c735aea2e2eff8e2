"""Algorithm registry: one file per algorithm, registered by name with :func:`register`."""

from __future__ import annotations

import importlib
import pkgutil

from bpfree.algorithms.base import Algorithm

_ALGORITHMS: dict[str, type[Algorithm]] = {}
_all_imported = False


def register(cls: type[Algorithm]) -> type[Algorithm]:
    _ALGORITHMS[cls.name] = cls
    return cls


def _import_all() -> None:
    # Every sibling module registers itself on import; adding an algorithm = adding a file.
    # A flag, not "registry empty": one module imported directly must not hide the others.
    global _all_imported
    if _all_imported:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    _all_imported = True


def algorithm_names() -> list[str]:
    _import_all()
    return sorted(_ALGORITHMS)


def get_algorithm(name: str) -> type[Algorithm]:
    _import_all()
    return _ALGORITHMS[name]
