"""Live tracking of a run in MLflow (``--mlflow URI``) and TensorBoard (``--tensorboard DIR``).

Both follow the run's history rows (:mod:`bpfree.live`) on one thread of their own: the training
thread only puts rows on a queue, so a slow or unreachable server never slows training. Each
epoch is logged as it ends (the curve row's numbers, step = epochs run); the run's end sets the
MLflow run's status: FINISHED for a completed run, FAILED for a diverged or failed one, KILLED for
an interrupted one. A failure (server down, disk full, a store MLflow refuses) is one warning,
after which that tracker stops and the run goes on; ``result.json`` stays the record.

Where a run is tracked is kept in ``tracking.json`` in its directory (the MLflow tracking URI,
experiment and run id; the TensorBoard log folder), so a resumed run continues the same MLflow
run and the same TensorBoard folder.

MLflow and TensorBoard are optional dependencies, imported on the tracking thread only when asked for.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import math
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from bpfree.errors import UnreadableFile, UserError
from bpfree.escape import plain
from bpfree.fileio import atomic_write_json, ensure_writable_dir, load_json, printable_path
from bpfree.results import RESULT_FILE

TRACKING_FILE = "tracking.json"
EXPERIMENT = "bpfree"
FINAL_METRICS = ("test_accuracy", "best_val_accuracy", "final_val_accuracy", "train_time_s", "eval_time_s", "train_flops",
                 "peak_memory_bytes", "energy_j", "epochs_run")
# MLflow's own HTTP retries (7 with exponential backoff, 120 s timeout) took 253 s to give up on an
# unreachable server; these bound them (a user's own settings win).
# MLflow's INFO lines (database set-up) would interleave with the run's log lines.
MLFLOW_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                   "MLFLOW_LOGGING_LEVEL": "WARNING"}
MLFLOW_STATUS = {"completed": "FINISHED", "diverged": "FAILED", "failed": "FAILED", "interrupted": "KILLED"}
MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value
log = logging.getLogger(__name__)
THREAD_PREFIX = "bpfree-tracking-"


class _OwnRetries(logging.Filter):
    """Drop urllib3's per-retry warnings raised on a tracking thread: the tracker warns once itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.threadName or "").startswith(THREAD_PREFIX)


_RETRY_FILTER = _OwnRetries()


@dataclass(frozen=True)
class TrackingOptions:
    """Where to track a run: an MLflow tracking URI and/or a TensorBoard folder (runs log to <folder>/<run_id>)."""

    mlflow: str | None = None
    tensorboard: Path | None = None
    experiment: str = EXPERIMENT

    def __bool__(self) -> bool:
        return bool(self.mlflow or self.tensorboard)


