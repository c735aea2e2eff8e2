"""A run while it trains: the rows of its live history, heartbeats inside long epochs, and the
listeners that follow them (log lines, MLflow, TensorBoard).

:class:`RunWatch` sits between the engine and everything that watches a run. The engine calls it
at the end of each epoch, after the timed training window and the validation have closed, and the
training thread then only builds the epoch's row and queues it; per step it only stores the step
counts it is handed (no I/O, no clock, no device sync, inside the timed window). One writer thread
takes the rows in order, appends each to ``history.jsonl`` (written and fsynced) and only then
hands it to the listeners, so a log line or a tracked metric never gets ahead of the file and the
training thread never waits for a disk or a terminal. When no row was written for
``heartbeat_s`` seconds the writer adds a heartbeat row, so a long epoch shows its steps, rate and
ETA. A listener that fails is dropped with one warning; training goes on.

The row format is documented in :mod:`bpfree.history`; :func:`text_line` and :func:`json_line`
turn a row into one log line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bpfree.errors import WriteError
from bpfree.escape import plain
from bpfree.history import append_row

Listener = Callable[[dict[str, Any]], None]
log = logging.getLogger(__name__)


def _json_safe(value: Any) -> Any:
    """Non-finite floats as null (a row must be strict JSON); containers walked."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class RunWatch:
    """Writes a run's history rows and hands them to listeners; see the module docstring."""

    def __init__(
        self,
        run_dir: Path,
        run_id: str,
        label: str,
        checkpoint: bool,
        heartbeat_s: float,
        progress: Callable[[dict[str, Any]], None] | None = None,
        step_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_id = run_id
        self.label = label
        self.checkpoint = checkpoint
        self.heartbeat_s = heartbeat_s
        self.progress = progress
        self.step_progress = step_progress
        self.listeners: list[Listener] = []
        self.total_epochs: int | None = None
        self._rows: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._started = 0.0  # monotonic time of start()
        self._last_row = 0.0  # monotonic time of the latest row
        self._epoch_started = 0.0  # monotonic time the current epoch began (the previous row's end)
        self._epochs_before: int | None = None  # epochs done before this attempt (a resume)
        self._epochs_run = 0
        self._phase: str | None = None
        self._step: dict[str, Any] | None = None  # the latest step event (set on the training thread)
        self._rate_mark: tuple[int, int, float] | None = None  # (epochs_run, step, time) of the last heartbeat
        self._history_failed = False

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, total_epochs: int, resumed: bool, listeners: Sequence[Listener] = (), device: str | None = None) -> None:
        self.total_epochs = total_epochs
        self.listeners = [listener for listener in listeners if listener is not None]
        self._started = self._last_row = self._epoch_started = time.monotonic()
        self._thread = threading.Thread(target=self._write_rows, name=f"bpfree-history-{self.run_id}", daemon=True)
        self._thread.start()
        self._emit({
            "event": "start", "total_epochs": total_epochs, "checkpoint": self.checkpoint, "resumed": resumed,
            "pid": os.getpid(), "host": socket.gethostname(), "device": device, "heartbeat_s": self.heartbeat_s,
        })

    def end(self, status: str, reason: str | None = None, test_accuracy: float | None = None, epochs_run: int | None = None,
            timeout_s: float = 30.0) -> None:
        """The run's last row (after result.json, when there is one); waits (bounded) until every row is written."""
        self._emit({
            "event": "end", "status": status, "reason": reason, "epochs_run": self._epochs_run if epochs_run is None else epochs_run,
            "elapsed_s": time.monotonic() - self._started, "test_accuracy": test_accuracy,
        })
        self._rows.put(None)
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            if self._thread.is_alive():
                log.warning("history of %s: rows still unwritten after %.0f s (a slow disk?)", plain(self.run_id, one_line=True), timeout_s)

    # -- engine callbacks (training thread) -----------------------------------------------------
    def on_step(self, info: dict[str, Any]) -> None:
        """Inside the timed window: keep the counts, nothing else (the writer reads them for heartbeats)."""
        self._step = info
        if self.step_progress is not None:
            self.step_progress(info)

    def on_epoch(self, info: dict[str, Any]) -> None:
        """After an epoch's training window and validation: its row queued for the writer."""
        now = time.monotonic()
        epochs_run = int(info["epochs_run"])
        total = int(info.get("total_epochs") or self.total_epochs or epochs_run)
        if self._epochs_before is None:
            self._epochs_before = epochs_run - 1
        elapsed = now - self._started
        per_epoch = elapsed / max(1, epochs_run - self._epochs_before)
        curve = info.get("curve")
        if not isinstance(curve, dict):  # an engine without the curve in its event: the fields it has
            curve = {"phase": info.get("phase"), "epoch": epochs_run, "train_loss": info.get("train_loss"), "val_accuracy": info.get("val_accuracy")}
        peak = curve.get("peak_memory_bytes", info.get("peak_memory_bytes"))
        self._epochs_run, self._phase = epochs_run, info.get("phase")
        self._emit({
            "event": "epoch", "epochs_run": epochs_run, "total_epochs": total, "phase": info.get("phase"),
            "epoch": info.get("epoch"), "elapsed_s": elapsed, "eta_s": per_epoch * max(0, total - epochs_run),
            "status": "running", "checkpoint": self.checkpoint, "peak_memory_bytes": peak, "curve": curve,
        })
        self._epoch_started = time.monotonic()
        if self.progress is not None:
            self.progress(info)

    def _emit(self, fields: dict[str, Any]) -> None:
        """Queue a row (a copy: the engine keeps mutating its own dicts) for the writer."""
        self._last_row = time.monotonic()
        self._rows.put(_json_safe({"event": fields["event"], "time": time.time(), "run_id": self.run_id, "run": self.label, **fields}))

    # -- the writer thread ----------------------------------------------------------------------
    def _write_rows(self) -> None:
        while True:
            wait = self._last_row + self.heartbeat_s - time.monotonic() if self.heartbeat_s > 0 else None
            try:
                row = self._rows.get(timeout=max(0.01, wait) if wait is not None else None)
            except queue.Empty:
                if time.monotonic() >= self._last_row + self.heartbeat_s:
                    self._last_row = time.monotonic()
                    self._write(_json_safe({"event": "heartbeat", "time": time.time(), "run_id": self.run_id, "run": self.label,
                                            **self._heartbeat_row()}))
                continue
            if row is None:
                return
            self._write(row)

    def _heartbeat_row(self) -> dict[str, Any]:
        now = time.monotonic()
        info = self._step
        row: dict[str, Any] = {
            "event": "heartbeat", "epochs_run": self._epochs_run, "total_epochs": self.total_epochs,
            "phase": self._phase, "step": None, "steps": None, "steps_per_s": None, "elapsed_s": now - self._started, "eta_s": None,
        }
        if info is None or int(info["epochs_run"]) < self._epochs_run:  # no step yet in this epoch
            return row
        epochs_run, step, steps = int(info["epochs_run"]), int(info["step"]), int(info["steps"])
        mark = self._rate_mark
        if mark is None or mark[0] != epochs_run or mark[1] > step:
            mark = (epochs_run, 0, max(self._epoch_started, self._started))
        rate = (step - mark[1]) / (now - mark[2]) if now > mark[2] and step > mark[1] else None
        self._rate_mark = (epochs_run, step, now)
        total = int(info.get("total_epochs") or self.total_epochs or epochs_run + 1)
        row.update(epochs_run=epochs_run, total_epochs=total, phase=info.get("phase"), step=step, steps=steps, steps_per_s=rate)
        if rate:
            row["eta_s"] = (steps - step) / rate + max(0, total - epochs_run - 1) * steps / rate
        return row

    def _write(self, row: dict[str, Any]) -> None:
        """On the writer thread: the history first (durable), then each listener."""
        if not self._history_failed:
            try:
                append_row(self.run_dir, row)
            except WriteError as exc:  # a full disk: the run goes on; result.json stays the record
                self._history_failed = True
                log.warning("%s; no more history rows for this run (training goes on)", plain(exc, one_line=True))
        for listener in list(self.listeners):
            try:
                listener(row)
            except Exception as exc:  # noqa: BLE001 - a watcher never stops the run
                self.listeners.remove(listener)
                log.warning("stopped following the run with %s: %s", type(listener).__name__, plain(exc, one_line=True)[:300])


