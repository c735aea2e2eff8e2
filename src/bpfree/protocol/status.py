"""`bpfree status DIR`: where every run under a results, suite, compare or tune directory stands,
read from the files alone, so it works on a directory that Slurm nodes share.

A run directory is a folder holding any of a run's files (result.json, config.json,
history.jsonl, its lock, a Slurm job marker); they are looked for up to three levels down
(``<tune output>/trials/<study>/<run>``). Each gets one row (:func:`bpfree.results.inspect_run`):

- completed / diverged: its result.json;
- running: a process holds the run's lock; last epoch, step progress and ETA from its history;
- failed: its last attempt ended with an error (the reason is kept in the history);
- interrupted: config.json without a result and nobody holding the lock (a stale lock file
  included), resumable when a checkpoint is there;
- queued: a Slurm job marker without a started run, or a run of the last suite/compare plan
  (``.bpfree-plan.json``) not started while that suite still holds its output lock; such a run
  whose suite has ended is ``not started`` (rerun the suite).

:class:`HistoryFollower` follows the histories of the runs under a directory from a thread, for
the log lines of ``compare``, ``suite`` and ``tune`` (whose runs train in other processes).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bpfree.errors import UnreadableFile
from bpfree.fileio import load_json, parse_json, read_appended
from bpfree.history import HISTORY_FILE, RUN_LOCK_FILE, probe_lock
from bpfree.live import duration
from bpfree.protocol.suite.lock import LOCK_FILE
from bpfree.protocol.suite.planning import read_plan
from bpfree.protocol.suite.slurm import JOB_MARKER
from bpfree.results import CHECKPOINT_FILE, CONFIG_FILE, RESULT_FILE, RunFiles, inspect_run

RUN_FILES = (RESULT_FILE, CONFIG_FILE, HISTORY_FILE, RUN_LOCK_FILE, JOB_MARKER, CHECKPOINT_FILE)
SKIP_DIRS = {"export", "figures", "tables", "__pycache__"}
MAX_DEPTH = 3
DONE, FAILED_STATES, LEFT_STATES = ("completed",), ("failed", "diverged", "unreadable"), ("interrupted", "queued", "not started")


def is_run_dir(path: Path) -> bool:
    return any(os.path.lexists(path / name) for name in RUN_FILES)


def find_run_dirs(root: Path, max_depth: int = MAX_DEPTH) -> list[Path]:
    """Run directories at or under ``root`` (hidden folders and report outputs skipped), sorted."""
    root = Path(root)
    if is_run_dir(root):
        return [root]
    found: list[Path] = []
    stack = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith(".") or entry.name in SKIP_DIRS or not entry.is_dir(follow_symlinks=False):
                continue
            path = Path(entry.path)
            if is_run_dir(path):
                found.append(path)
            elif depth + 1 < max_depth:
                stack.append((path, depth + 1))
    return sorted(found)


@dataclass
class RunRow:
    """One run's line in ``bpfree status``."""

    run: str  # label: algorithm model dataset seed
    run_id: str
    state: str
    epoch: int | None = None  # epochs finished
    total_epochs: int | None = None
    val_accuracy: float | None = None  # the latest epoch's
    test_accuracy: float | None = None
    eta_s: float | None = None  # of this run, now
    updated_s: float | None = None  # seconds since its history's latest row
    resumable: bool | None = None
    detail: str = ""
    duration_s: float | None = None  # a finished run's wall time (started_at to finished_at)
    run_dir: str = ""


def _label(config: dict[str, Any] | None, fallback: str) -> str:
    if not config or not config.get("algorithm"):
        return fallback
    return f"{config.get('algorithm')} {config.get('model')} {config.get('dataset')} s{config.get('seed')}"


