"""Result records: unique run ids, atomic writes, and reading a results directory (and its telemetry) back."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from bpfree.config import RunConfig, build_config
from bpfree.errors import UnreadableFile, UserError
from bpfree.fileio import MAX_CONFIG_BYTES, MAX_RESULT_BYTES, MAX_TABLE_BYTES, atomic_write, load_json, printable_path, read_bounded
from bpfree.history import HISTORY_FILE, History, LockState, lock_state, process_alive, read_history
from bpfree.meters.telemetry import COLUMNS as TELEMETRY_COLUMNS
from bpfree.meters.telemetry import TELEMETRY_FILE

RESULT_FILE = "result.json"
CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
SCHEMA_VERSION = 1


MODEL_ID_CHARS = 32  # the model part of a run id; longer specs are cut and hashed


def model_id(spec: str) -> str:
    """The model spec as a short folder-name part: [a-z0-9.=-] only, cut and hashed when long."""
    text = re.sub(r"[^a-z0-9.=-]+", "-", spec.lower().replace(":", "").replace(",", "-")).strip("-.") or "model"
    if len(text) <= MODEL_ID_CHARS:
        return text
    digest = hashlib.sha256(spec.encode()).hexdigest()[:8]
    return f"{text[: MODEL_ID_CHARS - 9].rstrip('-.')}-{digest}"


def new_run_id(cfg: RunConfig) -> str:
    """algorithm-dataset-model-seed-key-time-random: unique across seeds, processes and machines."""
    model = model_id(cfg.model)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{cfg.algorithm}-{cfg.dataset}-{model}-s{cfg.seed}-{cfg.key()[:8]}-{stamp}-{secrets.token_hex(3)}"


def atomic_torch_save(path: Path, obj: Any) -> None:
    # Serialised in memory first, so a full disk surfaces as an OSError from the file write
    # (torch's own writer reports it as an opaque "unexpected pos" RuntimeError).
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    blob = buffer.getbuffer()
    atomic_write(path, lambda handle: handle.write(blob))


# -- the result record schema: what readers (report, compare, suite) may rely on ----------------------
_RECORD = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)
Share = Field(None, ge=0, le=1)
NonNegative = Field(None, ge=0)


class CurveRecord(BaseModel):
    """One evaluation point of a run's curve (records written before points carried costs have only the first fields)."""

    model_config = _RECORD
    phase: str | None = None
    epoch: int | None = Field(None, ge=0)
    train_loss: float | None = None
    val_accuracy: float | None = Share
    epoch_time_s: float | None = NonNegative
    eval_time_s: float | None = NonNegative
    energy_j: float | None = NonNegative
    cumulative_train_time_s: float | None = NonNegative
    cumulative_energy_j: float | None = NonNegative
    point: Literal["epoch", "interval"] | None = None
    epoch_progress: float | None = NonNegative
    cumulative_train_flops: float | None = NonNegative
    cumulative_steps: int | None = Field(None, ge=0)
    cumulative_samples: int | None = Field(None, ge=0)
    train_accuracy: float | None = Share
    peak_memory_bytes: float | None = NonNegative


class ConfigRecord(BaseModel):
    """The stored config: the fields reports group, sort and pair by."""

    model_config = _RECORD
    algorithm: str | None = None
    dataset: str | None = None
    model: str | None = None
    epochs: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)
    patience: int | None = Field(None, ge=1)
    val_fraction: float | None = Field(None, gt=0, lt=1)
    device: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class ResultRecord(BaseModel):
    """A ``result.json`` as readers may rely on it; anything else is a malformed record, skipped and named."""

    model_config = _RECORD
    run_id: str = Field(min_length=1)
    status: str = Field(min_length=1)
    reason: str | None = None
    algorithm: str = Field(min_length=1)
    dataset: str = Field(min_length=1)
    model: str = Field(min_length=1)
    seed: int = Field(ge=0)
    config: ConfigRecord
    config_key: str | None = None
    test_accuracy: float | None = Share
    best_val_accuracy: float | None = Field(None, ge=-1, le=1)
    epochs_run: int = Field(0, ge=0)
    curves: list[CurveRecord] = Field(default_factory=list)
    train_time_s: float = Field(ge=0)
    eval_time_s: float = Field(0.0, ge=0)
    train_flops: float | None = NonNegative
    eval_flops: float | None = NonNegative
    peak_memory_bytes: float | None = NonNegative
    energy_j: float | None = NonNegative
    eval_energy_j: float | None = NonNegative
    energy_method: str | None = None
    energy_reason: str | None = None
    memory_method: str | None = None
    paper: str | None = None
    deviations: list[str] = Field(default_factory=list)
    environment: dict[str, Any] = Field(default_factory=dict)
    resumed: bool = False

    @model_validator(mode="before")
    @classmethod
    def _utf8_text(cls, data: Any) -> Any:
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except (TypeError, ValueError, UnicodeEncodeError):
            raise ValueError("holds text that is not valid UTF-8") from None
        return data


