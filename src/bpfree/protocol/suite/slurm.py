"""Slurm job options, from the suite file's ``slurm:`` mapping and the command line, as submitit parameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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

