"""Tidy tables from a results directory: ``runs`` (one row per run), ``curves`` (one per epoch),
``phases`` (one per training phase), as CSV or Parquet."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from bpfree.errors import UserError
from bpfree.results import iter_results, load_results_frame

if TYPE_CHECKING:
    import pandas as pd

ID_COLUMNS = ("run_id", "algorithm", "dataset", "model", "seed", "config_key", "status")
FORMATS = ("csv", "parquet")


def _rows(records: list[dict[str, Any]], field: str) -> list[dict[str, Any]]:
    rows = []
    for record in records:
        ids = {name: record.get(name) for name in ID_COLUMNS}
        for index, item in enumerate(record.get(field) or []):
            flat = {k: v for k, v in item.items() if not isinstance(v, (list, dict))}
            rows.append({**ids, f"{field[:-1]}_index": index, **flat})
    return rows


def tidy_tables(results_dir: Path) -> dict[str, pd.DataFrame]:
    import pandas as pd

    results_dir = Path(results_dir)
    records = list(iter_results(results_dir))
    if not records:
        raise UserError(f"results directory {results_dir}: no result.json found under it")
    return {
        "runs": load_results_frame(results_dir),
        "curves": pd.DataFrame(_rows(records, "curves")),
        "phases": pd.DataFrame(_rows(records, "phases")),
    }


def export_tables(results_dir: Path, out_dir: Path, fmt: str = "csv") -> list[Path]:
    """Write runs/curves/phases.<fmt> into ``out_dir``; returns the paths written."""
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
