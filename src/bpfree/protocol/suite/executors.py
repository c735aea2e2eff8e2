"""Executors: inline (this process), local (one process per run) and submitit (Slurm, local, debug)."""

from __future__ import annotations

import multiprocessing
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from bpfree.errors import UserError
from bpfree.fileio import ensure_writable_dir
from bpfree.protocol.suite.lock import output_lock
from bpfree.protocol.suite.planning import Plan, Task, write_plan
from bpfree.protocol.suite.processes import worker_initializer
from bpfree.protocol.suite.slurm import SlurmOptions, write_job_marker
from bpfree.protocol.suite.tasks import SubmititRun, run_task

EXECUTORS = ("local", "inline", "slurm", "submitit-local", "debug")
_SUBMITIT_CLUSTER = {"slurm": "slurm", "submitit-local": "local", "debug": "debug"}

Callback = Callable[[Task, dict[str, Any]], None]


def _threads_per_run(jobs: int) -> int:
    from bpfree.meters.environment import allocated_cpus

    return max(1, allocated_cpus() // max(1, jobs))


def _run_inline(tasks: Sequence[Task], threads: int | None, on_done: Callback) -> None:
    import torch

    before = torch.get_num_threads()
    try:
        for task in tasks:
            on_done(task, run_task(task.config, str(task.run_dir), threads))
    finally:
        torch.set_num_threads(before)


WORKER_DIED = "worker process died while training this run (killed, or out of memory)"


def _run_local(tasks: Sequence[Task], jobs: int, threads: int | None, on_done: Callback) -> None:
    """Each run in its own process (a fresh child per run), at most ``jobs`` at a time.

    A worker that dies (killed, out of memory) breaks its pool: the runs in flight at that moment
    are rerun one at a time in fresh pools, so the run that kills its worker is found and marked
    failed, and every other run still trains.
    """
    threads = threads or _threads_per_run(jobs)
    queue: deque[Task] = deque(tasks)
    suspects: deque[Task] = deque()
    while queue or suspects:
        if suspects:
            alone = deque([suspects.popleft()])
            for task in _pool_round(alone, 1, threads, on_done):
                on_done(task, {"ok": False, "run_dir": str(task.run_dir), "error": WORKER_DIED})
        else:
            suspects.extend(_pool_round(queue, jobs, threads, on_done))


def _new_pool(jobs: int) -> ProcessPoolExecutor:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["bpfree.protocol.warm"])  # children fork from a warm server
    kwargs: dict[str, Any] = {"max_workers": max(1, jobs), "mp_context": context, "initializer": worker_initializer}
    if sys.version_info >= (3, 11):
        kwargs["max_tasks_per_child"] = 1
    return ProcessPoolExecutor(**kwargs)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started and end the workers now (their runs resume from checkpoints)."""
    workers = list((getattr(pool, "_processes", None) or {}).values())  # shutdown forgets them
    pool.shutdown(wait=False, cancel_futures=True)
    for process in workers:
        if process.is_alive():
            process.terminate()


def _pool_round(queue: deque[Task], jobs: int, threads: int, on_done: Callback) -> list[Task]:
    """Run tasks from ``queue`` in one pool until it is empty or the pool breaks.

    Returns the tasks that were in flight when a worker died (empty if none died).
    """
    pool = _new_pool(jobs)
    running: dict[Future, Task] = {}
    try:
        while queue or running:
            while queue and len(running) < max(1, jobs):
                task = queue.popleft()
                running[pool.submit(run_task, task.config, str(task.run_dir), threads)] = task
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            broken = False
            for future in done:
                task = running.pop(future)
                try:
                    outcome = future.result()
                except BrokenProcessPool:
                    running[future] = task  # rerun below, with the others in flight
                    broken = True
                    continue
                except Exception as exc:  # noqa: BLE001 - e.g. an outcome that could not be sent back
                    outcome = {"ok": False, "run_dir": str(task.run_dir), "error": f"worker process failed: {type(exc).__name__}: {exc}"}
                on_done(task, outcome)
            if broken:
                return list(running.values())
        return []
    except BaseException:  # Ctrl-C, SIGTERM (raised as SystemExit by the handler), a failing callback
        _stop_workers(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def terminate_as_exit() -> Iterator[None]:
    """SIGTERM ends the suite like Ctrl-C: the pool is shut down and its workers stopped, then exit 143."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_submitit(tasks: Sequence[Task], cluster: str, output: Path, jobs: int, options: SlurmOptions, wait: bool, on_done: Callback) -> list[str]:
    folder = Path(output) / ".submitit" / "%j"
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    except RuntimeError as exc:  # e.g. no srun: not on a Slurm cluster
        raise UserError(f"--executor {cluster}: {str(exc).splitlines()[0]}; use --executor local here") from None
    params = options.parameters()
    if cluster == "slurm" and options.array_parallelism is None:
        params["slurm_array_parallelism"] = max(1, jobs) if jobs > 1 else 64
    if cluster != "slurm":
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    try:
        executor.update_parameters(**params)
    except (NameError, AssertionError, ValueError) as exc:
        raise UserError(f"slurm options: {str(exc).splitlines()[0]}") from None
    threads = options.cpus if options.cpus else None
    job_list = executor.map_array(
        SubmititRun(), [t.config for t in tasks], [str(t.run_dir) for t in tasks], [threads] * len(tasks)
    )
    ids = [str(job.job_id) for job in job_list]
    if cluster == "slurm":
        for task, job_id in zip(tasks, ids):
            task.run_dir.mkdir(parents=True, exist_ok=True)
            write_job_marker(task.run_dir, task.key, job_id)
    if wait:
        for task, job in zip(tasks, job_list):
            try:
                outcome = job.result()
            except Exception as exc:  # noqa: BLE001 - job failed outside run_task (time limit, node failure)
                outcome = {"ok": False, "run_dir": str(task.run_dir), "error": f"job {job.job_id} failed: {str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}"}
            on_done(task, outcome)
    return ids