def _seconds_between(start: Any, end: Any) -> float | None:
    try:
        return (datetime.fromisoformat(str(end)) - datetime.fromisoformat(str(start))).total_seconds()
    except (TypeError, ValueError):
        return None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def run_row(files: RunFiles, now: float | None = None) -> RunRow:
    """The row of one inspected run directory."""
    now = time.time() if now is None else now
    name = files.run_dir.name
    if files.record is not None:
        record = files.record
        curves = record.get("curves") or []
        return RunRow(
            run=_label(record, name), run_id=name, state=files.state, epoch=_int(record.get("epochs_run")),
            val_accuracy=_number(curves[-1].get("val_accuracy")) if curves else None,
            test_accuracy=_number(record.get("test_accuracy")), detail=str(record.get("reason") or ""),
            duration_s=_seconds_between(record.get("started_at"), record.get("finished_at")), run_dir=str(files.run_dir),
        )
    history = files.history
    row = RunRow(run=_label(files.config, name), run_id=name, state=files.state, run_dir=str(files.run_dir))
    if files.state == "unreadable":
        row.detail = files.reason or "unreadable"
        return row
    if history is not None:
        last_epoch = history.last_epoch or {}
        last = history.last or {}
        start = history.start or {}
        if not files.config and isinstance(last.get("run"), str):
            row.run = last["run"]
        row.epoch = _int(last_epoch.get("epochs_run")) or 0
        row.total_epochs = _int(last.get("total_epochs")) or _int(last_epoch.get("total_epochs")) or _int(start.get("total_epochs"))
        curve = last_epoch.get("curve")
        row.val_accuracy = _number(curve.get("val_accuracy")) if isinstance(curve, dict) else None
        when = _number(last.get("time"))
        row.updated_s = max(0.0, now - when) if when is not None else None
        if files.state == "running":
            eta = _number(last.get("eta_s")) if last.get("event") in ("epoch", "heartbeat") else None
            row.eta_s = max(0.0, eta - (row.updated_s or 0.0)) if eta is not None else None
            parts = []
            if last.get("event") == "heartbeat" and _int(last.get("step")) is not None:
                rate = _number(last.get("steps_per_s"))
                parts.append(f"epoch {row.epoch + 1}: step {last.get('step')}/{last.get('steps')}" + (f" at {rate:.1f}/s" if rate else ""))
            if start.get("host"):
                parts.append(f"pid {start.get('pid')} on {start.get('host')}")
            row.detail = ", ".join(parts)
    elif files.state == "running":
        row.detail = "starting"
    if files.state in ("interrupted", "failed"):
        row.resumable = files.resumable
        how = "resumable (checkpoint)" if files.resumable else "no checkpoint: a resume starts it over"
        row.detail = f"{files.reason}; {how}" if files.state == "failed" else how
    return row


@dataclass
class StatusReport:
    """Every run under a directory and the set's summary."""

    directory: Path
    rows: list[RunRow] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    eta_s: float | None = None  # of the whole set (see summary_line)
    eta_basis: str = ""

    @property
    def done(self) -> int:
        return sum(self.counts.get(s, 0) for s in DONE)

    @property
    def running(self) -> int:
        return self.counts.get("running", 0)

    @property
    def failed(self) -> int:
        return sum(self.counts.get(s, 0) for s in FAILED_STATES)

    @property
    def left(self) -> int:
        return sum(self.counts.get(s, 0) for s in LEFT_STATES)

    @property
    def active(self) -> bool:
        """Something may still change by itself: a run is running or queued."""
        return self.running > 0 or self.counts.get("queued", 0) > 0

    def summary_line(self) -> str:
        left = ", ".join(f"{self.counts[s]} {s}" for s in LEFT_STATES if self.counts.get(s))
        text = (f"{len(self.rows)} run{'s' if len(self.rows) != 1 else ''}: {self.done} done, {self.running} running, {self.failed} failed, "
                f"{self.left} left" + (f" ({left})" if left else ""))
        if self.eta_s is not None:
            text += f"; ETA of the set {duration(self.eta_s)} ({self.eta_basis})"
        elif self.left and not self.active:
            text += "; nothing running: rerun the suite or compare (or `bpfree resume DIR`) to continue"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "summary": {"runs": len(self.rows), "done": self.done, "running": self.running, "failed": self.failed, "left": self.left,
                        "by_state": dict(self.counts), "eta_s": self.eta_s, "eta_basis": self.eta_basis or None},
            "runs": [asdict(row) for row in self.rows],
        }


