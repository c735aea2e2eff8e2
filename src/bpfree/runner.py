"""Execute one run end to end: build, train (resuming if a checkpoint exists), write the result atomically."""

from __future__ import annotations

import fcntl
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bpfree.config import RunConfig, build_config, run_label
from bpfree.engine import Engine, ProgressCallback
from bpfree.errors import UserError
from bpfree.fileio import WriteError, atomic_write_json, ensure_writable_dir, printable_path
from bpfree.history import RUN_LOCK_FILE, heartbeat_interval
from bpfree.live import Listener, RunWatch
from bpfree.results import CHECKPOINT_FILE, CONFIG_FILE, RESULT_FILE, new_run_id
from bpfree.tracking import Tracking, TrackingOptions, stored_options

LOCK_PATIENCE_S = 2.0  # `bpfree status` probes the lock for an instant: a start waits that out
# How long the end of a run waits for its trackers (an interrupted run waits less).
TRACKING_CLOSE_S = {"completed": 60.0, "diverged": 60.0, "failed": 20.0, "interrupted": 10.0}


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Only one process trains a run directory at a time (two resumes, an orphaned worker and a rerun).

    flock is released by the kernel when its holder dies, so a killed run leaves no stale lock;
    readers tell a running run from an interrupted one by probing it (:func:`bpfree.history.lock_state`).
    """
    try:
        handle = open(Path(run_dir) / RUN_LOCK_FILE, "a")  # noqa: SIM115 - held for the whole run
    except OSError as exc:
        raise WriteError(f"run directory {printable_path(run_dir)}: cannot create its lock file ({exc.strerror or exc})") from None
    try:
        deadline = time.monotonic() + LOCK_PATIENCE_S
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise UserError(
                        f"run directory {printable_path(run_dir)}: another bpfree process is training it; wait for it to end"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        handle.close()


def remove_stale_checkpoint_writes(run_dir: Path) -> None:
    """Temporary files of a checkpoint write that a kill interrupted (only called under the run lock)."""
    for tmp in Path(run_dir).glob(f".{CHECKPOINT_FILE}.*.tmp"):
        tmp.unlink(missing_ok=True)


def execute(
    cfg: RunConfig,
    run_dir: Path | None = None,
    progress: ProgressCallback | None = None,
    keep_checkpoint: bool = False,
    step_progress: ProgressCallback | None = None,
    on_start: Callable[[Path], None] | None = None,
    on_event: Listener | None = None,
    heartbeat_s: float | None = None,
    tracking: TrackingOptions | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Train ``cfg`` and write ``<output>/<run_id>/result.json``; returns (run_dir, result).

    Everything that can fail on user input (data, model, device) is built before the run
    directory is created, so a bad input leaves nothing behind. ``on_start`` is called with the
    run directory once it exists (before training). Every run appends its live history to
    ``history.jsonl`` (:mod:`bpfree.history`); ``on_event`` gets each row as it is written
    (start, epoch, heartbeat every ``heartbeat_s`` seconds inside long epochs, end), and
    ``tracking`` follows the run in MLflow and/or TensorBoard.
    """
    if run_dir is not None:
        run_dir = Path(run_dir).expanduser().resolve()  # `bpfree resume .` is the directory's real name
    output = ensure_writable_dir(cfg.output if run_dir is None else run_dir.parent)
    run_id = new_run_id(cfg) if run_dir is None else run_dir.name
    run_dir = output / run_id
    watch = RunWatch(run_dir, run_id, run_label(cfg), cfg.checkpoint, heartbeat_interval(heartbeat_s), progress, step_progress)
    engine = Engine(cfg, run_dir=run_dir, progress=watch.on_epoch, step_progress=watch.on_step)
    run_dir.mkdir(parents=True, exist_ok=True)
    tracker: Tracking | None = None
    status, result = "failed", {}
    try:
        with run_lock(run_dir):
            if (run_dir / RESULT_FILE).is_file():
                raise UserError(f"run directory {printable_path(run_dir)}: already complete ({RESULT_FILE} exists); nothing to run")
            remove_stale_checkpoint_writes(run_dir)
            if not (run_dir / CONFIG_FILE).exists():
                atomic_write_json(run_dir / CONFIG_FILE, {"run_id": run_id, "config": cfg.model_dump(mode="json")})
            if on_start is not None:
                on_start(run_dir)
            if tracking:
                tracker = Tracking(run_dir, run_id, cfg.model_dump(mode="json"), tracking)
            total_epochs = sum(phase.epochs for phase in engine.algorithm.schedule())
            resumed = (run_dir / CHECKPOINT_FILE).is_file()
            watch.start(total_epochs, resumed, [listener for listener in (on_event, tracker) if listener is not None], str(engine.device))
            try:
                result = {"run_id": run_id, **engine.run()}
                write_result(run_dir, result)
            except BaseException as exc:
                status = "interrupted" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "failed"
                reason = "stopped (Ctrl-C or a signal)" if status == "interrupted" else _reason(exc)
                watch.end(status, reason)
                raise
            status = str(result.get("status"))
            watch.end(status, result.get("reason"), result.get("test_accuracy"), result.get("epochs_run"))
    finally:
        if tracker is not None:
            tracker.close(status, result or None, TRACKING_CLOSE_S.get(status, 10.0))
    if not keep_checkpoint:
        (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    return run_dir, result


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return first if isinstance(exc, UserError) else f"{type(exc).__name__}: {first}".rstrip(": ")


def write_result(run_dir: Path, result: dict[str, Any]) -> None:
    """Write result.json; if that fails (disk full), the trained result is printed, never lost."""
    try:
        atomic_write_json(run_dir / RESULT_FILE, result)
    except WriteError as exc:
        sys.stdout.write(json.dumps(result, allow_nan=False) + "\n")
        sys.stdout.flush()
        raise WriteError(f"{exc}; the trained result was printed to stdout as JSON (its checkpoint, if any, is kept)") from None


def load_run_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"run directory {printable_path(Path(run_dir))}: no {CONFIG_FILE}; not a bpfree run directory")
    try:
        stored = json.loads(path.read_text())["config"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{printable_path(path)}: unreadable or malformed; the run cannot be resumed") from None
    return build_config(stored, source=str(path))


def resume(
    run_dir: Path,
    progress: ProgressCallback | None = None,
    keep_checkpoint: bool = False,
    step_progress: ProgressCallback | None = None,
    on_start: Callable[[Path], None] | None = None,
    on_event: Listener | None = None,
    heartbeat_s: float | None = None,
    tracking: TrackingOptions | None = None,
):
    """Continue an interrupted run from its checkpoint (or restart it cleanly if it has none).

    Without ``tracking`` the run is tracked where it was before (``tracking.json``), continuing
    the same MLflow run.
    """
    run_dir = Path(run_dir).expanduser().resolve()
    if (run_dir / RESULT_FILE).exists():
        raise UserError(f"run directory {printable_path(run_dir)}: already complete ({RESULT_FILE} exists); nothing to resume")
    return execute(
        load_run_config(run_dir), run_dir=run_dir, progress=progress, keep_checkpoint=keep_checkpoint,
        step_progress=step_progress, on_start=on_start, on_event=on_event, heartbeat_s=heartbeat_s,
        tracking=tracking if tracking else stored_options(run_dir),
    )