def check_record(record: Any) -> str | None:
    """None for a record that follows the schema, else one line saying what is wrong."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    try:
        ResultRecord.model_validate(record)
    except ValidationError as exc:
        problems = []
        for item in exc.errors()[:3]:
            where = ".".join(str(p) for p in item["loc"]) or "record"
            problems.append(f"{where}: {item['msg']}")
        return "; ".join(problems).encode("ascii", "backslashreplace").decode()
    return None


@dataclass
class ResultSet:
    """The valid records of a results directory, and the files that were skipped with the reason."""

    records: list[dict[str, Any]]
    rejected: list[tuple[Path, str]]

    def rejected_note(self) -> str | None:
        """One line naming every skipped run directory and why."""
        if not self.rejected:
            return None
        shown = "; ".join(f"{printable_path(Path(p.parent.name))}/{RESULT_FILE} ({why})" for p, why in self.rejected)
        return f"skipped {len(self.rejected)} malformed result record(s), not counted: {shown}"


def read_results(directory: Path, unfinished: bool = True) -> ResultSet:
    """Every result.json under ``directory``, checked against the schema (files are never rewritten).

    With ``unfinished`` (the default), a run directory without a result (config.json, maybe a
    history) is read too, as a record of what its files show (:func:`unfinished_record`): status
    ``running``, ``interrupted`` or ``failed``, with its curves and last epoch, and no test accuracy.
    """
    records: list[dict[str, Any]] = []
    rejected: list[tuple[Path, str]] = []
    for path in sorted(Path(directory).glob(f"*/{RESULT_FILE}")):
        try:
            record = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            rejected.append((path, f"unreadable: {type(exc).__name__}"))
            continue
        problem = check_record(record)
        if problem is None:
            records.append(record)
        else:
            rejected.append((path, problem))
    if unfinished:
        for path in sorted(Path(directory).glob(f"*/{CONFIG_FILE}")):
            if os.path.lexists(path.parent / RESULT_FILE):
                continue
            files = inspect_run(path.parent)
            record = unfinished_record(files) if files.state in UNFINISHED else None
            problem = files.reason if record is None else check_record(record)
            if problem is None and record is not None:
                records.append(record)
            else:
                rejected.append((path.parent / RESULT_FILE, f"unfinished run, unreadable: {problem}"))
    return ResultSet(records, rejected)


# -- runs without a result: what their files show ----------------------------------------------------
UNFINISHED = ("running", "interrupted", "failed")


@dataclass
class RunFiles:
    """What a run directory's files say about its run, read without touching them.

    ``state``: the result's status when ``result.json`` exists (completed, diverged); else
    ``running`` (a process holds the run's lock), ``failed`` (its last attempt ended with an
    error, the reason kept), ``interrupted`` (killed or stopped: nobody holds the lock, a stale
    lock file included); ``unreadable`` (``reason`` says why) or ``empty`` (none of a run's files).
    """

    run_dir: Path
    state: str
    record: dict[str, Any] | None = None  # result.json
    config: dict[str, Any] | None = None  # config.json's stored config
    history: History | None = None
    resumable: bool = False  # a checkpoint is there to continue from
    reason: str | None = None
    lock: LockState = "absent"


def _alive_elsewhere(history: History | None) -> bool:
    """Where flock cannot tell (file systems without it): the process named by the latest start
    row, on this host; on another host, rows newer than three heartbeats (or ten minutes)."""
    start = history.start if history is not None else None
    if history is None or start is None or (history.end is not None):
        return False
    if start.get("host") == socket.gethostname():
        alive = process_alive(start.get("pid"))
        if alive is not None:
            return alive
    last = history.last or start
    beat, when = start.get("heartbeat_s"), last.get("time")
    beat = float(beat) if isinstance(beat, (int, float)) else 0.0
    when = float(when) if isinstance(when, (int, float)) else 0.0
    return time.time() - when < max(600.0, 3 * beat)


def inspect_run(run_dir: Path) -> RunFiles:
    """A run directory's state from its files alone (see :class:`RunFiles`); never raises for a bad file."""
    run_dir = Path(run_dir)
    result_path = run_dir / RESULT_FILE
    if os.path.lexists(result_path):
        try:
            record = load_json(result_path, MAX_RESULT_BYTES)
        except UnreadableFile as exc:
            return RunFiles(run_dir, "unreadable", reason=str(exc))
        problem = check_record(record)
        if problem is not None:
            return RunFiles(run_dir, "unreadable", reason=f"{printable_path(result_path)}: {problem}")
        return RunFiles(run_dir, str(record["status"]), record=record, reason=record.get("reason"))
    files = RunFiles(run_dir, "empty", lock=lock_state(run_dir), resumable=(run_dir / CHECKPOINT_FILE).is_file())
    try:
        if os.path.lexists(run_dir / CONFIG_FILE):
            stored = load_json(run_dir / CONFIG_FILE, MAX_CONFIG_BYTES)
            files.config = stored.get("config") if isinstance(stored.get("config"), dict) else None
            if files.config is None:
                files.state, files.reason = "unreadable", f"{printable_path(run_dir / CONFIG_FILE)}: no 'config' mapping"
                return files
        files.history = read_history(run_dir)
    except UnreadableFile as exc:
        files.state, files.reason = "unreadable", str(exc)
        return files
    if files.config is None and files.history is None:
        if files.lock == "held":
            files.state = "running"  # between taking the lock and writing config.json
        return files
    end = files.history.end if files.history is not None else None
    if files.lock == "held" or (files.lock == "unknown" and _alive_elsewhere(files.history)):
        files.state = "running"
    elif end is not None and end.get("status") == "failed":
        files.state, files.reason = "failed", str(end.get("reason") or "failed")
    else:
        files.state = "interrupted"
    return files


def unfinished_record(files: RunFiles) -> dict[str, Any]:
    """A result record for a run without result.json: what it reached so far, no test accuracy.

    ``status`` is running, interrupted or failed; ``resumable`` says whether a checkpoint is
    there; ``reason`` says where it stopped and how to continue.
    """
    stored = files.config or {}
    history = files.history or History()
    curves = history.curves
    last = history.last_epoch or {}
    start = history.start or {}
    device = start.get("device") if isinstance(start.get("device"), str) else None
    config, key = stored, None
    try:
        cfg = build_config(stored, source=printable_path(files.run_dir / CONFIG_FILE))
        config, key = cfg.resolved(), cfg.key(device_type=device.split(":", 1)[0] if device else None)
    except UserError:
        pass  # e.g. an algorithm no longer registered: the stored config as it is
    epochs_run = last.get("epochs_run") if isinstance(last.get("epochs_run"), int) else 0
    total = last.get("total_epochs") if isinstance(last.get("total_epochs"), int) else start.get("total_epochs")
    shown = printable_path(files.run_dir)
    if files.state == "running":
        reason = f"running: epoch {epochs_run} of {total or '?'} done"
    elif files.state == "failed":
        reason = f"failed after epoch {epochs_run}: {files.reason}"
    else:
        how = f"`bpfree resume {shown}` continues it" if files.resumable else f"no checkpoint: `bpfree resume {shown}` starts it over"
        reason = f"interrupted after epoch {epochs_run} of {total or '?'}; {how}"
    vals = [c["val_accuracy"] for c in curves if isinstance(c.get("val_accuracy"), (int, float))]
    train_time = last.get("curve", {}).get("cumulative_train_time_s") if isinstance(last.get("curve"), dict) else None
    started = start.get("time")
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": files.run_dir.name,
        "status": files.state,
        "reason": reason,
        "resumable": files.resumable,
        "algorithm": config.get("algorithm"),
        "dataset": config.get("dataset"),
        "model": config.get("model"),
        "seed": config.get("seed"),
        "config_key": key,
        "config": config,
        "test_accuracy": None,
        "best_val_accuracy": max(vals) if vals else None,
        "epochs_run": epochs_run,
        "total_epochs": total,
        "curves": curves,
        "train_time_s": float(train_time) if isinstance(train_time, (int, float)) else 0.0,
        "eval_time_s": float(sum(c.get("eval_time_s") or 0.0 for c in curves)),
        "energy_reason": "not recorded for an unfinished run (energy is read into result.json when a run ends)",
        "environment": {"device": device} if device else {},
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat() if isinstance(started, (int, float)) else None,
        "history": HISTORY_FILE,
    }


