"""A suite task that kills its own worker process, as the out-of-memory killer would (imported by workers)."""

from __future__ import annotations

import os

from bpfree.protocol.suite.tasks import run_task


def run_or_die(config: dict, run_dir: str, threads: int | None = None) -> dict:
    if config.get("name") == "dies":
        os._exit(9)
    return run_task(config, run_dir, threads)
