"""Slurm job options, from the suite file's ``slurm:`` mapping and the command line, as submitit parameters."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Written into a run directory when its job is submitted, so a second `suite --no-wait` before the
# job ends neither submits the run again nor starts a second run directory for it.
JOB_MARKER = ".slurm-job.json"
# squeue lists a job while it may still train: pending, running, requeued, suspended, ...
ENDED_STATES = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY"}


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



@dataclass(frozen=True)
class SubmittedRun:
    key: str
    run_dir: Path
    job_id: str


def write_job_marker(run_dir: Path, key: str, job_id: str) -> None:
    from bpfree.fileio import atomic_write_json

    atomic_write_json(Path(run_dir) / JOB_MARKER, {"config_key": key, "job_id": str(job_id)})


def read_job_markers(output: Path) -> dict[str, SubmittedRun]:
    """key -> the run submitted for it (the newest marker wins)."""
    found: dict[str, tuple[float, SubmittedRun]] = {}
    if not Path(output).is_dir():
        return {}
    for marker in Path(output).glob(f"*/{JOB_MARKER}"):
        try:
            data = json.loads(marker.read_text())
            key, job_id, mtime = str(data["config_key"]), str(data["job_id"]), marker.stat().st_mtime
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
            continue
        if key not in found or mtime > found[key][0]:
            found[key] = (mtime, SubmittedRun(key, marker.parent, job_id))
    return {key: run for key, (_, run) in found.items()}


def jobs_in_queue(job_ids: Iterable[str]) -> set[str] | None:
    """The given jobs (array tasks like ``12_3`` included) that Slurm still holds; None if squeue cannot tell."""
    ids = sorted(set(job_ids))
    if not ids:
        return set()
    squeue = shutil.which("squeue")
    if squeue is None:
        return None
    parents = sorted({job.split("_", 1)[0] for job in ids})
    try:
        proc = subprocess.run(
            [squeue, "-h", "-r", "-o", "%i %T", "-j", ",".join(parents)], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        # squeue fails for job ids it no longer knows: every one of them has ended.
        return set() if "Invalid job id" in proc.stderr else None
    queued = set()
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].upper() not in ENDED_STATES:
            queued.add(parts[0])
    return {job for job in ids if job in queued}
