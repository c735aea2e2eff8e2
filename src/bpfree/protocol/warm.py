"""Imported once by the local executor's fork server, so every run's process starts warm.

Each run gets a fresh process (its memory peak and state are its own), forked from a server
that has already paid the one-off costs: importing torch and the meters, torch's lazy optimizer
imports, and parsing the embedded dataset. Nothing here runs a parallel kernel, so forking stays
safe. Any failure is ignored: a cold child still works, only slower.
"""

from __future__ import annotations


def warm() -> None:
    try:
        import torch

        import bpfree.engine  # noqa: F401  (torch, algorithms, models, data, meters)
        import bpfree.runner  # noqa: F401

        weight = torch.zeros(1, requires_grad=True)
        torch.optim.Adam([weight])  # triggers torch's lazy optimizer imports once
        torch.optim.AdamW([weight])
        from bpfree.data import load_dataset

        load_dataset("mnist5k")  # cached for the process (and inherited by forked children)
        from bpfree.meters import energy

        energy._probe_zeus  # noqa: B018
        import zeus.device  # noqa: F401
        import zeus.monitor  # noqa: F401
    except Exception:  # noqa: BLE001 - warming is an optimisation only
        pass


warm()
