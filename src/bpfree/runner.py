"""Execute one run end to end: build, train (resuming if a checkpoint exists), write the result atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bpfree.config import RunConfig, build_config
from bpfree.engine import Engine, ProgressCallback
from bpfree.errors import UserError
from bpfree.results import CHECKPOINT_FILE, CONFIG_FILE, RESULT_FILE, atomic_write_json, ensure_writable_dir, new_run_id


def execute(
    cfg: RunConfig,
    run_dir: Path | None = None,
    progress: ProgressCallback | None = None,
    keep_checkpoint: bool = False,
    step_progress: ProgressCallback | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Train ``cfg`` and write ``<output>/<run_id>/result.json``; returns (run_dir, result).

    Everything that can fail on user input (data, model, device) is built before the run
    directory is created, so a bad input leaves nothing behind.
    """
    output = ensure_writable_dir(cfg.output if run_dir is None else Path(run_dir).parent)
    run_id = new_run_id(cfg) if run_dir is None else Path(run_dir).name
    run_dir = output / run_id
    engine = Engine(cfg, run_dir=run_dir, progress=progress, step_progress=step_progress)
    if not (run_dir / CONFIG_FILE).exists():
        atomic_write_json(run_dir / CONFIG_FILE, {"run_id": run_id, "config": cfg.model_dump(mode="json")})
    result = {"run_id": run_id, **engine.run()}
    atomic_write_json(run_dir / RESULT_FILE, result)
    if not keep_checkpoint:
        (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    return run_dir, result


def load_run_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"run directory {run_dir}: no {CONFIG_FILE}; not a bpfree run directory")
    try:
        stored = json.loads(path.read_text())["config"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{path}: unreadable or malformed; the run cannot be resumed") from None
    return build_config(stored, source=str(path))


def resume(run_dir: Path, progress: ProgressCallback | None = None, keep_checkpoint: bool = False,
           step_progress: ProgressCallback | None = None):
    """Continue an interrupted run from its checkpoint (or restart it cleanly if it has none)."""
    run_dir = Path(run_dir)
    if (run_dir / RESULT_FILE).exists():
        raise UserError(f"run directory {run_dir}: already complete ({RESULT_FILE} exists); nothing to resume")
    return execute(load_run_config(run_dir), run_dir=run_dir, progress=progress, keep_checkpoint=keep_checkpoint,
                   step_progress=step_progress)
