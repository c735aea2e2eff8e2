"""Suites: a grid of configs x seeds, run once each, resumable, locally or through submitit (Slurm).

Suite file (YAML)::

    output: results/paper          # optional; --output overrides
    seeds: [0, 1, 2]               # or a count (3 -> 0, 1, 2); omitted: each config's own seed
    overrides: {device: auto}      # optional, applied to every config
    configs:
      - bp_mnist_mlp_2x1000.yaml   # a path, relative to the suite file
      - path: mf_mnist_mlp_2x1000.yaml
        overrides: {epochs: 5}     # per-entry overrides
      - {algorithm: bp, model: "mlp:1x64", epochs: 2}   # an inline config
    slurm: {partition: gpu, time_min: 120, gpus: 1}   # optional defaults for --executor slurm

Identity is the config key (``RunConfig.key()``, seed included). Before anything runs, the output
directory is scanned: a key with a result.json is skipped; a key with an interrupted run directory
(config.json, maybe checkpoint.pt, no result.json) is resumed in that directory; every other key
gets a fresh run directory. Every task is idempotent (it checks its directory again before it
trains), so a task that submitit requeues after a timeout resumes instead of starting over.
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from bpfree.config import RunConfig, apply_assignments, build_config, parse_seeds, read_yaml_mapping, run_label
from bpfree.errors import ConfigError, UserError
from bpfree.results import CHECKPOINT_FILE, CONFIG_FILE, RESULT_FILE, ensure_writable_dir, new_run_id

SUITE_KEYS = ("configs", "seeds", "overrides", "output", "slurm")
ENTRY_KEYS = ("path", "overrides")
EXECUTORS = ("local", "inline", "slurm", "submitit-local", "debug")
_SUBMITIT_CLUSTER = {"slurm": "slurm", "submitit-local": "local", "debug": "debug"}
LOCK_FILE = ".bpfree-suite.lock"


# -- suite files ---------------------------------------------------------------------------------
def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``; nested mappings (``params``) merge, everything else replaces."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _resolve_config_path(text: str, base: Path) -> Path:
    path = Path(text).expanduser()
    if path.is_absolute():
        return path
    beside = base / path
    return beside if beside.exists() or not path.exists() else path


@dataclass
class SuiteEntry:
    source: str  # where the config came from, for messages
    values: dict[str, Any]


@dataclass
class Suite:
    path: Path | None
    entries: list[SuiteEntry]
    seeds: list[int] | None
    output: Path | None
    slurm: dict[str, Any] = field(default_factory=dict)


def _seeds(value: Any, where: str) -> list[int] | None:
    if isinstance(value, str):  # a YAML text such as "0,1" is not a seed list
        raise UserError(f"{where}: 'seeds' must be a list of distinct integers >= 0 or a count, got {value!r}")
    return parse_seeds(value, f"{where}: 'seeds'")


def load_suite(path: Path) -> Suite:
    """Read and check a suite file; every problem is one UserError line naming the file and entry."""
    from bpfree.configs import resolve

    path = resolve(path)
    where = f"suite file {path}"
    if not path.is_file():
        raise UserError(f"{where}: not found")
    try:
        data = read_yaml_mapping(path)
    except ConfigError as exc:
        raise UserError(str(exc).replace(f"config file {path}", where, 1)) from None
    unknown = sorted(set(data) - set(SUITE_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(SUITE_KEYS)}")
    configs = data.get("configs")
    if not isinstance(configs, list) or not configs:
        raise UserError(f"{where}: 'configs' must be a non-empty list of config paths or inline configs")
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise UserError(f"{where}: 'overrides' must be a mapping of field: value")
    slurm = data.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise UserError(f"{where}: 'slurm' must be a mapping (partition, account, gpus, time_min, cpus, mem_gb)")
    output = data.get("output")
    if output is not None and not isinstance(output, str):
        raise UserError(f"{where}: 'output' must be a path")
    entries = []
    for i, item in enumerate(configs):
        label = f"{where}: configs[{i}]"
        entry_overrides: dict[str, Any] = {}
        if isinstance(item, dict) and "path" in item:
            extra = sorted(set(item) - set(ENTRY_KEYS))
            if extra:
                raise UserError(f"{label}: unknown key(s) {', '.join(map(repr, extra))} beside 'path'; allowed: {', '.join(ENTRY_KEYS)}")
            entry_overrides = item.get("overrides") or {}
            if not isinstance(entry_overrides, dict):
                raise UserError(f"{label}: 'overrides' must be a mapping")
            item = item["path"]
        if isinstance(item, str):
            config_path = _resolve_config_path(item, path.parent)
            if not config_path.is_file():
                raise UserError(f"{label}: config file {item} not found (looked in {path.parent} and the current directory)")
            try:
                values = read_yaml_mapping(config_path)
            except ConfigError as exc:
                raise UserError(f"{label}: {exc}") from None
            source = str(config_path)
        elif isinstance(item, dict):
            values, source = dict(item), f"{path.name} configs[{i}] (inline)"
        else:
            raise UserError(f"{label}: expected a config path or an inline config mapping, got {type(item).__name__}")
        entries.append(SuiteEntry(source, deep_merge(deep_merge(values, overrides), entry_overrides)))
    return Suite(path, entries, _seeds(data.get("seeds"), where), Path(output) if output else None, slurm)


def expand(
    entries: Sequence[SuiteEntry],
    seeds: Sequence[int] | None,
    output: Path,
    assignments: Sequence[str] = (),
) -> list[RunConfig]:
    """Configs x seeds as validated RunConfigs writing to ``output``; duplicates (same key) dropped."""
    configs: list[RunConfig] = []
    seen: set[str] = set()
    for entry in entries:
        values = apply_assignments(entry.values, assignments)
        for seed in seeds if seeds is not None else [values.get("seed", 0)]:
            cfg = build_config({**values, "seed": seed, "output": str(output)}, source=entry.source)
            if cfg.key() not in seen:
                seen.add(cfg.key())
                configs.append(cfg)
    return configs


# -- planning ------------------------------------------------------------------------------------
@dataclass
class Task:
    key: str
    label: str
    config: dict[str, Any]
    run_dir: Path
    action: str  # "new" | "resume"


@dataclass
class Plan:
    output: Path
    tasks: list[Task]
    skipped: list[tuple[RunConfig, Path]]  # already complete: (config, its run directory)

    @property
    def total(self) -> int:
        return len(self.tasks) + len(self.skipped)


label = run_label


def scan_output(output: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """(key -> completed run dir, key -> interrupted run dir) for the run directories in ``output``."""
    from bpfree.runner import load_run_config

    done: dict[str, Path] = {}
    interrupted: dict[str, Path] = {}
    if not Path(output).is_dir():
        return done, interrupted
    for run_dir in sorted(p for p in Path(output).iterdir() if p.is_dir()):
        result_path = run_dir / RESULT_FILE
        if result_path.is_file():
            try:
                key = json.loads(result_path.read_text()).get("config_key")
            except (OSError, json.JSONDecodeError, AttributeError):
                continue
            if key:
                done.setdefault(key, run_dir)
            continue
        if not (run_dir / CONFIG_FILE).is_file():
            continue
        try:
            key = load_run_config(run_dir).key()
        except UserError:
            continue  # not ours to judge (e.g. an algorithm no longer registered): leave it alone
        previous = interrupted.get(key)
        if previous is None or _progress_mtime(run_dir) > _progress_mtime(previous):
            interrupted[key] = run_dir
    return done, interrupted


def _progress_mtime(run_dir: Path) -> tuple[bool, float]:
    """Which of two interrupted attempts at one run to continue: one with a checkpoint, the newest."""
    checkpoint = run_dir / CHECKPOINT_FILE
    if checkpoint.exists():
        return True, checkpoint.stat().st_mtime
    return False, (run_dir / CONFIG_FILE).stat().st_mtime


def make_plan(configs: Sequence[RunConfig], output: Path) -> Plan:
    output = Path(output)
    done, interrupted = scan_output(output)
    tasks, skipped = [], []
    for cfg in configs:
        key = cfg.key()
        if key in done:
            skipped.append((cfg, done[key]))
        elif key in interrupted:
            tasks.append(Task(key, label(cfg), cfg.model_dump(mode="json"), interrupted[key], "resume"))
        else:
            tasks.append(Task(key, label(cfg), cfg.model_dump(mode="json"), output / new_run_id(cfg), "new"))
    return Plan(output, tasks, skipped)


# -- one task (runs in a worker process, a Slurm job, or in-process) ------------------------------
def run_task(config: dict[str, Any], run_dir: str, threads: int | None = None) -> dict[str, Any]:
    """Train one run to completion in ``run_dir``: skip if complete, resume if started, else start.

    Never raises for a failed run: the failure comes back as ``{"ok": False, "error": ...}`` so one
    bad configuration does not stop the others (and submitit's debug executor opens no debugger).
    """
    path = Path(run_dir)
    try:
        if threads:
            import torch

            torch.set_num_threads(threads)
        from bpfree import runner

        if (path / RESULT_FILE).is_file():
            result = json.loads((path / RESULT_FILE).read_text())
            action = "already complete"
        elif (path / CONFIG_FILE).is_file():
            _, result = runner.resume(path)
            action = "resumed"
        else:
            _, result = runner.execute(build_config(config), run_dir=path)
            action = "new"
        return {
            "ok": True,
            "action": action,
            "run_dir": str(path),
            "run_id": result.get("run_id"),
            "status": result.get("status"),
            "test_accuracy": result.get("test_accuracy"),
            "train_time_s": result.get("train_time_s"),
        }
    except Exception as exc:  # noqa: BLE001 - reported per run, never silently
        message = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        return {"ok": False, "run_dir": str(path), "error": message.splitlines()[0] if message else type(exc).__name__}


class SubmititRun(submitit.helpers.Checkpointable):
    """A run as a submitit job; on timeout or preemption it is requeued and resumes its checkpoint."""

    def __call__(self, config: dict[str, Any], run_dir: str, threads: int | None = None) -> dict[str, Any]:
        return run_task(config, run_dir, threads)


# -- executors -----------------------------------------------------------------------------------
@dataclass
class SlurmOptions:
    partition: str | None = None
    account: str | None = None
    gpus: int | None = None
    time_min: int | None = None
    cpus: int | None = None
    mem_gb: float | None = None
    array_parallelism: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # any other slurm_* parameter

    @classmethod
    def from_mapping(cls, data: dict[str, Any], where: str = "slurm") -> SlurmOptions:
        known = {"partition", "account", "gpus", "time_min", "cpus", "mem_gb", "array_parallelism"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**kwargs, extra=extra)

    def merged(self, other: SlurmOptions) -> SlurmOptions:
        """``other``'s set values over this one's."""
        values = {k: getattr(other, k) if getattr(other, k) is not None else getattr(self, k)
                  for k in ("partition", "account", "gpus", "time_min", "cpus", "mem_gb", "array_parallelism")}
        return SlurmOptions(**values, extra={**self.extra, **other.extra})

    def parameters(self) -> dict[str, Any]:
        params = {
            "name": "bpfree",
            "timeout_min": self.time_min,
            "cpus_per_task": self.cpus,
            "mem_gb": self.mem_gb,
            "gpus_per_node": self.gpus,
            "slurm_partition": self.partition,
            "slurm_account": self.account,
            "slurm_array_parallelism": self.array_parallelism,
            **{f"slurm_{k}" if not k.startswith("slurm_") else k: v for k, v in self.extra.items()},
        }
        return {k: v for k, v in params.items() if v is not None}


@contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """One suite at a time per output directory, so no run is started twice."""
    handle = open(Path(output) / LOCK_FILE, "w")  # noqa: SIM115
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"output directory {output}: another bpfree suite or compare is running on it; wait for it or use another --output") from None
        yield
    finally:
        handle.close()


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


def _run_local(tasks: Sequence[Task], jobs: int, threads: int | None, on_done: Callback) -> None:
    """Each run in its own process (a fresh child per run), at most ``jobs`` at a time."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["bpfree.protocol.warm"])  # children fork from a warm server
    kwargs: dict[str, Any] = {"max_workers": max(1, jobs), "mp_context": context}
    if sys.version_info >= (3, 11):
        kwargs["max_tasks_per_child"] = 1
    threads = threads or _threads_per_run(jobs)
    with ProcessPoolExecutor(**kwargs) as pool:
        futures = {pool.submit(run_task, t.config, str(t.run_dir), threads): t for t in tasks}
        try:
            for future in as_completed(futures):
                task = futures[future]
                try:
                    outcome = future.result()
                except Exception as exc:  # noqa: BLE001 - a worker that died (killed, out of memory)
                    outcome = {"ok": False, "run_dir": str(task.run_dir), "error": f"worker process failed: {type(exc).__name__}: {exc}"}
                on_done(task, outcome)
        except BaseException:
            for future in futures:
                future.cancel()
            raise


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
        if executor == "inline":
            _run_inline(plan.tasks, threads, record)
        elif executor == "local":
            _run_local(plan.tasks, jobs, threads, record)
        else:
            job_ids = _run_submitit(plan.tasks, _SUBMITIT_CLUSTER[executor], plan.output, jobs, slurm or SlurmOptions(), wait, record)
    return SuiteOutcome(plan, outcomes, job_ids)


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
