"""Tidy tables from a results directory: ``runs`` (one row per run), ``curves`` (one per evaluation
point), ``phases`` (one per training phase) and ``telemetry`` (one per resource sample, from each
run's telemetry.csv), as CSV or Parquet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from bpfree.errors import UserError
from bpfree.results import iter_results, load_results_frame, telemetry_frame

ID_COLUMNS = ("run_id", "algorithm", "dataset", "model", "seed", "config_key", "status")
FORMATS = ("csv", "parquet")
TABLES = ("runs", "curves", "phases", "telemetry")


def _rows(records: list[dict[str, Any]], field: str) -> list[dict[str, Any]]:
    rows = []
    for record in records:
        ids = {name: record.get(name) for name in ID_COLUMNS}
        for index, item in enumerate(record.get(field) or []):
            flat = {k: v for k, v in item.items() if not isinstance(v, (list, dict))}
            rows.append({**ids, f"{field[:-1]}_index": index, **flat})
    return rows


def results_table(results_dir: Path, name: str, records: list[dict[str, Any]] | None = None) -> pd.DataFrame:
    """One of :data:`TABLES` for the runs under ``results_dir`` (``records``: already read)."""
    if name not in TABLES:
        raise UserError(f"table {name!r}: expected one of {', '.join(TABLES)}")
    results_dir = Path(results_dir)
    if name == "runs":
        return load_results_frame(results_dir)
    records = list(iter_results(results_dir)) if records is None else records
    if name == "telemetry":
        return telemetry_frame(results_dir, records, ID_COLUMNS)
    return pd.DataFrame(_rows(records, name))


def tidy_tables(results_dir: Path) -> dict[str, pd.DataFrame]:
    results_dir = Path(results_dir)
    records = list(iter_results(results_dir))
    if not records:
        raise UserError(f"results directory {results_dir}: no result.json found under it")
    return {name: results_table(results_dir, name, records) for name in TABLES}


def export_tables(results_dir: Path, out_dir: Path, fmt: str = "csv") -> list[Path]:
    """Write runs/curves/phases/telemetry.<fmt> into ``out_dir``; returns the paths written."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UserError("--format parquet needs pyarrow: pip install 'bpfree[parquet]'") from None
    tables = tidy_tables(results_dir)  # fails before anything is written
    from bpfree.fileio import atomic_write_bytes

    paths = []
    for name, frame in tables.items():
        path = Path(out_dir) / f"{name}.{fmt}"
        if fmt == "csv":
            atomic_write_bytes(path, frame.to_csv(index=False).encode())
        else:
            import io

            buffer = io.BytesIO()
            frame.to_parquet(buffer, index=False)
            atomic_write_bytes(path, buffer.getvalue())
        paths.append(path)
    return paths
