"""A run directory while it trains: its live history (``history.jsonl``) and its lock.

``history.jsonl`` is appended as the run goes, one JSON object per line, each line flushed and
fsynced (:func:`bpfree.fileio.append_line`), whether checkpoints are on or off; a kill can tear
only the last line, which readers skip. Every row has ``event``, ``time`` (Unix seconds),
``run_id`` and ``run`` (the run's label); by event:

- ``start``: ``total_epochs``, ``checkpoint`` (whether checkpoints are written), ``resumed``
  (a checkpoint was there to continue from), ``pid``, ``host``, ``device``, ``heartbeat_s``;
- ``epoch``: a finished epoch: ``epochs_run``, ``total_epochs``, ``phase``, ``epoch`` (in its
  phase), ``elapsed_s`` (wall time of this attempt), ``eta_s`` (of the run, at the mean epoch
  time so far, all epochs assumed: early stopping can only shorten it), ``status`` ("running"),
  ``checkpoint``, and ``curve``: the curve row that ``result.json`` will hold for this epoch;
- ``heartbeat``: inside a long epoch: ``epochs_run``, ``total_epochs``, ``phase``, ``step``,
  ``steps``, ``steps_per_s``, ``elapsed_s``, ``eta_s``;
- ``end``: ``status`` (completed, diverged, failed, interrupted), ``reason``, ``epochs_run``,
  ``elapsed_s``, ``test_accuracy``.

A resumed run appends to the same file; its epochs replace those of an earlier attempt from the
epoch it resumed at (:func:`read_history` keeps the latest row per epoch), and a run that starts
over without a checkpoint voids the earlier epochs.

The lock (``.bpfree-run.lock``) is held with ``flock`` by the process that trains the run and
released by the kernel when that process ends, however it ends: :func:`lock_state` tells a run
that is training from one that was killed (a lock file nobody holds is stale).
"""

from __future__ import annotations

import fcntl
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bpfree.errors import UnreadableFile
from bpfree.fileio import append_line, json_bytes, read_jsonl

HISTORY_FILE = "history.jsonl"
RUN_LOCK_FILE = ".bpfree-run.lock"
EVENTS = ("start", "epoch", "heartbeat", "end")
DEFAULT_HEARTBEAT_S = 60.0
# The heartbeat interval of runs started without one (suite and compare workers, tune trials).
HEARTBEAT_ENV = "BPFREE_HEARTBEAT_S"

LockState = Literal["held", "free", "absent", "unknown"]


def heartbeat_interval(value: float | None = None) -> float:
    """``value``, else $BPFREE_HEARTBEAT_S, else 60 s; 0 switches heartbeats off."""
    if value is not None:
        return max(0.0, float(value))
    try:
        return max(0.0, float(os.environ.get(HEARTBEAT_ENV, DEFAULT_HEARTBEAT_S)))
    except ValueError:
        return DEFAULT_HEARTBEAT_S


def append_row(run_dir: Path, row: dict[str, Any]) -> None:
    """Append one row (flushed and fsynced); raises :class:`bpfree.errors.WriteError` naming the file."""
    append_line(Path(run_dir) / HISTORY_FILE, json_bytes(row, indent=None).decode())


@dataclass
class History:
    """What a run's history says: its epochs (latest attempt wins) and its latest start, row and end."""

    epochs: list[dict[str, Any]] = field(default_factory=list)
    start: dict[str, Any] | None = None  # the latest start row
    last: dict[str, Any] | None = None  # the latest row of any event
    end: dict[str, Any] | None = None  # the end row of the latest attempt, if it ended
    torn_tail: bool = False
    bad_lines: list[int] = field(default_factory=list)

    @property
    def last_epoch(self) -> dict[str, Any] | None:
        return self.epochs[-1] if self.epochs else None

    @property
    def curves(self) -> list[dict[str, Any]]:
        return [row["curve"] for row in self.epochs if isinstance(row.get("curve"), dict)]


def _epoch_number(row: dict[str, Any]) -> int | None:
    value = row.get("epochs_run")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def parse_history(rows: list[dict[str, Any]]) -> History:
    """Fold rows into a :class:`History` (rows of unknown events and malformed epoch rows are ignored)."""
    history = History()
    for row in rows:
        event = row.get("event")
        if event not in EVENTS:
            continue
        history.last = row
        if event == "start":
            history.start, history.end = row, None
            if row.get("resumed") is False:  # started over (no checkpoint): earlier epochs are void
                history.epochs.clear()
        elif event == "end":
            history.end = row
        elif event == "epoch":
            number = _epoch_number(row)
            if number is None:
                continue
            # a resumed attempt repeats epochs after its checkpoint: its rows replace the earlier ones
            while history.epochs and (_epoch_number(history.epochs[-1]) or 0) >= number:
                history.epochs.pop()
            history.epochs.append(row)
    return history


def read_history(run_dir: Path) -> History | None:
    """The run's history, or None when it has none; a malformed file raises :class:`UnreadableFile`."""
    path = Path(run_dir) / HISTORY_FILE
    if not os.path.lexists(path):
        return None
    lines = read_jsonl(path)
    history = parse_history(lines.records)
    history.torn_tail, history.bad_lines = lines.torn_tail, lines.bad_lines
    return history


def lock_state(run_dir: Path) -> LockState:
    """Whether a process holds the run's lock: held, free (stale: its holder is gone), absent, or unknown."""
    return probe_lock(Path(run_dir) / RUN_LOCK_FILE)


def probe_lock(path: Path) -> LockState:
    """Whether a process holds an ``flock`` on ``path`` (a run's or a suite's lock file).

    Probed with a shared non-blocking ``flock`` taken and dropped at once on a read-only
    descriptor (so it works on a read-only copy); ``unknown`` where the file system has no
    ``flock`` or the file is not a regular file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return "absent"
    except OSError:
        return "unknown"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "unknown"
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return "held"
        except OSError:
            return "unknown"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return "free"
    finally:
        os.close(fd)


def process_alive(pid: Any) -> bool | None:
    """Whether a process of this host with ``pid`` exists (None if that cannot be told)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return None
    return True


__all__ = [
    "DEFAULT_HEARTBEAT_S", "EVENTS", "HEARTBEAT_ENV", "HISTORY_FILE", "RUN_LOCK_FILE", "History", "LockState", "UnreadableFile",
    "append_row", "heartbeat_interval", "lock_state", "parse_history", "probe_lock", "process_alive", "read_history",
]
