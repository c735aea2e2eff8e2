"""bpfree: train networks with backpropagation-free algorithms and measure them against backprop.

The Python API (imported lazily, so ``import bpfree`` stays light)::

    import bpfree
    result = bpfree.run("quick/mf_mnist5k.yaml", epochs=2, seed=1)   # -> bpfree.Result
    outcome = bpfree.compare(algorithms=["mf"], seeds=2)
    frame = bpfree.load_results("results/compare")                     # -> pandas.DataFrame
"""

from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING, Any

try:
    __version__ = metadata.version("bpfree")
except metadata.PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"

if TYPE_CHECKING:
    from bpfree.api import compare, load_results, make_config, run
    from bpfree.config import RunConfig
    from bpfree.results import Result

__all__ = ["Result", "RunConfig", "__version__", "compare", "load_results", "make_config", "run"]

_LAZY = {
    "run": "bpfree.api",
    "compare": "bpfree.api",
    "load_results": "bpfree.api",
    "make_config": "bpfree.api",
    "Result": "bpfree.results",
    "RunConfig": "bpfree.config",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bpfree' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