def iter_results(directory: Path) -> Iterator[dict[str, Any]]:
    """Every valid result record under ``directory`` (malformed ones are skipped; see ``read_results``)."""
    yield from read_results(directory).records


def load_results(directory: Path) -> list[dict[str, Any]]:
    return read_results(directory).records


class CurvePoint(BaseModel):
    """One evaluation point: a row of ``Result.curves`` (every epoch's end; with ``eval_every`` also points inside epochs).

    The cumulative fields are the run's training cost up to the point; evaluation is outside them.
    Records written before these fields existed lack them (None): every row was then an epoch's end.
    """

    model_config = ConfigDict(extra="allow")

    phase: str
    epoch: int = Field(description="epoch of the point, from 1 (an interval point: the epoch it falls in)")
    point: Literal["epoch", "interval"] | None = Field(None, description="an epoch's end, or a point inside an epoch (eval_every)")
    epoch_progress: float | None = Field(None, description="epochs of training up to the point, e.g. 2.25")
    train_loss: float | None = Field(None, description="mean training loss of the epoch's steps (so far, at an interval point)")
    val_accuracy: float | None = None
    val_loss: float | None = None
    train_accuracy: float | None = Field(
        None, description="accuracy on the fixed training sample (train_accuracy_samples images), epoch rows only; outside every cost total"
    )
    epoch_time_s: float | None = Field(None, description="training time of the epoch (so far, at an interval point)")
    eval_time_s: float | None = Field(None, description="this point's validation time")
    energy_j: float | None = Field(None, description="training energy of the epoch (so far); null where not measured")
    peak_memory_bytes: int | None = Field(None, description="peak memory of the epoch's training window (so far)")
    cumulative_train_time_s: float | None = Field(None, description="training time of the run up to the point")
    cumulative_energy_j: float | None = Field(None, description="training energy of the run up to the point; null where not measured")
    cumulative_train_flops: int | None = Field(None, description="training FLOPs of the run up to the point (steps run x FLOPs of their kind)")
    cumulative_steps: int | None = Field(None, description="optimiser steps of the run up to the point")
    cumulative_samples: int | None = Field(None, description="training samples seen up to the point")