@dataclass
class SuiteOutcome:
    plan: Plan
    outcomes: list[tuple[Task, dict[str, Any]]]
    job_ids: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[tuple[Task, dict[str, Any]]]:
        return [(t, o) for t, o in self.outcomes if not o.get("ok")]


def execute_plan(
    plan: Plan,
    executor: str = "local",
    jobs: int = 1,
    slurm: SlurmOptions | None = None,
    wait: bool = True,
    on_done: Callback | None = None,
    threads: int | None = None,
) -> SuiteOutcome:
    """Run the plan's tasks; ``threads`` is torch's thread count per run (default: CPUs / jobs)."""
    if executor not in EXECUTORS:
        raise UserError(f"--executor {executor!r}: choose one of {', '.join(EXECUTORS)}")
    if jobs < 1:
        raise UserError(f"--jobs {jobs}: must be >= 1")
    ensure_writable_dir(plan.output)
    outcomes: list[tuple[Task, dict[str, Any]]] = []

    def record(task: Task, outcome: dict[str, Any]) -> None:
        outcomes.append((task, outcome))
        if on_done is not None:
            on_done(task, outcome)

    if not plan.tasks:
        return SuiteOutcome(plan, outcomes)
    job_ids: list[str] = []
    with output_lock(plan.output):
        write_plan(plan)
        if executor == "inline":
            _run_inline(plan.tasks, threads, record)
        elif executor == "local":
            with terminate_as_exit():
                _run_local(plan.tasks, jobs, threads, record)
        else:
            job_ids = _run_submitit(plan.tasks, _SUBMITIT_CLUSTER[executor], plan.output, jobs, slurm or SlurmOptions(), wait, record)
    return SuiteOutcome(plan, outcomes, job_ids)

