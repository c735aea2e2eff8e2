"""Optional MLflow logging of a finished run (``bpfree run --mlflow URI``).

MLflow is imported only here and only when asked for; the run's own result.json stays the record.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bpfree.errors import UserError
from bpfree.results import RESULT_FILE

FINAL_METRICS = ("test_accuracy", "best_val_accuracy", "train_time_s", "eval_time_s", "train_flops", "peak_memory_bytes", "energy_j", "epochs_run")


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


def log_to_mlflow(run_dir: Path, tracking_uri: str, experiment: str = "bpfree") -> str:
    """Log config, per-epoch curves, final metrics and result.json of ``run_dir``; returns the MLflow run id."""
    try:
        import mlflow
    except ImportError:
        raise UserError("--mlflow needs MLflow: pip install 'bpfree[mlflow]'") from None
    record = json.loads((Path(run_dir) / RESULT_FILE).read_text())
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=record["run_id"]) as active:
        mlflow.set_tags({"bpfree.run_id": record["run_id"], "bpfree.status": record["status"], "bpfree.algorithm": record["algorithm"]})
        mlflow.log_params({k: str(v) for k, v in _flat("", record.get("config") or {}).items()})
        for step, row in enumerate(record.get("curves") or []):
            metrics = {k: float(row[k]) for k in ("train_loss", "val_accuracy", "epoch_time_s", "energy_j") if _finite(row.get(k))}
            if metrics:
                mlflow.log_metrics(metrics, step=step)
        mlflow.log_metrics({k: float(record[k]) for k in FINAL_METRICS if _finite(record.get(k))})
        mlflow.log_artifact(str(Path(run_dir) / RESULT_FILE))
        return active.info.run_id