class Result(BaseModel):
    """The record of one run, as stored in ``<run_dir>/result.json``.

    Fields the engine adds later are kept (``extra="allow"``), so a newer record still loads; the
    published JSON schema (``bpfree schema``) lists the fields every record has.
    """

    model_config = ConfigDict(extra="allow")

    run_id: str
    schema_version: int
    status: Literal["completed", "diverged", "running", "interrupted", "failed"] | str
    reason: str | None = None
    algorithm: str
    dataset: str
    model: str
    seed: int
    config_key: str
    config: dict[str, Any]
    paper: str | None = None
    deviations: list[str] = Field(default_factory=list)
    test_accuracy: float | None = None
    best_val_accuracy: float | None = None
    epochs_run: int
    curves: list[CurvePoint] = Field(default_factory=list)
    phases: list[dict[str, Any]] = Field(default_factory=list)
    train_time_s: float
    eval_time_s: float
    train_flops: int | None = None
    eval_flops: int | None = None
    train_steps: int | None = Field(None, description="optimiser steps of the finished epochs")
    train_samples_seen: int | None = Field(None, description="training samples those steps saw")
    train_accuracy_samples: int | None = Field(None, description="size of the fixed training sample behind the curves' train_accuracy")
    train_accuracy_time_s: float | None = Field(None, description="time spent measuring train_accuracy: in neither train_time_s nor eval_time_s")
    telemetry: dict[str, Any] | None = Field(
        None, description="the resource sampler: file (telemetry.csv beside result.json), interval_s, rows, sources, problem (why it stopped early)"
    )
    inference_flops_per_sample: float | None = None
    uncounted_ops: dict[str, int] = Field(
        default_factory=dict, description="compute-heavy operators met without a FLOP formula (calls counted); not in the FLOP totals"
    )
    final_val_accuracy: float | None = Field(None, description="validation accuracy of the weights tested (the stopping rule's restore)")
    stopping_rule: dict[str, Any] | None = Field(None, description="monitor, restore, min_delta and patience of the run")
    test_accuracy_by_readout: dict[str, float] | None = Field(
        None, description="test accuracy under each read-out rule of the model (NoProp: mean, sampled); the headline is config.readout"
    )
    layer_accuracy: dict[str, dict[str, float]] | None = Field(
        None, description="validation and test accuracy of each layer-local read-out (MF projection, FF layer, CaFo predictor, NoProp block)"
    )
    flush_denormal: bool | None = Field(None, description="whether subnormal floats were flushed to zero (CPU)")
    train_cpu_time_s: float | None = Field(None, description="process CPU time inside the training windows")
    cpu_share: float | None = Field(None, description="training CPU seconds per wall second per thread")
    contended: bool | None = Field(None, description="a CPU run whose CPU share fell below 0.7: it waited for its cores")
    peak_memory_bytes: int | None = None
    memory_method: str | None = None
    energy_j: float | None = Field(None, description="training energy in joules; null (never 0) where no counter was readable")
    eval_energy_j: float | None = None
    energy_method: str | None = None
    energy_reason: str | None = None
    environment: dict[str, Any] = Field(default_factory=dict)
    started_at: str | None = None
    finished_at: str | None = None

    _run_dir: Path | None = PrivateAttr(None)

    @property
    def run_dir(self) -> Path | None:
        """Where the record was read from or written to (not part of the stored JSON)."""
        return self._run_dir

    @classmethod
    def from_run_dir(cls, run_dir: Path) -> Result:
        path = Path(run_dir) / RESULT_FILE
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: no readable result ({exc})") from None
        result = cls.model_validate(record)
        result._run_dir = Path(run_dir)
        return result


