"""Configs shipped inside the package: ``quick/`` (the default comparison), ``extra/`` (quick configs of
further algorithms and algorithm x model pairs) and ``paper/`` (GPU runs).

They are package data, read through :mod:`importlib.resources`, so an installed wheel finds them
from any working directory. A config path given on the command line is looked up on disk first,
then here, so ``configs/quick/ff_mnist5k.yaml``, ``quick/ff_mnist5k.yaml``,
``extra/noprop_ct_mnist5k.yaml`` and ``paper/suite.yaml`` work everywhere.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from bpfree.errors import UserError

COLLECTIONS = ("quick", "extra", "paper")


def packaged_dir(collection: str = "quick") -> Path:
    """The installed directory of a shipped collection (wheels install unzipped, so it is a real path)."""
    if collection not in COLLECTIONS:
        raise UserError(f"config collection {collection!r}: expected one of {', '.join(COLLECTIONS)}")
    path = Path(str(resources.files(__name__).joinpath(collection)))
    if not path.is_dir():
        raise UserError(f"the installed bpfree has no configs/{collection}; reinstall it or pass --configs DIR")
    return path


def resolve(path: Path | str) -> Path:
    """``path`` if it exists; else the shipped config it names (an optional ``configs/`` prefix allowed)."""
    path = Path(path)
    if path.exists():
        return path
    parts = path.parts
    if parts and parts[0] == "configs":
        parts = parts[1:]
    if parts and parts[0] in COLLECTIONS:
        shipped = packaged_dir(parts[0]).joinpath(*parts[1:])
        if shipped.exists():
            return shipped
    return path