# -- log lines --------------------------------------------------------------------------------------
def duration(seconds: Any) -> str:
    """42s, 12m05s, 3h02m; '?' when unknown."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = int(round(seconds))
    if whole < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _number(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def _mib(value: Any) -> str:
    return f"{value / 2**20:.0f} MiB" if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def _epochs(done: Any, total: Any) -> str:
    return f"{done if isinstance(done, int) else '?'}/{total if isinstance(total, int) else '?'}"


def text_line(row: dict[str, Any]) -> str:
    """One plain log line for a history row: time, run label, then ``|``-separated fields.

    Every string that came from the run (label, phase, reason, host) is escaped for a plain
    line and kept on one line.
    """
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row.get("time") or time.time()))
    event = row.get("event")
    phase = plain(row.get("phase") or "-", one_line=True)
    if event == "epoch":
        curve = row.get("curve") or {}
        parts = [
            f"{phase} epoch {_epochs(row.get('epochs_run'), row.get('total_epochs'))}",
            f"loss {_number(curve.get('train_loss'), '.4f')}",
            f"val {_number(curve.get('val_accuracy'), '.4f')}",
            f"epoch {duration(curve.get('epoch_time_s'))}",
            f"elapsed {duration(row.get('elapsed_s'))}",
            f"ETA {duration(row.get('eta_s'))}",
            f"peak {_mib(row.get('peak_memory_bytes'))}",
        ]
    elif event == "heartbeat":
        done, total = row.get("epochs_run"), row.get("total_epochs")
        if row.get("step") is None:  # between epochs: setting up, validating, checkpointing, or closing the run
            where = "setting up" if not done else "closing the run" if done == total else f"after epoch {_epochs(done, total)}"
            parts = [where, f"elapsed {duration(row.get('elapsed_s'))}"]
        else:
            parts = [
                f"{phase} epoch {_epochs(done + 1 if isinstance(done, int) else None, total)} in progress",
                f"step {_epochs(row.get('step'), row.get('steps'))}",
                f"{_number(row.get('steps_per_s'), '.1f')} steps/s",
                f"elapsed {duration(row.get('elapsed_s'))}",
                f"ETA {duration(row.get('eta_s'))}",
            ]
    elif event == "start":
        parts = [
            "resumed" if row.get("resumed") else "started",
            f"{row.get('total_epochs')} epochs",
            f"checkpoints {'on' if row.get('checkpoint') else 'off'}",
            f"pid {row.get('pid')} on {plain(row.get('host'), one_line=True)}",
        ]
    else:
        parts = [
            plain(row.get("status") or event, one_line=True),
            f"test {_number(row.get('test_accuracy'), '.4f')}",
            f"{row.get('epochs_run')} epochs",
            f"elapsed {duration(row.get('elapsed_s'))}",
        ]
        if row.get("reason"):
            parts.append(plain(row["reason"], one_line=True))
    return f"{stamp} {plain(row.get('run', '?'), one_line=True)} | " + " | ".join(parts)


def json_line(row: dict[str, Any]) -> str:
    """The row itself as one JSON line (control characters escaped by JSON)."""
    return json.dumps(row, allow_nan=False, separators=(",", ":"))


__all__ = ["Listener", "RunWatch", "duration", "json_line", "text_line"]
