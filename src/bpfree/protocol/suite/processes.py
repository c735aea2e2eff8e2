"""Worker processes end with their parent: no forkserver, resource tracker or run outlives a killed suite.

Linux only (prctl); elsewhere these are no-ops and a killed suite may leave its workers running.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent ends (even by SIGKILL)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent ended before the request took effect
        os._exit(1)


def worker_initializer() -> None:
    """Run in each pool worker: it dies with the fork server, which dies with the suite (see warm.py)."""
    die_with_parent()
