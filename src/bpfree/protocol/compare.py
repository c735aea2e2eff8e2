"""`bpfree compare`: every alternative algorithm next to backprop on the identical architecture.

The comparison set is a directory (or list) of config files, by default the shipped ``quick``
configs (``src/bpfree/configs/quick/``). Each config whose algorithm is not ``bp`` is an
*alternative*; its *BP twin* follows the one rule of :mod:`bpfree.protocol.twin` (the report pairs
results by the same rule):

- an explicit BP config in the set on the same dataset, model and device type (the one whose
  budget matches best), if there is one; otherwise
- derived from the alternative: the same dataset, model, batch sizes, patience, seed,
  validation split and device, with ``algorithm: bp``, no algorithm params, and BP's own
  optimiser settings (``optimizer``, ``lr``, ``weight_decay``, ``momentum``), taken from
  ``--bp-config`` (e.g. a file written by ``bpfree tune``) or else the RunConfig defaults.
  Its epoch cap is the alternative's total over all its phases (``budget: passes``, the default:
  CaFo greedy with 3 predictors x 10 epochs gives its twin 30), so both may pass over the training
  data equally often; ``budget: epochs`` gives the twin the alternative's ``epochs`` unchanged.

Twins equal in every field are one run (the config key decides), so two CaFo variants on the
same network share one BP twin. Runs go through the suite machinery (resumable, one process per
run), then the report is written from the stored results.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bpfree.config import RunConfig, apply_assignments, build_config, read_yaml_mapping
from bpfree.errors import ConfigError, UserError
from bpfree.protocol.budget import BUDGET_RULES
from bpfree.protocol.suite import Plan, SuiteEntry, SuiteOutcome, Task, execute_plan, expand, make_plan
from bpfree.protocol.twin import BP, RECIPE_FIELDS, choose_twin, config_identity, derive_twin

BP_RECIPE_FIELDS = RECIPE_FIELDS
DEFAULT_SEEDS = 3


def default_configs_dir() -> Path:
    """The shipped ``quick`` configs (package data, so this works from any folder)."""
    from bpfree.configs import packaged_dir

    return packaged_dir("quick")


def config_files(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    from bpfree.configs import resolve

    for path in paths:
        path = resolve(path)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"--configs {path}: not found")
    if not files:
        raise UserError(f"--configs {', '.join(map(str, paths))}: no YAML config files")
    return files


def bp_recipe(path: Path | None) -> dict[str, Any]:
    """BP's own optimiser settings: from a BP config file, else the RunConfig defaults."""
    defaults = RunConfig.model_fields
    recipe = {name: defaults[name].default for name in BP_RECIPE_FIELDS}
    if path is not None:
        values = read_yaml_mapping(path)
        if values.get("algorithm", BP) != BP:
            raise UserError(f"--bp-config {path}: algorithm is {values.get('algorithm')!r}, expected bp")
        recipe.update({k: values[k] for k in BP_RECIPE_FIELDS if k in values})
    return recipe


@dataclass
class ComparisonSet:
    alternatives: list[SuiteEntry]
    baselines: list[SuiteEntry]  # explicit and derived BP configs
    notes: list[str] = field(default_factory=list)

    @property
    def entries(self) -> list[SuiteEntry]:
        return self.baselines + self.alternatives


def _registered() -> list[str]:
    from bpfree.algorithms import algorithm_names

    return algorithm_names()


def _model_known(model: Any) -> bool:
    from bpfree.models import parse_model_spec

    try:
        parse_model_spec(str(model))
        return True
    except ValueError:
        return False


