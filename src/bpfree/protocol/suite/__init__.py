"""Suites: a grid of configs x seeds, run once each, resumable, locally or through submitit (Slurm).

The package is split by concern: ``files`` (the suite file format), ``planning`` (what is done,
interrupted or new), ``tasks`` (one run in a worker or job), ``executors`` (inline, local
processes, submitit), ``slurm`` (job options and submitted-job markers) and ``lock`` (one suite
per output directory). ``run_suite`` ties them together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from bpfree.protocol.suite.executors import (
    EXECUTORS,
    Callback,
    SuiteOutcome,
    execute_plan,
)
from bpfree.protocol.suite.files import (
    Suite,
    SuiteEntry,
    deep_merge,
    expand,
    load_suite,
)
from bpfree.protocol.suite.lock import LOCK_FILE, output_lock
from bpfree.protocol.suite.planning import Plan, Task, label, make_plan, scan_output
from bpfree.protocol.suite.slurm import SlurmOptions
from bpfree.protocol.suite.tasks import SubmititRun, run_task

__all__ = [
    "EXECUTORS", "LOCK_FILE", "Callback", "Plan", "SlurmOptions", "SubmititRun", "Suite", "SuiteEntry", "SuiteOutcome", "Task",
    "deep_merge", "execute_plan", "expand", "label", "load_suite", "make_plan", "output_lock", "run_suite", "run_task", "scan_output",
]



def run_suite(
    path: Path,
    output: Path | None = None,
    assignments: Sequence[str] = (),
    seeds: Sequence[int] | None = None,
    executor: str = "local",
    jobs: int = 1,
    slurm: SlurmOptions | None = None,
    wait: bool = True,
    on_plan: Callable[[Plan], None] | None = None,
    on_done: Callback | None = None,
    dry_run: bool = False,
    threads: int | None = None,
) -> SuiteOutcome:
    """Load ``path``, plan against its output directory, and run what is missing."""
    suite = load_suite(path)
    out = Path(output) if output is not None else suite.output or Path("results") / Path(path).stem
    configs = expand(suite.entries, list(seeds) if seeds is not None else suite.seeds, out, assignments)
    plan = make_plan(configs, out)
    if on_plan is not None:
        on_plan(plan)
    if dry_run:
        return SuiteOutcome(plan, [])
    options = SlurmOptions.from_mapping(suite.slurm).merged(slurm or SlurmOptions())
    return execute_plan(plan, executor, jobs, options, wait, on_done, threads)
