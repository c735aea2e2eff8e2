"""The Python API behind ``bpfree.run``, ``bpfree.compare`` and ``bpfree.load_results``.

The same code paths as the command line: a config mapping, file or RunConfig is validated,
overrides are applied field by field (``params`` merged), and results land in ``<output>/<run_id>/``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bpfree.config import RunConfig, build_config, read_yaml_mapping
from bpfree.export import results_table
from bpfree.results import Result
from bpfree.tracking import check_options

if TYPE_CHECKING:
    import pandas as pd

    from bpfree.protocol.compare import CompareOutcome


def _config_values(config: RunConfig | Mapping[str, Any] | str | Path | None) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, RunConfig):
        return config.model_dump(mode="json")
    if isinstance(config, Mapping):
        return dict(config)
    from bpfree.configs import resolve

    return dict(read_yaml_mapping(resolve(config)))


def make_config(config: RunConfig | Mapping[str, Any] | str | Path | None = None, **overrides: Any) -> RunConfig:
    """A validated RunConfig from a config, mapping or YAML path plus field overrides."""
    values = _config_values(config)
    params = overrides.pop("params", None)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if params:
        values["params"] = {**(values.get("params") or {}), **params}
    return build_config(values, source=str(config) if isinstance(config, (str, Path)) else "config")


def run(
    config: RunConfig | Mapping[str, Any] | str | Path | None = None,
    *,
    keep_checkpoint: bool = False,
    mlflow: str | None = None,
    tensorboard: str | Path | None = None,
    **overrides: Any,
) -> Result:
    """Train one run and return its typed result (also written to ``<output>/<run_id>/result.json``).

    ``bpfree.run("quick/mf_mnist5k.yaml", epochs=2, seed=1)`` or ``bpfree.run({"algorithm": "mf"})``;
    ``mlflow="sqlite:///mlflow.db"`` logs each epoch to that MLflow tracking URI as it ends,
    ``tensorboard="tb"`` to TensorBoard under ``tb/<run_id>``.
    """
    from bpfree.runner import execute

    cfg = make_config(config, **overrides)
    tracking = check_options(mlflow, Path(tensorboard) if tensorboard is not None else None)
    run_dir, record = execute(cfg, keep_checkpoint=keep_checkpoint, tracking=tracking)
    result = Result.model_validate(record)
    result._run_dir = run_dir
    return result


def compare(
    configs: Sequence[str | Path] | None = None,
    *,
    output: str | Path = "results/compare",
    seeds: int | Sequence[int] = 3,
    algorithms: Sequence[str] = (),
    datasets: Sequence[str] = (),
    epochs: int | None = None,
    jobs: int = 0,
    executor: str = "local",
    assignments: Sequence[str] = (),
    bp_config: str | Path | None = None,
) -> CompareOutcome:
    """Each alternative next to its BP twin, as ``bpfree compare``; returns runs and report paths.

    ``assignments`` are the CLI's ``--set key=value`` strings, applied to every run.
    """
    from bpfree.config import parse_seeds
    from bpfree.protocol.compare import compare as run_compare

    seed_values = parse_seeds(seeds if isinstance(seeds, int) else list(seeds), "seeds") or [0]
    return run_compare(
        configs=[Path(c) for c in configs] if configs else None,
        output=Path(output),
        seeds=seed_values,
        datasets=list(datasets),
        algorithms=list(algorithms),
        epochs=epochs,
        jobs=jobs,
        executor=executor,
        assignments=list(assignments),
        bp_config=Path(bp_config) if bp_config else None,
    )


def load_results(directory: str | Path, table: str = "runs") -> pd.DataFrame:
    """A table of the stored runs under ``directory``, as ``bpfree export`` writes it.

    ``runs``: one row per run (scalars, ``config.*``, ``params.*``, ``environment.*``); ``curves``:
    one per evaluation point; ``phases``: one per training phase; ``telemetry``: one per resource
    sample (each run's telemetry.csv), each led by the run's id columns.
    """
    return results_table(Path(directory), table)