def result_schema() -> dict[str, Any]:
    """The JSON schema of ``result.json`` (published as ``schema/result.schema.json``)."""
    schema = Result.model_json_schema()
    schema["$id"] = "https://bpfree/result.schema.json"
    schema["title"] = "bpfree run result"
    return schema


def load_results_frame(directory: Path) -> pd.DataFrame:
    """Every run under ``directory`` as one pandas DataFrame row (nested records as columns)."""
    rows = []
    for record in iter_results(directory):
        row = {k: v for k, v in record.items() if not isinstance(v, (list, dict))}
        for name, value in (record.get("config") or {}).items():
            if not isinstance(value, (list, dict)):
                row.setdefault(f"config.{name}", value)
        for name, value in ((record.get("config") or {}).get("params") or {}).items():
            row[f"params.{name}"] = value
        for name, value in (record.get("environment") or {}).items():
            if not isinstance(value, (list, dict)):
                row[f"environment.{name}"] = value
        row["run_dir"] = str(Path(directory) / record["run_id"])
        rows.append(row)
    return pd.DataFrame(rows)


# Column types of telemetry.csv; nullable integers, so an empty cell ("not available here") is <NA>.
TELEMETRY_DTYPES = {
    "time_s": "float64", "unix_time": "float64", "phase": "string", "epoch": "Int64", "rss_bytes": "Int64",
    "cpu_percent": "float64", "cuda_allocated_bytes": "Int64", "cuda_reserved_bytes": "Int64",
    "gpu_memory_used_bytes": "Int64", "gpu_power_w": "float64", "gpu_sm_util_pct": "float64",
    "gpu_sm_clock_mhz": "float64", "gpu_mem_clock_mhz": "float64", "rapl_energy_j": "float64", "activity": "string",
}


def read_telemetry(run_dir: Path) -> pd.DataFrame | None:
    """A run's ``telemetry.csv`` as a DataFrame (one row per sample), or None when the run has none.

    Bounded (``MAX_TABLE_BYTES``, regular files only); a last line torn by a kill is dropped. A file
    that is not a telemetry table raises :class:`UnreadableFile` naming it.
    """
    path = Path(run_dir) / TELEMETRY_FILE
    if not path.exists() and not path.is_symlink():
        return None
    blob = read_bounded(path, MAX_TABLE_BYTES)
    blob = blob[: blob.rfind(b"\n") + 1]  # whole lines only: the last one may be torn
    header = blob.split(b"\n", 1)[0].decode("utf-8", "replace")
    if tuple(header.split(",")) != TELEMETRY_COLUMNS:
        raise UnreadableFile(f"{printable_path(path)}: not a bpfree telemetry table (its header is not {','.join(TELEMETRY_COLUMNS)})")
    try:
        return pd.read_csv(io.BytesIO(blob), dtype=TELEMETRY_DTYPES, keep_default_na=False, na_values=[""], encoding="utf-8")
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnreadableFile(f"{printable_path(path)}: malformed telemetry table ({problem[:200]})") from None


def telemetry_frame(directory: Path, records: list[dict[str, Any]], id_columns: tuple[str, ...]) -> pd.DataFrame:
    """The telemetry of every run in ``records`` (stored under ``directory``), one row per sample,
    led by the run's ``id_columns``; runs without telemetry add no rows."""
    frames = []
    for record in records:
        frame = read_telemetry(Path(directory) / record["run_id"])
        if frame is not None and len(frame):
            for position, name in enumerate(id_columns):
                frame.insert(position, name, record.get(name))
            frames.append(frame)
    if not frames:
        return pd.DataFrame({**{name: pd.Series(dtype="object") for name in id_columns},
                             **{name: pd.Series(dtype=dtype) for name, dtype in TELEMETRY_DTYPES.items()}})
    return pd.concat(frames, ignore_index=True)
