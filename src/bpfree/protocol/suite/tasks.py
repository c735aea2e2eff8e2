"""One task of a suite: train one run to completion in its directory (a worker process, a Slurm job, or in-process).

Every task is idempotent (it checks its directory again before it trains), so a task that
submitit requeues after a timeout resumes instead of starting over.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import submitit

from bpfree.config import build_config
from bpfree.errors import UserError
from bpfree.results import CONFIG_FILE, RESULT_FILE


def run_task(config: dict[str, Any], run_dir: str, threads: int | None = None) -> dict[str, Any]:
    """Train one run to completion in ``run_dir``: skip if complete, resume if started, else start.

    Never raises for a failed run: the failure comes back as ``{"ok": False, "error": ...}`` so one
    bad configuration does not stop the others (and submitit's debug executor opens no debugger).
    """
    path = Path(run_dir)
    try:
        if threads:
            import torch

            torch.set_num_threads(threads)
        from bpfree import runner

        if (path / RESULT_FILE).is_file():
            result = json.loads((path / RESULT_FILE).read_text())
            action = "already complete"
        elif (path / CONFIG_FILE).is_file():
            _, result = runner.resume(path)
            action = "resumed"
        else:
            _, result = runner.execute(build_config(config), run_dir=path)
            action = "new"
        return {
            "ok": True,
            "action": action,
            "run_dir": str(path),
            "run_id": result.get("run_id"),
            "status": result.get("status"),
            "test_accuracy": result.get("test_accuracy"),
            "train_time_s": result.get("train_time_s"),
        }
    except Exception as exc:  # noqa: BLE001 - reported per run, never silently
        message = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        return {"ok": False, "run_dir": str(path), "error": message.splitlines()[0] if message else type(exc).__name__}


class SubmititRun(submitit.helpers.Checkpointable):
    """A run as a submitit job; on timeout or preemption it is requeued and resumes its checkpoint."""

    def __call__(self, config: dict[str, Any], run_dir: str, threads: int | None = None) -> dict[str, Any]:
        return run_task(config, run_dir, threads)

