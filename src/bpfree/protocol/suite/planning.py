"""Planning: which runs of a suite are complete (skipped), interrupted (resumed) or new.

Identity is the config key (``RunConfig.key()``, seed included). Before anything runs, the output
directory is scanned: a key with a result.json is skipped; a key with an interrupted run directory
(config.json, maybe checkpoint.pt, no result.json) is resumed in that directory; every other key
gets a fresh run directory.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bpfree.config import RunConfig, run_label
from bpfree.errors import UnreadableFile, UserError
from bpfree.fileio import atomic_write_json, load_json
from bpfree.protocol.suite.slurm import jobs_in_queue, read_job_markers
from bpfree.results import CHECKPOINT_FILE, CONFIG_FILE, RESULT_FILE, new_run_id


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
    # submitted earlier and still queued or running in Slurm: (config, run directory, job id)
    in_flight: list[tuple[RunConfig, Path, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.tasks) + len(self.skipped) + len(self.in_flight)


label = run_label

# What a suite or compare set out to run, written when it starts, so `bpfree status` can show the
# runs that have not started yet (from the files alone).
PLAN_FILE = ".bpfree-plan.json"


def write_plan(plan: Plan) -> None:
    """Record the plan's runs in its output directory (run directories by name, relative to it)."""
    atomic_write_json(Path(plan.output) / PLAN_FILE, {
        "written_at": time.time(),
        "tasks": [{"key": t.key, "label": t.label, "run_dir": t.run_dir.name, "action": t.action} for t in plan.tasks],
        "skipped": [{"key": cfg.key(), "label": label(cfg), "run_dir": path.name} for cfg, path in plan.skipped],
        "in_flight": [{"key": cfg.key(), "label": label(cfg), "run_dir": path.name, "job_id": job} for cfg, path, job in plan.in_flight],
    })


def read_plan(output: Path) -> list[dict[str, str]]:
    """The planned runs of the last suite or compare in ``output`` (label, run_dir name); empty if none."""
    try:
        data = load_json(Path(output) / PLAN_FILE)
    except UnreadableFile:
        return []
    runs = []
    for part in ("tasks", "skipped", "in_flight"):
        for item in data.get(part) or []:
            if isinstance(item, dict) and isinstance(item.get("run_dir"), str) and isinstance(item.get("label"), str):
                name = Path(item["run_dir"]).name  # a name inside output, never a path elsewhere
                if name and name not in (".", ".."):
                    runs.append({"label": item["label"], "run_dir": name})
    return runs


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
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
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
    """Complete runs are skipped, runs whose Slurm job is still queued or running are left to it,
    interrupted runs resume in their directory, and the rest start (in the directory a finished
    job already created, if any)."""
    output = Path(output)
    done, interrupted = scan_output(output)
    submitted = {key: run for key, run in read_job_markers(output).items() if key not in done}
    queued = jobs_in_queue(run.job_id for run in submitted.values())
    tasks, skipped, in_flight = [], [], []
    for cfg in configs:
        key = cfg.key()
        job = submitted.get(key)
        if key in done:
            skipped.append((cfg, done[key]))
        elif job is not None and (queued is None or job.job_id in queued):
            in_flight.append((cfg, job.run_dir, job.job_id))  # unknown state (no squeue here): never submit twice
        elif key in interrupted:
            tasks.append(Task(key, label(cfg), cfg.model_dump(mode="json"), interrupted[key], "resume"))
        elif job is not None:
            tasks.append(Task(key, label(cfg), cfg.model_dump(mode="json"), job.run_dir, "new"))
        else:
            tasks.append(Task(key, label(cfg), cfg.model_dump(mode="json"), output / new_run_id(cfg), "new"))
    return Plan(output, tasks, skipped, in_flight)