def _mlflow_version() -> str | None:
    for dist in ("mlflow", "mlflow-skinny"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _file_store_allowed() -> bool:
    version = _mlflow_version() or "0"
    major = int(version.split(".", 1)[0]) if version.split(".", 1)[0].isdigit() else 0
    return major < 3 or os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() in ("1", "true", "yes")


def check_mlflow_uri(uri: str, flag: str = "--mlflow") -> str:
    """A tracking URI MLflow will accept, relative paths made absolute (a resume from another folder
    finds the same store); every problem is one :class:`UserError` line."""
    text = uri.strip()
    if not text:
        raise UserError(f"{flag}: empty tracking URI; give one such as sqlite:///mlflow.db or http://HOST:5000")
    if importlib.util.find_spec("mlflow") is None:
        raise UserError(f"{flag} needs MLflow: pip install 'bpfree[mlflow]'")
    parsed = urlparse(text)
    scheme = parsed.scheme.lower()
    if scheme in ("", "file") or len(scheme) == 1:  # a path or file: URI is MLflow's file store
        if not _file_store_allowed():
            raise UserError(
                f"{flag} {plain(text, one_line=True)}: MLflow {_mlflow_version()} keeps its file store in maintenance mode and "
                f"refuses new runs there; use a database such as sqlite:///mlflow.db, a server (http://HOST:5000), "
                f"or set MLFLOW_ALLOW_FILE_STORE=true"
            )
        path = Path(parsed.path if scheme == "file" else text).expanduser()
        return path.resolve().as_uri()
    if scheme == "sqlite":
        path_text = text[len("sqlite:///"):] if text.lower().startswith("sqlite:///") else ""
        if not path_text or path_text.startswith(":memory:"):
            raise UserError(f"{flag} {plain(text, one_line=True)}: name a database file, e.g. sqlite:///mlflow.db (an in-memory store ends with the run)")
        path = Path(path_text).expanduser()
        if not path.is_absolute():
            path = Path.cwd() / path
        if not path.parent.is_dir():
            raise UserError(f"{flag} {plain(text, one_line=True)}: folder {printable_path(path.parent)} does not exist")
        return "sqlite:///" + str(path)
    return text


def check_options(mlflow: str | None = None, tensorboard: Path | None = None) -> TrackingOptions | None:
    """Validated tracking options (None when nothing is asked for); refusals are one line."""
    uri = check_mlflow_uri(mlflow) if mlflow is not None else None
    folder = None
    if tensorboard is not None:
        if not str(tensorboard).strip():
            raise UserError("--tensorboard: empty folder name")
        if importlib.util.find_spec("tensorboard") is None:
            raise UserError("--tensorboard needs the tensorboard package: pip install 'bpfree[tensorboard]'")
        folder = ensure_writable_dir(Path(tensorboard), "--tensorboard").resolve()
    options = TrackingOptions(uri, folder)
    return options if options else None


def stored_tracking(run_dir: Path) -> dict[str, Any]:
    """What ``tracking.json`` says (empty when absent or unreadable: tracking starts afresh)."""
    try:
        data = load_json(Path(run_dir) / TRACKING_FILE)
    except UnreadableFile:
        return {}
    return data if isinstance(data, dict) else {}


def stored_options(run_dir: Path) -> TrackingOptions | None:
    """The tracking a run was started with, to continue on resume (None when it had none)."""
    stored = stored_tracking(run_dir)

    def text(part: str, key: str) -> str | None:
        section = stored.get(part)
        value = section.get(key) if isinstance(section, dict) else None
        return value if isinstance(value, str) and value else None

    folder = text("tensorboard", "folder")
    options = TrackingOptions(text("mlflow", "tracking_uri"), Path(folder) if folder else None, text("mlflow", "experiment") or EXPERIMENT)
    return options if options else None


def _flat(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(f"{name}.", value))
        else:
            flat[name] = value
    return flat


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def curve_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of an epoch row's curve (the epoch index itself is the step)."""
    curve = row.get("curve") or {}
    return {k: float(v) for k, v in curve.items() if k != "epoch" and _finite(v)}


class _MlflowSink:
    name = "MLflow"

    def __init__(self, tracking: Tracking, options: TrackingOptions) -> None:
        self.tracking, self.uri, self.experiment = tracking, options.mlflow, options.experiment
        self.client: Any = None
        self.run_id: str | None = None

    def open(self) -> None:
        for name, value in MLFLOW_DEFAULTS.items():
            os.environ.setdefault(name, value)
        from mlflow.tracking import MlflowClient  # optional dependency, on the tracking thread only

        self.client = MlflowClient(tracking_uri=self.uri)
        stored = self.tracking.stored.get("mlflow") or {}
        if stored.get("tracking_uri") == self.uri and isinstance(stored.get("run_id"), str):
            self.run_id = stored["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")  # a resumed run continues its MLflow run
            return
        experiment = self.client.get_experiment_by_name(self.experiment)
        experiment_id = experiment.experiment_id if experiment is not None else self.client.create_experiment(self.experiment)
        cfg = self.tracking.config
        tags = {"bpfree.run_id": self.tracking.run_id, **{f"bpfree.{k}": str(cfg.get(k)) for k in ("algorithm", "dataset", "model", "seed")}}
        run = self.client.create_run(experiment_id, run_name=self.tracking.run_id, tags=tags)
        self.run_id = run.info.run_id
        self.tracking.remember("mlflow", {"tracking_uri": self.uri, "experiment": self.experiment, "experiment_id": experiment_id, "run_id": self.run_id})
        from mlflow.entities import Param  # optional dependency, on the tracking thread only

        params = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in _flat("", cfg).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def epoch(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric  # optional dependency, on the tracking thread only

        stamp, step = int(row["time"] * 1000), int(row["epochs_run"])
        metrics = [Metric(k, v, stamp, step) for k, v in curve_metrics(row).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def end(self, status: str, result: dict[str, Any] | None) -> None:
        if result:
            final = {k: float(result[k]) for k in FINAL_METRICS if _finite(result.get(k))}
            for key, value in final.items():
                self.client.log_metric(self.run_id, key, value)
            result_path = self.tracking.run_dir / RESULT_FILE
            if result_path.is_file():
                self.client.log_artifact(self.run_id, str(result_path))
        self.client.set_tag(self.run_id, "bpfree.status", status)
        self.client.set_terminated(self.run_id, status=MLFLOW_STATUS.get(status, "FAILED"))


class _TensorBoardSink:
    name = "TensorBoard"

    def __init__(self, tracking: Tracking, options: TrackingOptions) -> None:
        assert options.tensorboard is not None
        self.tracking, self.folder = tracking, Path(options.tensorboard)
        self.writer: Any = None

    def open(self) -> None:
        from torch.utils.tensorboard import SummaryWriter  # optional dependency (the tensorboard package)

        log_dir = self.folder / self.tracking.run_id
        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.tracking.remember("tensorboard", {"folder": str(self.folder), "log_dir": str(log_dir)})

    def epoch(self, row: dict[str, Any]) -> None:
        step = int(row["epochs_run"])
        for key, value in curve_metrics(row).items():
            self.writer.add_scalar(key, value, global_step=step, walltime=row["time"])
        self.writer.flush()

    def end(self, status: str, result: dict[str, Any] | None) -> None:
        for key in FINAL_METRICS:
            if result and _finite(result.get(key)):
                self.writer.add_scalar(f"final/{key}", float(result[key]), global_step=int(result.get("epochs_run") or 0))
        self.writer.add_text("status", status)
        self.writer.close()


class Tracking:
    """The trackers of one run, fed from a queue on one daemon thread (see the module docstring).

    Call it with each history row (a :data:`bpfree.live.Listener`); :meth:`close` ends the tracked
    runs with the run's status and waits a bounded time for the thread.
    """

    def __init__(self, run_dir: Path, run_id: str, config: dict[str, Any], options: TrackingOptions) -> None:
        self.run_dir, self.run_id, self.config = Path(run_dir), run_id, config
        self.stored = stored_tracking(run_dir)
        self.sinks: list[Any] = []
        if options.mlflow:
            self.sinks.append(_MlflowSink(self, options))
        if options.tensorboard:
            self.sinks.append(_TensorBoardSink(self, options))
        self._queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        retry_log = logging.getLogger("urllib3.connectionpool")
        if _RETRY_FILTER not in retry_log.filters:
            retry_log.addFilter(_RETRY_FILTER)
        self._thread = threading.Thread(target=self._work, name=f"{THREAD_PREFIX}{run_id}", daemon=True)
        self._thread.start()

    def __call__(self, row: dict[str, Any]) -> None:
        if row.get("event") == "epoch":
            self._queue.put(("epoch", row))

    def close(self, status: str, result: dict[str, Any] | None = None, timeout_s: float = 60.0) -> None:
        self._queue.put(("end", (status, result)))
        self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            names = ", ".join(sink.name for sink in self.sinks)
            log.warning("%s tracking of %s still busy after %.0f s; left unfinished (result.json is the record)", names, self.run_id, timeout_s)

    def remember(self, key: str, value: dict[str, Any]) -> None:
        """Record in tracking.json where this run is tracked (so a resume continues there)."""
        self.stored = {**self.stored, key: value}
        atomic_write_json(self.run_dir / TRACKING_FILE, self.stored)

    def _work(self) -> None:
        live = [sink for sink in self.sinks if self._attempt(sink, "open", ())]
        while True:
            kind, payload = self._queue.get()
            arguments = (payload,) if kind == "epoch" else payload
            live = [sink for sink in live if self._attempt(sink, kind, arguments)]
            if kind == "end":
                return

    def _attempt(self, sink: Any, method: str, arguments: tuple[Any, ...]) -> bool:
        try:
            getattr(sink, method)(*arguments)
            return True
        except Exception as exc:  # noqa: BLE001 - any tracker failure: warn once, never stop the run
            first = plain(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, one_line=True)
            log.warning("%s tracking stopped for %s: %s; training goes on and result.json stays the record",
                        sink.name, self.run_id, first if len(first) <= 240 else first[:239] + "…")
            return False


__all__ = ["TRACKING_FILE", "Tracking", "TrackingOptions", "check_mlflow_uri", "check_options", "stored_options", "stored_tracking"]