def build_set(
    paths: Sequence[Path],
    datasets: Sequence[str] = (),
    algorithms: Sequence[str] = (),
    epochs: int | None = None,
    assignments: Sequence[str] = (),
    bp_config: Path | None = None,
    common: dict[str, Any] | None = None,
    budget: str = "passes",
) -> ComparisonSet:
    """Read the comparison configs, apply selections and overrides, and pair each with a BP twin."""
    if budget not in BUDGET_RULES:
        raise UserError(f"--budget {budget}: choose one of {', '.join(BUDGET_RULES)}")
    registered = _registered()
    recipe = bp_recipe(bp_config)
    unknown = sorted(set(algorithms) - set(registered))
    if unknown:
        raise UserError(f"--algorithm {', '.join(unknown)}: not registered; choose from {', '.join(a for a in registered if a != BP)}")
    notes: list[str] = []
    alternatives: list[tuple[Path, dict[str, Any]]] = []
    explicit_bp: list[tuple[Path, dict[str, Any]]] = []
    for path in config_files(paths):
        values = read_yaml_mapping(path)
        name = values.get("algorithm", BP)
        if name not in registered:
            notes.append(f"skipped {path.name}: algorithm {name!r} is not registered in this installation")
            continue
        if "model" in values and not _model_known(values["model"]):
            notes.append(f"skipped {path.name}: model {values.get('model')!r} is not registered in this installation")
            continue
        if name == BP:
            explicit_bp.append((path, values))
        elif not algorithms or name in algorithms:
            alternatives.append((path, values))
    if not alternatives:
        raise UserError("nothing to compare: no registered alternative algorithm among the selected configs")

    def finish(values: dict[str, Any], dataset: str | None) -> dict[str, Any]:
        values = dict(values)
        if dataset is not None:
            values["dataset"] = dataset
        if epochs is not None:
            values["epochs"] = epochs
        values.update({k: v for k, v in (common or {}).items() if v is not None})
        return apply_assignments(values, assignments)

    alt_entries: list[SuiteEntry] = []
    bp_entries: list[SuiteEntry] = []
    dataset_choices: list[str | None] = list(datasets) or [None]
    for dataset in dataset_choices:
        for path, values in alternatives:
            alt = finish(values, dataset)
            alt.setdefault("name", path.stem)
            alt_cfg = _validate(alt, str(path))
            alt_identity = config_identity(alt_cfg)
            alt_entries.append(SuiteEntry(str(path), alt))
            candidates = [(str(bp_path), finished, _validate(finished, str(bp_path))) for bp_path, bp_values in explicit_bp for finished in [finish(bp_values, dataset)]]
            chosen = choose_twin(alt_identity, candidates, lambda c: config_identity(c[2]))
            if chosen is not None:
                source, twin = chosen[0], chosen[1]
            else:
                twin, source = derive_twin({**alt, "model": alt_cfg.model}, recipe, budget), f"BP twin of {path.name}"
                _validate(twin, source)
            bp_entries.append(SuiteEntry(source, twin))
    return ComparisonSet(alt_entries, bp_entries, notes)


def _validate(values: dict[str, Any], source: str) -> RunConfig:
    try:
        return build_config(values, source=source)
    except ConfigError as exc:
        raise UserError(str(exc)) from None


@dataclass
class CompareOutcome:
    plan: Plan
    suite: SuiteOutcome
    notes: list[str]
    report: Any  # bpfree.report.render.Report


def auto_jobs() -> int:
    """Parallel runs for ``--jobs 0``: one at a time when a GPU or an energy counter is in play
    (each run's time and energy must be its own); otherwise one single-threaded run per core, up
    to 4 (small models gain little from intra-op threads, and on a shared CPU multi-threaded
    kernels stall badly)."""
    import torch

    from bpfree.meters.energy import cpu_energy_counter_readable
    from bpfree.meters.environment import allocated_cpus

    if torch.cuda.is_available() or cpu_energy_counter_readable():
        return 1
    return max(1, min(4, allocated_cpus()))


def every_run_failed(suite: SuiteOutcome) -> str:
    """One line: every run failed, with each distinct reason (most common first) and an example run."""
    reasons: dict[str, list[str]] = {}
    for task, outcome in suite.failed:
        reasons.setdefault(str(outcome.get("error") or "unknown error"), []).append(task.label)
    ordered = sorted(reasons.items(), key=lambda kv: -len(kv[1]))
    why = "; ".join(f"{len(labels)}x {error} (e.g. {labels[0]})" for error, labels in ordered[:3])
    return f"every run failed ({len(suite.failed)} of {len(suite.outcomes)}): {why}"


def compare(
    configs: Sequence[Path] | None = None,
    output: Path = Path("results/compare"),
    seeds: Sequence[int] = (0, 1, 2),
    datasets: Sequence[str] = (),
    algorithms: Sequence[str] = (),
    epochs: int | None = None,
    jobs: int = 1,
    executor: str = "local",
    assignments: Sequence[str] = (),
    bp_config: Path | None = None,
    common: dict[str, Any] | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    on_done: Callable[[Task, dict[str, Any]], None] | None = None,
    threads: int | None = None,
    budget: str = "passes",
) -> CompareOutcome:
    from bpfree.report.render import write_notes, write_report

    if jobs == 0:
        jobs = auto_jobs()
    paths = list(configs) if configs else [default_configs_dir()]
    cset = build_set(paths, datasets, algorithms, epochs, assignments, bp_config, common, budget)
    run_configs = expand(cset.entries, list(seeds), Path(output))
    plan = make_plan(run_configs, Path(output))
    if on_plan is not None:
        on_plan(plan)
    suite = execute_plan(plan, executor=executor, jobs=jobs, on_done=on_done, threads=threads)
    notes = list(cset.notes)
    for task, outcome in suite.failed:
        notes.append(f"run failed: {task.label} ({task.run_dir.name}): {outcome.get('error')}")
    if suite.outcomes and len(suite.failed) == len(suite.outcomes) and not plan.skipped:
        raise UserError(every_run_failed(suite))
    write_notes(Path(output), notes, {"configs": [str(p) for p in paths], "seeds": list(seeds), "budget": budget})
    report = write_report(Path(output), notes=notes)
    return CompareOutcome(plan, suite, notes, report)
