"""Algorithm registry: one file per algorithm, registered by its ``name`` with :func:`register`.

The built-in algorithms are imported explicitly at the end of this module; an algorithm defined
elsewhere (a plugin, a notebook) registers itself the same way.
"""

from __future__ import annotations

from bpfree.algorithms.base import Algorithm
from bpfree.registry import Registry

ALGORITHMS: Registry[type[Algorithm]] = Registry("algorithm", plugin_group="bpfree.algorithms")


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make ``cls`` available as ``cls.name`` (a name already taken is refused)."""
    return ALGORITHMS.add(cls.name, cls)


def algorithm_names() -> list[str]:
    return ALGORITHMS.names()


def get_algorithm(name: str) -> type[Algorithm]:
    """The algorithm class registered as ``name``; an unknown name raises a one-line ConfigError."""
    return ALGORITHMS.get(name)


# The built-in algorithms (each registers itself on import).
from bpfree.algorithms import bp, cafo, ff, mf, noprop, noprop_ct, noprop_fm  # noqa: E402,F401