def _set_eta(rows: list[RunRow], left: int) -> tuple[float | None, str]:
    """The whole set's ETA: running runs' ETAs plus the runs left at the mean finished run's wall
    time, shared over as many runs in parallel as run now (rough, and said so)."""
    running = [r for r in rows if r.state == "running"]
    if not running and not any(r.state == "queued" for r in rows):
        return (0.0, "all ended") if not left else (None, "")
    durations = [r.duration_s for r in rows if r.state == "completed" and r.duration_s is not None]
    basis = "each run left as long as the mean finished run"
    if not durations:
        durations = [(r.updated_s or 0.0) + r.eta_s for r in running if r.eta_s is not None and r.epoch]
        basis = "each run left as long as the running ones"
    if left and not durations:
        return None, ""
    mean = sum(durations) / len(durations) if durations else 0.0
    etas = [r.eta_s for r in running if r.eta_s is not None]
    parallel = max(1, len(running))
    eta = (sum(etas) + left * mean) / parallel
    if left == 0 and etas:
        eta = max(etas)
    return eta, f"rough: {len(running)} running in parallel, {basis}" if left else "the slowest running run's"


def scan(directory: Path, now: float | None = None) -> StatusReport:
    """The status of every run under ``directory`` (see the module docstring)."""
    directory = Path(directory)
    now = time.time() if now is None else now
    report = StatusReport(directory)
    seen: set[str] = set()
    for run_dir in find_run_dirs(directory):
        files = inspect_run(run_dir)
        if files.state == "empty":
            marker = _job_marker(run_dir)
            if marker is None:
                continue
            report.rows.append(RunRow(run=run_dir.name, run_id=run_dir.name, state="queued", detail=f"Slurm job {marker}", run_dir=str(run_dir)))
        else:
            report.rows.append(run_row(files, now))
        seen.add(run_dir.name)
    plan = read_plan(directory) if directory.is_dir() else []
    suite_running = probe_lock(directory / LOCK_FILE) == "held"
    for item in plan:
        if item["run_dir"] not in seen:
            state = "queued" if suite_running else "not started"
            report.rows.append(RunRow(run=item["label"], run_id=item["run_dir"], state=state,
                                      detail="planned" if suite_running else "planned; its suite or compare has ended",
                                      run_dir=str(directory / item["run_dir"])))
            seen.add(item["run_dir"])
    for row in report.rows:
        report.counts[row.state] = report.counts.get(row.state, 0) + 1
    report.eta_s, report.eta_basis = _set_eta(report.rows, report.left)
    return report


def _job_marker(run_dir: Path) -> str | None:
    try:
        data = load_json(run_dir / JOB_MARKER)
    except UnreadableFile:
        return None
    job = data.get("job_id")
    return str(job) if isinstance(job, (str, int)) and not isinstance(job, bool) else None


class HistoryFollower:
    """Follows every ``history.jsonl`` under ``root`` from a thread and hands each new row to ``on_row``.

    Histories that exist when it starts are followed from their end (old rows are not replayed);
    ones that appear later from their start. :meth:`stop` reads what is left, then ends the thread.
    """

    def __init__(self, root: Path, on_row: Callable[[dict[str, Any]], None], poll_s: float = 1.0, rescan_s: float = 5.0) -> None:
        self.root, self.on_row, self.poll_s, self.rescan_s = Path(root), on_row, poll_s, rescan_s
        self.offsets: dict[Path, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._scanned = 0.0

    def start(self) -> HistoryFollower:
        for run_dir in find_run_dirs(self.root):
            path = run_dir / HISTORY_FILE
            try:
                self.offsets[path] = path.stat().st_size
            except OSError:
                self.offsets[path] = 0
        self._scanned = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="bpfree-history-follower", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.poll(rescan=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll(rescan=time.monotonic() - self._scanned >= self.rescan_s)

    def poll(self, rescan: bool = False) -> None:
        if rescan:
            self._scanned = time.monotonic()
            for run_dir in find_run_dirs(self.root):
                self.offsets.setdefault(run_dir / HISTORY_FILE, 0)
        for path, offset in list(self.offsets.items()):
            try:
                blob, self.offsets[path] = read_appended(path, offset)
            except UnreadableFile:
                continue
            for line in blob.splitlines():
                try:
                    row = parse_json(line.decode("utf-8"), max_depth=16)
                except (UnicodeDecodeError, ValueError):
                    continue
                if isinstance(row, dict):
                    try:
                        self.on_row(row)
                    except Exception:  # noqa: BLE001 - a broken log stream never stops the runs
                        self._stop.set()
                        return


__all__ = ["HistoryFollower", "RunRow", "StatusReport", "find_run_dirs", "is_run_dir", "run_row", "scan"]
