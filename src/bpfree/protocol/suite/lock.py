"""One suite or compare at a time per output directory."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bpfree.errors import UserError

LOCK_FILE = ".bpfree-suite.lock"


@contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """One suite at a time per output directory, so no run is started twice."""
    handle = open(Path(output) / LOCK_FILE, "w")  # noqa: SIM115
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"output directory {output}: another bpfree suite or compare is running on it; wait for it or use another --output") from None
        yield
    finally:
        handle.close()


